"""The control plane both frontends share: health, metadata, statistics and repository control.

Protocol-neutral answers (bools, dicts, model entries); each frontend only encodes them, so a
Flight action and its OIP RPC can never disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pyarrow as pa

from iskander.arrow.types import type_name
from iskander.backends import backend_type
from iskander.core.model import ModelVersion, ReadyModel
from iskander.core.registry import ModelRegistry
from iskander.errors import ModelNotFound


def schema_fields(schema: pa.Schema) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": type_name(f.type), "nullable": f.nullable} for f in schema]


def platform(entry: ModelVersion) -> str:
    """Triton's platform name; a version that failed to load or was unloaded has no backend object."""
    return entry.platform if isinstance(entry, ReadyModel) else backend_type(entry.settings.backend).platform


class ControlPlane:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.live = True  # False once the server is stopping

    # --- health -----------------------------------------------------------------------------------

    def ready(self) -> bool:
        """Ready when every configured model is loaded (Triton's ServerReady semantics)."""
        return self.live and self.registry.all_ready()

    def model_ready(self, name: str, version: str | None = None) -> bool:
        """Unknown models and versions are not ready (Triton answers the same, no error)."""
        try:
            return isinstance(self.registry.find(name, version), ReadyModel)
        except ModelNotFound:
            return False

    def model_health(self) -> dict[str, bool]:
        """Each model name -> whether its newest version serves (grpc.health per-model status)."""
        return {name: isinstance(self.registry.find(name), ReadyModel) for name in self.registry.names()}

    def health(self) -> dict[str, Any]:
        return {
            "live": self.live,
            "ready": self.ready(),
            "models": [{"name": e.name, "version": e.version, "state": e.state.value} for e in self.registry.all()],
        }

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after any model changes state."""
        self.registry.on_change(listener)

    # --- metadata ---------------------------------------------------------------------------------

    def model(self, name: str, version: str | None = None) -> ReadyModel:
        """A ready model version (NOT_FOUND / UNAVAILABLE errors otherwise)."""
        return self.registry.get_ready(name, version)

    def entry(self, name: str, version: str | None = None) -> ModelVersion:
        """A configured model version whatever its state (NOT_FOUND if unknown)."""
        return self.registry.find(name, version)

    def ready_models(self) -> list[ReadyModel]:
        """The newest ready version of every model that has one."""
        found = (self.registry.find(name) for name in self.registry.names())
        return [e for e in found if isinstance(e, ReadyModel)]

    def ready_versions(self, name: str) -> list[str]:
        """Versions that can serve now (what both OIP ModelMetadata and Flight metadata list)."""
        return [v.version for v in self.registry.versions(name) if isinstance(v, ReadyModel)]

    def configured_versions(self, name: str) -> list[int]:
        return [v.settings.version for v in self.registry.versions(name)]

    def describe(self, entry: ModelVersion) -> dict[str, Any]:
        """JSON-able metadata of one model version: state, versions and both schemas."""
        info: dict[str, Any] = {
            "name": entry.name,
            "version": entry.version,
            "versions": self.ready_versions(entry.name),
            "state": entry.state.value,
            "platform": platform(entry),
        }
        if entry.reason:
            info["reason"] = entry.reason
        if isinstance(entry, ReadyModel):
            contract = entry.contract
            info["contract"] = "manifest" if contract.from_manifest else "derived"
            info["input_schema"] = schema_fields(contract.input_schema)
            info["output_schema"] = schema_fields(contract.output_schema)
            info["passthrough"] = [f.name for f in contract.passthrough]
        return info

    def list_models(self) -> list[dict[str, Any]]:
        return [self.describe(e) for e in self.registry.all()]

    def repository_index(self, ready_only: bool = False, name: str | None = None) -> list[dict[str, str]]:
        """Every configured model version (or one model's) with its state and reason (Triton's RepositoryIndex)."""
        entries = self.registry.versions(name) if name else self.registry.all()
        return [
            {"name": e.name, "version": e.version, "state": e.state.value, "reason": e.reason}
            for e in entries
            if not ready_only or isinstance(e, ReadyModel)
        ]

    def statistics(self, name: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
        """Statistics snapshots: all models, one model's versions, or one version (NOT_FOUND if unknown)."""
        if not name:
            entries = self.registry.all()
        elif version:
            entries = [self.registry.find(name, version)]
        else:
            self.registry.find(name)  # raises NOT_FOUND for an unknown model
            entries = self.registry.versions(name)
        return [_with_restarts(e.stats.snapshot(), e) for e in entries]

    # --- repository control -----------------------------------------------------------------------

    def load(self, name: str) -> None:
        """(Re)load a configured model by name; never a path."""
        self.registry.load(name)

    def unload(self, name: str) -> None:
        self.registry.unload(name)


def _with_restarts(snapshot: dict[str, Any], entry: ModelVersion) -> dict[str, Any]:
    """Worker-process backends (python, sklearn) add how many workers they restarted since load."""
    restarts = entry.backend.restarts if isinstance(entry, ReadyModel) else None
    if restarts is not None:
        snapshot["worker_restarts"] = restarts
    return snapshot
