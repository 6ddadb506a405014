"""OpenTelemetry tracing: one server span per request, with the core and backend as children.

Off unless ``[observability] otlp_endpoint`` is set: then nothing is imported, no provider exists
and every hook is an ``is None`` test. When on, the dataplane opens a SERVER span whose parent is
the W3C ``traceparent`` the client sent (gRPC metadata or Flight headers); the core adds its
children after the fact from the timings it measures anyway (perf_counter_ns), so a batched
execution, which runs on the batcher's thread, still lands under the request that waited for it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.resources import Resource

    from iskander.config.settings import ObservabilitySettings

# perf_counter_ns -> Unix ns, for span timestamps (measured once; drift is far below a span's length)
_EPOCH_OFFSET_NS = time.time_ns() - time.perf_counter_ns()


def unix_ns(perf_ns: int) -> int:
    return perf_ns + _EPOCH_OFFSET_NS


class Tracing:
    def __init__(self, settings: ObservabilitySettings, resource: Resource) -> None:
        self.enabled = bool(settings.otlp_endpoint)
        self.provider: Any = None
        if not self.enabled:
            return
        from opentelemetry import trace
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._trace = trace
        self._propagator = TraceContextTextMapPropagator()
        # ParentBased: a client's sampled flag wins; the ratio applies to traces that start here.
        self.provider = TracerProvider(resource=resource, sampler=ParentBased(TraceIdRatioBased(settings.trace_sample_ratio)))
        self.provider.add_span_processor(BatchSpanProcessor(
            OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=settings.otlp_insecure)
        ))
        self.tracer = self.provider.get_tracer("iskander")

    def start_request(
        self, name: str, carrier: Mapping[str, str] | None, received_ns: int, attributes: dict[str, Any]
    ) -> Any:
        """The frontend's SERVER span, child of the client's traceparent if it sent one."""
        parent = self._propagator.extract(carrier) if carrier else None
        return self.tracer.start_span(
            name, context=parent, kind=self._trace.SpanKind.SERVER, start_time=unix_ns(received_ns),
            attributes=attributes,
        )

    def child(self, parent: Any, name: str, start_ns: int, end_ns: int, attributes: dict[str, Any]) -> Any:
        """A finished child span of ``parent`` from perf_counter_ns timestamps; returns it."""
        ctx = self._trace.set_span_in_context(parent)
        span = self.tracer.start_span(name, context=ctx, start_time=unix_ns(start_ns), attributes=attributes)
        span.end(end_time=unix_ns(end_ns))
        return span

    def end(self, span: Any, code: str | None = None, message: str = "") -> None:
        from opentelemetry.trace import Status, StatusCode

        if code is not None:
            span.set_attribute("iskander.status_code", code)
            span.set_status(Status(StatusCode.ERROR, f"{code}: {message}"[:500]))
        span.end()

    def shutdown(self) -> None:
        if self.provider is not None:
            self.provider.shutdown()  # flushes spans still in the batch processor
