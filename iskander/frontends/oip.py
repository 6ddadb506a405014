"""KServe Open Inference Protocol v2 gRPC frontend, wire-compatible with Triton's GRPCInferenceService.

Translates OIP tensors to an Arrow RecordBatch (the contract's input columns), calls the core, and
encodes the output columns as ``raw_output_contents``. RPCs not implemented here answer
UNIMPLEMENTED with the feature they belong to. Served by grpc.aio (see "the asyncio gRPC server").
"""

from __future__ import annotations

import asyncio
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
import numpy as np
import pyarrow as pa
from google.protobuf.message import DecodeError
from grpc_health.v1 import _async as health_aio  # grpc_health's asyncio servicer (health.aio)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .._proto import grpc_service_pb2 as pb
from ..auth import TlsFiles, TokenAuth
from ..core import SERVER_NAME, InferenceCore, server_version
from ..errors import InvalidInput, IskanderError, ResourceExhausted
from ..model_info import ready_versions, repository_index, statistics
from ..observer import Call, new_request_id
from ..registry import ModelState, ModelVersion
from ..text import clip
from .oip_codec import TensorDecoder, encode_column, oip_datatype, oip_shape, oip_view, passthrough_lists
from .oip_errors import abort_with, bounded, log
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


class OipServicer:
    """The OIP v2 RPCs as plain blocking methods that raise Iskander errors: no gRPC context in here.
    ``AioOip`` decides where each runs (event loop or thread pool) and maps errors to statuses."""

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

    # --- health and metadata (cheap, lock-free reads: answered on the event loop) ------------------

    def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.core.live)

    def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.core.ready())

    def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        try:
            entry = self.core.registry.find(request.name, request.version or None)
        except Exception:  # unknown model or version: not ready (Triton answers the same)
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=entry.state is ModelState.READY)

    def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=list(EXTENSIONS))

    def ModelMetadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        entry = self.core.model(request.name, request.version or None)
        assert entry.contract is not None and entry.backend is not None
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=entry.name,
            versions=ready_versions(self.core.registry, entry.name),
            platform=entry.backend.platform,
            inputs=[tensor(name=name, datatype=oip_datatype(t), shape=oip_shape(t))
                    for name, t in oip_view(entry.contract.input_schema, requests=True)],
            outputs=[tensor(name=name, datatype=oip_datatype(t), shape=oip_shape(t))
                     for name, t in oip_view(entry.contract.output_schema,
                                             skip=passthrough_lists(entry.contract.passthrough))],
        )

    # --- inference (blocking: decode, onnxruntime, encode; run in the thread pool) -----------------

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
                    f"unexpected inference input '{clip(tensor.name)}' for model '{model}'; inputs: "
                    f"{', '.join(codec.order)}",
                    model=model, column=clip(tensor.name),
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

    def deadline(self, time_remaining: float | None) -> float | None:
        """The earlier of the client's gRPC deadline and the server's request_timeout_s (monotonic)."""
        now = time.monotonic()
        candidates = []
        if time_remaining is not None:
            candidates.append(now + time_remaining)
        if self.request_timeout_s:
            candidates.append(now + self.request_timeout_s)
        return min(candidates) if candidates else None

    def infer(
        self, request: pb.ModelInferRequest, call: Call, deadline: float | None = None,
        stream: _StreamRows | None = None,
    ) -> pb.ModelInferResponse:
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
        if stream is not None:  # counted only once the shapes are validated
            stream.add(rows, entry.settings.max_stream_rows or self.max_stream_rows, model)
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
                raise InvalidInput(f"output '{clip(name)}' of model '{model}' has no OIP datatype; read it over "
                                   "Flight", model=model, output=clip(name))
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

    def ModelInfer(
        self, request: pb.ModelInferRequest | bytes, deadline: float | None = None, received: int | None = None,
        metadata: Sequence[tuple[str, Any]] | None = None,
    ) -> pb.ModelInferResponse:
        received = received or time.perf_counter_ns()
        if isinstance(request, bytes):
            request = _parse(pb.ModelInferRequest, request, "ModelInfer")
        with self.core.observer.call("grpc", "ModelInfer", received, request.model_name, _carrier(metadata)) as call:
            return self.infer(request, call, deadline)

    def stream_step(
        self, raw: bytes, stream: _StreamRows, time_remaining: float | None, received: int,
        metadata: Sequence[tuple[str, Any]] | None,
    ) -> bytes:
        """One ModelStreamInfer request -> the serialized answer. A failed request gets
        ``error_message`` and the stream stays open for the next; only the stream's row limit ends
        the stream (raises _StreamLimit)."""
        observer = self.core.observer
        request = None
        call = None
        try:
            request = _parse(pb.ModelInferRequest, raw, "ModelStreamInfer")
            with observer.call("grpc", "ModelStreamInfer", received, request.model_name, _carrier(metadata)) as call:
                response = self.infer(request, call, self.deadline(time_remaining), stream)
            return pb.ModelStreamInferResponse(infer_response=response).SerializeToString()
        except _StreamLimit:
            raise
        except IskanderError as exc:
            observer.unattributed_failure("grpc", "ModelStreamInfer", exc, call.request_id if call else None)
            message = bounded(exc.message)
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the stream
            request_id = call.request_id if call else new_request_id()
            log.exception("internal error in ModelStreamInfer (request id %s)", request_id)
            observer.unattributed_failure("grpc", "ModelStreamInfer", exc, request_id)
            message = f"internal server error (request id {request_id})"
        echo = pb.ModelInferResponse()
        if request is not None:  # Triton echoes these so a client can match the error to its request
            echo = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                         id=request.id)
        return pb.ModelStreamInferResponse(error_message=message, infer_response=echo).SerializeToString()

    # --- Triton extensions: configuration, statistics, repository ------------------------------

    def ModelConfig(self, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        entry = self.core.model(request.name, request.version or None)
        return pb.ModelConfigResponse(config=model_config(entry, self.core.registry, self.core.max_batch_size(entry)))

    def ModelStatistics(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        snapshots = statistics(self.core.registry, request.name or None, request.version or None)
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(s) for s in snapshots])

    def RepositoryIndex(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[index(**m) for m in repository_index(self.core.registry, ready_only=request.ready)]
        )

    def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest) -> pb.RepositoryModelLoadResponse:
        overrides = sorted(k for k in request.parameters if k == "config" or k.startswith("file:"))
        if overrides:
            raise InvalidInput(
                f"load of model '{clip(request.model_name)}' carries '{clip(overrides[0])}'; Iskander loads only "
                "models from its configuration and accepts no config or file overrides from clients",
                model=clip(request.model_name),
            )
        self.core.registry.load(request.model_name)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest) -> pb.RepositoryModelUnloadResponse:
        self.core.registry.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()


