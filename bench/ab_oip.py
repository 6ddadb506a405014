"""A/B of two Iskander source trees on OIP ModelInfer, both servers up at once so machine noise hits
both alike: p50 of one sequential client (alternating blocks of requests), then closed-loop throughput
(2 processes x 4 tritonclient threads, alternating synchronized windows). two_tower, batch 128.

    python bench/ab_oip.py --old /tmp/oip-base --new . [--blocks 10] [--windows 12]

Make the old tree with e.g. `mkdir /tmp/oip-base && git archive <commit> | tar -x -C /tmp/oip-base`.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

WINDOW_S = 2.0
MODEL = "two_tower"


def spawn(tree: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """`python -m iskander` from ``tree`` (its own package), demo config, free ports."""
    from iskander.launch import READY

    proc = subprocess.Popen([sys.executable, "-m", "iskander", "--flight-port", "0", "--grpc-port", "0"], cwd=tree,
                            stdout=subprocess.PIPE, stderr=open(log, "w"), text=True,
                            env={**os.environ, "PYTHONPATH": str(tree)})
    assert proc.stdout is not None
    for line in proc.stdout:
        m = READY.match(line.strip())
        if m:
            return proc, m.group("grpc")
    raise RuntimeError(f"server in {tree} did not start: {log.read_text()}")


def inputs(n: int = 128):  # type: ignore[no-untyped-def]
    import tritonclient.grpc as triton

    rng = np.random.default_rng(0)
    out = []
    for name, data, dtype in (("user_id", np.array([[f"u{i}".encode()] for i in range(n)], dtype=object), "BYTES"),
                              ("item_id", np.array([[f"i{i}".encode()] for i in range(n)], dtype=object), "BYTES"),
                              ("user_features", rng.standard_normal((n, 16)).astype(np.float32), "FP32"),
                              ("item_features", rng.standard_normal((n, 16)).astype(np.float32), "FP32")):
        t = triton.InferInput(name, list(data.shape), dtype)
        t.set_data_from_numpy(data)
        out.append(t)
    return out


def p50(urls: dict[str, str], blocks: int) -> dict[str, np.ndarray]:
    import tritonclient.grpc as triton

    feed = inputs()
    clients = {k: triton.InferenceServerClient(u) for k, u in urls.items()}
    for c in clients.values():
        for _ in range(300):
            c.infer(MODEL, feed)
    lat: dict[str, list[int]] = {k: [] for k in urls}
    for b in range(blocks):
        for k in (("old", "new") if b % 2 == 0 else ("new", "old")):
            for _ in range(200):
                t0 = time.perf_counter_ns()
                clients[k].infer(MODEL, feed)
                lat[k].append(time.perf_counter_ns() - t0)
    return {k: np.array(v) / 1000 for k, v in lat.items()}


def _tput_worker(urls: dict[str, str], start: float, windows: int, q) -> None:  # type: ignore[no-untyped-def]
    import tritonclient.grpc as triton

    counts = {k: 0 for k in urls}
    lock = threading.Lock()

    def run() -> None:
        clients = {k: triton.InferenceServerClient(u) for k, u in urls.items()}
        feed = inputs()
        for c in clients.values():
            for _ in range(20):
                c.infer(MODEL, feed)
        while time.time() < start:
            time.sleep(0.001)
        for w in range(windows):
            k = ("old", "new")[w % 2] if (w // 2) % 2 == 0 else ("new", "old")[w % 2]  # ABBA order
            end = start + (w + 1) * WINDOW_S
            m = 0
            while time.time() < end:
                clients[k].infer(MODEL, feed)
                m += 1
            with lock:
                counts[k] += m

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.put(counts)


def throughput(urls: dict[str, str], windows: int) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    start = time.time() + 8
    procs = [ctx.Process(target=_tput_worker, args=(urls, start, windows, q)) for _ in range(2)]
    for p in procs:
        p.start()
    totals = {k: 0 for k in urls}
    for _ in procs:
        for k, v in q.get(timeout=windows * WINDOW_S + 120).items():
            totals[k] += v
    for p in procs:
        p.join()
    return {k: v / (windows / 2 * WINDOW_S) for k, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, default=Path("."))
    parser.add_argument("--blocks", type=int, default=10)
    parser.add_argument("--windows", type=int, default=12)
    args = parser.parse_args()
    from iskander.launch import stop_process

    logs = Path(os.environ.get("TMPDIR", "/tmp"))
    servers = {k: spawn(tree.resolve(), logs / f"ab_oip_{k}.log") for k, tree in (("old", args.old), ("new", args.new))}
    urls = {k: url for k, (_, url) in servers.items()}
    try:
        lat = p50(urls, args.blocks)
        tput = throughput(urls, args.windows)
    finally:
        for proc, _ in servers.values():
            stop_process(proc)
    for k in ("old", "new"):
        a = lat[k]
        print(f"{k}: p50 {np.percentile(a, 50):.0f} us  p90 {np.percentile(a, 90):.0f} us  "
              f"throughput {tput[k]:.0f} req/s")
    print(f"new/old: p50 {np.percentile(lat['new'], 50) / np.percentile(lat['old'], 50):.3f}  "
          f"throughput {tput['new'] / tput['old']:.3f}")


if __name__ == "__main__":
    main()
