"""Arrow Flight frontend (pyarrow.flight): DoExchange inference plus discovery and actions.

Conventions (docs/flight.md):
- descriptor ``FlightDescriptor.for_path(model)`` or ``for_path(model, version)``;
- ``DoExchange``: the client streams record batches; each is answered by one output batch, in order,
  on the same stream, so one stream carries many micro-batches;
- ``GetSchema``: the input schema a DoExchange must send; ``GetFlightInfo``: the same, plus the model
  metadata (output schema included) as JSON in ``app_metadata``;
- actions (``ListActions`` describes each): health, readiness, model listing and metadata,
  statistics, repository index, load and unload.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from iskander.arrow.checks import check_batch, needs_full
from iskander.auth import TlsFiles, TokenAuth
from iskander.core.control import ControlPlane
from iskander.core.dataplane import ArrowRequest, Dataplane, RequestContext, StreamRows
from iskander.core.model import ReadyModel
from iskander.errors import InvalidInput, ModelNotReady, ResourceExhausted, Unimplemented
from iskander.frontends.flight_errors import flight_errors, flight_errors_gen, to_flight_error
from iskander.observability.observer import Observer
from iskander.text import clip

ACTIONS = {
    "health": "Server liveness and readiness, with each model version's state. Body: empty.",
    "ready": "Readiness of the server, or of one model if the body names it (UTF-8 name, or JSON "
    '{"name": ..., "version": ...}).',
    "list_models": "Every configured model version with its state and schemas. Body: empty.",
    "model_metadata": 'Metadata of one model: versions, state, input and output schemas. Body: UTF-8 model '
    'name or JSON {"name": ..., "version": ...}.',
    "statistics": "Inference statistics (Triton's ModelStatistics fields) of every model, one model, or one "
    "version. Body: empty, a model name, or JSON {\"name\": ..., \"version\": ...}.",
    "repository_index": "Every configured model version with state and reason. Body: empty, or JSON "
    '{"ready": true} for ready versions only.',
    "load_model": "(Re)load a configured model by name (never a path). Body: UTF-8 model name or JSON "
    '{"name": ...}.',
    "unload_model": "Stop serving a model; requests already running finish. Body: UTF-8 model name or JSON "
    '{"name": ...}.',
}


def _descriptor_target(descriptor: flight.FlightDescriptor) -> tuple[str, str | None]:
    if descriptor.descriptor_type != flight.DescriptorType.PATH:
        raise InvalidInput("use a PATH descriptor: FlightDescriptor.for_path(model) or for_path(model, version)")
    path = descriptor.path or []
    if len(path) not in (1, 2):
        raise InvalidInput(f"descriptor path must be [model] or [model, version], got {len(path)} elements")
    try:
        parts = [p.decode() if isinstance(p, bytes) else p for p in path]
    except UnicodeDecodeError:
        raise InvalidInput("descriptor path elements must be UTF-8 text") from None
    return parts[0], (parts[1] if len(parts) == 2 else None)


MAX_ACTION_BODY = 64 * 1024  # action bodies name a model; nothing legitimate comes near this
MAX_JSON_DEPTH = 8
_JSON_STRING = re.compile(r'"(?:\\.|[^"\\])*"')


def _json_depth(text: str) -> int:
    """Deepest nesting of arrays/objects, counted without parsing (strings removed first), so a body
    nested 100,000 deep is refused before json.loads recurses into it."""
    depth = deepest = 0
    for ch in _JSON_STRING.sub("", text):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput("action body is not UTF-8 text") from None
    if _json_depth(text) > MAX_JSON_DEPTH:
        raise InvalidInput(f"action body nests JSON deeper than {MAX_JSON_DEPTH} levels")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise InvalidInput("action body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("action body must be a JSON object")
    return data


def _action_target(body: bytes) -> tuple[str | None, str | None]:
    text = body.decode("utf-8", errors="replace").strip()
    if not text:
        return None, None
    if text.startswith("{"):
        data = _json_body(body)
        name, version = data.get("name"), data.get("version")
        for key, value in (("name", name), ("version", version)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (str, int))):
                raise InvalidInput(f"action body key '{key}' must be a string, got {type(value).__name__}")
        return (str(name) if name else None), (str(version) if version is not None else None)
    return text, None


def _json_result(value: Any) -> flight.Result:
    return flight.Result(json.dumps(value).encode())


class FlightFrontend(flight.FlightServerBase):
    """pyarrow does not show a Flight client's own deadline to the server, and exposes no gRPC
    message cap for Flight servers: the dataplane applies request_timeout_s and max_message_bytes
    (to each received batch, before anything reads it)."""

    def __init__(self, dataplane: Dataplane, control: ControlPlane, location: str, **kwargs: Any) -> None:
        super().__init__(location, **kwargs)
        self.dataplane = dataplane
        self.control = control
        self.observer = dataplane.observer
        # set when the server stops: streams end after the batch they are answering
        self.draining = threading.Event()
        self._busy = 0  # batches being answered now
        self._busy_lock = threading.Lock()
        self._idle = threading.Condition(self._busy_lock)

    # --- discovery --------------------------------------------------------------------------------

    def _flight_info(self, entry: ReadyModel, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        meta = self.control.describe(entry)
        meta["output_schema_ipc"] = base64.b64encode(entry.contract.output_schema.serialize().to_pybytes()).decode()
        return flight.FlightInfo(
            entry.contract.input_schema, descriptor, [], -1, -1, app_metadata=json.dumps(meta).encode()
        )

    @flight_errors_gen
    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> Iterator[flight.FlightInfo]:
        for entry in self.control.ready_models():
            yield self._flight_info(entry, flight.FlightDescriptor.for_path(entry.name))

    @flight_errors
    def get_flight_info(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        name, version = _descriptor_target(descriptor)
        return self._flight_info(self.control.model(name, version), descriptor)

    @flight_errors
    def get_schema(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        name, version = _descriptor_target(descriptor)
        return flight.SchemaResult(self.control.model(name, version).contract.input_schema)

    # --- inference --------------------------------------------------------------------------------

    @flight_errors
    def do_exchange(
        self,
        context: flight.ServerCallContext,
        descriptor: flight.FlightDescriptor,
        reader: flight.MetadataRecordBatchReader,
        writer: flight.MetadataRecordBatchWriter,
    ) -> None:
        name, version = _descriptor_target(descriptor)
        entry = self.dataplane.model(name, version)
        # Pin the version for the stream so every batch on it is answered by the same model version
        # (looked up per batch: an unloaded model's next batch fails UNAVAILABLE, a reload serves it).
        version = entry.version
        started = False
        stream = StreamRows()
        carrier = (lambda: _trace_carrier(context)) if self.observer.tracing is not None else None
        full_check: list[bool] = []  # decided from the stream's schema at its first batch
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                break
            except (pa.ArrowException, OSError, TypeError) as exc:
                # malformed stream: a second schema mid-stream, an undecodable IPC message, an
                # extension type over the wrong storage (TypeError from its deserializer)
                raise InvalidInput(
                    f"the DoExchange stream for model '{clip(name)}' could not be read (one stream carries one "
                    f"schema and record batches): {clip(str(exc).split('. Detail')[0], 300)}",
                    model=name,
                ) from None
            batch = chunk.data
            if batch is None:  # metadata-only message: nothing to score
                continue
            self._busy_enter()
            try:
                # each batch is one request: counted, traced and logged on its own
                ctx = RequestContext("flight", "DoExchange", time.perf_counter_ns(), None, carrier, stream)
                entry = self.dataplane.model(name, version)
                # the received buffers' sizes (not what the header claims) are checked before
                # anything reads them; then the batch's structure (arrow/checks.py)
                request = ArrowRequest(batch.get_total_buffer_size(), _checked(batch, name, full_check))
                answer = self.dataplane.infer(entry, request, ctx)
                if not started:
                    writer.begin(answer.schema)
                    started = True
                writer.write_batch(answer)
            finally:
                self._busy_exit()
            if self.draining.is_set():
                # the batch in flight was answered; end the stream before the process goes
                raise ModelNotReady(
                    f"the server is shutting down; the stream for model '{clip(name)}' is closed after "
                    "the batch it answered; reconnect (to another replica) for more",
                    model=name,
                )
        if not started:
            writer.begin(entry.contract.output_schema)

    def _busy_enter(self) -> None:
        with self._busy_lock:
            self._busy += 1

    def _busy_exit(self) -> None:
        with self._busy_lock:
            self._busy -= 1
            if not self._busy:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no batch is being answered (streams may still be open and idle)."""
        with self._busy_lock:
            return self._idle.wait_for(lambda: self._busy == 0, timeout)

    # --- actions ----------------------------------------------------------------------------------

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return list(ACTIONS.items())

    @flight_errors_gen
    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Iterator[flight.Result]:
        kind = action.type
        body = action.body.to_pybytes() if action.body is not None else b""
        if len(body) > MAX_ACTION_BODY:
            raise InvalidInput(f"action body of {len(body)} bytes is larger than {MAX_ACTION_BODY}; send a model name")
        control = self.control
        if kind == "health":
            yield _json_result(control.health())
        elif kind == "ready":
            name, version = _action_target(body)
            if name is None:
                yield _json_result({"ready": control.ready()})
            else:
                entry = control.entry(name, version)
                yield _json_result({"name": name, "version": entry.version, "ready": isinstance(entry, ReadyModel)})
        elif kind == "list_models":
            yield _json_result(control.list_models())
        elif kind == "model_metadata":
            name, version = _action_target(body)
            if name is None:
                raise InvalidInput("model_metadata needs a model name in the action body")
            yield _json_result(control.describe(control.entry(name, version)))
        elif kind == "statistics":
            name, version = _action_target(body)
            yield _json_result(control.statistics(name, version))
        elif kind == "repository_index":
            ready_only = bool(body.strip()) and bool(_json_body(body).get("ready", False))
            yield _json_result(control.repository_index(ready_only=ready_only))
        elif kind in ("load_model", "unload_model"):
            name, _ = _action_target(body)
            if name is None:
                raise InvalidInput(f"{kind} needs a model name in the action body")
            if kind == "load_model":
                control.load(name)
            else:
                control.unload(name)
            yield _json_result({"name": name, "versions": control.repository_index(name=name)})
        else:
            raise Unimplemented(f"unknown action '{clip(kind)}'; actions: {', '.join(ACTIONS)}", action=clip(kind))


class TokenMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Refuses every Flight call without a valid 'authorization: Bearer <token>' header."""

    def __init__(self, auth: TokenAuth) -> None:
        super().__init__()
        self.auth = auth

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[Any]]) -> None:
        if not self.auth.check_headers(headers.get("authorization", [])):
            raise flight.FlightUnauthenticatedError(
                "missing or invalid bearer token: send exactly one header 'authorization: Bearer <token>'"
            )
        return None


# Calls that carry inference data. Discovery, schema and actions (health among them) are never
# counted, so they answer however many streams are open.
_DATA_METHODS = frozenset({flight.FlightMethod.DO_EXCHANGE, flight.FlightMethod.DO_PUT, flight.FlightMethod.DO_GET})


class _Admitted(flight.ServerMiddleware):
    def __init__(self, factory: "AdmissionFactory") -> None:
        super().__init__()
        self.factory = factory

    def call_completed(self, exception: BaseException | None) -> None:
        self.factory.release()


class AdmissionFactory(flight.ServerMiddlewareFactory):
    """Caps the data streams open at once. Runs when the call starts, before the handler reads a
    batch, so refused streams never get their payload into Python. On Flight every inference call is
    a stream, so the cap is the smaller of max_concurrent_streams and max_concurrent_rpcs."""

    def __init__(self, observer: Observer, limit: int, key: str) -> None:
        super().__init__()
        self.observer = observer
        self.limit = limit
        self.key = key
        self._open = 0
        self._lock = threading.Lock()

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[Any]]) -> _Admitted | None:
        if info.method not in _DATA_METHODS:
            return None
        with self._lock:
            current = self._open
            if current < self.limit:
                self._open = current + 1
                return _Admitted(self)
        exc = ResourceExhausted(
            f"{current} Flight data streams are open, the server's limit ({self.key} = {self.limit}); "
            "close a stream or retry later",
            limit=self.key, expected=self.limit, got=current,
        )
        self.observer.unattributed_failure("flight", "DoExchange", exc)
        raise to_flight_error(exc)

    def release(self) -> None:
        with self._lock:
            self._open -= 1


class TraceHeaders(flight.ServerMiddleware):
    """Keeps a call's W3C trace-context headers for the handler (installed only when tracing is on)."""

    def __init__(self, carrier: dict[str, str]) -> None:
        super().__init__()
        self.carrier = carrier


