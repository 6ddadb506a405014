"""The one mapping from Iskander errors to Arrow Flight errors.

pyarrow's server turns plain Python exceptions (pa.ArrowInvalid, KeyError, ...) into the right gRPC
code but appends the server's Python traceback, file paths included, to the message. FlightError
subclasses travel cleanly and carry ``extra_info``, so every error is one of those, with the
Iskander code in the message prefix and in the JSON ``extra_info`` ({"code", "message", "model",
"column", "expected", "got", ...}). Clients branch on ``json.loads(e.extra_info)["code"]``.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pyarrow.flight as flight

from ..errors import ErrorCode, IskanderError
from ..observer import new_request_id, observed_request_id

log = logging.getLogger("iskander.flight")

_FLIGHT_ERRORS: dict[ErrorCode, type[flight.FlightError]] = {
    ErrorCode.INVALID_ARGUMENT: flight.FlightServerError,  # no Flight code for it; see extra_info
    ErrorCode.NOT_FOUND: flight.FlightServerError,
    ErrorCode.RESOURCE_EXHAUSTED: flight.FlightServerError,
    ErrorCode.UNIMPLEMENTED: flight.FlightServerError,
    ErrorCode.UNAVAILABLE: flight.FlightUnavailableError,
    ErrorCode.DEADLINE_EXCEEDED: flight.FlightTimedOutError,
    ErrorCode.INTERNAL: flight.FlightInternalError,
}


def to_flight_error(exc: IskanderError) -> flight.FlightError:
    cls = _FLIGHT_ERRORS[exc.code]
    return cls(f"[{exc.code.value}] {exc.message}", extra_info=json.dumps(exc.to_dict()).encode())


F = TypeVar("F", bound=Callable[..., Any])

# Flight RPC names for the handlers, as operators see them in logs and the rpc failure metric
_RPC_NAMES = {
    "do_exchange": "DoExchange", "do_action": "DoAction", "get_schema": "GetSchema",
    "get_flight_info": "GetFlightInfo", "list_flights": "ListFlights",
}


def _internal(method: str, exc: BaseException) -> flight.FlightError:
    request_id = observed_request_id(exc) or new_request_id()
    log.exception("internal error in Flight %s (request id %s)", method, request_id, exc_info=exc)
    body = {"code": ErrorCode.INTERNAL.value, "message": "internal server error", "request_id": request_id}
    return flight.FlightInternalError(
        f"[INTERNAL] internal server error (request id {request_id})", extra_info=json.dumps(body).encode()
    )


def _translated(exc: Exception, method: str, frontend: Any) -> flight.FlightError:
    """The one Flight error every failure of a handler leaves as; failures the core did not already
    account for a model are reported once to the observer (log line and metric)."""
    if isinstance(exc, flight.FlightError):
        return exc
    rpc = _RPC_NAMES.get(method, method)
    if isinstance(exc, IskanderError):
        frontend.core.observer.unattributed_failure("flight", rpc, exc)
        return to_flight_error(exc)
    error = _internal(rpc, exc)
    frontend.core.observer.unattributed_failure("flight", rpc, exc, observed_request_id(exc))
    return error


def flight_errors(method: F) -> F:
    """Decorate a handler so that every failure leaves as a clean Flight error."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except Exception as exc:
            raise _translated(exc, method.__name__, self) from None

    return wrapper  # type: ignore[return-value]


def flight_errors_gen(method: F) -> F:
    """Same as flight_errors, for handlers that return a generator (errors raise while iterating)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Iterator[Any]:
        try:
            yield from method(self, *args, **kwargs)
        except Exception as exc:
            raise _translated(exc, method.__name__, self) from None

    return wrapper  # type: ignore[return-value]
