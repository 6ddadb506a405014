"""Per-request overhead of the python backend versus calling predict in process.

Runs PythonBackend directly (no server, no network): one worker, a trivial model (score = x * 2 on
float32 x [rows] + feats [rows, 16]), median of many calls each way. The difference is the worker
round trip: Arrow conversion, IPC serialization, the transfer each way, checks.

``--transport`` picks how batches cross: ``region`` (the default the server uses: written once
into the worker's shared-memory region, only a length on the socket), ``socket`` (the whole IPC
stream on the socketpair, as every batch larger than the region goes), or ``both``, alternated
over ``--rounds`` (ABAB) so machine noise hits both alike.

    PYTHONPATH=. python bench/python_worker_overhead.py [--rows 128] [--calls 2000] [--transport both --rounds 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from iskander.backends import worker_wire
from iskander.backends.base import TensorSpec
from iskander.backends.python_worker import PythonBackend
from iskander.config.settings import ModelSettings

MODEL = '''
import pyarrow as pa
import pyarrow.compute as pc


class Model:
    def predict(self, batch):
        return pa.RecordBatch.from_arrays([pc.multiply(batch.column("x"), pa.scalar(2.0, pa.float32()))], names=["score"])
'''


def median_us(fn, calls: int) -> float:
    times = []
    for _ in range(calls):
        t = time.perf_counter_ns()
        fn()
        times.append(time.perf_counter_ns() - t)
    return statistics.median(times) / 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--transport", choices=("region", "socket", "both"), default="region")
    ap.add_argument("--rounds", type=int, default=1, help="with --transport both: ABAB rounds")
    args = ap.parse_args()
    transports = ["region", "socket"] if args.transport == "both" else [args.transport]
    region_half = worker_wire.REGION_HALF_BYTES
    rng = np.random.default_rng(0)
    feeds = {"x": rng.random(args.rows, dtype=np.float32), "feats": rng.random((args.rows, 16), dtype=np.float32)}
    ns: dict = {}
    exec(compile(textwrap.dedent(MODEL), "m", "exec"), ns)
    model = ns["Model"]()
    batch = pa.RecordBatch.from_arrays(
        [pa.array(feeds["x"]), pa.FixedSizeListArray.from_arrays(pa.array(feeds["feats"].reshape(-1)), 16)],
        names=["x", "feats"])
    request_bytes = worker_wire.ipc_size(batch)
    answer_bytes = worker_wire.ipc_size(model.predict(batch))
    direct: list[float] = []
    through: dict[str, list[float]] = {t: [] for t in transports}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.py"
        path.write_text(textwrap.dedent(MODEL))
        ins = (TensorSpec("x", pa.float32(), (None,), "float32"),
               TensorSpec("feats", pa.float32(), (None, 16), "fixed_size_list<float32>[16]"))
        outs = (TensorSpec("score", pa.float32(), (None,), "float32"),)
        for _ in range(args.rounds if args.transport == "both" else 1):
            for transport in transports:
                # read when a worker starts: 0 means no region, every batch on the socket
                worker_wire.REGION_HALF_BYTES = region_half if transport == "region" else 0
                backend = PythonBackend(ModelSettings(name="m", path=path, backend="python"), ins, outs)
                try:
                    for _ in range(200):  # warm up both paths
                        backend.run(["score"], feeds, "m")
                        model.predict(batch)
                    through[transport].append(median_us(lambda: backend.run(["score"], feeds, "m"), args.calls))
                    direct.append(median_us(lambda: model.predict(batch), args.calls))
                finally:
                    backend.close()
    load = os.getloadavg()
    print(f"rows={args.rows} request {request_bytes} B answer {answer_bytes} B calls={args.calls} "
          f"loadavg={load[0]:.2f},{load[1]:.2f},{load[2]:.2f} cpus={os.cpu_count()}")
    floor = statistics.median(direct)
    print(f"predict in process      median {floor:8.1f} us")
    for transport, values in through.items():
        runs = ", ".join(f"{v:.1f}" for v in values)
        worker = statistics.median(values)
        print(f"through a worker ({transport:6}) median {worker:8.1f} us  overhead {worker - floor:8.1f} us"
              + (f"  (runs: {runs})" if len(values) > 1 else ""))


if __name__ == "__main__":
    main()
