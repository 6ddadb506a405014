"""OpenTelemetry metrics over the per-model statistics, exported to Prometheus and/or OTLP.

Counters and gauges are observable instruments whose callbacks read ``ModelStats`` (the same
counters as ModelStatistics and the Flight ``statistics`` action), so they cannot disagree and cost
the request path nothing. Histograms cannot be observed, and OpenTelemetry's ``Histogram.record``
costs ~15 us per call on these machines (five per request); so requests leave their timings in
``ModelStats``' sample buffer, which a background thread drains into the histograms every
``DRAIN_INTERVAL_S`` (small bursts, off the request's critical path) and the first callback of each
collection drains once more. The SDK runs every observable callback before it reads the
synchronous instruments, so a scrape always includes every request finished before it began. docs/observability.md lists
each metric with its nearest Triton ``nv_inference_*`` equivalent.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING

from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricReader
from opentelemetry.sdk.resources import Resource

if TYPE_CHECKING:
    from .core import InferenceCore
    from .settings import ObservabilitySettings

log = logging.getLogger("iskander.metrics")

# Seconds: 25 us .. ~27 s, doubling (Triton's request latencies span the same range).
DURATION_BUCKETS = tuple(0.000025 * 2**k for k in range(21))
BATCH_BUCKETS = tuple(float(2**k) for k in range(17))  # 1 .. 65536 rows
DRAIN_INTERVAL_S = 0.2


class Metrics:
    """The instruments, bound to one core; ``start`` serves /metrics when a port is configured."""

    def __init__(self, core: InferenceCore, settings: ObservabilitySettings, resource: Resource) -> None:
        self.core = core
        self.settings = settings
        self._readers: list[MetricReader] = []
        self._http = None
        self.port: int | None = None
        if settings.metrics_port is not None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

            # Own registry: two servers in one process (tests) never share series.
            self.registry = CollectorRegistry()
            for collector in (ProcessCollector, PlatformCollector, GCCollector):
                collector(registry=self.registry)
            self._readers.append(PrometheusMetricReader(scope_info_enabled=False, registry=self.registry))
        if settings.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            self._readers.append(PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=settings.otlp_endpoint, insecure=settings.otlp_insecure),
                export_interval_millis=int(settings.otlp_metrics_interval_s * 1000),
            ))
        self.enabled = bool(self._readers)
        self._drain_lock = threading.Lock()
        self._stopping = threading.Event()
        self._drainer: threading.Thread | None = None
        if not self.enabled:
            return
        self.provider = MeterProvider(metric_readers=self._readers, resource=resource)
        meter = self.provider.get_meter("iskander")
        # Observed from the statistics (labels: model, version, protocol [, code]).
        meter.create_observable_counter(
            "iskander.inference.request.success", [self._success], unit="{request}",
            description="Successful inference requests (nv_inference_request_success).")
        meter.create_observable_counter(
            "iskander.inference.request.failure", [self._failure], unit="{request}",
            description="Failed inference requests by status code (nv_inference_request_failure).")
        meter.create_observable_counter(
            "iskander.inference.count", [self._rows], unit="{row}",
            description="Rows inferred: a batch of N rows counts N (nv_inference_count).")
        meter.create_observable_counter(
            "iskander.inference.exec.count", [self._executions], unit="{execution}",
            description="Backend (onnxruntime) executions; fewer than requests under dynamic batching "
                        "(nv_inference_exec_count).")
        meter.create_observable_gauge(
            "iskander.inference.inflight", [self._inflight], unit="{request}",
            description="Requests admitted and not finished: queued, running or being encoded.")
        meter.create_observable_gauge(
            "iskander.inference.queued", [self._queued], unit="{request}",
            description="Requests waiting in the dynamic-batching queue (nv_inference_pending_request_count).")
        meter.create_observable_gauge(
            "iskander.model.ready", [self._ready], unit="1",
            description="1 if the model version is READY to serve, else 0.")
        # Recorded from the sample buffers at collection time.
        self.request_duration = meter.create_histogram(
            "iskander.inference.request.duration", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            description="Whole successful request, received to answered (nv_inference_request_duration_us).")
        self.queue_duration = meter.create_histogram(
            "iskander.inference.queue.duration", unit="s", explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            description="Waiting for admission and the dynamic batcher (nv_inference_queue_duration_us).")
        self.input_duration = meter.create_histogram(
            "iskander.inference.compute.input.duration", unit="s",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            description="Decoding and validating inputs into tensors (nv_inference_compute_input_duration_us).")
        self.infer_duration = meter.create_histogram(
            "iskander.inference.compute.infer.duration", unit="s",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            description="onnxruntime run (nv_inference_compute_infer_duration_us).")
        self.output_duration = meter.create_histogram(
            "iskander.inference.compute.output.duration", unit="s",
            explicit_bucket_boundaries_advisory=DURATION_BUCKETS,
            description="Building the output batch from the tensors (nv_inference_compute_output_duration_us).")
        self.batch_size = meter.create_histogram(
            "iskander.inference.batch.size", unit="{row}", explicit_bucket_boundaries_advisory=BATCH_BUCKETS,
            description="Rows per backend execution (merged batch under dynamic batching).")
        # Calls that failed before reaching a model (unknown model, bad descriptor, ...).
        self.rpc_failures = meter.create_counter(
            "iskander.rpc.failure", unit="{call}",
            description="Calls that failed without reaching a model, by protocol, method and status code.")
        for entry in core.registry.all():
            if entry.stats is not None:
                entry.stats.keep_samples = True

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self, host: str) -> None:
        if not self.enabled:
            return
        self._drainer = threading.Thread(target=self._drain_loop, name="metrics-drain", daemon=True)
        self._drainer.start()
        if self.settings.metrics_port is None:
            return
        from prometheus_client import start_http_server

        bind = self.settings.metrics_host or host
        self._http, _ = start_http_server(self.settings.metrics_port, addr=bind, registry=self.registry)
        self.port = self._http.server_port
        log.info("Prometheus metrics on http://%s:%d/metrics", bind, self.port)

    def _drain_loop(self) -> None:
        while not self._stopping.wait(DRAIN_INTERVAL_S):
            try:
                self._drain()
            except Exception:  # noqa: BLE001 - metrics must never take the server down
                log.exception("draining metric samples failed")

    def stop(self) -> None:
        self._stopping.set()
        if self._drainer is not None:
            self._drainer.join(timeout=2)
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        if self.enabled:
            self.provider.shutdown()  # flushes a last OTLP export

    def rpc_failure(self, protocol: str, method: str, code: str) -> None:
        if self.enabled:
            self.rpc_failures.add(1, {"protocol": protocol, "method": method, "code": code})

    # --- callbacks --------------------------------------------------------------------------------

    def _entries(self) -> Iterable:
        return (e for e in self.core.registry.all() if e.stats is not None)

    def _drain(self) -> None:
        """Move buffered request timings into the histograms (runs at the start of a collection)."""
        with self._drain_lock:
            for entry in self._entries():
                samples = entry.stats.take_samples()
                if not samples:
                    continue
                labels = {p: {"model": entry.name, "version": entry.version, "protocol": p}
                          for p in {s.protocol for s in samples}}
                for s in samples:
                    attrs = labels[s.protocol]
                    self.request_duration.record(s.total_ns / 1e9, attrs)
                    if s.queue_ns or s.infer_ns:  # zero-row requests ran nothing
                        self.queue_duration.record(s.queue_ns / 1e9, attrs)
                        self.input_duration.record(s.input_ns / 1e9, attrs)
                        self.infer_duration.record(s.infer_ns / 1e9, attrs)
                        self.output_duration.record(s.output_ns / 1e9, attrs)
                    if s.execution_rows:
                        self.batch_size.record(s.execution_rows, attrs)

    def _success(self, options: CallbackOptions) -> Iterable[Observation]:
        self._drain()  # the first callback of every collection (instruments are observed in order)
        for entry in self._entries():
            for protocol, counts in entry.stats.protocol_counts().items():
                yield Observation(counts.success, {"model": entry.name, "version": entry.version, "protocol": protocol})

    def _failure(self, options: CallbackOptions) -> Iterable[Observation]:
        for entry in self._entries():
            for protocol, counts in entry.stats.protocol_counts().items():
                for code, n in counts.failures.items():
                    yield Observation(n, {"model": entry.name, "version": entry.version, "protocol": protocol,
                                          "code": code})

    def _rows(self, options: CallbackOptions) -> Iterable[Observation]:
        for entry in self._entries():
            for protocol, counts in entry.stats.protocol_counts().items():
                yield Observation(counts.inference_count,
                                  {"model": entry.name, "version": entry.version, "protocol": protocol})

    def _executions(self, options: CallbackOptions) -> Iterable[Observation]:
        for entry in self._entries():
            for protocol, counts in entry.stats.protocol_counts().items():
                yield Observation(counts.execution_count,
                                  {"model": entry.name, "version": entry.version, "protocol": protocol})

    def _inflight(self, options: CallbackOptions) -> Iterable[Observation]:
        inflight = self.core.inflight()
        for entry in self._entries():
            yield Observation(inflight.get(entry.settings.key, 0), {"model": entry.name, "version": entry.version})

    def _queued(self, options: CallbackOptions) -> Iterable[Observation]:
        for entry in self._entries():
            queued = entry.batcher.queued() if entry.batcher is not None else 0
            yield Observation(queued, {"model": entry.name, "version": entry.version})

    def _ready(self, options: CallbackOptions) -> Iterable[Observation]:
        from .registry import ModelState

        for entry in self._entries():
            yield Observation(int(entry.state is ModelState.READY), {"model": entry.name, "version": entry.version})
