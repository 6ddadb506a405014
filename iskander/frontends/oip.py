"""KServe Open Inference Protocol v2 gRPC frontend, wire-compatible with Triton's GRPCInferenceService.

Translates OIP tensors to an Arrow RecordBatch (the contract's input columns), calls the core, and
encodes the output columns as ``raw_output_contents``. RPCs not implemented here answer
UNIMPLEMENTED (the generated base class does that).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent import futures

import threading
import time
import weakref
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from .._proto import grpc_service_pb2 as pb
from .._proto import grpc_service_pb2_grpc as pb_grpc
from ..auth import TlsFiles, TokenAuth
from ..core import SERVER_NAME, InferenceCore, server_version
from ..errors import InvalidInput, IskanderError, ResourceExhausted
from ..model_info import ready_versions, repository_index, statistics
from ..observer import Call
from ..registry import ModelState, ModelVersion
from .oip_codec import TensorDecoder, encode_column, oip_datatype, oip_shape, oip_view, passthrough_lists
from .oip_errors import grpc_errors, log
from .oip_model_config import model_config, model_statistics

# Advertise only what is implemented (perf_analyzer and clients read this list).
EXTENSIONS: tuple[str, ...] = ("model_repository", "model_configuration", "statistics")

_UNIMPLEMENTED = {
    "SystemSharedMemoryStatus": "system shared memory",
    "SystemSharedMemoryRegister": "system shared memory",
    "SystemSharedMemoryUnregister": "system shared memory",
    "CudaSharedMemoryStatus": "CUDA shared memory",
    "CudaSharedMemoryRegister": "CUDA shared memory",
    "CudaSharedMemoryUnregister": "CUDA shared memory",
    "TraceSetting": "trace settings",
    "LogSettings": "log settings",
}


def _column(name: str, arrow_type: pa.DataType, arrays: dict[str, pa.Array], rows: int) -> pa.Array:
    """A request column from decoded tensors: structs rebuilt from 'name.field' tensors (any
    depth); a column OIP cannot carry becomes nulls (passthrough only: it is not in oip_view)."""
    if pa.types.is_struct(arrow_type):
        children = [_column(f"{name}.{f.name}", f.type, arrays, rows) for f in arrow_type]
        return pa.StructArray.from_arrays(children, fields=list(arrow_type))
    if name in arrays:
        return arrays[name]
    return pa.nulls(rows, arrow_type)


def _flat_columns(batch: pa.RecordBatch, skip: frozenset[str]) -> dict[str, pa.Array]:
    """Output columns by OIP tensor name: struct fields as 'column.field' (see oip_view)."""
    flat: dict[str, pa.Array] = {}

    def walk(name: str, array: pa.Array) -> None:
        if pa.types.is_struct(array.type):
            for field, child in zip(array.type, array.flatten()):  # flatten: a null struct nulls its fields
                walk(f"{name}.{field.name}", child)
        else:
            flat[name] = array

    for name, column in zip(batch.schema.names, batch.columns):
        walk(name, column)
    return {name: flat[name] for name, _ in oip_view(batch.schema, skip=skip)}


def _mixed_contents(name: str, model: str) -> InvalidInput:
    return InvalidInput(
        f"input '{name}' for model '{model}' sets contents while the request uses raw_input_contents; "
        "use one or the other",
        model=model, column=name,
    )


class _ModelCodec:
    """Per model version: decoders for its OIP input tensors, and how they form the request batch."""

    def __init__(self, entry: ModelVersion) -> None:
        contract = entry.contract
        assert contract is not None
        self.schema = contract.input_schema
        self.decoders = {
            name: TensorDecoder(entry.name, name, arrow_type, contract.cast_sources(name))
            for name, arrow_type in oip_view(self.schema, requests=True)
        }
        self.order = tuple(self.decoders)
        # the common case, decided once: every request column is one OIP tensor of the same name
        self.flat = tuple(self.decoders) == tuple(self.schema.names)
        self.skip = passthrough_lists(contract.passthrough)
        self.flat_outputs = not self.skip and not any(pa.types.is_struct(f.type) for f in contract.output_schema)
        # plain contracts skip Arrow entirely: raw bytes -> numpy views -> onnxruntime -> raw bytes
        self.plain = contract.plain and self.flat and not any(d.alternatives for d in self.decoders.values())
        self.out_datatype = {b.column: oip_datatype(b.type) for b in contract.outputs}

    def batch(self, arrays: dict[str, pa.Array], rows: int) -> pa.RecordBatch:
        """Columns in contract order: struct columns rebuilt from their 'column.field' tensors,
        Flight-only passthrough columns sent as nulls. A cast source keeps its own type (the core casts)."""
        if self.flat:
            return pa.RecordBatch.from_arrays([arrays[name] for name in self.order], names=self.order)
        columns = [_column(field.name, field.type, arrays, rows) for field in self.schema]
        fields = [pa.field(f.name, c.type) for f, c in zip(self.schema, columns)]
        return pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields))


class OipServicer(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, core: InferenceCore, request_timeout_s: float = 0.0, max_stream_rows: int = 0) -> None:
        self.core = core
        self.request_timeout_s = request_timeout_s
        self.max_stream_rows = max_stream_rows
        # Keyed weakly by the contract object: a reloaded model gets a fresh codec and the old one
        # goes with its contract.
        self._codecs: weakref.WeakKeyDictionary[object, _ModelCodec] = weakref.WeakKeyDictionary()
        self._codecs_lock = threading.Lock()

    def _codec(self, entry: ModelVersion) -> _ModelCodec:
        key = entry.contract
        codec = self._codecs.get(key)
        if codec is None:
            with self._codecs_lock:
                codec = self._codecs.get(key) or _ModelCodec(entry)
                self._codecs[key] = codec
        return codec

    # --- health and metadata ----------------------------------------------------------------------

    @grpc_errors
    def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.core.live)

    @grpc_errors
    def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready())

    @grpc_errors
    def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.ServicerContext) -> pb.ModelReadyResponse:
        try:
            entry = self.core.registry.find(request.name, request.version or None)
        except Exception:  # unknown model or version: not ready (Triton answers the same)
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=entry.state is ModelState.READY)

    @grpc_errors
    def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=list(EXTENSIONS))

    @grpc_errors
    def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: grpc.ServicerContext
    ) -> pb.ModelMetadataResponse:
        entry = self.core.model(request.name, request.version or None)
        assert entry.contract is not None
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=entry.name,
            versions=ready_versions(self.core.registry, entry.name),
            platform="onnxruntime_onnx",
            inputs=[tensor(name=name, datatype=oip_datatype(t), shape=oip_shape(t))
                    for name, t in oip_view(entry.contract.input_schema, requests=True)],
            outputs=[tensor(name=name, datatype=oip_datatype(t), shape=oip_shape(t))
                     for name, t in oip_view(entry.contract.output_schema,
                                             skip=passthrough_lists(entry.contract.passthrough))],
        )

    # --- inference --------------------------------------------------------------------------------

    def _decode(
        self, request: pb.ModelInferRequest, codec: _ModelCodec, model: str
    ) -> tuple[dict[str, Any], int]:
        """Validate every input tensor and decode it: to Arrow arrays, or for a plain contract to
        numpy views of the request bytes. Returns (arrays by column, rows)."""
        inputs = request.inputs
        raw = request.raw_input_contents
        if raw and len(raw) != len(inputs):
            typed = next((t.name for t in inputs if t.HasField("contents")), None)
            if typed is not None:
                raise _mixed_contents(typed, model)
            raise InvalidInput(
                f"expected {len(inputs)} raw_input_contents entries (one per input) for model '{model}', "
                f"got {len(raw)}",
                model=model,
            )
        arrays: dict[str, pa.Array] = {}
        rows = None
        for i, tensor in enumerate(inputs):
            decoder = codec.decoders.get(tensor.name)
            if decoder is None:
                raise InvalidInput(
                    f"unexpected inference input '{tensor.name}' for model '{model}'; inputs: "
                    f"{', '.join(codec.order)}",
                    model=model, column=tensor.name,
                )
            if tensor.name in arrays:
                raise InvalidInput(f"input '{tensor.name}' is given twice for model '{model}'", model=model)
            if decoder.alternatives or tensor.datatype != decoder.datatype:
                decoder = decoder.select(tensor.datatype, tensor.shape)
            n = decoder.rows(tensor.shape, tensor.datatype)
            if rows is None:
                rows = n
            elif n != rows:
                raise InvalidInput(
                    f"input '{tensor.name}' for model '{model}' has batch size {n}, other inputs have {rows}",
                    model=model, column=tensor.name, expected=rows, got=n,
                )
            if raw:
                if tensor.HasField("contents"):
                    raise _mixed_contents(tensor.name, model)
                arrays[tensor.name] = decoder.ndarray_from_raw(raw[i], n) if codec.plain \
                    else decoder.from_raw(raw[i], n)
            else:
                arrays[tensor.name] = decoder.ndarray_from_contents(tensor.contents, n) if codec.plain \
                    else decoder.from_contents(tensor.contents, n)
        missing = [name for name in codec.order if name not in arrays]
        if missing:
            raise InvalidInput(
                f"expected {len(codec.order)} inputs but got {len(arrays)} inputs for model '{model}'; "
                f"missing input '{missing[0]}'",
                model=model, column=missing[0],
            )
        return arrays, rows or 0

    def _deadline(self, context: grpc.ServicerContext) -> float | None:
        """The earlier of the client's gRPC deadline and the server's request_timeout_s (monotonic)."""
        now = time.monotonic()
        candidates = []
        remaining = context.time_remaining()
        if remaining is not None:
            candidates.append(now + remaining)
        if self.request_timeout_s:
            candidates.append(now + self.request_timeout_s)
        return min(candidates) if candidates else None

    def infer(self, request: pb.ModelInferRequest, call: Call, deadline: float | None = None) -> pb.ModelInferResponse:
        model = request.model_name
        entry = self.core.model(model, request.model_version or None)
        codec = self._codec(entry)
        try:
            limit = entry.settings.max_message_bytes
            if limit:
                size = sum(len(raw) for raw in request.raw_input_contents)
                if size > limit:
                    raise ResourceExhausted(
                        f"request of {size} bytes of tensor data for model '{model}' exceeds its max_message_bytes "
                        f"({limit})",
                        model=model, limit="max_message_bytes", expected=limit, got=size,
                    )
            arrays, rows = self._decode(request, codec, model)
        except Exception as exc:
            self.core.record_failure(entry, call, exc)
            raise
        requested: Sequence[str] = list(dict.fromkeys(o.name for o in request.outputs))
        if codec.plain:
            return self._infer_plain(entry, codec, request, arrays, rows, requested, call, deadline)
        batch = codec.batch(arrays, rows)
        result = self.core.infer(model, entry.version, batch, outputs=requested or None, deadline=deadline, call=call)
        out = result.batch
        response = pb.ModelInferResponse(model_name=model, model_version=result.version, id=request.id)
        columns = dict(zip(out.schema.names, out.columns)) if codec.flat_outputs else _flat_columns(out, codec.skip)
        names = requested or list(columns)
        raw_outputs = []
        for name in names:
            if name not in columns:
                raise InvalidInput(f"output '{name}' of model '{model}' has no OIP datatype; read it over Flight",
                                   model=model, output=name)
            datatype, shape, data = encode_column(columns[name])
            response.outputs.add(name=name, datatype=datatype, shape=shape)
            raw_outputs.append(data)
        response.raw_output_contents.extend(raw_outputs)
        return response

    def _infer_plain(
        self, entry: ModelVersion, codec: _ModelCodec, request: pb.ModelInferRequest, arrays: dict[str, Any],
        rows: int, requested: Sequence[str], call: Call, deadline: float | None,
    ) -> pb.ModelInferResponse:
        selected, tensors = self.core.infer_tensors(entry, arrays, rows, requested or None, deadline, call)
        response = pb.ModelInferResponse(model_name=entry.name, model_version=entry.version, id=request.id)
        raw_outputs = []
        for binding in selected:
            tensor = tensors[binding.column]
            shape = list(tensor.shape) if tensor.ndim > 1 else [rows, 1]  # Triton's [N, 1] for one value per row
            response.outputs.add(name=binding.column, datatype=codec.out_datatype[binding.column], shape=shape)
            raw_outputs.append(np.ascontiguousarray(tensor).tobytes())
        response.raw_output_contents.extend(raw_outputs)
        return response

    @grpc_errors
    def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.ServicerContext) -> pb.ModelInferResponse:
        received = time.perf_counter_ns()
        with self.core.observer.call("grpc", "ModelInfer", received, request.model_name, _carrier(context)) as call:
            return self.infer(request, call, self._deadline(context))

    def ModelStreamInfer(
        self, request_iterator: Iterator[pb.ModelInferRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ModelStreamInferResponse]:
        """Answers each request in order on the stream; a failed request gets ``error_message`` and
        the stream stays open for the next."""
        stream_rows = 0
        for request in request_iterator:
            received = time.perf_counter_ns()
            stream_rows += max((int(t.shape[0]) for t in request.inputs if len(t.shape)), default=0)
            limit = self._stream_rows_limit(request.model_name)
            if limit and stream_rows > limit:
                context.abort(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"stream for model '{request.model_name}' carried {stream_rows} rows, more than "
                    f"max_stream_rows ({limit}); open a new stream",
                )
            observer = self.core.observer
            try:
                with observer.call("grpc", "ModelStreamInfer", received, request.model_name, _carrier(context)) as call:
                    response = self.infer(request, call, self._deadline(context))
            except IskanderError as exc:
                observer.unattributed_failure("grpc", "ModelStreamInfer", exc, call.request_id)
                message = exc.message
            except Exception as exc:  # noqa: BLE001 - one bad request must not end the stream
                log.exception("internal error in ModelStreamInfer (request id %s)", call.request_id)
                observer.unattributed_failure("grpc", "ModelStreamInfer", exc, call.request_id)
                message = f"internal server error (request id {call.request_id})"
            else:
                yield pb.ModelStreamInferResponse(infer_response=response)
                continue
            yield pb.ModelStreamInferResponse(
                error_message=message,
                infer_response=pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id
                ),
            )

    def _stream_rows_limit(self, model: str) -> int:
        try:
            own = self.core.registry.find(model).settings.max_stream_rows
        except IskanderError:
            own = None  # unknown model: the request itself will say so
        return own or self.max_stream_rows

    # --- Triton extensions: configuration, statistics, repository ------------------------------

    @grpc_errors
    def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.ServicerContext) -> pb.ModelConfigResponse:
        entry = self.core.model(request.name, request.version or None)
        return pb.ModelConfigResponse(config=model_config(entry, self.core.registry, self.core.max_batch_size(entry)))

    @grpc_errors
    def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: grpc.ServicerContext
    ) -> pb.ModelStatisticsResponse:
        snapshots = statistics(self.core.registry, request.name or None, request.version or None)
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(s) for s in snapshots])

    @grpc_errors
    def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[index(**m) for m in repository_index(self.core.registry, ready_only=request.ready)]
        )

    @grpc_errors
    def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelLoadResponse:
        overrides = sorted(k for k in request.parameters if k == "config" or k.startswith("file:"))
        if overrides:
            raise InvalidInput(
                f"load of model '{request.model_name}' carries '{overrides[0]}'; Iskander loads only models "
                "from its configuration and accepts no config or file overrides from clients",
                model=request.model_name,
            )
        self.core.registry.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
    def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: grpc.ServicerContext
    ) -> pb.RepositoryModelUnloadResponse:
        self.core.registry.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


def _carrier(context: grpc.ServicerContext) -> Callable[[], dict[str, str]]:
    """gRPC metadata as a W3C trace-context carrier (read only when tracing is on)."""
    return lambda: {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}


def _unimplemented(method: str, feature: str):
    def handler(self: OipServicer, request: object, context: grpc.ServicerContext) -> None:
        context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method}: Iskander does not implement {feature}"
            + ("; send tensors in the request" if "memory" in feature else ""),
        )

    handler.__name__ = method
    return handler


for _method, _feature in _UNIMPLEMENTED.items():
    setattr(OipServicer, _method, _unimplemented(_method, _feature))


_UNAUTHENTICATED = "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"


class TokenInterceptor(grpc.ServerInterceptor):
    """Refuses calls without a valid bearer token; grpc.health.v1 stays open when asked to."""

    def __init__(self, auth: TokenAuth, health_open: bool) -> None:
        self.auth = auth
        self.health_open = health_open

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        if self.health_open and handler_call_details.method.startswith("/grpc.health.v1.Health/"):
            return continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if self.auth.check(metadata.get("authorization")):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        return _denying(handler) if handler is not None else None


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED."""

    def deny(request: object, context: grpc.ServicerContext) -> None:
        context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


