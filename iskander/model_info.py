"""Protocol-neutral description of served models, used by both frontends' discovery calls."""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from .arrow_types import type_name
from .registry import ModelRegistry, ModelState, ModelVersion


def schema_fields(schema: pa.Schema) -> list[dict[str, Any]]:
    return [{"name": f.name, "type": type_name(f.type), "nullable": f.nullable} for f in schema]


def ready_versions(registry: ModelRegistry, name: str) -> list[str]:
    """Versions that can serve now (what both OIP ModelMetadata and Flight metadata list)."""
    return [v.version for v in registry.versions(name) if v.state is ModelState.READY]


def describe(entry: ModelVersion, registry: ModelRegistry) -> dict[str, Any]:
    """JSON-able metadata of one model version: state, versions and both schemas."""
    info: dict[str, Any] = {
        "name": entry.name,
        "version": entry.version,
        "versions": ready_versions(registry, entry.name),
        "state": entry.state.value,
        "platform": "onnxruntime_onnx",
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
