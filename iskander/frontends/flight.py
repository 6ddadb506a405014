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
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from ..auth import TlsFiles, TokenAuth
from ..core import InferenceCore
from ..errors import InvalidInput, ResourceExhausted
from ..model_info import describe, repository_index, statistics
from ..registry import ModelState, ModelVersion
from .flight_errors import flight_errors, flight_errors_gen

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
    parts = [p.decode() if isinstance(p, bytes) else p for p in descriptor.path]
    if len(parts) == 1:
        return parts[0], None
    if len(parts) == 2:
        return parts[0], parts[1]
    raise InvalidInput(f"descriptor path must be [model] or [model, version], got {parts}")


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
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
        return (str(name) if name else None), (str(version) if version else None)
    return text, None


def _json_result(value: Any) -> flight.Result:
    return flight.Result(json.dumps(value).encode())


class FlightFrontend(flight.FlightServerBase):
    def __init__(
        self, core: InferenceCore, location: str, max_batch_bytes: int, request_timeout_s: float = 0.0, **kwargs: Any
    ) -> None:
        super().__init__(location, **kwargs)
        self.core = core
        # pyarrow does not show a Flight client's own deadline to the server: only this one applies
        self.request_timeout_s = request_timeout_s
        self.max_stream_rows = 0  # set by make_flight_server
        # pyarrow exposes no gRPC message cap for Flight servers, so the same limit as the OIP
        # frontend's max_message_bytes is applied to each received batch before it reaches a model.
        self.max_batch_bytes = max_batch_bytes

    # --- discovery --------------------------------------------------------------------------------

    def _flight_info(self, entry: ModelVersion, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        assert entry.contract is not None
        meta = describe(entry, self.core.registry)
        meta["output_schema_ipc"] = base64.b64encode(entry.contract.output_schema.serialize().to_pybytes()).decode()
        return flight.FlightInfo(
            entry.contract.input_schema, descriptor, [], -1, -1, app_metadata=json.dumps(meta).encode()
        )

    @flight_errors_gen
    def list_flights(self, context: flight.ServerCallContext, criteria: bytes) -> Iterator[flight.FlightInfo]:
        for name in self.core.registry.names():
            entry = self.core.registry.find(name)
            if entry.state is ModelState.READY:
                yield self._flight_info(entry, flight.FlightDescriptor.for_path(name))

    @flight_errors
    def get_flight_info(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> flight.FlightInfo:
        name, version = _descriptor_target(descriptor)
        return self._flight_info(self.core.model(name, version), descriptor)

    @flight_errors
    def get_schema(self, context: flight.ServerCallContext, descriptor: flight.FlightDescriptor) -> flight.SchemaResult:
        name, version = _descriptor_target(descriptor)
        entry = self.core.model(name, version)
        assert entry.contract is not None
        return flight.SchemaResult(entry.contract.input_schema)

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
        entry = self.core.model(name, version)
        # Pin the version for the stream so every batch on it is answered by the same model.
        version = entry.version
        started = False
        stream_rows = 0
        max_rows = entry.settings.max_stream_rows or self.max_stream_rows  # the model's own limits first
        max_bytes = entry.settings.max_message_bytes or self.max_batch_bytes
        observer = self.core.observer
        carrier = (lambda: _trace_carrier(context)) if observer.tracing is not None else None
        while True:
            try:
                chunk = reader.read_chunk()
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as exc:  # malformed stream, e.g. a second schema mid-stream
                raise InvalidInput(
                    f"the DoExchange stream for model '{name}' could not be read (one stream carries one schema "
                    f"and record batches): {str(exc).split('. Detail')[0]}",
                    model=name,
                ) from None
            batch = chunk.data
            if batch is None:  # metadata-only message: nothing to score
                continue
            # each batch is one request: counted, traced and logged on its own
            with observer.call("flight", "DoExchange", time.perf_counter_ns(), name, carrier) as call:
                try:
                    stream_rows += batch.num_rows
                    self._check_limits(entry, batch, stream_rows, max_rows, max_bytes)
                except Exception as exc:
                    self.core.record_failure(entry, call, exc)
                    raise
                deadline = time.monotonic() + self.request_timeout_s if self.request_timeout_s else None
                result = self.core.infer(name, version, batch, deadline=deadline, call=call)
                if not started:
                    writer.begin(result.batch.schema)
                    started = True
                writer.write_batch(result.batch)
        if not started:
            assert entry.contract is not None
            writer.begin(entry.contract.output_schema)

    @staticmethod
    def _check_limits(entry: ModelVersion, batch: pa.RecordBatch, stream_rows: int, max_rows: int,
                      max_bytes: int) -> None:
        name = entry.name
        size = batch.get_total_buffer_size()
        if size > max_bytes:
            raise ResourceExhausted(
                f"record batch of {size} bytes for model '{name}' exceeds max_message_bytes "
                f"({max_bytes}); send smaller batches",
                model=name, limit="max_message_bytes", expected=max_bytes, got=size,
            )
        if max_rows and stream_rows > max_rows:
            raise ResourceExhausted(
                f"stream for model '{name}' carried {stream_rows} rows, more than max_stream_rows "
                f"({max_rows}); open a new stream",
                model=name, limit="max_stream_rows", expected=max_rows, got=stream_rows,
            )

    # --- actions ----------------------------------------------------------------------------------

    def list_actions(self, context: flight.ServerCallContext) -> list[tuple[str, str]]:
        return list(ACTIONS.items())

    @flight_errors_gen
    def do_action(self, context: flight.ServerCallContext, action: flight.Action) -> Iterator[flight.Result]:
        kind = action.type
        body = action.body.to_pybytes() if action.body is not None else b""
        registry = self.core.registry
        if kind == "health":
            yield _json_result({
                "live": self.core.live,
                "ready": self.core.ready(),
                "models": [{"name": e.name, "version": e.version, "state": e.state.value} for e in registry.all()],
            })
        elif kind == "ready":
            name, version = _action_target(body)
            if name is None:
                yield _json_result({"ready": self.core.ready()})
            else:
                entry = registry.find(name, version)
                yield _json_result({"name": name, "version": entry.version, "ready": entry.state is ModelState.READY})
        elif kind == "list_models":
            yield _json_result([describe(e, registry) for e in registry.all()])
        elif kind == "model_metadata":
            name, version = _action_target(body)
            if name is None:
                raise InvalidInput("model_metadata needs a model name in the action body")
            yield _json_result(describe(registry.find(name, version), registry))
        elif kind == "statistics":
            name, version = _action_target(body)
            yield _json_result(statistics(registry, name, version))
        elif kind == "repository_index":
            ready_only = bool(body.strip()) and bool(_json_body(body).get("ready", False))
            yield _json_result(repository_index(registry, ready_only=ready_only))
        elif kind in ("load_model", "unload_model"):
            name, _ = _action_target(body)
            if name is None:
                raise InvalidInput(f"{kind} needs a model name in the action body")
            if kind == "load_model":
                registry.load(name)
            else:
                registry.unload(name)
            yield _json_result({"name": name, "versions": repository_index(registry, name=name)})
        else:
            raise InvalidInput(f"unknown action '{kind}'; actions: {', '.join(ACTIONS)}", action=kind)


class TokenMiddlewareFactory(flight.ServerMiddlewareFactory):
    """Refuses every Flight call without a valid 'authorization: Bearer <token>' header."""

    def __init__(self, auth: TokenAuth) -> None:
        super().__init__()
        self.auth = auth

    def start_call(self, info: flight.CallInfo, headers: dict[str, list[Any]]) -> None:
        values = headers.get("authorization", [])
        if not any(self.auth.check(v) for v in values):
            raise flight.FlightUnauthenticatedError(
                "missing or invalid bearer token: send header 'authorization: Bearer <token>'"
            )
        return None


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


def make_flight_server(
    core: InferenceCore, host: str, port: int, max_batch_bytes: int, request_timeout_s: float = 0.0,
    auth: TokenAuth | None = None, tls: TlsFiles | None = None, max_stream_rows: int = 0,
) -> FlightFrontend:
    middleware: dict[str, flight.ServerMiddlewareFactory] = {}
    if auth is not None and auth.enabled:
        middleware["auth"] = TokenMiddlewareFactory(auth)
    if core.observer.tracing is not None:
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
        frontend = FlightFrontend(
            core, f"{scheme}://{host}:{port}", max_batch_bytes, request_timeout_s, middleware=middleware or None,
            **options
        )
        frontend.max_stream_rows = max_stream_rows
        return frontend
    except pa.ArrowException as exc:  # pyarrow says only "Server did not start properly"
        raise OSError(
            f"cannot bind the Arrow Flight port {host}:{port} (in use, or not an address of this machine)"
        ) from exc