class TraceHeadersFactory(flight.ServerMiddlewareFactory):
    def start_call(self, info: flight.CallInfo, headers: dict[str, list[Any]]) -> TraceHeaders:
        carrier = {}
        for key in ("traceparent", "tracestate"):
            values = headers.get(key)
            if values:
                value = values[0]
                carrier[key] = value.decode() if isinstance(value, bytes) else value
        return TraceHeaders(carrier)


def _trace_carrier(context: flight.ServerCallContext) -> dict[str, str] | None:
    middleware = context.get_middleware("trace")
    return middleware.carrier if middleware is not None else None


def _checked(batch: pa.RecordBatch, model: str, full_check: list[bool]) -> Callable[[], pa.RecordBatch]:
    """The batch's structural check as the request's decode step (run after the size limit)."""

    def decode() -> pa.RecordBatch:
        if not full_check:
            full_check.append(needs_full(batch.schema))
        check_batch(batch, model, full_check[0])
        return batch

    return decode


def make_flight_server(
    dataplane: Dataplane, control: ControlPlane, host: str, port: int, auth: TokenAuth | None = None,
    tls: TlsFiles | None = None, max_concurrent_rpcs: int = 0, max_concurrent_streams: int = 0,
) -> FlightFrontend:
    middleware: dict[str, flight.ServerMiddlewareFactory] = {}
    if auth is not None and auth.enabled:
        middleware["auth"] = TokenMiddlewareFactory(auth)  # first: unauthenticated calls are never counted
    caps = [(limit, key) for limit, key in ((max_concurrent_streams, "max_concurrent_streams"),
                                             (max_concurrent_rpcs, "max_concurrent_rpcs")) if limit]
    if caps:
        middleware["admission"] = AdmissionFactory(dataplane.observer, *min(caps))
    if dataplane.observer.tracing is not None:
        middleware["trace"] = TraceHeadersFactory()
    options: dict[str, Any] = {}
    if tls is not None:
        options = {
            "tls_certificates": [flight.CertKeyPair(cert=tls.cert, key=tls.key)],
            "verify_client": tls.client_ca is not None,
            "root_certificates": tls.client_ca,
        }
    scheme = "grpc+tls" if tls is not None else "grpc"
    try:
        return FlightFrontend(
            dataplane, control, f"{scheme}://{host}:{port}", middleware=middleware or None, **options
        )
    except pa.ArrowException as exc:  # pyarrow says only "Server did not start properly"
        raise OSError(
            f"cannot bind the Arrow Flight port {host}:{port} (in use, or not an address of this machine)"
        ) from exc
