"""What validating a received record batch costs, in process (issue 12: the Flight edge validates
every DoExchange batch before anything reads it).

    python bench/validation_cost.py [--rows 128,1024,8192,65536,1048576] [--samples 21]
                                    [--out bench/results/DATE/validation_cost.md]

Two batch shapes: fixed-width columns (float32 fixed_size_list[16] + int64, the two-tower kind of
request) and a utf8 id column (~12 bytes a value). Each batch is written to Arrow IPC and read
back, so its buffers are laid out as a Flight server receives them. For each, the median over
``--samples`` samples of ``batch.validate()`` (cheap: lengths and buffer sizes, O(columns)) and
``batch.validate(full=True)`` (also offsets, UTF-8 and child data: O(rows) where those apply); a
sample times enough calls to last >= 2 ms, so the clock's resolution does not show. Prints a
Markdown table with the machine's load average before and after (shared machines: numbers move).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

DEFAULT_ROWS = (128, 1024, 8192, 65536, 1_048_576)
MIN_SAMPLE_S = 0.002


def fixed_width(rows: int, rng: np.random.Generator) -> pa.RecordBatch:
    values = pa.array(rng.random(rows * 16, dtype=np.float32))
    return pa.record_batch({
        "features": pa.FixedSizeListArray.from_arrays(values, 16),
        "item_id": pa.array(rng.integers(0, 1 << 40, rows, dtype=np.int64)),
    })


def strings(rows: int, rng: np.random.Generator) -> pa.RecordBatch:
    ids = [f"user-{n:07d}" for n in rng.integers(0, 10_000_000, rows)]
    return pa.record_batch({"entity_id": pa.array(ids, pa.string())})


SHAPES: dict[str, tuple[str, Callable[[int, np.random.Generator], pa.RecordBatch]]] = {
    "fixed": ("float32 fixed_size_list[16] + int64", fixed_width),
    "strings": ("utf8 ids (~12 B)", strings),
}


def as_received(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch after an IPC write and read: buffers are slices of one received body."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return pa.ipc.open_stream(sink.getvalue()).read_next_batch()


def per_call_s(call: Callable[[], object], samples: int) -> float:
    """Median seconds per call over ``samples`` samples of enough calls to last MIN_SAMPLE_S."""
    number = 1
    while True:  # calibrate
        start = time.perf_counter()
        for _ in range(number):
            call()
        if time.perf_counter() - start >= MIN_SAMPLE_S:
            break
        number *= 2
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        for _ in range(number):
            call()
        times.append((time.perf_counter() - start) / number)
    return statistics.median(times)


def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:.2f}" if us < 10 else f"{us:.1f}" if us < 1000 else f"{us:,.0f}"


def run(rows: list[int], samples: int, command: str) -> str:
    rng = np.random.default_rng(12)
    load_before = os.getloadavg()
    lines = [
        "| batch | rows | body bytes | validate() µs | ns/row | validate(full=True) µs | ns/row |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for shape, (label, make) in SHAPES.items():
        for n in rows:
            batch = as_received(make(n, rng))
            batch.validate(full=True)  # the data is valid: every timed call does the whole work
            cheap = per_call_s(batch.validate, samples)
            full = per_call_s(lambda: batch.validate(full=True), samples)
            lines.append(f"| {shape}: {label} | {n:,} | {batch.nbytes:,} | {fmt_us(cheap)} | {cheap / n * 1e9:.3g} "
                         f"| {fmt_us(full)} | {full / n * 1e9:.3g} |")
    load_after = os.getloadavg()
    head = [
        f"# RecordBatch.validate cost ({dt.date.today().isoformat()})",
        "",
        f"`{command}`: median of {samples} samples, each >= "
        f"{MIN_SAMPLE_S * 1000:.0f} ms of repeated calls, on a batch read back from Arrow IPC.",
        "",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.platform()}",
        f"- python {platform.python_version()}, pyarrow {pa.__version__}, numpy {np.__version__}",
        f"- load average (1/5/15 min) before: {' / '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {' / '.join(f'{x:.2f}' for x in load_after)}",
        "",
    ]
    return "\n".join(head + lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(str(r) for r in DEFAULT_ROWS))
    parser.add_argument("--samples", type=int, default=21)
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown here")
    args = parser.parse_args(argv)
    command = " ".join(["python bench/validation_cost.py", *(sys.argv[1:] if argv is None else argv)])
    text = run([int(r) for r in args.rows.split(",")], args.samples, command)
    sys.stdout.write(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
