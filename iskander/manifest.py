"""The Arrow schema manifest that sits next to a model file.

A manifest is TOML (``<model stem>.manifest.toml``) that declares the Arrow-facing contract::

    [[inputs]]                      # columns the model consumes
    name = "user_features"          # Arrow column name (also the OIP tensor name)
    type = "fixed_size_list<float32>[8]"
    tensor = "user_vec"             # ONNX input it feeds (default: same as name)

    [[outputs]]                     # columns the model produces
    name = "score"
    type = "float32"
    tensor = "score"                # ONNX output it comes from (default: same as name)

    [[passthrough]]                 # columns returned unchanged beside the outputs, row-aligned
    name = "user_id"
    type = "utf8"

See docs/manifest.md for the full format.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import attrs
import pyarrow as pa

from .arrow_types import parse_type
from .errors import ConfigError


@attrs.frozen
class ColumnSpec:
    name: str
    type: pa.DataType
    tensor: str  # the ONNX tensor; for passthrough columns, same as name
    description: str = ""


@attrs.frozen
class Manifest:
    inputs: tuple[ColumnSpec, ...]
    outputs: tuple[ColumnSpec, ...]
    passthrough: tuple[ColumnSpec, ...]
    source: Path


_SECTIONS = ("inputs", "outputs", "passthrough")
_COLUMN_KEYS = {"name", "type", "tensor", "description"}


def _column(entry: Any, where: str, with_tensor: bool) -> ColumnSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table")
    allowed = _COLUMN_KEYS if with_tensor else _COLUMN_KEYS - {"tensor"}
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(f"{where} key '{unknown[0]}': unknown key (known keys: {', '.join(sorted(allowed))})")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where} key 'name': is required and must be a non-empty string")
    raw_type = entry.get("type")
    if not isinstance(raw_type, str):
        raise ConfigError(f"{where} ('{name}') key 'type': is required and must be a string such as 'float32'")
    try:
        arrow_type = parse_type(raw_type)
    except ValueError as exc:
        raise ConfigError(f"{where} ('{name}') key 'type': {exc}") from None
    tensor = entry.get("tensor", name)
    if not isinstance(tensor, str) or not tensor:
        raise ConfigError(f"{where} ('{name}') key 'tensor': must be a non-empty string")
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{where} ('{name}') key 'description': must be a string")
    return ColumnSpec(name=name, type=arrow_type, tensor=tensor, description=description)


def parse_manifest(data: dict[str, Any], source: Path, model: str) -> Manifest:
    prefix = f"manifest {source.name}, model '{model}'"  # name only: reasons reach clients
    unknown = sorted(set(data) - set(_SECTIONS))
    if unknown:
        raise ConfigError(f"{prefix}: unknown key '{unknown[0]}' (expected [[inputs]], [[outputs]], [[passthrough]])")
    sections: dict[str, tuple[ColumnSpec, ...]] = {}
    for section in _SECTIONS:
        entries = data.get(section, [])
        if not isinstance(entries, list):
            raise ConfigError(f"{prefix}: '{section}' must be an array of tables ([[{section}]])")
        sections[section] = tuple(
            _column(e, f"{prefix}, {section}[{i}]", with_tensor=section != "passthrough")
            for i, e in enumerate(entries)
        )
    if not sections["inputs"]:
        raise ConfigError(f"{prefix}: at least one [[inputs]] column is required")
    if not sections["outputs"]:
        raise ConfigError(f"{prefix}: at least one [[outputs]] column is required")
    request_cols = [c.name for c in sections["inputs"] + sections["passthrough"]]
    response_cols = [c.name for c in sections["passthrough"] + sections["outputs"]]
    for label, cols in (("request", request_cols), ("response", response_cols)):
        dupes = sorted({c for c in cols if cols.count(c) > 1})
        if dupes:
            raise ConfigError(f"{prefix}: column '{dupes[0]}' appears twice in the {label} columns")
    return Manifest(source=source, **sections)


def load_manifest(path: Path, model: str) -> Manifest:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"manifest {path.name}, model '{model}': cannot read: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"manifest {path.name}, model '{model}': invalid TOML: {exc}") from None
    return parse_manifest(data, path, model)
