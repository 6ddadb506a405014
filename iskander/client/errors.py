"""The client's exceptions: one class per server code, read back from pyarrow's Flight errors.

Server errors become ``IskanderClientError`` subclasses carrying the server's code, message and
details (model, column, row, ...); ``translate`` turns a pyarrow exception into one.
"""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from iskander.client.flight_status import error_details

__all__ = [
    "IskanderClientError", "InvalidArgument", "NotFound", "Unavailable", "ResourceExhausted",
    "Unauthenticated", "DeadlineExceeded", "Unimplemented", "InternalError", "Cancelled", "translate",
]


class IskanderClientError(Exception):
    """An Iskander call failed. ``code`` is the server's code (``INVALID_ARGUMENT``, ``NOT_FOUND``, ...),
    ``message`` its message without gRPC decoration, ``details`` the rest of its JSON ``extra_info``."""

    code = "UNKNOWN"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    @property
    def model(self) -> str | None:
        return self.details.get("model")

    @property
    def column(self) -> str | None:
        return self.details.get("column")

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class InvalidArgument(IskanderClientError):
    code = "INVALID_ARGUMENT"


class NotFound(IskanderClientError):
    code = "NOT_FOUND"


class Unavailable(IskanderClientError):
    code = "UNAVAILABLE"


class ResourceExhausted(IskanderClientError):
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(IskanderClientError):
    code = "UNAUTHENTICATED"


class DeadlineExceeded(IskanderClientError):
    code = "DEADLINE_EXCEEDED"


class Unimplemented(IskanderClientError):
    code = "UNIMPLEMENTED"


class InternalError(IskanderClientError):
    code = "INTERNAL"


class Cancelled(IskanderClientError):
    code = "CANCELLED"


_BY_CODE: dict[str, type[IskanderClientError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, Unavailable, ResourceExhausted, Unauthenticated, DeadlineExceeded,
                Unimplemented, InternalError, Cancelled)
}
# Errors that never reached Iskander's handlers (transport, auth middleware) carry no code: use the class.
_BY_FLIGHT_CLASS: list[tuple[type[flight.FlightError], type[IskanderClientError]]] = [
    (flight.FlightUnauthenticatedError, Unauthenticated),
    (flight.FlightUnauthorizedError, Unauthenticated),
    (flight.FlightUnavailableError, Unavailable),
    (flight.FlightTimedOutError, DeadlineExceeded),
    (flight.FlightCancelledError, Cancelled),
    (flight.FlightInternalError, InternalError),
]
# pyarrow appends this to every status it gets from finishing a call: the text of a server's answer
FINISHED = ". gRPC client debug context:"
_PREFIX = re.compile(r"^\[(?P<code>[A-Z_]+)\] (?P<message>.*)$", re.S)
# Errors raised by their Arrow status (INVALID_ARGUMENT, NOT_FOUND, UNIMPLEMENTED on the wire)
# carry no extra_info: their JSON details ride in the status detail, after ". Detail: ".
_BY_ARROW_CLASS: list[tuple[type[Exception], type[IskanderClientError]]] = [
    (pa.ArrowKeyError, NotFound),
    (pa.ArrowNotImplementedError, Unimplemented),
    (pa.ArrowInvalid, InvalidArgument),
    (pa.ArrowTypeError, InvalidArgument),
]


def _clean(text: str) -> str:
    """pyarrow appends '. Detail: ...' and gRPC debug context to the server's message."""
    text = text.split(". Detail:")[0].split(FINISHED)[0].strip()
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] == "'" else text  # KeyError quotes


def translate(exc: BaseException) -> IskanderClientError:
    """The client exception for a pyarrow Flight (or Arrow) error: the JSON details from
    ``extra_info`` or from the last line of an Arrow-status error's detail (flight_status)."""
    details = dict(error_details(exc))
    text = _clean(str(exc))
    code = details.pop("code", None)
    message = details.pop("message", None)
    match = _PREFIX.match(text)
    if match:
        code = code or match.group("code")
        message = message or match.group("message")
    cls = _BY_CODE.get(code or "")
    if cls is None:
        cls = next((c for f, c in _BY_FLIGHT_CLASS if isinstance(exc, f)), None)
    if cls is None:  # e.g. ArrowInvalid raised locally while writing a batch
        cls = next((c for a, c in _BY_ARROW_CLASS if isinstance(exc, a)), IskanderClientError)
    return cls(message or text, details)
