"""One error hierarchy for the whole server.

The core raises these; each frontend maps ``ErrorCode`` to its wire status in exactly one table
(``frontends/oip_errors.py``, ``frontends/flight_errors.py``). Messages are written for the
client: they name the model, the column or tensor, what was expected and what came.
"""

from __future__ import annotations

import enum
from typing import Any


class ErrorCode(enum.Enum):
    INVALID_ARGUMENT = "INVALID_ARGUMENT"
    NOT_FOUND = "NOT_FOUND"
    UNAVAILABLE = "UNAVAILABLE"
    RESOURCE_EXHAUSTED = "RESOURCE_EXHAUSTED"
    UNIMPLEMENTED = "UNIMPLEMENTED"
    DEADLINE_EXCEEDED = "DEADLINE_EXCEEDED"
    INTERNAL = "INTERNAL"


class IskanderError(Exception):
    """Base error. ``details`` is a small JSON-able dict (model, column, expected, got, ...)."""

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = {k: v for k, v in details.items() if v is not None}

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code.value, "message": self.message, **self.details}


class InvalidInput(IskanderError):
    """The request does not match the model's contract (types, shapes, nulls, columns)."""

    code = ErrorCode.INVALID_ARGUMENT


class ModelNotFound(IskanderError):
    code = ErrorCode.NOT_FOUND


class ModelNotReady(IskanderError):
    code = ErrorCode.UNAVAILABLE


class ResourceExhausted(IskanderError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class StreamLimitExceeded(ResourceExhausted):
    """A stream carried more rows than max_stream_rows: the stream ends, not just the request."""


class DeadlineExceeded(IskanderError):
    """The request's deadline passed before the model ran it; it was not run."""

    code = ErrorCode.DEADLINE_EXCEEDED


class Unimplemented(IskanderError):
    code = ErrorCode.UNIMPLEMENTED


class InternalError(IskanderError):
    code = ErrorCode.INTERNAL


class ConfigError(Exception):
    """Bad configuration or manifest, raised at start-up or model load (never sent to clients as is)."""


class ModelLoadError(Exception):
    """A model could not be loaded; the registry records the reason and keeps serving the others."""
