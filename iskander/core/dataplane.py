"""The one inference entry point both frontends call: a ready model, a request, its context.

``Dataplane.infer`` owns everything between a frontend's translation and its encoding: the
payload-size, stream-row, batch-size and in-flight limits, the deadline, decoding under the
model's accounting, the contract, the backend (directly or through the dynamic batcher),
statistics, metrics and the request span. Frontends translate their wire format into a request
(``ArrowRequest`` or ``TensorRequest``), map ``IskanderError`` codes to status codes, and
encode the answer. Nothing here knows gRPC or Flight.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import overload

import attrs
import numpy as np
import pyarrow as pa

from iskander.arrow.types import element_type, numpy_dtype
from iskander.contract import OutputBinding, Prepared
from iskander.core.model import ReadyModel
from iskander.core.registry import ModelRegistry
from iskander.errors import DeadlineExceeded, InvalidInput, ResourceExhausted, StreamLimitExceeded
from iskander.observability.observer import Observer, Timings, new_request_id

SERVER_NAME = "iskander"


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iskander")
    except PackageNotFoundError:
        return "0.0.0"


# --- what a frontend hands in ---------------------------------------------------------------------


class StreamRows:
    """Rows one stream (a Flight DoExchange, an OIP ModelStreamInfer) has carried. A stream's
    requests are answered in order, so one thread at a time touches it."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows = 0


@attrs.define(slots=True)
class RequestContext:
    """One request as the frontend received it: also the ``Call`` the observer accounts."""

    protocol: str  # "flight" | "grpc" | "internal"
    method: str  # DoExchange, ModelInfer, ModelStreamInfer, ...
    received_ns: int  # perf_counter_ns when the frontend got it (decoding counts as compute_input)
    client_deadline: float | None = None  # time.monotonic() the client gives up, if it said
    carrier: Callable[[], Mapping[str, str] | None] | None = None  # W3C trace context, read only when tracing
    stream: StreamRows | None = None  # set for requests on a stream: max_stream_rows applies
    request_id: str = attrs.Factory(new_request_id)
    span: object = None  # set by the observer when tracing is on


@attrs.frozen(slots=True)
class ArrowRequest:
    """A request whose payload becomes an Arrow batch of the contract's input columns.
    ``decode`` is the frontend's validation and translation; it runs only after ``nbytes``
    passed max_message_bytes, and its failures count against the model."""

    nbytes: int
    decode: Callable[[], pa.RecordBatch]
    outputs: Sequence[str] | None = None


@attrs.frozen(slots=True)
class TensorRequest:
    """A request for a plain contract (``contract.plain``) whose payload is numpy tensors keyed by
    column name, e.g. views of OIP raw contents: the contract skips Arrow both ways."""

    nbytes: int
    decode: Callable[[], tuple[Mapping[str, np.ndarray], int]]  # (tensors by column, rows)
    outputs: Sequence[str] | None = None


@attrs.frozen(slots=True)
class TensorAnswer:
    outputs: tuple[OutputBinding, ...]  # in the order asked for (all outputs when none were named)
    tensors: dict[str, np.ndarray]  # by column, batch dimension first
    rows: int


# --- the dataplane --------------------------------------------------------------------------------


class Inflight:
    """Requests admitted and not finished, per model version: the bounded queue of max_inflight."""

    def __init__(self) -> None:
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def admit(self, model: ReadyModel) -> None:
        """Beyond max_inflight a request is refused at once, not piled up."""
        limit = model.limits.max_inflight
        key = model.key
        with self._lock:
            current = self._counts.get(key, 0)
            if limit and current >= limit:
                raise ResourceExhausted(
                    f"model '{model.name}' already has {current} requests running or queued "
                    f"(max_inflight = {limit}); retry later",
                    model=model.name, limit="max_inflight", expected=limit, got=current,
                )
            self._counts[key] = current + 1

    def release(self, model: ReadyModel) -> None:
        with self._lock:
            self._counts[model.key] -= 1

    def snapshot(self) -> dict[str, int]:
        """By model version key (for the metrics)."""
        with self._lock:
            return dict(self._counts)


