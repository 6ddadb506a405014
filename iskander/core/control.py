"""Protocol-neutral description of served models, used by both frontends' discovery calls."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from iskander.arrow.types import type_name
from iskander.backends import backend_type
from iskander.core.registry import ModelRegistry, ModelState, ModelVersion


def schema_fields(schema: pa.Schema) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": type_name(f.type), "nullable": f.nullable} for f in schema]


def ready_versions(registry: ModelRegistry, name: str) -> list[str]:
    """Versions that can serve now (what both OIP ModelMetadata and Flight metadata list)."""
    return [v.version for v in registry.versions(name) if v.state is ModelState.READY]


def platform(entry: ModelVersion) -> str:
    """Triton's platform name; a version that failed to load or was unloaded has no backend object."""
    return entry.backend.platform if entry.backend is not None else backend_type(entry.settings.backend).platform


def describe(entry: ModelVersion, registry: ModelRegistry) -> dict[str, Any]:
    """JSON-able metadata of one model version: state, versions and both schemas."""
    info: dict[str, Any] = {
        "name": entry.name,
        "version": entry.version,
        "versions": ready_versions(registry, entry.name),
        "state": entry.state.value,
        "platform": platform(entry),
    }
    if entry.reason:
        info["reason"] = entry.reason
    if entry.state is ModelState.READY and entry.contract is not None:
        contract = entry.contract
        info["contract"] = "manifest" if contract.from_manifest else "derived"
        info["input_schema"] = schema_fields(contract.input_schema)
        info["output_schema"] = schema_fields(contract.output_schema)
        info["passthrough"] = [f.name for f in contract.passthrough]
    return info


def repository_index(
    registry: ModelRegistry, ready_only: bool = False, name: str | None = None
) -> list[dict[str, str]]:
    """Every configured model version (or one model's) with its state and reason (Triton's RepositoryIndex)."""
    entries = registry.versions(name) if name else registry.all()
    return [
        {"name": e.name, "version": e.version, "state": e.state.value, "reason": e.reason}
        for e in entries
        if not ready_only or e.state is ModelState.READY
    ]


def statistics(registry: ModelRegistry, name: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
    """Statistics snapshots: all models, one model's versions, or one version (NOT_FOUND if unknown)."""
    if not name:
        entries = registry.all()
    elif version:
        entries = [registry.find(name, version)]
    else:
        registry.find(name)  # raises NOT_FOUND for an unknown model
        entries = registry.versions(name)
    return [_with_restarts(e.stats.snapshot(), e) for e in entries if e.stats is not None]


def _with_restarts(snapshot: dict[str, Any], entry: ModelVersion) -> dict[str, Any]:
    """Worker-process backends (python, sklearn) add how many workers they restarted since load."""
    restarts = getattr(entry.backend, "restarts", None)
    if restarts is not None:
        snapshot["worker_restarts"] = restarts
    return snapshot