class _StreamLimit(Exception):
    """The stream carried more rows than max_stream_rows: the stream ends RESOURCE_EXHAUSTED."""


class _StreamRows:
    """Rows one ModelStreamInfer stream has carried; touched by one pool thread at a time (a
    stream's requests are answered in order)."""

    __slots__ = ("rows",)

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int, limit: int, model: str) -> None:
        self.rows += rows
        if limit and self.rows > limit:
            raise _StreamLimit(f"stream for model '{clip(model)}' carried {self.rows} rows, more than "
                               f"max_stream_rows ({limit}); open a new stream")


def _parse(message_type: type, raw: bytes, method: str) -> Any:
    """Request bytes -> message; bytes that are not one are the client's mistake, not INTERNAL."""
    try:
        return message_type.FromString(raw)
    except DecodeError:
        raise InvalidInput(f"{method}: the request is not a valid {message_type.DESCRIPTOR.full_name} "
                           f"message ({len(raw)} bytes)") from None


def _carrier(metadata: Sequence[tuple[str, Any]] | None) -> Callable[[], dict[str, str]] | None:
    """gRPC metadata as a W3C trace-context carrier (captured only when tracing is on)."""
    if metadata is None:
        return None
    return lambda: {k: v for k, v in metadata if isinstance(v, str)}