class Dataplane:
    def __init__(
        self, registry: ModelRegistry, observer: Observer, inflight: Inflight, request_timeout_s: float = 0.0,
    ) -> None:
        self.registry = registry
        self.observer = observer
        self.inflight = inflight
        self.request_timeout_s = request_timeout_s  # server-side deadline of every request; 0 = none

    def model(self, name: str, version: str | None = None) -> ReadyModel:
        """A ready model version (raises NOT_FOUND / UNAVAILABLE errors otherwise)."""
        return self.registry.get_ready(name, version)

    @overload
    def infer(self, model: ReadyModel, request: ArrowRequest, ctx: RequestContext) -> pa.RecordBatch: ...

    @overload
    def infer(self, model: ReadyModel, request: TensorRequest, ctx: RequestContext) -> TensorAnswer: ...

    def infer(
        self, model: ReadyModel, request: ArrowRequest | TensorRequest, ctx: RequestContext
    ) -> pa.RecordBatch | TensorAnswer:
        """Run one request; every outcome is accounted once (statistics, metrics, span, log)."""
        observer = self.observer
        observer.begin(ctx, model.name)
        try:
            self._check_bytes(model, request.nbytes)
            if isinstance(request, ArrowRequest):
                batch = request.decode()
                if not isinstance(batch, pa.RecordBatch):
                    raise InvalidInput(f"model '{model.name}' expects an Arrow RecordBatch", model=model.name)
                rows = batch.num_rows
            else:
                tensors, rows = request.decode()
            self._count_stream_rows(model, ctx, rows)
            self._check_rows(model, rows)
            self.inflight.admit(model)
        except BaseException as exc:
            observer.failure(model, ctx, exc)
            raise
        try:
            contract = model.contract
            entered = time.perf_counter_ns()
            selected = contract.select_outputs(request.outputs)
            start = time.perf_counter_ns()
            prepared = contract.prepare(batch) if isinstance(request, ArrowRequest) \
                else contract.prepare_tensors(tensors, rows)
            if rows == 0:
                answer = self._empty(model, request, prepared, selected)
                observer.success(model, ctx, None, 0)
                return answer
            results, run = self._run(model, prepared, selected, self._deadline(ctx))
            answer = contract.assemble(prepared, selected, results) if isinstance(request, ArrowRequest) \
                else TensorAnswer(selected, contract.tensors_out(selected, results, rows), rows)
            done = time.perf_counter_ns()
        except BaseException as exc:  # client mistakes and server faults alike count as failures
            observer.failure(model, ctx, exc)
            raise
        finally:
            self.inflight.release(model)
        observer.success(model, ctx, run.timings(entered, start, done), rows)
        return answer

    # --- limits -----------------------------------------------------------------------------------

    @staticmethod
    def _check_bytes(model: ReadyModel, nbytes: int) -> None:
        limit = model.limits.max_message_bytes
        if limit and nbytes > limit:
            raise ResourceExhausted(
                f"request of {nbytes} bytes for model '{model.name}' exceeds max_message_bytes ({limit}); "
                "send smaller batches",
                model=model.name, limit="max_message_bytes", expected=limit, got=nbytes,
            )

    @staticmethod
    def _count_stream_rows(model: ReadyModel, ctx: RequestContext, rows: int) -> None:
        stream = ctx.stream
        if stream is None:
            return
        stream.rows += rows  # counted only once the request decoded soundly
        limit = model.limits.max_stream_rows
        if limit and stream.rows > limit:
            raise StreamLimitExceeded(
                f"stream for model '{model.name}' carried {stream.rows} rows, more than max_stream_rows "
                f"({limit}); open a new stream",
                model=model.name, limit="max_stream_rows", expected=limit, got=stream.rows,
            )

    @staticmethod
    def _check_rows(model: ReadyModel, rows: int) -> None:
        limit = model.limits.max_batch_size
        if limit and rows > limit:
            raise InvalidInput(
                f"inference request batch-size must be <= {limit} for '{model.name}', got {rows}",
                model=model.name, expected=limit, got=rows,
            )

    def _deadline(self, ctx: RequestContext) -> float | None:
        """The earlier of the client's deadline and the server's request_timeout_s (monotonic)."""
        if not self.request_timeout_s:
            return ctx.client_deadline
        # received_ns is perf_counter_ns; the server's timeout runs from now, a few µs later at most
        server = time.monotonic() + self.request_timeout_s
        return server if ctx.client_deadline is None else min(server, ctx.client_deadline)

    # --- running ----------------------------------------------------------------------------------

    @staticmethod
    def _empty(
        model: ReadyModel, request: ArrowRequest | TensorRequest, prepared: Prepared,
        selected: tuple[OutputBinding, ...],
    ) -> pa.RecordBatch | TensorAnswer:
        if isinstance(request, ArrowRequest):
            return model.contract.empty_output(prepared, selected)
        empty = {b.column: np.empty((0, *(b.row_shape or ())), dtype=numpy_dtype(element_type(b.type)))
                 for b in selected}
        return TensorAnswer(selected, empty, 0)

    @staticmethod
    def _run(
        model: ReadyModel, prepared: Prepared, selected: Sequence[OutputBinding], deadline: float | None
    ) -> tuple[dict[str, np.ndarray], _Run]:
        """The backend, directly or through the model's dynamic batcher; an expired request is not run."""
        prepared_at = time.perf_counter_ns()
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(
                f"model '{model.name}': the request's deadline passed before it ran; it was not run",
                model=model.name,
            )
        if model.batcher is not None:
            batch_run = model.batcher.run(prepared.feeds, prepared.rows, deadline)
            return batch_run.results, _Run(
                prepared_at, batch_run.queue_ns, batch_run.infer_ns, batch_run.batch_rows, batch_run.first,
                time.perf_counter_ns(),
            )
        tensors = model.contract.run_tensors(selected)
        results = dict(zip(tensors, model.backend.run(tensors, prepared.feeds, model.name, deadline)))
        ran_at = time.perf_counter_ns()
        return results, _Run(prepared_at, 0, ran_at - prepared_at, prepared.rows, True, ran_at)


@attrs.frozen(slots=True)
class _Run:
    prepared_at: int
    queued_ns: int
    infer_ns: int
    batch_rows: int
    new_execution: bool
    ran_at: int

    def timings(self, entered: int, start: int, done: int) -> Timings:
        return Timings(entered, start, self.prepared_at, self.queued_ns, self.infer_ns, self.ran_at, done,
                       self.batch_rows, self.new_execution)
