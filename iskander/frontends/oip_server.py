"""The asyncio gRPC server for the OIP v2 servicer (``oip.OipServicer``).

One event loop thread answers health, liveness, readiness and metadata, and runs small requests to
cheap models itself (``InlinePolicy``); every other inference request goes to a pool of
``grpc_workers`` threads. Inference calls are admitted here, before their payload is read
(``Admission``). docs/operations.md has the measurements behind each choice.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import _async as health_aio  # grpc_health's asyncio servicer (health.aio)
from grpc_health.v1 import health_pb2, health_pb2_grpc

from iskander._proto import grpc_service_pb2 as pb
from iskander.auth import TlsFiles, TokenAuth
from iskander.core.control import ControlPlane
from iskander.core.dataplane import Dataplane, StreamRows
from iskander.errors import StreamLimitExceeded
from iskander.frontends.oip import UNIMPLEMENTED, OipServicer
from iskander.frontends.oip_errors import abort_with

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

    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self._cost: dict[tuple[str, str], float] = {}  # (model, version asked) -> EWMA seconds per request

    def inline(self, request: pb.ModelInferRequest, open_calls: int) -> bool:
        if open_calls > self.INLINE_MAX_OPEN:
            return False
        key = (request.model_name, request.model_version)
        cost = self._cost.get(key)
        if cost is None or cost >= self.INLINE_BUDGET_S:
            return False
        try:
            entry = self.control.entry(request.model_name, request.model_version or None)
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
        self.observer = servicer.observer
        self.pool = pool
        self.admission = admission
        self.inline = InlinePolicy(servicer.control)

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
                    _unimplemented(name, UNIMPLEMENTED.get(name, name)),
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
            deadline = self.servicer.client_deadline(context.time_remaining())
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
            rows = StreamRows()
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
                except StreamLimitExceeded as exc:
                    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.message)
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
    dataplane: Dataplane, control: ControlPlane, host: str, port: int, workers: int, max_message_bytes: int,
    auth: TokenAuth | None = None, health_open: bool = True, tls: TlsFiles | None = None,
    max_concurrent_rpcs: int = 0, max_concurrent_streams: int = 0,
) -> tuple[GrpcServer, int, LoopHealth]:
    loop, thread = _loop_thread()
    pool = futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="oip")
    oip = AioOip(OipServicer(dataplane, control), pool,
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


# grpc.health service SERVING exactly when ServerReady is true; model names cannot hold "/", so no clash
READY_SERVICE = "iskander/ready"


def set_health(health_servicer: LoopHealth, control: ControlPlane, serving: bool) -> None:
    """Server status under '' and the service name (liveness: the process serves); readiness under
    'iskander/ready' (every configured model loaded, as ServerReady); each model's under its name
    (grpc_health_probe -service)."""
    def status(up: bool) -> int:
        return health_pb2.HealthCheckResponse.SERVING if up else health_pb2.HealthCheckResponse.NOT_SERVING

    health_servicer.set("", status(serving))
    health_servicer.set("inference.GRPCInferenceService", status(serving))
    health_servicer.set(READY_SERVICE, status(serving and control.ready()))
    for name, ready in control.model_health().items():
        health_servicer.set(name, status(serving and ready))
