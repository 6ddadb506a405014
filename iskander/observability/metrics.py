"""Metrics over the per-model statistics: Prometheus (``/metrics``) and/or OTLP.

Counters and gauges are OpenTelemetry observable instruments whose callbacks read ``ModelStats``
(the same counters as ModelStatistics and the Flight ``statistics`` action), so they cannot
disagree and cost the request path nothing.

Histograms cannot be observed, and OpenTelemetry's ``Histogram.record`` costs ~15 us per value on
these machines (six values a request: ~75 us, 10% of a whole Flight request, and a draining thread
doing that work in bursts tripled OIP's p99 in bench/overhead.py). So:
- for Prometheus, ``ModelStats`` counts the histogram buckets itself (~3 us a request) and a
  prometheus_client collector in the same registry publishes them, exact at every scrape;
- for OTLP, requests buffer their timings and a background thread records them into
  OpenTelemetry histograms every ``DRAIN_INTERVAL_S`` (the first callback of each collection drains
  once more: the SDK runs observable callbacks before it reads synchronous instruments).
Each exporter has its own MeterProvider, so the histogram names never appear twice on /metrics.
docs/observability.md lists each metric with its nearest Triton ``nv_inference_*`` equivalent.

/metrics can require ``authorization: Bearer <token>`` (``[observability] metrics_auth_token`` or
the ISKANDER_METRICS_TOKEN environment variable; either token is accepted): without it every scrape
gets 401 with ``WWW-Authenticate: Bearer``. docs/security.md says what the endpoint exposes.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource

from iskander.auth import TokenAuth
from iskander.core.model import ModelVersion, ReadyModel
from iskander.observability.stats import BATCH_BOUNDS, DURATION_BOUNDS_NS

if TYPE_CHECKING:
    from iskander.config.settings import ObservabilitySettings
    from iskander.core.registry import ModelRegistry

log = logging.getLogger("iskander.observability.metrics")

DURATION_BUCKETS_S = tuple(b / 1e9 for b in DURATION_BOUNDS_NS)
BATCH_BUCKETS = tuple(float(b) for b in BATCH_BOUNDS)
DRAIN_INTERVAL_S = 0.2
METRICS_TOKEN_ENV = "ISKANDER_METRICS_TOKEN"

# name (as in ModelStats) -> (OpenTelemetry name, unit, description); Prometheus adds _seconds etc.
HISTOGRAMS = {
    "request": ("iskander.inference.request.duration", "s",
                "Whole successful request, received to answered (nv_inference_request_duration_us)."),
    "queue": ("iskander.inference.queue.duration", "s",
              "Waiting for admission and the dynamic batcher (nv_inference_queue_duration_us)."),
    "compute_input": ("iskander.inference.compute.input.duration", "s",
                      "Decoding and validating inputs into tensors (nv_inference_compute_input_duration_us)."),
    "compute_infer": ("iskander.inference.compute.infer.duration", "s",
                      "onnxruntime run (nv_inference_compute_infer_duration_us)."),
    "compute_output": ("iskander.inference.compute.output.duration", "s",
                       "Building the output batch from the tensors (nv_inference_compute_output_duration_us)."),
    "batch_size": ("iskander.inference.batch.size", "{row}",
                   "Rows per backend execution (merged batch under dynamic batching)."),
}


def _labels(entry: ModelVersion, protocol: str | None = None) -> dict[str, str]:
    labels = {"model": entry.name, "version": entry.version}
    if protocol is not None:
        labels["protocol"] = protocol
    return labels


class Metrics:
    """The exporters, reading the registry's statistics; ``start`` serves /metrics when a port is
    configured. ``inflight`` gives requests admitted and not finished by model version key."""

    def __init__(
        self, models: ModelRegistry, inflight: Callable[[], dict[str, int]], settings: ObservabilitySettings,
        resource: Resource,
    ) -> None:
        self.models = models
        self.inflight = inflight
        self.settings = settings
        self._providers: list[MeterProvider] = []
        self._rpc_failures: list[Any] = []
        self._otlp_histograms: dict[str, Any] = {}
        self._http = None
        self.port: int | None = None
        self._drain_lock = threading.Lock()
        self._stopping = threading.Event()
        self._drainer: threading.Thread | None = None
        stats = [e.stats for e in models.all()]  # they outlive reloads
        if settings.metrics_port is not None:
            from opentelemetry.exporter.prometheus import PrometheusMetricReader
            from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

            # Own registry: two servers in one process (tests) never share series.
            self.registry = CollectorRegistry()
            for collector in (ProcessCollector, PlatformCollector, GCCollector):
                collector(registry=self.registry)
            self.registry.register(_HistogramCollector(models))
            provider = MeterProvider(
                metric_readers=[PrometheusMetricReader(scope_info_enabled=False, registry=self.registry)],
                resource=resource,
            )
            self._instruments(provider.get_meter("iskander"))
            self._providers.append(provider)
            for s in stats:
                s.keep_histograms = True
        if settings.otlp_endpoint:
            from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
            from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

            reader = PeriodicExportingMetricReader(
                OTLPMetricExporter(endpoint=settings.otlp_endpoint, insecure=settings.otlp_insecure),
                export_interval_millis=int(settings.otlp_metrics_interval_s * 1000),
            )
            provider = MeterProvider(metric_readers=[reader], resource=resource)
            meter = provider.get_meter("iskander")
            # first: its callback drains the buffered timings before the histograms are read
            meter.create_observable_gauge("iskander.inference.queued", [self._drain_then_queued], unit="{request}",
                                          description=_QUEUED)
            self._instruments(meter, queued=False)
            for name, (otel_name, unit, description) in HISTOGRAMS.items():
                self._otlp_histograms[name] = meter.create_histogram(
                    otel_name, unit=unit, description=description,
                    explicit_bucket_boundaries_advisory=BATCH_BUCKETS if name == "batch_size" else DURATION_BUCKETS_S,
                )
            self._providers.append(provider)
            for s in stats:
                s.keep_samples = True
        self.enabled = bool(self._providers)

    def _instruments(self, meter: Meter, queued: bool = True) -> None:
        """Counters and gauges, observed from the statistics (labels: model, version[, protocol[, code]])."""
        meter.create_observable_counter(
            "iskander.inference.request.success", [self._per_protocol("success")], unit="{request}",
            description="Successful inference requests (nv_inference_request_success).")
        meter.create_observable_counter(
            "iskander.inference.request.failure", [self._failure], unit="{request}",
            description="Failed inference requests by status code (nv_inference_request_failure).")
        meter.create_observable_counter(
            "iskander.inference.count", [self._per_protocol("inference_count")], unit="{row}",
            description="Rows inferred: a batch of N rows counts N (nv_inference_count).")
        meter.create_observable_counter(
            "iskander.inference.exec.count", [self._per_protocol("execution_count")], unit="{execution}",
            description="Backend (onnxruntime) executions; fewer than requests under dynamic batching "
                        "(nv_inference_exec_count).")
        meter.create_observable_gauge(
            "iskander.inference.inflight", [self._inflight], unit="{request}",
            description="Requests admitted and not finished: queued, running or being encoded.")
        if queued:
            meter.create_observable_gauge("iskander.inference.queued", [self._queued], unit="{request}",
                                          description=_QUEUED)
        meter.create_observable_gauge(
            "iskander.model.ready", [self._ready], unit="1",
            description="1 if the model version is READY to serve, else 0.")
        meter.create_observable_counter(
            "iskander.worker.restarts", [self._restarts], unit="{restart}",
            description="Worker processes restarted after dying or hanging (python and sklearn backends; "
                        "counts from the model version's load).")
        # Calls that failed before reaching a model (unknown model, bad descriptor, ...).
        self._rpc_failures.append(meter.create_counter(
            "iskander.rpc.failure", unit="{call}",
            description="Calls that failed without reaching a model, by protocol, method and status code."))

    # --- lifecycle --------------------------------------------------------------------------------

    def start(self, host: str) -> None:
        if self._otlp_histograms:
            self._drainer = threading.Thread(target=self._drain_loop, name="metrics-drain", daemon=True)
            self._drainer.start()
        if self.settings.metrics_port is None:
            return
        from prometheus_client import make_wsgi_app

        bind = self.settings.metrics_host or host
        auth = metrics_auth(self.settings)
        app = make_wsgi_app(self.registry)
        if auth.enabled:
            app = bearer_protected(app, auth)
        self._http = _serve_wsgi(bind, self.settings.metrics_port, app)
        self.port = self._http.server_port
        log.info("Prometheus metrics on http://%s:%d/metrics%s", bind, self.port,
                 " (bearer token required)" if auth.enabled else "")

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
        for provider in self._providers:
            provider.shutdown()  # flushes a last OTLP export

    def rpc_failure(self, protocol: str, method: str, code: str) -> None:
        for counter in self._rpc_failures:
            counter.add(1, {"protocol": protocol, "method": method, "code": code})

    # --- callbacks --------------------------------------------------------------------------------

    def _entries(self) -> Iterable[ModelVersion]:
        return self.models.all()

    def _drain(self) -> None:
        """Record the buffered request timings into the OTLP histograms."""
        h = self._otlp_histograms
        with self._drain_lock:
            for entry in self._entries():
                samples = entry.stats.take_samples()
                if not samples:
                    continue
                labels = {p: _labels(entry, p) for p in {s.protocol for s in samples}}
                for s in samples:
                    attrs = labels[s.protocol]
                    h["request"].record(s.total_ns / 1e9, attrs)
                    if s.queue_ns or s.infer_ns:  # zero-row requests ran nothing
                        h["queue"].record(s.queue_ns / 1e9, attrs)
                        h["compute_input"].record(s.input_ns / 1e9, attrs)
                        h["compute_infer"].record(s.infer_ns / 1e9, attrs)
                        h["compute_output"].record(s.output_ns / 1e9, attrs)
                    if s.execution_rows:
                        h["batch_size"].record(s.execution_rows, attrs)

    def _drain_then_queued(self, options: CallbackOptions) -> Iterable[Observation]:
        self._drain()
        yield from self._queued(options)

    def _per_protocol(self, counter: str) -> Callable[[CallbackOptions], Iterable[Observation]]:
        """A callback observing one of the ``ProtocolCounts`` counters for every model version."""

        def observe(options: CallbackOptions) -> Iterable[Observation]:
            for entry in self._entries():
                for protocol, counts in entry.stats.protocol_counts().items():
                    yield Observation(getattr(counts, counter), _labels(entry, protocol))

        return observe

    def _failure(self, options: CallbackOptions) -> Iterable[Observation]:
        for entry in self._entries():
            for protocol, counts in entry.stats.protocol_counts().items():
                for code, n in counts.failures.items():
                    yield Observation(n, {**_labels(entry, protocol), "code": code})

    def _inflight(self, options: CallbackOptions) -> Iterable[Observation]:
        inflight = self.inflight()
        for entry in self._entries():
            yield Observation(inflight.get(entry.settings.key, 0), _labels(entry))

    def _queued(self, options: CallbackOptions) -> Iterable[Observation]:
        for entry in self._entries():
            batcher = entry.batcher if isinstance(entry, ReadyModel) else None
            yield Observation(batcher.queued() if batcher is not None else 0, _labels(entry))

    def _restarts(self, options: CallbackOptions) -> Iterable[Observation]:
        for entry in self._entries():
            restarts = entry.backend.restarts if isinstance(entry, ReadyModel) else None
            if restarts is not None:
                yield Observation(restarts, _labels(entry))

    def _ready(self, options: CallbackOptions) -> Iterable[Observation]:
        for entry in self._entries():
            yield Observation(int(isinstance(entry, ReadyModel)), _labels(entry))


_QUEUED = "Requests waiting in the dynamic-batching queue (nv_inference_pending_request_count)."


def metrics_auth(settings: ObservabilitySettings) -> TokenAuth:
    """The tokens /metrics accepts: the config's and the environment's (none = open)."""
    tokens = {settings.metrics_auth_token, os.environ.get(METRICS_TOKEN_ENV, "").strip()}
    return TokenAuth({t.encode() for t in tokens if t})


def bearer_protected(app: Callable[..., Any], auth: TokenAuth) -> Callable[..., Any]:
    """A WSGI app that answers 401 unless the request has one valid ``authorization: Bearer``.

    wsgiref joins repeated headers with commas, so two ``authorization`` headers never pass:
    the same rule as the gRPC frontends (TokenAuth.check_headers)."""

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        header = environ.get("HTTP_AUTHORIZATION")
        if header is not None and auth.check_headers([header]):
            return app(environ, start_response)
        # RFC 6750: no credentials -> just the scheme; wrong ones -> error="invalid_token"
        challenge = 'Bearer realm="iskander-metrics"' + ("" if header is None else ', error="invalid_token"')
        body = b"401 Unauthorized: /metrics needs 'authorization: Bearer <token>'\n"
        start_response("401 Unauthorized", [("WWW-Authenticate", challenge), ("Content-Type", "text/plain"),
                                            ("Content-Length", str(len(body)))])
        return [body]

    return guarded


def _serve_wsgi(addr: str, port: int, app: Callable[..., Any]) -> Any:
    """prometheus_client's start_http_server, with our app (it takes no WSGI middleware)."""
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from prometheus_client.exposition import ThreadingWSGIServer

    class Server(ThreadingWSGIServer):
        address_family = socket.getaddrinfo(addr or None, port, type=socket.SOCK_STREAM)[0][0]

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - no access log on stderr
            pass

    httpd = make_server(addr, port, app, Server, handler_class=QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd


class _HistogramCollector:
    """Publishes the histograms ``ModelStats`` counts, under the names the OpenTelemetry Prometheus
    exporter would give them (so dashboards work whichever path fed them)."""

    def __init__(self, models: ModelRegistry) -> None:
        self.models = models

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        families = {}
        for name, (otel_name, unit, description) in HISTOGRAMS.items():
            prom = otel_name.replace(".", "_") + ("_seconds" if unit == "s" else "")
            families[name] = HistogramMetricFamily(prom, description, labels=["model", "version", "protocol"])
        for entry in self.models.all():
            for protocol, hists in entry.stats.histograms().items():
                for name, hist in hists.items():
                    scale = 1e9 if name != "batch_size" else 1
                    cumulative, buckets = 0, []
                    for bound, count in zip(hist.bounds, hist.counts):
                        cumulative += count
                        buckets.append((floatToGoString(bound / scale), cumulative))
                    buckets.append(("+Inf", cumulative + hist.counts[-1]))
                    families[name].add_metric([entry.name, entry.version, protocol], buckets, hist.total / scale)
        yield from families.values()
