"""Python workers: throughput and latency of a GIL-bound python model with workers = 1 and workers = 2.

    PYTHONPATH=. python bench/python_workers.py [--rows 64] [--target-ms 3] [--clients 2x2]
                                                [--duration 20] [--rounds 2] [--quick] [--out FILE]

The model (written into a temp dir) is pure-Python arithmetic in a loop over the rows: it holds the
GIL for its whole predict, so within one process requests cannot overlap, and only more worker
processes add throughput. Its loop count is calibrated here, in process, so one predict takes
about ``--target-ms``. For each setting a real server process (``python -m iskander``, this tree)
serves the model over Flight; a closed loop of P x S concurrent clients (``--clients P x S``: P
spawned load-generator processes with S kept-open DoExchange streams each, bench/loadgen.py) sends
``--rows``-row batches back to back for ``--duration`` s after a warm-up. Settings run in ABBA
order over ``--rounds`` (w1 w2 w2 w1 ...) so drift on a shared machine hits both alike; the
report takes the median of the rounds per setting. Also recorded: CPU time per request of the
server process and of its workers, apart (from /proc), and the load average.

Ratios printed: workers=2 throughput / workers=1 throughput (the ideal is 2.0 with spare cores:
the server's own process, the workers and the clients all need CPU, so a 2-vCPU machine cannot
show it), and p50 / p99 latency workers=2 / workers=1.

Results: bench/results/<date>/python_workers-<time>[-quick].json. ``--quick`` (1 round, 3 s, small
warm-up) only proves the chain works; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(ROOT), str(BENCH)]  # this tree's iskander, and the harness modules beside this file
# the server process imports the same tree (its workers inherit the path from the server)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from iskander.launch import spawn_server  # noqa: E402
from loadgen import LoadSpec, run_load  # noqa: E402
from workloads import PYTHON_MODELS, Workload  # noqa: E402

MODEL_NAME = "gil_loop"

MODEL = '''
import pyarrow as pa


class Model:
    """Pure-Python arithmetic per row: holds the GIL for the whole predict."""

    def load(self, context):
        self.iters = int(context.parameters["iters"])

    def predict(self, batch):
        out = []
        for x in batch.column("x").to_pylist():
            acc = x
            for _ in range(self.iters):
                acc = acc * 0.5 + 0.25 * (acc if acc > 0.0 else -acc) + 1e-3
            out.append(acc)
        return pa.RecordBatch.from_arrays([pa.array(out, pa.float32())], names=["score"])
'''


def load_model(folder: Path):  # type: ignore[no-untyped-def]
    ns: dict = {}
    exec(compile(textwrap.dedent(MODEL), str(folder / f"{MODEL_NAME}.py"), "exec"), ns)
    return ns["Model"]()


def predict_ms(model, batch: pa.RecordBatch, calls: int = 30) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        model.predict(batch)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def calibrate(folder: Path, batch: pa.RecordBatch, target_ms: float) -> tuple[int, float]:
    """Loop count giving about ``target_ms`` per predict of ``batch`` here, and the time measured."""
    model = load_model(folder)
    iters = 50
    for _ in range(4):
        model.iters = iters
        took = predict_ms(model, batch)
        iters = max(1, round(iters * target_ms / took))
    model.iters = iters
    return iters, predict_ms(model, batch)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """utime + stime of the server ``pid`` and of its live children (the workers), from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    server = workers = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        used = (int(fields[11]) + int(fields[12])) / tick
        if int(entry.name) == pid:
            server += used
        elif int(fields[1]) == pid:
            workers += used
    return server, workers


def write_model(folder: Path, workers: int, iters: int) -> Path:
    (folder / f"{MODEL_NAME}.py").write_text(textwrap.dedent(MODEL))
    (folder / f"{MODEL_NAME}.manifest.toml").write_text(PYTHON_MODELS[MODEL_NAME].manifest_toml())
    config = folder / f"workers{workers}.toml"
    config.write_text(
        f'[[models]]\nname = "{MODEL_NAME}"\nbackend = "python"\npath = "{folder / MODEL_NAME}.py"\n'
        f"workers = {workers}\nparameters = {{ iters = {iters} }}\n"
    )
    return config


