"""Per-request overhead of the python backend versus calling predict in process.

Runs PythonBackend directly (no server, no network): one worker, a trivial model (score = x * 2 on
b128 float32 [128, 16] + [128]), median of many calls each way. The difference is the worker
round trip: Arrow conversion, IPC serialization, two socket transfers, checks.

    PYTHONPATH=. python bench/python_worker_overhead.py [--rows 128] [--calls 2000]
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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.py"
        path.write_text(textwrap.dedent(MODEL))
        ins = (TensorSpec("x", pa.float32(), (None,), "float32"),
               TensorSpec("feats", pa.float32(), (None, 16), "fixed_size_list<float32>[16]"))
        outs = (TensorSpec("score", pa.float32(), (None,), "float32"),)
        backend = PythonBackend(ModelSettings(name="m", path=path, backend="python"), ins, outs)
        rng = np.random.default_rng(0)
        feeds = {"x": rng.random(args.rows, dtype=np.float32), "feats": rng.random((args.rows, 16), dtype=np.float32)}
        ns: dict = {}
        exec(compile(textwrap.dedent(MODEL), "m", "exec"), ns)
        model = ns["Model"]()
        batch = pa.RecordBatch.from_arrays(
            [pa.array(feeds["x"]), pa.FixedSizeListArray.from_arrays(pa.array(feeds["feats"].reshape(-1)), 16)],
            names=["x", "feats"])
        for _ in range(200):  # warm up both paths
            backend.run(["score"], feeds, "m")
            model.predict(batch)
        worker = median_us(lambda: backend.run(["score"], feeds, "m"), args.calls)
        direct = median_us(lambda: model.predict(batch), args.calls)
        backend.close()
    load = os.getloadavg()
    print(f"rows={args.rows} calls={args.calls} loadavg={load[0]:.2f},{load[1]:.2f},{load[2]:.2f} cpus={os.cpu_count()}")
    print(f"predict in process  median {direct:8.1f} us")
    print(f"through a worker    median {worker:8.1f} us")
    print(f"overhead per request       {worker - direct:8.1f} us")


if __name__ == "__main__":
    main()
