"""Per-model-version inference statistics with Triton's semantics, shared by both frontends.

Counts and durations (ns) for success, fail, queue, compute_input, compute_infer and
compute_output; per-batch-size compute stats; inference_count (rows) vs execution_count (backend
runs); last inference time. Queue and the three compute counters grow with every successful
request that ran the model (together); execution_count and batch_stats grow once per execution,
which under dynamic batching serves several requests. One lock per model version.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import attrs


@attrs.define
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns

    def to_dict(self) -> dict[str, int]:
        return {"count": self.count, "ns": self.ns}


@attrs.define
class BatchStats:
    compute_input: Duration = attrs.Factory(Duration)
    compute_infer: Duration = attrs.Factory(Duration)
    compute_output: Duration = attrs.Factory(Duration)


@attrs.define
class Execution:
    """Timings of one backend execution, in ns (perf_counter_ns)."""

    queue_ns: int
    input_ns: int
    infer_ns: int
    output_ns: int
    rows: int  # rows of the execution (the merged batch under dynamic batching)
    new_execution: bool = True  # False for the 2nd..nth request of one batched execution


class ModelStats:
    def __init__(self, name: str, version: str) -> None:
        self.name = name
        self.version = version
        self._lock = threading.Lock()
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0
        self.batches: dict[int, BatchStats] = {}

    def record_success(self, total_ns: int, execution: Execution | None, rows: int) -> None:
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            self.success.add(total_ns)
            self.inference_count += rows
            self.last_inference_ms = now_ms
            if execution is not None:
                # per request, as Triton: each request of a batch is charged the batch's compute time
                self.queue.add(execution.queue_ns)
                self.compute_input.add(execution.input_ns)
                self.compute_infer.add(execution.infer_ns)
                self.compute_output.add(execution.output_ns)
                if not execution.new_execution:
                    return
                self.execution_count += 1
                batch = self.batches.get(execution.rows)
                if batch is None:
                    batch = self.batches[execution.rows] = BatchStats()
                batch.compute_input.add(execution.input_ns)
                batch.compute_infer.add(execution.infer_ns)
                batch.compute_output.add(execution.output_ns)

    def record_failure(self, total_ns: int) -> None:
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            self.fail.add(total_ns)
            self.last_inference_ms = now_ms

    def snapshot(self) -> dict[str, Any]:
        """A consistent copy, JSON-able; the shape mirrors Triton's ModelStatistics."""
        with self._lock:
            return {
                "name": self.name,
                "version": self.version,
                "last_inference": self.last_inference_ms,
                "inference_count": self.inference_count,
                "execution_count": self.execution_count,
                "inference_stats": {
                    "success": self.success.to_dict(),
                    "fail": self.fail.to_dict(),
                    "queue": self.queue.to_dict(),
                    "compute_input": self.compute_input.to_dict(),
                    "compute_infer": self.compute_infer.to_dict(),
                    "compute_output": self.compute_output.to_dict(),
                },
                "batch_stats": [
                    {
                        "batch_size": size,
                        "compute_input": b.compute_input.to_dict(),
                        "compute_infer": b.compute_infer.to_dict(),
                        "compute_output": b.compute_output.to_dict(),
                    }
                    for size, b in sorted(self.batches.items())
                ],
            }
