"""The Python client for Iskander's Flight frontend (docs/client.md): ``from iskander.client import IskanderClient``.

``flight_client`` holds the client, ``errors`` its exceptions, ``convert`` the data conversions.
"""

from iskander.client.convert import attach_outputs, conform
from iskander.client.errors import (
    Cancelled, DeadlineExceeded, InternalError, InvalidArgument, IskanderClientError, NotFound, ResourceExhausted,
    Unauthenticated, Unavailable, Unimplemented, translate,
)
from iskander.client.flight_client import Exchange, IskanderClient, ModelInfo, connect
from iskander.client.replicas import Replicas  # noqa: E402  (after the names it imports from this package)

__all__ = [
    "Replicas",
    "IskanderClient", "ModelInfo", "Exchange", "connect", "attach_outputs", "conform", "translate",
    "IskanderClientError", "InvalidArgument", "NotFound", "Unavailable", "ResourceExhausted",
    "Unauthenticated", "DeadlineExceeded", "Unimplemented", "InternalError", "Cancelled",
]
