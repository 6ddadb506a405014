"""The one mapping from Iskander errors to gRPC status codes for the OIP v2 frontend."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from ..errors import ErrorCode, IskanderError
from ..observer import new_request_id, observed_request_id

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

F = TypeVar("F", bound=Callable[..., Any])


def grpc_errors(method: F) -> F:
    """Decorate a unary servicer method: Iskander errors abort with their status; anything else is
    logged with a request id and answered INTERNAL without internals. Failures the core did not
    already account for a model are reported once to the observer (log line and metric)."""

    @functools.wraps(method)
    def wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except IskanderError as exc:
            self.core.observer.unattributed_failure("grpc", method.__name__, exc)
            context.abort(GRPC_STATUS[exc.code], exc.message)
        except Exception as exc:  # noqa: BLE001 - the last line of defence for one request
            if isinstance(exc, grpc.RpcError) or type(exc).__name__ == "_AbortError":
                raise
            request_id = observed_request_id(exc) or new_request_id()
            log.exception("internal error in %s (request id %s)", method.__name__, request_id)
            self.core.observer.unattributed_failure("grpc", method.__name__, exc, request_id)
            context.abort(grpc.StatusCode.INTERNAL, f"internal server error (request id {request_id})")

    return wrapper  # type: ignore[return-value]
