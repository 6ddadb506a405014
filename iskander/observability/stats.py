"""Per-model-version inference statistics with Triton's semantics, shared by both frontends.

Counts and durations (ns) for success, fail, queue, compute_input, compute_infer and
compute_output; per-batch-size compute stats; inference_count (rows) vs execution_count (backend
runs); last inference time. Queue and the three compute counters grow with every successful
request that ran the model (together); execution_count and batch_stats grow once per execution,
which under dynamic batching serves several requests. One lock per model version.

These counters are the one source of truth: ModelStatistics (OIP), the Flight ``statistics``
action and the metrics (iskander/observability/metrics.py) all read them. Success, failure, inference and
execution counts are kept per protocol (the metrics' ``protocol`` label) and summed for the
Triton-shaped snapshot. When Prometheus metrics are on, the latency and batch-size histograms are
counted here too (a bisect per value under the lock already held: ~3 us a request, where
OpenTelemetry's Histogram.record costs ~15 us per value). When OTLP metrics are on, each request's
timings are also buffered for the OpenTelemetry histograms, which are fed off the request path.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
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
class ProtocolCounts:
    """What one protocol's requests did to one model version (cumulative)."""

    success: int = 0
    failures: dict[str, int] = attrs.Factory(dict)  # by error code
    inference_count: int = 0  # rows
    execution_count: int = 0  # backend runs started by this protocol's requests


@attrs.frozen
class Sample:
    """One successful request's timings, in ns, for the metrics' histograms."""

    protocol: str
    total_ns: int
    queue_ns: int
    input_ns: int
    infer_ns: int
    output_ns: int
    execution_rows: int  # rows of the backend run it started; 0 if it joined another's run or ran none


MAX_PENDING_SAMPLES = 100_000  # beyond this, undrained samples are dropped (OTLP histograms only)

# Histogram upper bounds (Prometheus `le`, inclusive): durations 25 us doubling to ~26 s, in ns;
# rows per execution 1 .. 65536.
DURATION_BOUNDS_NS = tuple(25_000 * 2**k for k in range(21))
BATCH_BOUNDS = tuple(2**k for k in range(17))
DURATIONS = ("request", "queue", "compute_input", "compute_infer", "compute_output")


@attrs.define
class Histogram:
    bounds: tuple[int, ...]
    counts: list[int]  # per bucket, not cumulative; the last one is above every bound
    total: int = 0  # sum of the observed values

    @classmethod
    def of(cls, bounds: tuple[int, ...]) -> Histogram:
        return cls(bounds, [0] * (len(bounds) + 1))

    def observe(self, value: int) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.total)


def _histograms() -> dict[str, Histogram]:
    hists = {name: Histogram.of(DURATION_BOUNDS_NS) for name in DURATIONS}
    hists["batch_size"] = Histogram.of(BATCH_BOUNDS)
    return hists


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
        self.protocols: dict[str, ProtocolCounts] = {}
        self.keep_histograms = False  # set by the metrics when Prometheus is on
        self._histograms: dict[str, dict[str, Histogram]] = {}  # protocol -> name -> histogram
        self.keep_samples = False  # set by the metrics when OTLP is on
        self._samples: list[Sample] = []

    def _protocol(self, protocol: str) -> ProtocolCounts:
        counts = self.protocols.get(protocol)
        if counts is None:
            counts = self.protocols[protocol] = ProtocolCounts()
        return counts

    def record_success(self, total_ns: int, execution: Execution | None, rows: int, protocol: str = "internal") -> None:
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            counts = self._protocol(protocol)
            counts.success += 1
            counts.inference_count += rows
            self.success.add(total_ns)
            self.inference_count += rows
            self.last_inference_ms = now_ms
            if self.keep_histograms:
                self._observe(protocol, total_ns, execution)
            if self.keep_samples:
                self._keep(protocol, total_ns, execution)
            if execution is not None:
                # per request, as Triton: each request of a batch is charged the batch's compute time
                self.queue.add(execution.queue_ns)
                self.compute_input.add(execution.input_ns)
                self.compute_infer.add(execution.infer_ns)
                self.compute_output.add(execution.output_ns)
                if not execution.new_execution:
                    return
                self.execution_count += 1
                counts.execution_count += 1
                batch = self.batches.get(execution.rows)
                if batch is None:
                    batch = self.batches[execution.rows] = BatchStats()
                batch.compute_input.add(execution.input_ns)
                batch.compute_infer.add(execution.infer_ns)
                batch.compute_output.add(execution.output_ns)

    def _observe(self, protocol: str, total_ns: int, execution: Execution | None) -> None:
        hists = self._histograms.get(protocol)
        if hists is None:
            hists = self._histograms[protocol] = _histograms()
        hists["request"].observe(total_ns)
        if execution is None:  # a zero-row request: nothing ran
            return
        hists["queue"].observe(execution.queue_ns)
        hists["compute_input"].observe(execution.input_ns)
        hists["compute_infer"].observe(execution.infer_ns)
        hists["compute_output"].observe(execution.output_ns)
        if execution.new_execution:
            hists["batch_size"].observe(execution.rows)

    def histograms(self) -> dict[str, dict[str, Histogram]]:
        """A consistent copy of the histograms, by protocol and name."""
        with self._lock:
            return {p: {n: h.copy() for n, h in hists.items()} for p, hists in self._histograms.items()}

    def _keep(self, protocol: str, total_ns: int, execution: Execution | None) -> None:
        if len(self._samples) >= MAX_PENDING_SAMPLES:
            return
        if execution is None:  # a zero-row request: nothing ran
            self._samples.append(Sample(protocol, total_ns, 0, 0, 0, 0, 0))
        else:
            self._samples.append(Sample(
                protocol, total_ns, execution.queue_ns, execution.input_ns, execution.infer_ns, execution.output_ns,
                execution.rows if execution.new_execution else 0,
            ))

    def record_failure(self, total_ns: int, protocol: str = "internal", code: str = "INTERNAL") -> None:
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            failures = self._protocol(protocol).failures
            failures[code] = failures.get(code, 0) + 1
            self.fail.add(total_ns)
            self.last_inference_ms = now_ms

    def take_samples(self) -> list[Sample]:
        """Hand the buffered samples to the metrics (and forget them)."""
        with self._lock:
            samples, self._samples = self._samples, []
        return samples

    def protocol_counts(self) -> dict[str, ProtocolCounts]:
        """A consistent copy of the per-protocol counters."""
        with self._lock:
            return {
                p: ProtocolCounts(c.success, dict(c.failures), c.inference_count, c.execution_count)
                for p, c in self.protocols.items()
            }

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
                # Iskander's addition (Flight action only): the per-protocol counters behind the metrics
                "protocols": {
                    p: {"success": c.success, "failures": dict(c.failures), "inference_count": c.inference_count,
                        "execution_count": c.execution_count}
                    for p, c in sorted(self.protocols.items())
                },
            }
