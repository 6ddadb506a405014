"""Soak: mixed valid and invalid traffic over both protocols for a fixed time.

    python bench/soak.py [--seconds 60] [--threads 6] [--invalid 0.3]

Starts Iskander with the demo models, then each thread loops until the time is up, sending a random
mix: valid Flight batches (one kept-open stream per thread), valid OIP requests, and invalid ones
of several kinds on both protocols. Every valid request must succeed and every invalid one must be
refused with a client-error status; anything else is counted as lost/unexpected. The server's RSS is
sampled every 0.5 s. Acceptance: zero lost valid requests, no unexpected statuses, flat RSS after
warm-up. Writes bench/results/<date>/soak.json and prints a summary.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import os
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from iskander.client.flight_status import error_details
from iskander.launch import spawn_server

CLIENT_ERRORS = ("INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED", "UNAVAILABLE")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def tabular_batch(n: int, rng: np.random.Generator) -> pa.RecordBatch:
    return pa.record_batch({
        "entity_id": pa.array([f"e{i}" for i in range(n)]),
        "features": pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(n * 4).astype(np.float32)), 4),
        "category": pa.array(rng.integers(0, 10, n)),
    })


INVALID_FLIGHT = {
    "missing_column": lambda b: b.drop_columns(["category"]),
    "wrong_type": lambda b: b.set_column(2, "category", pa.array(np.zeros(b.num_rows))),
    "nulls": lambda b: b.set_column(2, "category", pa.array([None] * b.num_rows, pa.int64())),
    "out_of_range_id": lambda b: b.set_column(2, "category", pa.array(np.full(b.num_rows, 999, np.int64))),
}


def oip_inputs(n: int, rng: np.random.Generator, kind: str | None = None):
    ids = np.array([[f"e{i}".encode()] for i in range(n)], dtype=np.object_)
    feats = rng.standard_normal((n, 4)).astype(np.float32)
    cats = rng.integers(0, 10, (n, 1))
    specs = [("entity_id", ids, "BYTES"), ("features", feats, "FP32"), ("category", cats, "INT64")]
    if kind == "wrong_datatype":
        specs[1] = ("features", feats.astype(np.float64), "FP64")
    elif kind == "wrong_shape":
        specs[1] = ("features", rng.standard_normal((n, 5)).astype(np.float32), "FP32")
    elif kind == "missing_input":
        specs = specs[:2]
    inputs = []
    for name, data, dtype in specs:
        t = triton.InferInput(name, list(data.shape), dtype)
        t.set_data_from_numpy(data)
        inputs.append(t)
    return inputs


def worker(server, seed: int, deadline: float, invalid_share: float, tally: collections.Counter,
           lock: threading.Lock) -> None:
    rng = np.random.default_rng(seed)
    pick = random.Random(seed)
    fc = flight.connect(server.flight_uri)
    tc = triton.InferenceServerClient(server.grpc_url)
    stream = None

    def count(key: str) -> None:
        with lock:
            tally[key] += 1

    while time.monotonic() < deadline:
        n = pick.choice([1, 8, 64, 256])
        invalid = pick.random() < invalid_share
        if pick.random() < 0.5:  # Flight
            batch = tabular_batch(n, rng)
            if invalid:
                kind = pick.choice(list(INVALID_FLIGHT))
                try:
                    w, r = fc.do_exchange(flight.FlightDescriptor.for_path("tabular"))
                    with w:
                        bad = INVALID_FLIGHT[kind](batch)
                        w.begin(bad.schema)
                        w.write_batch(bad)
                        r.read_chunk()
                    count(f"unexpected_accept:flight:{kind}")
                except pa.ArrowException as exc:
                    code = error_details(exc).get("code", "?")
                    count(f"refused:flight:{kind}:{code}" if code in CLIENT_ERRORS else f"unexpected:flight:{kind}:{code}")
                continue
            try:
                if stream is None:
                    w, r = fc.do_exchange(flight.FlightDescriptor.for_path("tabular"))
                    w.begin(batch.schema)
                    stream = (w, r)
                stream[0].write_batch(batch)
                out = stream[1].read_chunk().data
                count("ok:flight" if out.num_rows == n else "lost:flight:row_count")
            except Exception as exc:  # noqa: BLE001 - a lost valid request, whatever the reason
                count(f"lost:flight:{type(exc).__name__}")
                stream = None
        else:  # OIP
            kind = pick.choice(["wrong_datatype", "wrong_shape", "missing_input", "unknown_model"]) if invalid else None
            model = "nope" if kind == "unknown_model" else "tabular"
            try:
                result = tc.infer(model, oip_inputs(n, rng, kind if kind != "unknown_model" else None))
                if kind:
                    count(f"unexpected_accept:oip:{kind}")
                else:
                    count("ok:oip" if result.as_numpy("score").shape == (n, 1) else "lost:oip:shape")
            except InferenceServerException as exc:
                code = str(exc.status()).replace("StatusCode.", "")
                if kind:
                    count(f"refused:oip:{kind}:{code}" if code in CLIENT_ERRORS else f"unexpected:oip:{kind}:{code}")
                else:
                    count(f"lost:oip:{code}")
    if stream is not None:
        stream[0].done_writing()
        stream[0].close()
    fc.close()
    tc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--invalid", type=float, default=0.3, help="share of invalid requests")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    tally: collections.Counter = collections.Counter()
    lock = threading.Lock()
    rss: list[tuple[float, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = spawn_server(None, Path(tmp) / "server.log")
        try:
            pid = server.process.pid
            start = time.monotonic()
            deadline = start + args.seconds
            threads = [threading.Thread(target=worker, args=(server, i, deadline, args.invalid, tally, lock))
                       for i in range(args.threads)]
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                rss.append((round(time.monotonic() - start, 1), round(rss_mib(pid), 1)))
                time.sleep(0.5)
            for t in threads:
                t.join(timeout=30)
            internal_logged = server.log().count("internal error")
        finally:
            server.stop()
    valid_ok = tally["ok:flight"] + tally["ok:oip"]
    lost = {k: v for k, v in tally.items() if k.startswith(("lost", "unexpected"))}
    warm = [m for t, m in rss if t >= args.seconds * 0.2]
    report = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "seconds": args.seconds, "threads": args.threads, "invalid_share": args.invalid,
        "valid_ok": valid_ok, "refused_invalid": sum(v for k, v in tally.items() if k.startswith("refused")),
        "lost_or_unexpected": lost, "internal_errors_logged": internal_logged,
        "rss_mib_after_warmup": {"min": min(warm), "max": max(warm)} if warm else None,
        "rss_curve": rss, "tally": dict(sorted(tally.items())),
    }
    out = args.out or Path("bench/results") / dt.date.today().isoformat() / "soak.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{args.seconds:g} s, {args.threads} threads: {valid_ok} valid requests answered, "
          f"{report['refused_invalid']} invalid ones refused with client errors, lost/unexpected: {lost or 0}, "
          f"internal errors logged: {internal_logged}")
    if warm:
        print(f"RSS after warm-up: {min(warm):.1f}-{max(warm):.1f} MiB (start {rss[0][1]:.1f} MiB)")
    print(f"wrote {out}")
    if lost:
        raise SystemExit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