# --- the asyncio gRPC server --------------------------------------------------------------------
#
# One event loop in its own thread serves every connection. Health, liveness, readiness and metadata
# are answered on the loop; inference (decode + onnxruntime + encode, blocking) runs in a pool of
# grpc_workers threads. An idle stream is a suspended coroutine, so streams cannot starve anything.

_SERVICE = "inference.GRPCInferenceService"
_HEALTH_PREFIX = "/grpc.health.v1.Health/"
# cheap reads answered on the loop; every other implemented unary RPC runs in the pool
_ON_LOOP = frozenset({"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
                      "ModelStatistics", "RepositoryIndex"})
_IN_POOL = frozenset({"RepositoryModelLoad", "RepositoryModelUnload"})


class _Undecodable:
    """What a request deserializer returns for bytes that are not the message, so the handler
    answers INVALID_ARGUMENT (grpc's own path would answer INTERNAL)."""

    __slots__ = ("size",)

    def __init__(self, size: int) -> None:
        self.size = size


def _deserializer(message_type: type) -> Callable[[bytes], Any]:
    def parse(raw: bytes) -> Any:
        try:
            return message_type.FromString(raw)
        except DecodeError:
            return _Undecodable(len(raw))

    return parse


class Admission:
    """Transport admission: inference calls (unary and streams) open at once, and of those,
    streams. Touched only on the event loop, so plain counters suffice."""

    def __init__(self, max_rpcs: int, max_streams: int) -> None:
        self.max_rpcs = max_rpcs
        self.max_streams = max_streams
        self.rpcs = 0
        self.streams = 0

    def refusal(self, stream: bool) -> str | None:
        """None when admitted (and counted); otherwise why not."""
        if self.max_rpcs and self.rpcs >= self.max_rpcs:
            return (f"server busy: {self.rpcs} inference calls open, the limit is max_concurrent_rpcs "
                    f"({self.max_rpcs}); retry later")
        if stream and self.max_streams and self.streams >= self.max_streams:
            return (f"server busy: {self.streams} ModelStreamInfer streams open, the limit is max_concurrent_streams "
                    f"({self.max_streams}); retry later or reuse a stream")
        self.rpcs += 1
        self.streams += stream
        return None

    def leave(self, stream: bool) -> None:
        self.rpcs -= 1
        self.streams -= stream


class InlinePolicy:
    """Which inference requests run on the event loop itself rather than in the pool.

    Handing a request to a pool thread and back costs more than a cheap model's whole run (measured
    with bench/ab_oip.py: running every b128 request on the loop gave 2.1-2.2x the throughput of the
    thread hand-off). But a request on the loop delays everything else on it, health included. So a
    request runs inline only when its message is small (INLINE_MAX_BYTES), its model version is not
    dynamically batched (the batcher waits for company, which must not happen on the loop), and the
    model version's recent cost per request, learned from earlier requests (the first ones go to the
    pool), is under INLINE_BUDGET_S, and no more than INLINE_MAX_OPEN inference calls are open. The
    cost is the thread's CPU time (``time.thread_time``: the servicer's Python plus onnxruntime at
    intra_op 1, not time spent waiting for the GIL or a batch), which is what the loop would be held
    for. At most INLINE_MAX_OPEN such requests can be ready ahead of a health probe, so the probe
    waits at most about 24 x 2 ms = 48 ms; beyond that many open calls, requests go to the pool."""

    INLINE_MAX_BYTES = 64 * 1024
    INLINE_BUDGET_S = 0.002
    INLINE_MAX_OPEN = 24
    _ALPHA = 0.2  # EWMA weight of the newest request

    def __init__(self, core: InferenceCore) -> None:
        self.core = core
        self._cost: dict[tuple[str, str], float] = {}  # (model, version asked) -> EWMA seconds per request

    def inline(self, request: pb.ModelInferRequest, open_calls: int) -> bool:
        if open_calls > self.INLINE_MAX_OPEN:
            return False
        key = (request.model_name, request.model_version)
        cost = self._cost.get(key)
        if cost is None or cost >= self.INLINE_BUDGET_S:
            return False
        try:
            entry = self.core.registry.find(request.model_name, request.model_version or None)
        except Exception:  # noqa: BLE001 - unknown model: the pool path reports it
            return False
        return entry.settings.dynamic_batching is None

    def record(self, request: pb.ModelInferRequest, seconds: float) -> None:
        """Called from the loop or a pool thread; a lost update under a race only delays learning."""
        key = (request.model_name, request.model_version)
        cost = self._cost.get(key)
        if cost is None and len(self._cost) > 4096:  # names are client-chosen: bound the table
            self._cost.clear()
        self._cost[key] = seconds if cost is None else cost + self._ALPHA * (seconds - cost)


