"""A real OTLP/gRPC trace receiver for tests: the server process exports its spans here over the
network, exactly as it would to an OpenTelemetry Collector, and the test reads what arrived."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager

import attrs
import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc


@attrs.frozen
class ReceivedSpan:
    name: str
    trace_id: str  # hex
    span_id: str
    parent_span_id: str  # "" for a root span
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind
    attributes: dict
    status_code: int  # 0 unset, 1 ok, 2 error
    start_ns: int
    end_ns: int


def _value(any_value) -> object:
    field = any_value.WhichOneof("value")
    return getattr(any_value, field) if field else None


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.resources: list[dict] = []
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 - generated name
        with self.lock:
            for rs in request.resource_spans:
                self.resources.append({a.key: _value(a.value) for a in rs.resource.attributes})
                for ss in rs.scope_spans:
                    for s in ss.spans:
                        self.spans.append(ReceivedSpan(
                            s.name, s.trace_id.hex(), s.span_id.hex(), s.parent_span_id.hex(), s.kind,
                            {a.key: _value(a.value) for a in s.attributes}, s.status.code,
                            s.start_time_unix_nano, s.end_time_unix_nano,
                        ))
        return trace_service_pb2.ExportTraceServiceResponse()


class _MetricsService(metrics_service_pb2_grpc.MetricsServiceServicer):
    def __init__(self) -> None:
        self.names: set[str] = set()
        self.lock = threading.Lock()

    def Export(self, request, context):  # noqa: N802 - generated name
        with self.lock:
            for rm in request.resource_metrics:
                for sm in rm.scope_metrics:
                    self.names.update(m.name for m in sm.metrics)
        return metrics_service_pb2.ExportMetricsServiceResponse()


class Receiver:
    def __init__(self, service: _TraceService, metrics: _MetricsService, port: int) -> None:
        self._service = service
        self._metrics = metrics
        self.endpoint = f"http://127.0.0.1:{port}"

    def metric_names(self) -> set[str]:
        with self._metrics.lock:
            return set(self._metrics.names)

    def spans(self) -> list[ReceivedSpan]:
        with self._service.lock:
            return list(self._service.spans)

    def resources(self) -> list[dict]:
        with self._service.lock:
            return list(self._service.resources)

    def wait_for(self, predicate: Callable[[list[ReceivedSpan]], bool], timeout: float = 20.0) -> list[ReceivedSpan]:
        """Poll until ``predicate(spans)`` holds; the spans so far either way."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            spans = self.spans()
            if predicate(spans):
                return spans
            time.sleep(0.1)
        return self.spans()


@contextmanager
def otlp_receiver() -> Iterator[Receiver]:
    service, metrics = _TraceService(), _MetricsService()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(service, server)
    metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(metrics, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Receiver(service, metrics, port)
    finally:
        server.stop(grace=None)
