"""What the registry holds for one configured model version: a ready model or why it is not.

A ``ReadyModel`` has everything a request needs, none of it optional: the compiled contract, the
backend, its batcher (when dynamic batching is on), its statistics and its effective limits
(the model's own, else the server's defaults, resolved once at load). A version that is loading,
failed or was unloaded is a ``NotReady`` with the reason. Code that needs a contract takes a
``ReadyModel``; the type says it is there.
"""

from __future__ import annotations

import enum

import attrs

from iskander.backends import Backend
from iskander.config.settings import ModelSettings
from iskander.contract import Contract
from iskander.core.batcher import Batcher
from iskander.observability.stats import ModelStats


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"  # failed to load or unloaded; ``reason`` says why


@attrs.frozen
class Limits:
    """Per-request bounds in force for one model version; 0 = unbounded."""

    max_batch_size: int = 0  # rows per request
    max_inflight: int = 0  # requests admitted (running or queued) at once
    max_message_bytes: int = 0  # payload bytes of one request (one Flight batch, one OIP request's tensors)
    max_stream_rows: int = 0  # rows one stream may carry in total

    def for_model(self, settings: ModelSettings) -> Limits:
        """The model's own limits where it sets them, these (the server's defaults) elsewhere."""
        return Limits(
            max_batch_size=settings.max_batch_size or self.max_batch_size,
            max_inflight=settings.max_inflight or self.max_inflight,
            max_message_bytes=settings.max_message_bytes or self.max_message_bytes,
            max_stream_rows=settings.max_stream_rows or self.max_stream_rows,
        )


@attrs.frozen
class ReadyModel:
    settings: ModelSettings
    contract: Contract
    backend: Backend
    stats: ModelStats = attrs.field(eq=False, repr=False)
    limits: Limits
    batcher: Batcher | None = attrs.field(default=None, eq=False, repr=False)  # None: dynamic batching off

    state = ModelState.READY
    reason = ""
    unloaded = False

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def version(self) -> str:
        return str(self.settings.version)

    @property
    def key(self) -> str:
        return self.settings.key

    @property
    def platform(self) -> str:
        return self.backend.platform


@attrs.frozen
class NotReady:
    settings: ModelSettings
    state: ModelState
    stats: ModelStats = attrs.field(eq=False, repr=False)
    reason: str = ""
    unloaded: bool = False  # unloaded on request: not counted against server readiness

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def version(self) -> str:
        return str(self.settings.version)

    @property
    def key(self) -> str:
        return self.settings.key


ModelVersion = ReadyModel | NotReady