def one_run(folder: Path, workers: int, iters: int, args: argparse.Namespace) -> dict:
    config = write_model(folder, workers, iters)
    server = spawn_server(config, folder / f"server-w{workers}.log")
    try:
        procs, slots = args.procs, args.slots
        spec = LoadSpec(
            client="flight_kept", endpoint={"flight_uri": server.flight_uri}, model=MODEL_NAME, batch=args.rows,
            mode="closed", duration_s=args.duration, workers=procs, slots=slots, warmup=args.warmup,
            labels={"workers": workers},
        )
        cpu = [(0.0, 0.0)]

        def started(t0: float) -> None:
            cpu[0] = cpu_seconds(server.process.pid)

        result = run_load(spec, on_start=started)
        end = cpu_seconds(server.process.pid)  # the workers are alive until the server stops
    finally:
        server.stop()
    result.pop("histogram", None)
    ok = max(result["ok"], 1)
    result["server_cpu_ms_per_request"] = (end[0] - cpu[0][0]) * 1e3 / ok  # Flight, core, worker wire
    result["workers_cpu_ms_per_request"] = (end[1] - cpu[0][1]) * 1e3 / ok  # predict and the worker's wire
    result["loadavg"] = os.getloadavg()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=64, help="rows per request")
    parser.add_argument("--target-ms", type=float, default=3.0, help="predict time per request, calibrated in process")
    parser.add_argument("--clients", default="2x2", help="P x S: load-generator processes x streams each")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per run")
    parser.add_argument("--warmup", type=int, default=20, help="requests per stream before the clock starts")
    parser.add_argument("--rounds", type=int, default=2, help="ABBA rounds: each round runs workers=1 and =2")
    parser.add_argument("--quick", action="store_true", help="1 round, 3 s, 5 warm-up requests: a smoke run")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration, args.warmup = 1, 3.0, 5
    args.procs, args.slots = (int(v) for v in args.clients.lower().split("x"))

    batch = Workload(MODEL_NAME, args.rows).arrow_batch()
    runs: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="iskander-python-workers-") as tmp:
        folder = Path(tmp)
        iters, took = calibrate(folder, batch, args.target_ms)
        print(f"model: {args.rows} rows, {iters} loop iterations a row, predict in process {took:.2f} ms (median)")
        order: list[int] = []
        for rnd in range(args.rounds):
            order += [1, 2] if rnd % 2 == 0 else [2, 1]
        for workers in order:
            r = one_run(folder, workers, iters, args)
            runs.append(r)
            lat = r["latency"]
            print(f"workers={workers}: {r['achieved_rps']:8.1f} req/s  p50 {lat['p50_us'] / 1e3:7.2f} ms  "
                  f"p99 {lat['p99_us'] / 1e3:7.2f} ms  errors {r['error_count']}  "
                  f"cpu/req server {r['server_cpu_ms_per_request']:.2f} ms workers {r['workers_cpu_ms_per_request']:.2f} ms  "
                  f"load {r['loadavg'][0]:.2f}")

    def med(workers: int, key: str) -> float:
        values = [r["achieved_rps"] if key == "rps" else r["latency"][key]
                  for r in runs if r["workers"] == workers]
        return statistics.median(values)

    summary = {
        f"workers{w}": {"achieved_rps": med(w, "rps"), "p50_us": med(w, "p50_us"), "p99_us": med(w, "p99_us")}
        for w in (1, 2)
    }
    ratios = {
        "throughput_w2_over_w1": summary["workers2"]["achieved_rps"] / summary["workers1"]["achieved_rps"],
        "p50_w2_over_w1": summary["workers2"]["p50_us"] / summary["workers1"]["p50_us"],
        "p99_w2_over_w1": summary["workers2"]["p99_us"] / summary["workers1"]["p99_us"],
    }
    print(f"throughput workers=2 / workers=1: {ratios['throughput_w2_over_w1']:.2f}x   "
          f"p50 {ratios['p50_w2_over_w1']:.2f}x   p99 {ratios['p99_w2_over_w1']:.2f}x   "
          f"(median of {args.rounds} round(s); {os.cpu_count()} cpus)")
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "pyarrow": pa.__version__,
                    "numpy": np.__version__},
        "model": {"rows": args.rows, "iters": iters, "predict_in_process_ms": took, "target_ms": args.target_ms},
        "load": {"clients": f"{args.procs}x{args.slots}", "transport": "flight_kept", "duration_s": args.duration,
                 "warmup_per_stream": args.warmup, "rounds": args.rounds, "order": order},
        "summary": summary, "ratios": ratios, "runs": runs,
    }
    now = dt.datetime.now()
    out = args.out or (BENCH / "results" / now.date().isoformat()
                       / f"python_workers-{now:%H%M%S}{'-quick' if args.quick else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
