"""Throughput of Ray Data and Spark over Iskander beside `python -m iskander score` (docs/scale-out.md).

    python bench/scale_out.py [--rows 2000000] [--model tabular|two_tower] [--workers 1,2]
                              [--engines ray,spark] [--modes remote,embedded] [--quick] [--out FILE]

One hive-partitioned Parquet dataset (days x regions, as in docs/etl.md) is scored end to end,
Parquet in and Parquet out, by:

- ``score``: ``python -m iskander score`` against a demo server process (the baseline; its own
  reported time, so interpreter start-up is not counted), with ``--concurrency`` 1 and 2;
- Ray Data: ``iskander.integrations.ray.predict`` then ``write_parquet``, remote (the same
  server) and embedded (``config=``, the model in each actor), with 1 and 2 actors;
- Spark: ``iskander.integrations.spark.predict`` then ``write.parquet``, remote and embedded, with
  the input coalesced to 1 and 2 partitions (that many concurrent tasks).

Cluster start-up (``ray.init``, the Spark session) is not timed; actor start-up and model loading
are, since a job pays them. Each configuration runs ``--warmup`` times unmeasured (the first job
of a Spark session or Ray cluster pays JVM and worker-process warm-up: 18 s against 3 s for the
same job here), then ``--repeat`` times (median kept). Printed and
written as JSON (default ``bench/results/<date>/scale_out_<model>.json``): rows/s of each, and its
ratio to ``score`` at concurrency 1 measured in the same run. Numbers move 20-40% run to run on a
shared 2-vCPU machine: read only the ratios, from a quiet machine.

``--quick`` (20,000 rows, one repeat after one warm-up, 1 worker) only proves the harness works.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from iskander.config.settings import default_config_path  # noqa: E402
from iskander.launch import spawn_server  # noqa: E402

SCORED = re.compile(r"scored ([\d,]+) rows .* in ([\d.]+) s")


def make_dataset(root: Path, model: str, rows: int, files: int) -> int:
    """``files`` Parquet files under day=/region= folders; returns the row count."""
    rng = np.random.default_rng(0)
    per_file = max(1, rows // files)
    layout = [(f"2024-05-{d + 1:02d}", region) for d in range(max(1, files // 2)) for region in ("eu", "us")][:files]
    total = 0
    for i, (day, region) in enumerate(layout):
        n = per_file
        ids = pa.array([f"{region}-{day}-{j}" for j in range(n)])
        if model == "tabular":
            table = pa.table({
                "entity_id": ids,
                "features": pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(n * 4).astype(np.float32)), 4),
                "category": pa.array(rng.integers(0, 10, n)),
                "amount": pa.array(rng.gamma(2.0, 30.0, n)),
            })
        else:
            table = pa.table({
                "user_id": ids, "item_id": ids,
                "user_features": pa.FixedSizeListArray.from_arrays(
                    pa.array(rng.standard_normal(n * 16).astype(np.float32)), 16),
                "item_features": pa.FixedSizeListArray.from_arrays(
                    pa.array(rng.standard_normal(n * 16).astype(np.float32)), 16),
            })
        folder = root / f"day={day}" / f"region={region}"
        folder.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, folder / f"part-{i}.parquet", row_group_size=65_536)
        total += n
    return total


def run_score(server_uri: str, model: str, data: Path, out: Path, concurrency: int) -> float:
    shutil.rmtree(out, ignore_errors=True)
    result = subprocess.run(
        [sys.executable, "-m", "iskander", "score", "--server", server_uri, "--model", model, "--input", str(data),
         "--output", str(out), "--concurrency", str(concurrency)],
        capture_output=True, text=True, timeout=3600)
    if result.returncode != 0:
        raise RuntimeError(f"score failed: {result.stderr}")
    match = SCORED.search(result.stdout)
    if match is None:
        raise RuntimeError(f"unexpected score output: {result.stdout!r}")
    return float(match.group(2))


WARMUP = 1  # set from --warmup


def timed(fn, repeat: int) -> float:
    for _ in range(WARMUP):  # the first job of a session pays JVM/worker warm-up that no later job does
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_ray(args, model, data: Path, out: Path, server_uri: str, config: Path, rows: int) -> list[dict]:
    import ray
    import ray.data

    from iskander.integrations.ray import predict

    cpus = os.cpu_count() or 2
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    results = []
    try:
        for mode in args.modes:
            for workers in args.workers:
                kwargs = {"server": server_uri} if mode == "remote" else {"config": str(config)}
                if mode == "embedded":
                    # leave one CPU to the read and write tasks: the actors share the others
                    kwargs["num_cpus"] = min(1.0, max(0.1, (cpus - 1) / workers))

                def job() -> None:
                    shutil.rmtree(out, ignore_errors=True)
                    # one block per file: Ray would read a small dataset as one block, fed to one actor
                    ds = ray.data.read_parquet(str(data), override_num_blocks=args.files)
                    predict(ds, model, concurrency=workers, batch_size=args.batch_rows, **kwargs) \
                        .write_parquet(str(out))

                seconds = timed(job, args.repeat)
                results.append({"engine": "ray", "mode": mode, "workers": workers, "seconds": seconds,
                                "rows_per_s": rows / seconds, "num_cpus": kwargs.get("num_cpus")})
                print_row(results[-1])
    finally:
        ray.shutdown()
    return results


def bench_spark(args, model, data: Path, out: Path, server_uri: str, config: Path, rows: int) -> list[dict]:
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    from pyspark.sql import SparkSession

    from iskander.integrations.spark import predict

    cpus = os.cpu_count() or 2
    spark = (SparkSession.builder.master(f"local[{cpus}]").appName("iskander-bench")
             .config("spark.ui.enabled", "false").config("spark.sql.shuffle.partitions", str(cpus))
             .config("spark.driver.bindAddress", "127.0.0.1").config("spark.driver.host", "127.0.0.1")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    results = []
    try:
        for mode in args.modes:
            for workers in args.workers:
                kwargs = {"server": server_uri} if mode == "remote" else {"config": str(config)}

                def job() -> None:
                    df = spark.read.parquet(str(data)).coalesce(workers)
                    predict(df, model, batch_rows=args.batch_rows, **kwargs) \
                        .write.mode("overwrite").parquet(str(out))

                seconds = timed(job, args.repeat)
                results.append({"engine": "spark", "mode": mode, "workers": workers, "seconds": seconds,
                                "rows_per_s": rows / seconds})
                print_row(results[-1])
    finally:
        spark.stop()
    return results


def print_row(r: dict) -> None:
    print(f"  {r['engine']:6} {r['mode']:9} workers={r['workers']}  {r['seconds']:8.2f} s  "
          f"{r['rows_per_s']:>12,.0f} rows/s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--model", choices=("tabular", "two_tower"), default="tabular")
    parser.add_argument("--workers", default="1,2", help="actors (Ray), concurrent tasks (Spark), --concurrency (score)")
    parser.add_argument("--engines", default="ray,spark")
    parser.add_argument("--modes", default="remote,embedded")
    parser.add_argument("--batch-rows", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured runs of each configuration first")
    parser.add_argument("--quick", action="store_true", help="20,000 rows, 1 worker, 1 repeat: proves the harness")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    global WARMUP
    WARMUP = args.warmup
    if args.quick:
        args.rows, args.files, args.repeat, args.workers = 20_000, 4, 1, "1"
    args.workers = [int(w) for w in args.workers.split(",")]
    args.modes = args.modes.split(",")
    engines = args.engines.split(",")
    out_file = args.out or ROOT / "bench" / "results" / dt.date.today().isoformat() / f"scale_out_{args.model}.json"

    work = Path(tempfile.mkdtemp(prefix="iskander-scale-bench-"))
    config = default_config_path()
    server = spawn_server(config, work / "server.log")
    try:
        data = work / "events"
        rows = make_dataset(data, args.model, args.rows, args.files)
        print(f"{rows:,} rows of {args.model} in {args.files} Parquet files; load average "
              f"{os.getloadavg()[0]:.2f}; server {server.flight_uri}", flush=True)
        results = []
        for workers in args.workers:
            runs = [run_score(server.flight_uri, args.model, data, work / "score_out", workers)
                    for _ in range(WARMUP + args.repeat)]
            seconds = statistics.median(runs[WARMUP:])
            results.append({"engine": "score", "mode": "remote", "workers": workers, "seconds": seconds,
                            "rows_per_s": rows / seconds})
            print_row(results[-1])
        if "ray" in engines:
            results += bench_ray(args, args.model, data, work / "ray_out", server.flight_uri, config, rows)
        if "spark" in engines:
            results += bench_spark(args, args.model, data, work / "spark_out", server.flight_uri, config, rows)
        baseline = next(r for r in results if r["engine"] == "score" and r["workers"] == args.workers[0])
        print(f"\nratio to score (concurrency {baseline['workers']}) rows/s, measured in this run:")
        for r in results:
            r["ratio_vs_score"] = r["rows_per_s"] / baseline["rows_per_s"]
            print(f"  {r['engine']:6} {r['mode']:9} workers={r['workers']}  x{r['ratio_vs_score']:.2f}")
        report = {
            "model": args.model, "rows": rows, "files": args.files, "batch_rows": args.batch_rows,
            "repeat": args.repeat, "warmup": args.warmup, "quick": args.quick, "cpus": os.cpu_count(), "load_average": os.getloadavg(),
            "python": platform.python_version(), "baseline": "score, concurrency " + str(baseline["workers"]),
            "results": results,
        }
        out_file.parent.mkdir(parents=True, exist_ok=True)
        out_file.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out_file}")
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
