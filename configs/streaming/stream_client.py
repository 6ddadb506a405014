"""Example D, streaming micro-batches: keep one Flight DoExchange stream open and score a stream of
small batches as they arrive (fraud / anomaly style), printing the latency of every batch.

    python configs/streaming/stream_client.py --server grpc://127.0.0.1:50051 --model churn \\
        --batches 50 --rows 32 --interval-ms 20

Serve the model first: python -m iskander --config configs/tabular-scoring.toml
One stream carries every batch: no per-batch connection or stream set-up, so each batch costs one
round trip. Rows whose score passes --threshold are flagged.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight


def synthetic_events(batches: int, rows: int, seed: int = 0) -> Iterator[pa.RecordBatch]:
    """Customer activity snapshots with the churn model's columns (see configs/tabular-scoring)."""
    rng = np.random.default_rng(seed)
    for b in range(batches):
        yield pa.record_batch({
            "entity_id": pa.array([f"c{b:04d}-{i:03d}" for i in range(rows)]),
            "tenure_months": pa.array(rng.gamma(2.0, 12.0, rows), pa.float64()),  # cast on the server
            "monthly_spend": pa.array(rng.normal(45.0, 15.0, rows), pa.float64()),
            "support_calls": pa.array(rng.poisson(1.5, rows), pa.int64()),
            "days_since_login": pa.array(rng.exponential(10.0, rows), pa.float32()),
            "discount_rate": pa.array(rng.uniform(0.0, 0.3, rows), pa.float32()),
            "devices": pa.array(rng.integers(1, 5, rows), pa.int64()),
        })


def score_stream(
    client: flight.FlightClient, model: str, batches: Iterable[pa.RecordBatch], interval_s: float = 0.0
) -> Iterator[tuple[pa.RecordBatch, pa.RecordBatch, float]]:
    """Yield (input, output, seconds) per batch, all on one DoExchange stream."""
    writer, reader = client.do_exchange(flight.FlightDescriptor.for_path(model))
    started = False
    try:
        for batch in batches:
            if not started:
                writer.begin(batch.schema)
                started = True
            t0 = time.perf_counter()
            writer.write_batch(batch)
            out = reader.read_chunk().data
            yield batch, out, time.perf_counter() - t0
            if interval_s:
                time.sleep(interval_s)
        writer.done_writing()
    finally:
        writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default="grpc://127.0.0.1:50051")
    parser.add_argument("--model", default="churn")
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--interval-ms", type=float, default=20.0, help="pause between batches")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    client = flight.connect(args.server)
    latencies = []
    rows = flagged_total = 0
    events = synthetic_events(args.batches, args.rows, args.seed)
    for i, (batch, out, seconds) in enumerate(score_stream(client, args.model, events, args.interval_ms / 1000)):
        scores = out.column("score").to_numpy()
        flagged = int((scores >= args.threshold).sum())
        latencies.append(seconds * 1000)
        rows += batch.num_rows
        flagged_total += flagged
        print(f"batch {i:4d}  rows {batch.num_rows:4d}  latency {seconds * 1000:7.2f} ms  "
              f"flagged {flagged:3d}  max score {scores.max():.3f}", flush=True)
    client.close()
    lat = np.array(latencies)
    print(f"{len(lat)} batches, {rows} rows, {flagged_total} flagged: latency p50 {np.percentile(lat, 50):.2f} ms, "
          f"p99 {np.percentile(lat, 99):.2f} ms, max {lat.max():.2f} ms")


if __name__ == "__main__":
    main()
