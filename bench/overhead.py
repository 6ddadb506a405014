"""Closed-loop overhead probe: one client, sequential requests, same model and batch on every path.

    python bench/overhead.py [--batch 128] [--requests 2000] [--variants off,metrics --rounds 3]
                             [--out bench/results/DATE/overhead_b128.json]

Paths: onnxruntime in process (the floor), Iskander Flight with one kept-open DoExchange stream,
Iskander Flight with a new stream per request, Iskander OIP v2 via tritonclient. Reports median,
p90, p99 per request and each path's median as a ratio to the in-process floor, measured in the
same run (these machines are shared and noisy: compare ratios, not absolute numbers).
This is not the open-loop load harness (no offered rate, no coordinated-omission control).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pyarrow.flight as flight
import tritonclient.grpc as triton

from iskander.launch import spawn_server
from iskander.config.loader import default_config_path

MODEL = "two_tower"


def make_batch(n: int) -> tuple[pa.RecordBatch, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    user = rng.standard_normal((n, 16)).astype(np.float32)
    item = rng.standard_normal((n, 16)).astype(np.float32)
    batch = pa.record_batch({
        "user_id": pa.array([f"u{i}" for i in range(n)]),
        "item_id": pa.array([f"i{i}" for i in range(n)]),
        "user_features": pa.FixedSizeListArray.from_arrays(pa.array(user.ravel()), 16),
        "item_features": pa.FixedSizeListArray.from_arrays(pa.array(item.ravel()), 16),
    })
    return batch, user, item


def measure(fn: Callable[[], object], requests: int, warmup: int) -> np.ndarray:
    for _ in range(warmup):
        fn()
    out = np.empty(requests)
    for i in range(requests):
        t0 = time.perf_counter_ns()
        fn()
        out[i] = time.perf_counter_ns() - t0
    return out / 1000.0  # microseconds


def summary(us: np.ndarray) -> dict[str, float]:
    return {
        "p50_us": float(np.percentile(us, 50)),
        "p90_us": float(np.percentile(us, 90)),
        "p99_us": float(np.percentile(us, 99)),
        "mean_us": float(us.mean()),
    }


def server_paths(batch: pa.RecordBatch, user: np.ndarray, item: np.ndarray, args: argparse.Namespace,
                 server_args: list[str], prefix: str, results: dict[str, dict[str, float]]) -> None:
    """The three client paths against one server process started with ``server_args``."""
    with tempfile.TemporaryDirectory() as tmp:
        # the demo config, same ORT settings
        server = spawn_server(None, Path(tmp) / "server.log", *server_args)
        try:
            fc = flight.connect(server.flight_uri)
            desc = flight.FlightDescriptor.for_path(MODEL)

            writer, reader = fc.do_exchange(desc)
            writer.begin(batch.schema)

            def kept_open() -> None:
                writer.write_batch(batch)
                reader.read_chunk()

            results[f"{prefix}flight_kept_open_stream"] = summary(measure(kept_open, args.requests, args.warmup))
            writer.done_writing()
            writer.close()

            def new_stream() -> None:
                w, r = fc.do_exchange(desc)
                w.begin(batch.schema)
                w.write_batch(batch)
                r.read_chunk()
                w.done_writing()
                w.close()

            results[f"{prefix}flight_new_stream"] = summary(measure(new_stream, args.requests, args.warmup))
            fc.close()

            tc = triton.InferenceServerClient(server.grpc_url)
            ids = np.array([s.encode() for s in batch.column("user_id").to_pylist()], dtype=np.object_).reshape(-1, 1)
            items = np.array([s.encode() for s in batch.column("item_id").to_pylist()], dtype=np.object_).reshape(-1, 1)
            inputs = []
            for name, data, dtype in (("user_id", ids, "BYTES"), ("item_id", items, "BYTES"),
                                      ("user_features", user, "FP32"), ("item_features", item, "FP32")):
                t = triton.InferInput(name, list(data.shape), dtype)
                t.set_data_from_numpy(data)
                inputs.append(t)
            results[f"{prefix}oip_tritonclient"] = summary(
                measure(lambda: tc.infer(MODEL, inputs), args.requests, args.warmup)
            )
            tc.close()
        finally:
            server.stop()



# Server observability variants: the overhead of metrics (--variants off,metrics) is measured, not assumed.
VARIANTS = {"off": [], "metrics": ["--metrics-port", "0"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--variants", default="off", help=f"server variants, comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--rounds", type=int, default=1, help="repeat the variants this many times, interleaved")
    args = parser.parse_args()

    batch, user, item = make_batch(args.batch)
    model_path = default_config_path().parent / "two_tower.onnx"
    results: dict[str, dict[str, float]] = {}

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
    feeds = {"user_features": user, "item_features": item}
    results["onnxruntime_in_process"] = summary(
        measure(lambda: session.run(["score", "user_embedding"], feeds), args.requests, args.warmup)
    )

    for rnd in range(args.rounds):  # interleaved: each variant sees the same machine noise
        for variant in args.variants.split(","):
            prefix = "" if variant == "off" else f"{variant}/"
            if args.rounds > 1:
                prefix = f"r{rnd}/{prefix}"
            server_paths(batch, user, item, args, VARIANTS[variant], prefix, results)

    floor = results["onnxruntime_in_process"]["p50_us"]
    for r in results.values():
        r["p50_ratio_to_onnxruntime"] = r["p50_us"] / floor
        r["p50_overhead_us"] = r["p50_us"] - floor
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                    "onnxruntime": ort.__version__, "pyarrow": pa.__version__},
        "model": MODEL, "batch": args.batch, "requests": args.requests, "warmup": args.warmup,
        "results": results,
    }
    print(f"{'path':28} {'p50 us':>9} {'p90 us':>9} {'p99 us':>9} {'x ORT':>7}")
    for name, r in results.items():
        print(f"{name:28} {r['p50_us']:9.0f} {r['p90_us']:9.0f} {r['p99_us']:9.0f} {r['p50_ratio_to_onnxruntime']:7.2f}")
    out = args.out or Path("bench/results") / dt.date.today().isoformat() / f"overhead_b{args.batch}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
