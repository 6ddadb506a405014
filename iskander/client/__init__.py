"""The Python client for Iskander's Flight frontend (docs/client.md): ``from iskander.client import IskanderClient``."""

from .flight_client import (
    Cancelled, DeadlineExceeded, Exchange, InternalError, InvalidArgument, IskanderClient, IskanderClientError,
    ModelInfo, NotFound, ResourceExhausted, Unauthenticated, Unavailable, Unimplemented, attach_outputs, conform,
    connect, translate,
)
from .replicas import Replicas  # noqa: E402  (after the names it imports from this package)

__all__ = [
    "Replicas",
    "IskanderClient", "ModelInfo", "Exchange", "connect", "attach_outputs", "conform", "translate",
    "IskanderClientError", "InvalidArgument", "NotFound", "Unavailable", "ResourceExhausted",
    "Unauthenticated", "DeadlineExceeded", "Unimplemented", "InternalError", "Cancelled",
]