class AioOip:
    """gRPC handlers for the inference service on a grpc.aio server."""

    def __init__(self, servicer: OipServicer, pool: futures.ThreadPoolExecutor, admission: Admission) -> None:
        self.servicer = servicer
        self.observer = servicer.core.observer
        self.pool = pool
        self.admission = admission
        self.inline = InlinePolicy(servicer.core)

    def _timed_infer(self, request: pb.ModelInferRequest, deadline: float | None, received: int,
                     metadata: Any) -> bytes:
        started = time.thread_time()
        try:
            return self.servicer.ModelInfer(request, deadline, received, metadata).SerializeToString()
        finally:
            self.inline.record(request, time.thread_time() - started)

    def _timed_step(self, request: pb.ModelInferRequest, raw: bytes, rows: Any, time_remaining: float | None,
                    received: int, metadata: Any) -> bytes:
        started = time.thread_time()
        try:
            return self.servicer.stream_step(raw, rows, time_remaining, received, metadata)
        finally:
            self.inline.record(request, time.thread_time() - started)

    def _small(self, raw: bytes) -> pb.ModelInferRequest | None:
        """The parsed request when it is small enough to consider running inline (parsing it on the
        loop costs a few microseconds); None for large or undecodable ones (the pool path reports)."""
        if len(raw) > InlinePolicy.INLINE_MAX_BYTES:
            return None
        try:
            return pb.ModelInferRequest.FromString(raw)
        except DecodeError:
            return None

    def handlers(self) -> grpc.GenericRpcHandler:
        service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
        handlers: dict[str, grpc.RpcMethodHandler] = {}
        for method in service.methods:
            name = method.name
            request_type = getattr(pb, method.input_type.name)
            if name == "ModelInfer":
                # request_streaming so that admission decides before the payload is read; raw bytes in
                # and out so that parsing and serializing run in the pool, not on the loop
                handlers[name] = grpc.stream_unary_rpc_method_handler(self._model_infer)
            elif name == "ModelStreamInfer":
                handlers[name] = grpc.stream_stream_rpc_method_handler(self._model_stream_infer)
            elif name in _ON_LOOP or name in _IN_POOL:
                handlers[name] = grpc.unary_unary_rpc_method_handler(
                    self._unary(name, getattr(self.servicer, name), in_pool=name in _IN_POOL),
                    request_deserializer=_deserializer(request_type),
                    response_serializer=lambda m: m.SerializeToString(),
                )
            else:
                handlers[name] = grpc.unary_unary_rpc_method_handler(
                    _unimplemented(name, _UNIMPLEMENTED.get(name, name)),
                    request_deserializer=lambda raw: raw,
                )
        return grpc.method_handlers_generic_handler(_SERVICE, handlers)

    def _unary(self, name: str, method: Callable[[Any], Any], in_pool: bool):  # type: ignore[no-untyped-def]
        async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"{name}: the request is not a valid message ({request.size} bytes)")
            try:
                if in_pool:
                    return await asyncio.get_running_loop().run_in_executor(self.pool, method, request)
                return method(request)
            except Exception as exc:  # noqa: BLE001 - mapped to a status once, in oip_errors
                await abort_with(context, exc, self.observer, name)

        return handler

    async def _enter(self, context: grpc.aio.ServicerContext, stream: bool) -> None:
        refusal = self.admission.refusal(stream)
        if refusal is not None:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refusal)

    def _metadata(self, context: grpc.aio.ServicerContext) -> Sequence[tuple[str, Any]] | None:
        return context.invocation_metadata() if self.observer.tracing is not None else None

    async def _model_infer(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> bytes:
        received = time.perf_counter_ns()
        await self._enter(context, stream=False)
        try:
            raw = await context.read()
            if raw is grpc.aio.EOF:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "ModelInfer: no request message")
            received = time.perf_counter_ns()
            deadline = self.servicer.deadline(context.time_remaining())
            try:
                request = self._small(raw)
                if request is None:
                    response = await asyncio.get_running_loop().run_in_executor(
                        self.pool, _infer_bytes, self.servicer, raw, deadline, received, self._metadata(context)
                    )
                elif self.inline.inline(request, self.admission.rpcs):
                    response = self._timed_infer(request, deadline, received, self._metadata(context))
                else:
                    response = await asyncio.get_running_loop().run_in_executor(
                        self.pool, self._timed_infer, request, deadline, received, self._metadata(context)
                    )
            except Exception as exc:  # noqa: BLE001 - mapped to a status once, in oip_errors
                await abort_with(context, exc, self.observer, "ModelInfer")
            return response
        finally:
            self.admission.leave(stream=False)

    async def _model_stream_infer(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        """Answers each request in order on the stream; a failed request gets ``error_message`` and
        the stream stays open for the next."""
        await self._enter(context, stream=True)
        try:
            loop = asyncio.get_running_loop()
            rows = _StreamRows()
            metadata = self._metadata(context)
            while True:
                raw = await context.read()
                if raw is grpc.aio.EOF:
                    return
                received = time.perf_counter_ns()
                try:
                    request = self._small(raw)
                    if request is None:
                        answer = await loop.run_in_executor(
                            self.pool, self.servicer.stream_step, raw, rows, context.time_remaining(), received,
                            metadata,
                        )
                    elif self.inline.inline(request, self.admission.rpcs):
                        answer = self._timed_step(request, raw, rows, context.time_remaining(), received, metadata)
                    else:
                        answer = await loop.run_in_executor(
                            self.pool, self._timed_step, request, raw, rows, context.time_remaining(), received,
                            metadata,
                        )
                except _StreamLimit as exc:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
                await context.write(answer)
        finally:
            self.admission.leave(stream=True)


def _infer_bytes(
    servicer: OipServicer, raw: bytes, deadline: float | None, received: int, metadata: Any
) -> bytes:
    return servicer.ModelInfer(raw, deadline, received, metadata).SerializeToString()


def _unimplemented(method: str, feature: str):  # type: ignore[no-untyped-def]
    async def handler(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{method}: Iskander does not implement {feature}"
            + ("; send tensors in the request" if "memory" in feature else ""),
        )

    return handler


_UNAUTHENTICATED = "missing or invalid bearer token: send metadata 'authorization: Bearer <token>'"


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls without exactly one valid bearer token; grpc.health.v1 stays open when asked to."""

    def __init__(self, auth: TokenAuth, health_open: bool) -> None:
        self.auth = auth
        self.health_open = health_open

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        if self.health_open and handler_call_details.method.startswith(_HEALTH_PREFIX):
            return await continuation(handler_call_details)
        values = [v for k, v in handler_call_details.invocation_metadata or () if k == "authorization"]
        handler = await continuation(handler_call_details)
        if self.auth.check_headers(values):
            return handler
        return _denying(handler) if handler is not None else None


def _denying(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` that answers UNAUTHENTICATED (a streaming-request
    handler, like ModelInfer's, refuses before reading the payload)."""

    async def deny(request: object, context: grpc.aio.ServicerContext) -> None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _UNAUTHENTICATED)

    kinds = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }
    make = kinds[(handler.request_streaming, handler.response_streaming)]
    return make(deny, request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)