def make_grpc_server(
    core: InferenceCore, host: str, port: int, workers: int, max_message_bytes: int, request_timeout_s: float = 0.0,
    auth: TokenAuth | None = None, health_open: bool = True, tls: TlsFiles | None = None, max_stream_rows: int = 0,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    options = [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
    ]
    interceptors = [TokenInterceptor(auth, health_open)] if auth is not None and auth.enabled else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="oip"), options=options,
        interceptors=interceptors,
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(OipServicer(core, request_timeout_s, max_stream_rows), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        if tls is None:
            bound = server.add_insecure_port(f"{host}:{port}")
        else:
            credentials = grpc.ssl_server_credentials(
                [(tls.key, tls.cert)], root_certificates=tls.client_ca, require_client_auth=tls.client_ca is not None
            )
            bound = server.add_secure_port(f"{host}:{port}", credentials)
    except RuntimeError:  # grpcio >= 1.60 raises instead of returning 0
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind the OIP gRPC port {host}:{port} (in use, or not an address of this machine)")
    return server, bound, health_servicer


def set_health(health_servicer: health.HealthServicer, core: InferenceCore, serving: bool) -> None:
    """Server status under '' and the service name; each model's under its name (grpc_health_probe -service)."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    health_servicer.set("", status)
    health_servicer.set("inference.GRPCInferenceService", status)
    for name in core.registry.names():
        ready = serving and core.registry.find(name).state is ModelState.READY
        health_servicer.set(
            name, health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
