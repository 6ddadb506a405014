"""Where every inference request is accounted for: statistics, metric samples, spans and logs.

The dataplane opens each request here (``begin``: its span when tracing is on) and reports its
outcome once (``success`` / ``failure``), so both protocols are counted, traced and logged the
same way. Failures that never reach a model (unknown model, malformed call) are reported by the
frontend's one error mapping through ``unattributed_failure``. Metrics and tracing are given at
construction and never change.
"""

from __future__ import annotations

import itertools
import logging
import os
import secrets
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import attrs

from iskander.errors import ErrorCode, IskanderError
from iskander.observability.stats import Execution
from iskander.text import clip

if TYPE_CHECKING:
    from iskander.core.model import ReadyModel
    from iskander.observability.metrics import Metrics
    from iskander.observability.tracing import Tracing

log = logging.getLogger("iskander.requests")

# Error messages can quote client text (names, shapes); one request must not make a huge log line.
MAX_LOGGED_MESSAGE = 2048

_ID_PREFIX = f"{os.getpid():x}{secrets.token_hex(3)}"
_ids = itertools.count(1)


def new_request_id() -> str:
    """Unique per process run and cheap: a random prefix and a counter."""
    return f"{_ID_PREFIX}-{next(_ids):x}"


class Call(Protocol):
    """One inference request as the frontend received it (the dataplane's ``RequestContext``)."""

    protocol: str  # "flight" | "grpc" | "internal"
    method: str  # DoExchange, ModelInfer, ModelStreamInfer, ...
    received_ns: int  # perf_counter_ns when the frontend got it
    request_id: str
    span: Any  # the SERVER span when tracing is on, set by ``begin``
    carrier: Callable[[], Mapping[str, str] | None] | None  # the client's W3C trace context


@attrs.frozen
class Timings:
    """perf_counter_ns marks of one successful request inside the core."""

    entered: int  # core entered (the frontend decoded before this)
    start: int  # admitted and checked; the contract starts
    prepared: int  # contract applied, tensors ready
    queued_ns: int  # waited in the dynamic batcher
    infer_ns: int
    ran_at: int  # backend results in hand
    done: int  # output built
    batch_rows: int
    new_execution: bool


def error_code(exc: BaseException) -> str:
    return exc.code.value if isinstance(exc, IskanderError) else ErrorCode.INTERNAL.value


def mark_observed(exc: BaseException, request_id: str) -> None:
    """Tell the frontend's error mapping this failure is already counted and logged."""
    try:
        exc.iskander_request_id = request_id  # type: ignore[attr-defined]
    except AttributeError:  # exceptions without a __dict__
        pass


def observed_request_id(exc: BaseException) -> str | None:
    return getattr(exc, "iskander_request_id", None)


class Observer:
    def __init__(self, metrics: Metrics | None = None, tracing: Tracing | None = None) -> None:
        self.metrics = metrics
        self.tracing = tracing if tracing is not None and tracing.enabled else None

    def begin(self, call: Call, model: str) -> None:
        """A request for ``model`` starts: its span opens (when tracing is on)."""
        tracing = self.tracing
        if tracing is None:
            return
        model = clip(model)  # client text: bounded before it reaches a span
        carrier = call.carrier
        call.span = tracing.start_request(
            f"{call.method} {model}", carrier() if carrier is not None else None, call.received_ns,
            {"rpc.system": "grpc", "rpc.method": call.method, "iskander.protocol": call.protocol,
             "iskander.model": model, "iskander.request_id": call.request_id},
        )

    def unattributed_failure(self, protocol: str, method: str, exc: BaseException, request_id: str | None = None) -> None:
        """A call that failed without reaching a model's accounting: one warning line and a metric."""
        if observed_request_id(exc) is not None:
            return
        code = error_code(exc)
        if self.metrics is not None:
            self.metrics.rpc_failure(protocol, method, code)
        if log.isEnabledFor(logging.WARNING):
            message = clip(exc.message, MAX_LOGGED_MESSAGE) if isinstance(exc, IskanderError) \
                else "internal server error"
            log.warning(
                "%s %s failed: %s %s", protocol, method, code, message,
                extra={"request_id": request_id, "protocol": protocol, "method": method, "status": code},
            )

    def success(self, entry: ReadyModel, call: Call, t: Timings | None, rows: int) -> None:
        """``t`` is None for a zero-row request (nothing ran)."""
        stats = entry.stats
        done = t.done if t is not None else time.perf_counter_ns()
        total = done - call.received_ns
        execution = None if t is None else Execution(
            queue_ns=(t.start - t.entered) + t.queued_ns,  # admission, then the batcher
            input_ns=(t.entered - call.received_ns) + (t.prepared - t.start),  # frontend decode + contract
            infer_ns=t.infer_ns,
            output_ns=t.done - t.ran_at,
            rows=t.batch_rows,
            new_execution=t.new_execution,
        )
        stats.record_success(total, execution, rows, call.protocol)
        tracing = self.tracing
        if call.span is not None and tracing is not None:
            if t is not None:
                self._spans(tracing, entry, call, t, rows)
            tracing.end(call.span)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "%s %s model=%s version=%s rows=%d status=OK duration_ms=%.3f", call.protocol, call.method,
                entry.name, entry.version, rows, total / 1e6,
                extra={"request_id": call.request_id, "protocol": call.protocol, "method": call.method,
                       "model": entry.name, "version": entry.version, "rows": rows, "status": "OK",
                       "duration_ms": round(total / 1e6, 3)},
            )

    def failure(self, entry: ReadyModel, call: Call, exc: BaseException) -> None:
        """A request for a known model that failed, in the frontend's decoding or in the core."""
        if observed_request_id(exc) is not None:
            return
        total = time.perf_counter_ns() - call.received_ns
        code = error_code(exc)
        entry.stats.record_failure(total, call.protocol, code)
        mark_observed(exc, call.request_id)
        tracing = self.tracing
        if call.span is not None and tracing is not None:
            call.span.set_attribute("iskander.version", entry.version)
            tracing.end(call.span, code, clip(getattr(exc, "message", exc), MAX_LOGGED_MESSAGE))
        if log.isEnabledFor(logging.WARNING):
            message = clip(exc.message, MAX_LOGGED_MESSAGE) if isinstance(exc, IskanderError) \
                else "internal server error"
            log.warning(
                "%s %s model=%s version=%s status=%s duration_ms=%.3f: %s", call.protocol, call.method, entry.name,
                entry.version, code, total / 1e6, message,
                extra={"request_id": call.request_id, "protocol": call.protocol, "method": call.method,
                       "model": entry.name, "version": entry.version, "status": code,
                       "duration_ms": round(total / 1e6, 3)},
            )

    @staticmethod
    def _spans(tracing: Tracing, entry: ReadyModel, call: Call, t: Timings, rows: int) -> None:
        call.span.set_attribute("iskander.version", entry.version)
        call.span.set_attribute("iskander.rows", rows)
        core = tracing.child(call.span, "iskander.infer", t.entered, t.done,
                             {"iskander.model": entry.name, "iskander.version": entry.version, "iskander.rows": rows})
        if t.queued_ns:
            tracing.child(core, "iskander.batch_queue", t.prepared, t.prepared + t.queued_ns, {})
        runtime = entry.backend.backend_name
        tracing.child(core, f"{runtime}.run", t.ran_at - t.infer_ns, t.ran_at,  # "onnxruntime.run"
                      {"iskander.batch_rows": t.batch_rows, "iskander.batched": t.batch_rows != rows})