class LoopHealth:
    """grpc.health.v1 statuses set from any thread; the aio HealthServicer lives on the loop."""

    def __init__(self, servicer: health_aio.HealthServicer, loop: asyncio.AbstractEventLoop) -> None:
        self.servicer = servicer
        self.loop = loop

    def set(self, service: str, status: int) -> None:
        if not self.loop.is_running():  # stopped: nothing would run the update
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self.loop:
            self.loop.create_task(self.servicer.set(service, status))
            return
        try:
            asyncio.run_coroutine_threadsafe(self.servicer.set(service, status), self.loop).result(timeout=5)
        except (RuntimeError, futures.TimeoutError):  # loop stopping: statuses no longer matter
            pass


class GrpcServer:
    """The grpc.aio server and its event loop thread, with the sync face server.py drives:
    start() and stop(grace) -> an Event set once every call has ended."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, server: grpc.aio.Server,
                 pool: futures.ThreadPoolExecutor) -> None:
        self.loop = loop
        self.thread = thread
        self.server = server
        self.pool = pool

    def _run(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self._run(self.server.start(), timeout=30)

    def stop(self, grace: float | None) -> threading.Event:
        done = threading.Event()

        async def stop() -> None:
            try:
                await self.server.stop(grace)
            finally:
                self.pool.shutdown(wait=False, cancel_futures=True)
                done.set()
                asyncio.get_running_loop().call_soon(self.loop.stop)

        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(stop(), self.loop)
        else:
            done.set()
        return done


def _loop_thread() -> tuple[asyncio.AbstractEventLoop, threading.Thread]:
    loop = asyncio.new_event_loop()
    started = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.call_soon(started.set)
        try:
            loop.run_forever()
        finally:
            loop.close()

    thread = threading.Thread(target=run, name="oip-loop", daemon=True)
    thread.start()
    started.wait(10)
    return loop, thread


def make_grpc_server(
    core: InferenceCore, host: str, port: int, workers: int, max_message_bytes: int, request_timeout_s: float = 0.0,
    auth: TokenAuth | None = None, health_open: bool = True, tls: TlsFiles | None = None, max_stream_rows: int = 0,
    max_concurrent_rpcs: int = 0, max_concurrent_streams: int = 0,
) -> tuple[GrpcServer, int, LoopHealth]:
    loop, thread = _loop_thread()
    pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="oip")
    oip = AioOip(OipServicer(core, request_timeout_s, max_stream_rows), pool,
                 Admission(max_concurrent_rpcs, max_concurrent_streams))

    async def build() -> tuple[grpc.aio.Server, int, health_aio.HealthServicer]:
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server on the same port must fail, not share it
            # Without BDP probing a stream's receive window stays at 64 KiB until the handler reads, so a
            # call refused by admission costs that much, not its whole payload (measured: a storm of 80 x 2 MB
            # calls grew the server by ~165 MB with probing, ~70 MB without). Costs throughput only for
            # messages far above 64 KiB on links with a long round trip.
            ("grpc.http2.bdp_probe", 0),
        ]
        interceptors = [TokenInterceptor(auth, health_open)] if auth is not None and auth.enabled else []
        server = grpc.aio.server(options=options, interceptors=interceptors)
        server.add_generic_rpc_handlers((oip.handlers(),))
        health_servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        try:
            if tls is None:
                bound = server.add_insecure_port(f"{host}:{port}")
            else:
                credentials = grpc.ssl_server_credentials(
                    [(tls.key, tls.cert)], root_certificates=tls.client_ca,
                    require_client_auth=tls.client_ca is not None,
                )
                bound = server.add_secure_port(f"{host}:{port}", credentials)
        except RuntimeError:  # grpcio >= 1.60 raises instead of returning 0
            bound = 0
        return server, bound, health_servicer

    server, bound, health_servicer = asyncio.run_coroutine_threadsafe(build(), loop).result(30)
    grpc_server = GrpcServer(loop, thread, server, pool)
    if bound == 0:
        grpc_server.stop(None).wait(5)
        raise OSError(f"cannot bind the OIP gRPC port {host}:{port} (in use, or not an address of this machine)")
    return grpc_server, bound, LoopHealth(health_servicer, loop)


def set_health(health_servicer: LoopHealth, core: InferenceCore, serving: bool) -> None:
    """Server status under '' and the service name; each model's under its name (grpc_health_probe -service)."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    health_servicer.set("", status)
    health_servicer.set("inference.GRPCInferenceService", status)
    for name in core.registry.names():
        ready = serving and core.registry.find(name).state is ModelState.READY
        health_servicer.set(
            name, health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )
