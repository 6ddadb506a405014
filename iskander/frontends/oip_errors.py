"""The one mapping from Iskander errors to gRPC status codes for the OIP v2 frontend."""

from __future__ import annotations

import logging

import grpc

from iskander.errors import ErrorCode, IskanderError
from iskander.observability.observer import Observer, new_request_id, observed_request_id
from iskander.text import clip

log = logging.getLogger("iskander.oip")

GRPC_STATUS: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorCode.UNIMPLEMENTED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorCode.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}

# Messages can quote client text from places that do not clip it themselves (the registry's
# lookups); this bounds what one request can make the server send back or log.
MAX_MESSAGE_CHARS = 2048


def bounded(message: str) -> str:
    return clip(message, MAX_MESSAGE_CHARS)


def status_for(exc: BaseException, observer: Observer, method: str) -> tuple[grpc.StatusCode, str]:
    """The status a failed call answers with. Iskander errors keep their code and message; anything
    else is logged with a request id and answered INTERNAL without internals. Failures the core did
    not already account for a model are reported once to the observer (log line and metric)."""
    if isinstance(exc, IskanderError):
        observer.unattributed_failure("grpc", method, exc)
        return GRPC_STATUS[exc.code], bounded(exc.message)
    request_id = observed_request_id(exc) or new_request_id()
    log.error("internal error in %s (request id %s)", method, request_id, exc_info=exc)
    observer.unattributed_failure("grpc", method, exc, request_id)
    return grpc.StatusCode.INTERNAL, f"internal server error (request id {request_id})"


async def abort_with(context: grpc.aio.ServicerContext, exc: BaseException, observer: Observer, method: str) -> None:
    code, message = status_for(exc, observer, method)
    await context.abort(code, message)
