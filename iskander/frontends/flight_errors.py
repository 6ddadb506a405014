"""The one mapping from Iskander errors to Arrow Flight errors, with the right gRPC status code.

pyarrow's Flight server can put a gRPC code on the wire in two ways, and each covers only part of
what a client must be told:
- a ``FlightError`` subclass travels as its Flight status (UNAVAILABLE, DEADLINE_EXCEEDED,
  INTERNAL, UNAUTHENTICATED, ...) with ``extra_info`` bytes, but there is no Flight status for
  INVALID_ARGUMENT, NOT_FOUND or UNIMPLEMENTED (``FlightServerError`` is gRPC UNKNOWN);
- any other Python exception travels by its Arrow status: ``ArrowInvalid``/``ValueError`` as
  INVALID_ARGUMENT, ``KeyError`` as NOT_FOUND, ``NotImplementedError`` as UNIMPLEMENTED, with the
  formatted Python exception appended as the status detail (``x-arrow-status-detail-bin`` and the
  message after ". Detail: ").
So client mistakes are raised as the plain exception of their code and everything else as the
FlightError of its code. The formatted exception would carry a traceback with the server's file
paths and source lines: ``hide_tracebacks`` (called once by the server process) sets
``sys.tracebacklimit = 0``, which is what ``traceback.format_exception`` reads, so the detail is just
the exception's type, message and the JSON details note. Iskander's own log lines format
tracebacks with an explicit limit (logs.py), so they keep theirs.

Every error carries the JSON details ({"code", "message", "model", "column", "expected", "got",
...}): as ``extra_info`` for FlightErrors, as the last line of the status detail otherwise
(``iskander.client.flight_status.error_details`` reads both). The message starts with ``[CODE]`` in both.

gRPC has RESOURCE_EXHAUSTED but pyarrow's server cannot send it (no Arrow or Flight status maps to
it). A limit the client can wait out (max_inflight, the concurrency caps) goes as UNAVAILABLE, which
retry policies retry; a request that is too large for a limit (max_message_bytes, max_stream_rows,
max_batch_size) goes as INVALID_ARGUMENT, since sending it again cannot succeed. The JSON ``code``
stays RESOURCE_EXHAUSTED in both cases.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import pyarrow as pa
import pyarrow.flight as flight

from iskander.errors import ErrorCode, IskanderError
from iskander.observability.observer import new_request_id, observed_request_id
from iskander.text import clip

log = logging.getLogger("iskander.flight")

# pyarrow repeats the message ~6 times across the status and its trailers; gRPC clients drop
# trailers over 8 KiB (soft limit) with RESOURCE_EXHAUSTED, losing the real status
MAX_MESSAGE_CHARS = 600

# limits a client can wait out: RESOURCE_EXHAUSTED on these goes as UNAVAILABLE (retryable)
TRANSIENT_LIMITS = frozenset({"max_inflight", "max_concurrent_rpcs", "max_concurrent_streams"})


def hide_tracebacks() -> None:
    """Keep server tracebacks off the Flight wire (see the module docstring). Process-wide: call
    it from the server process only, never from a library user's process."""
    sys.tracebacklimit = 0


class _Noted:
    """Mixin: the JSON details ride as an exception note, which pyarrow sends in the status detail."""

    def __init__(self, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)  # type: ignore[call-arg]
        self.add_note(json.dumps(details))  # type: ignore[attr-defined]

    def __str__(self) -> str:  # KeyError would quote its message
        return str(self.args[0])


# Short names and __module__ "iskander" keep the status detail readable: "iskander.InvalidArgument: ..."
class InvalidArgument(_Noted, pa.ArrowInvalid):
    __module__ = "iskander"


class NotFound(_Noted, KeyError):
    __module__ = "iskander"


class Unimplemented(_Noted, NotImplementedError):
    __module__ = "iskander"


_PLAIN: dict[ErrorCode, type[_Noted]] = {
    ErrorCode.INVALID_ARGUMENT: InvalidArgument,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.UNIMPLEMENTED: Unimplemented,
}

_FLIGHT: dict[ErrorCode, type[flight.FlightError]] = {
    ErrorCode.UNAVAILABLE: flight.FlightUnavailableError,
    ErrorCode.DEADLINE_EXCEEDED: flight.FlightTimedOutError,
    ErrorCode.INTERNAL: flight.FlightInternalError,
}


def to_flight_error(exc: IskanderError) -> Exception:
    """The exception that puts ``exc``'s code on the gRPC wire (see the module docstring)."""
    code = exc.code
    if code is ErrorCode.RESOURCE_EXHAUSTED:
        code = ErrorCode.UNAVAILABLE if exc.details.get("limit") in TRANSIENT_LIMITS else ErrorCode.INVALID_ARGUMENT
    message = f"[{exc.code.value}] {clip(exc.message, MAX_MESSAGE_CHARS)}"
    details = {k: clip(v) if isinstance(v, str) and k != "message" else v for k, v in exc.to_dict().items()}
    details["message"] = clip(exc.message, MAX_MESSAGE_CHARS)
    plain = _PLAIN.get(code)
    if plain is not None:
        return plain(message, details)  # type: ignore[return-value]
    return _FLIGHT[code](message, extra_info=json.dumps(details).encode())


F = TypeVar("F", bound=Callable[..., Any])

# Flight RPC names for the handlers, as operators see them in logs and the rpc failure metric
_RPC_NAMES = {
    "do_exchange": "DoExchange", "do_action": "DoAction", "get_schema": "GetSchema",
    "get_flight_info": "GetFlightInfo", "list_flights": "ListFlights", "do_get": "DoGet", "do_put": "DoPut",
}


def _internal(method: str, exc: BaseException) -> flight.FlightError:
    request_id = observed_request_id(exc) or new_request_id()
    log.exception("internal error in Flight %s (request id %s)", method, request_id, exc_info=exc)
    body = {"code": ErrorCode.INTERNAL.value, "message": "internal server error", "request_id": request_id}
    return flight.FlightInternalError(
        f"[INTERNAL] internal server error (request id {request_id})", extra_info=json.dumps(body).encode()
    )


def _translated(exc: Exception, method: str, frontend: Any) -> Exception:
    """The one error every failure of a handler leaves as; failures the core did not already
    account for a model are reported once to the observer (log line and metric)."""
    if isinstance(exc, (flight.FlightError, _Noted)):
        return exc
    rpc = _RPC_NAMES.get(method, method)
    if isinstance(exc, IskanderError):
        frontend.observer.unattributed_failure("flight", rpc, exc)
        return to_flight_error(exc)
    error = _internal(rpc, exc)
    frontend.observer.unattributed_failure("flight", rpc, exc, observed_request_id(exc))
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
