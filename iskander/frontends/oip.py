"""KServe Open Inference Protocol v2 gRPC frontend, wire-compatible with Triton's GRPCInferenceService.

Translates OIP tensors into a dataplane request (an Arrow RecordBatch of the contract's input
columns, or numpy tensors for a plain contract), calls the dataplane, and encodes the output columns
as ``raw_output_contents``; discovery and repository RPCs encode the control plane's answers. RPCs not implemented here answer
UNIMPLEMENTED with the feature they belong to. This module is the servicer: plain blocking code,
no gRPC context. ``oip_server`` serves it with grpc.aio (where each call runs, admission, auth).
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
from google.protobuf.message import DecodeError

from iskander._proto import grpc_service_pb2 as pb
from iskander.core.control import ControlPlane
from iskander.core.dataplane import (
    SERVER_NAME, ArrowRequest, Dataplane, RequestContext, StreamRows, TensorRequest, server_version,
)
from iskander.core.model import ReadyModel
from iskander.errors import InvalidInput, IskanderError, StreamLimitExceeded
from iskander.observability.observer import new_request_id
from iskander.text import clip
from iskander.frontends.oip_codec import TensorDecoder, encode_column, oip_datatype, oip_shape, oip_view, passthrough_lists
from iskander.frontends.oip_errors import bounded, log
from iskander.frontends.oip_model_config import model_config, model_statistics

# Advertise only what is implemented (perf_analyzer and clients read this list).
EXTENSIONS: tuple[str, ...] = ("model_repository", "model_configuration", "statistics")

UNIMPLEMENTED = {
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

    def __init__(self, entry: ReadyModel) -> None:
        contract = entry.contract
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

    def __init__(self, dataplane: Dataplane, control: ControlPlane) -> None:
        self.dataplane = dataplane
        self.control = control
        self.observer = dataplane.observer
        # Keyed weakly by the contract object: a reloaded model gets a fresh codec and the old one
        # goes with its contract.
        self._codecs: weakref.WeakKeyDictionary[object, _ModelCodec] = weakref.WeakKeyDictionary()
        self._codecs_lock = threading.Lock()

    def _codec(self, entry: ReadyModel) -> _ModelCodec:
        key = entry.contract
        codec = self._codecs.get(key)
        if codec is None:
            with self._codecs_lock:
                codec = self._codecs.get(key) or _ModelCodec(entry)
                self._codecs[key] = codec
        return codec

    # --- health and metadata (cheap, lock-free reads: answered on the event loop) ------------------

    def ServerLive(self, request: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=self.control.live)

    def ServerReady(self, request: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.control.ready())

    def ModelReady(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=self.control.model_ready(request.name, request.version or None))

    def ServerMetadata(self, request: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=SERVER_NAME, version=server_version(), extensions=list(EXTENSIONS))

    def ModelMetadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        entry = self.control.model(request.name, request.version or None)
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=entry.name,
            versions=self.control.ready_versions(entry.name),
            platform=entry.platform,
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

    @staticmethod
    def client_deadline(time_remaining: float | None) -> float | None:
        """The client's gRPC deadline as time.monotonic() (the dataplane adds the server's own)."""
        return None if time_remaining is None else time.monotonic() + time_remaining

    def infer(self, request: pb.ModelInferRequest, ctx: RequestContext) -> pb.ModelInferResponse:
        model = request.model_name
        entry = self.dataplane.model(model, request.model_version or None)
        codec = self._codec(entry)
        nbytes = sum(len(raw) for raw in request.raw_input_contents)
        requested: Sequence[str] = list(dict.fromkeys(o.name for o in request.outputs))
        outputs = requested or None
        if codec.plain:
            def tensors() -> tuple[Mapping[str, Any], int]:
                return self._decode(request, codec, model)

            answer = self.dataplane.infer(entry, TensorRequest(nbytes, tensors, outputs), ctx)
            return self._plain_response(entry, codec, request, answer.outputs, answer.tensors, answer.rows)

        def batch() -> pa.RecordBatch:
            arrays, rows = self._decode(request, codec, model)
            return codec.batch(arrays, rows)

        out = self.dataplane.infer(entry, ArrowRequest(nbytes, batch, outputs), ctx)
        response = pb.ModelInferResponse(model_name=model, model_version=entry.version, id=request.id)
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

    @staticmethod
    def _plain_response(
        entry: ReadyModel, codec: _ModelCodec, request: pb.ModelInferRequest, selected: Sequence[Any],
        tensors: dict[str, np.ndarray], rows: int,
    ) -> pb.ModelInferResponse:
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
        """``deadline``: the client's, as time.monotonic()."""
        received = received or time.perf_counter_ns()
        if isinstance(request, bytes):
            request = _parse(pb.ModelInferRequest, request, "ModelInfer")
        return self.infer(request, RequestContext("grpc", "ModelInfer", received, deadline, _carrier(metadata)))

    def stream_step(
        self, raw: bytes, stream: StreamRows, time_remaining: float | None, received: int,
        metadata: Sequence[tuple[str, Any]] | None,
    ) -> bytes:
        """One ModelStreamInfer request -> the serialized answer. A failed request gets
        ``error_message`` and the stream stays open for the next; only the stream's row limit ends
        the stream (raises StreamLimitExceeded)."""
        observer = self.observer
        request = None
        ctx = RequestContext("grpc", "ModelStreamInfer", received, self.client_deadline(time_remaining),
                             _carrier(metadata), stream)
        try:
            request = _parse(pb.ModelInferRequest, raw, "ModelStreamInfer")
            response = self.infer(request, ctx)
            _mark_final(request, response)
            return pb.ModelStreamInferResponse(infer_response=response).SerializeToString()
        except StreamLimitExceeded:
            raise
        except IskanderError as exc:
            observer.unattributed_failure("grpc", "ModelStreamInfer", exc, ctx.request_id)
            message = bounded(exc.message)
        except Exception as exc:  # noqa: BLE001 - one bad request must not end the stream
            log.exception("internal error in ModelStreamInfer (request id %s)", ctx.request_id)
            observer.unattributed_failure("grpc", "ModelStreamInfer", exc, ctx.request_id)
            message = f"internal server error (request id {ctx.request_id})"
        echo = pb.ModelInferResponse()
        if request is not None:  # Triton echoes these so a client can match the error to its request
            echo = pb.ModelInferResponse(model_name=request.model_name, model_version=request.model_version,
                                         id=request.id)
            _mark_final(request, echo)
        return pb.ModelStreamInferResponse(error_message=message, infer_response=echo).SerializeToString()

    # --- Triton extensions: configuration, statistics, repository ------------------------------

    def ModelConfig(self, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        entry = self.control.model(request.name, request.version or None)
        return pb.ModelConfigResponse(config=model_config(entry, self.control.configured_versions(entry.name)))

    def ModelStatistics(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        snapshots = self.control.statistics(request.name or None, request.version or None)
        return pb.ModelStatisticsResponse(model_stats=[model_statistics(s) for s in snapshots])

    def RepositoryIndex(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
        index = pb.RepositoryIndexResponse.ModelIndex
        return pb.RepositoryIndexResponse(
            models=[index(**m) for m in self.control.repository_index(ready_only=request.ready)]
        )

    def RepositoryModelLoad(self, request: pb.RepositoryModelLoadRequest) -> pb.RepositoryModelLoadResponse:
        name = _repository_model(request)
        overrides = sorted(k for k in request.parameters if k == "config" or k.startswith("file:"))
        if overrides:
            raise InvalidInput(
                f"load of model '{clip(name)}' carries '{clip(overrides[0])}'; Iskander loads only "
                "models from its configuration and accepts no config or file overrides from clients",
                model=clip(name),
            )
        self.control.load(name)
        return pb.RepositoryModelLoadResponse()

    def RepositoryModelUnload(self, request: pb.RepositoryModelUnloadRequest) -> pb.RepositoryModelUnloadResponse:
        self.control.unload(_repository_model(request))
        return pb.RepositoryModelUnloadResponse()


def _repository_model(request: pb.RepositoryModelLoadRequest | pb.RepositoryModelUnloadRequest) -> str:
    """The model a load/unload names. Triton numbers ``model_name`` 2 (``repository_name`` is 1);
    KServe's Open Inference Protocol numbers ``model_name`` 1, which arrives here as
    ``repository_name``. Iskander has one repository, so a request with only field 1 set names a model."""
    return request.model_name or request.repository_name


def _mark_final(request: pb.ModelInferRequest, response: pb.ModelInferResponse) -> None:
    """Triton's ``triton_enable_empty_final_response``: each request's last (here: only) response carries
    ``triton_final_response = true``, so clients waiting for the end of a request stop waiting."""
    flag = request.parameters.get("triton_enable_empty_final_response")
    if flag is not None and flag.bool_param:
        response.parameters["triton_final_response"].bool_param = True


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


#
# One event loop in its own thread serves every connection. Health, liveness, readiness and metadata
# are answered on the loop; inference (decode + onnxruntime + encode, blocking) runs in a pool of
# grpc_workers threads. An idle stream is a suspended coroutine, so streams cannot starve anything.
