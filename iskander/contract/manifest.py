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
from typing import Any, ClassVar

import attrs
import pyarrow as pa

from iskander.arrow.types import BFLOAT16, element_type, parse_type, row_shape, type_name
from iskander.backends.base import TensorSpec
from iskander.errors import ConfigError, ModelLoadError


# An output's transform, with the keys that go with it: one class per kind, so that a transform
# always has its keys (an output with no transform has none).
@attrs.frozen
class LabelTransform:
    """transform = "label": a class index (or class scores, best wins) -> its label."""

    labels: tuple[str, ...]
    name: ClassVar[str] = "label"


@attrs.frozen
class SelectTransform:
    """transform = "select": column ``index`` of an [N, k] tensor."""

    index: int
    name: ClassVar[str] = "select"


@attrs.frozen
class RankTransform:
    """transform = "rank": the rank of output column ``of`` within each ``group_by`` value."""

    of: str
    group_by: str | None = None
    descending: bool = True
    name: ClassVar[str] = "rank"


Transform = LabelTransform | SelectTransform | RankTransform


@attrs.frozen
class ColumnSpec:
    """One manifest column. Input-only keys: nulls, fill, cast_from, field_tensors. Output-only
    keys: transform (with labels, index, of, group_by, descending inside it)."""

    name: str
    type: pa.DataType
    tensor: str  # the ONNX tensor; for passthrough columns and rank outputs, same as name
    description: str = ""
    nulls: str = "reject"  # or "fill"
    fill: Any = None
    cast_from: tuple[pa.DataType, ...] = ()
    field_tensors: tuple[tuple[str, str], ...] = ()  # struct field -> ONNX input
    transform: Transform | None = None


@attrs.frozen
class Manifest:
    inputs: tuple[ColumnSpec, ...]
    outputs: tuple[ColumnSpec, ...]
    passthrough: tuple[ColumnSpec, ...]
    source: Path


_SECTIONS = ("inputs", "outputs", "passthrough")
_COMMON_KEYS = {"name", "type", "description"}
_KEYS = {
    "inputs": _COMMON_KEYS | {"tensor", "nulls", "fill", "cast_from", "field_tensors"},
    "outputs": _COMMON_KEYS | {"tensor", "transform", "labels", "index", "of", "group_by", "descending"},
    "passthrough": _COMMON_KEYS,
}
TRANSFORMS = ("label", "select", "rank")


def _column(entry: Any, where: str, section: str) -> ColumnSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: must be a table")
    allowed = _KEYS[section]
    unknown = sorted(set(entry) - allowed)
    if unknown:
        raise ConfigError(f"{where} key '{unknown[0]}': unknown key (known keys: {', '.join(sorted(allowed))})")
    name = entry.get("name")
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{where} key 'name': is required and must be a non-empty string")
    where = f"{where} ('{name}')"

    def fail(key: str, message: str) -> ConfigError:
        return ConfigError(f"{where} key '{key}': {message}")

    def arrow(key: str, text: Any) -> pa.DataType:
        if not isinstance(text, str):
            raise fail(key, "must be an Arrow type string such as 'float32'")
        try:
            return parse_type(text)
        except ValueError as exc:
            raise fail(key, str(exc)) from None

    if "type" not in entry:
        raise fail("type", "is required and must be a string such as 'float32'")
    arrow_type = arrow("type", entry["type"])
    tensor = entry.get("tensor", name)
    if not isinstance(tensor, str) or not tensor:
        raise fail("tensor", "must be a non-empty string")
    description = entry.get("description", "")
    if not isinstance(description, str):
        raise fail("description", "must be a string")
    spec: dict[str, Any] = {"name": name, "type": arrow_type, "tensor": tensor, "description": description}

    if section == "inputs":
        nulls = entry.get("nulls", "fill" if "fill" in entry else "reject")
        if nulls not in ("reject", "fill"):
            raise fail("nulls", f"must be 'reject' or 'fill', got {nulls!r}")
        if nulls == "fill" and "fill" not in entry:
            raise fail("fill", "is required when nulls = 'fill' (the value that replaces a null)")
        fill = entry.get("fill")
        if fill is not None and not isinstance(fill, (int, float, str, bool)):
            raise fail("fill", f"must be a number, string or boolean, got {type(fill).__name__}")
        cast_from = entry.get("cast_from", [])
        if isinstance(cast_from, str):
            cast_from = [cast_from]
        if not isinstance(cast_from, list):
            raise fail("cast_from", "must be a list of Arrow type strings")
        field_tensors = entry.get("field_tensors", {})
        if not isinstance(field_tensors, dict) or not all(isinstance(v, str) for v in field_tensors.values()):
            raise fail("field_tensors", "must be a table of struct field name = ONNX input name")
        if field_tensors and not pa.types.is_struct(arrow_type):
            raise fail("field_tensors", "is only for struct columns")
        if field_tensors and "tensor" in entry:
            raise fail("tensor", "give either 'tensor' (concatenate the struct's fields) or 'field_tensors', not both")
        spec.update(
            nulls=nulls, fill=fill, cast_from=tuple(arrow("cast_from", t) for t in cast_from),
            field_tensors=tuple(field_tensors.items()),
        )
    elif section == "outputs":
        transform = entry.get("transform")
        if transform is not None and transform not in TRANSFORMS:
            raise fail("transform", f"must be one of {', '.join(TRANSFORMS)}, got {transform!r}")
        labels = entry.get("labels", [])
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise fail("labels", "must be a list of strings")
        if transform == "label" and not labels:
            raise fail("labels", "is required for transform = 'label' (class index -> label)")
        index = entry.get("index")
        if transform == "select" and not (isinstance(index, int) and not isinstance(index, bool) and index >= 0):
            raise fail("index", "is required for transform = 'select' and must be an integer >= 0")
        of, group_by = entry.get("of"), entry.get("group_by")
        if transform == "rank" and not isinstance(of, str):
            raise fail("of", "is required for transform = 'rank': the output column whose values are ranked")
        if group_by is not None and not isinstance(group_by, str):
            raise fail("group_by", "must be a column name")
        descending = entry.get("descending", True)
        if not isinstance(descending, bool):
            raise fail("descending", "must be true or false")
        for key, needs in (("labels", "label"), ("index", "select"), ("of", "rank"), ("group_by", "rank")):
            if key in entry and transform != needs:
                raise fail(key, f"only applies with transform = '{needs}'")
        if transform == "label":
            spec["transform"] = LabelTransform(tuple(labels))
        elif transform == "select":
            spec["transform"] = SelectTransform(index)
        elif transform == "rank":
            spec["transform"] = RankTransform(of, group_by, descending)
    return ColumnSpec(**spec)


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
        sections[section] = tuple(_column(e, f"{prefix}, {section}[{i}]", section) for i, e in enumerate(entries))
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


def declared_signature(manifest: Manifest, kind: str) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
    """The tensors a manifest implies, for backends with no signature of their own (Python models).

    Each input tensor is what its columns make once compiled: one column gives [N, *row shape];
    several columns (or a struct's fields) concatenated give [N, total width]. Each output tensor
    is its column's [N, *row shape] ([N, k] for list<T>). The contract is then compiled against
    these exactly as against an ONNX graph, so its checks and messages are the same."""
    members: dict[str, list[pa.DataType]] = {}
    concatenated: set[str] = set()
    for spec in manifest.inputs:
        if pa.types.is_struct(spec.type):
            mapping = dict(spec.field_tensors)
            for f in spec.type:
                tensor = mapping.get(f.name, spec.tensor)
                members.setdefault(tensor, []).append(f.type)
                if not mapping:
                    concatenated.add(tensor)
        else:
            members.setdefault(spec.tensor, []).append(spec.type)
    inputs = []
    for tensor, types in members.items():
        _no_bfloat16(types[0], kind)
        if len(types) > 1 or tensor in concatenated:
            width = sum((row_shape(t) or (1,))[0] for t in types)
            inputs.append(TensorSpec(tensor, element_type(types[0]), (None, width), type_name(types[0])))
        else:
            inputs.append(TensorSpec(tensor, element_type(types[0]), (None, *row_shape(types[0])), type_name(types[0])))
    outputs: dict[str, TensorSpec] = {}
    for spec in manifest.outputs:
        if isinstance(spec.transform, RankTransform):
            continue  # computed by the server from another output
        if spec.transform is not None:
            raise ModelLoadError(
                f"manifest output '{spec.name}': transform '{spec.transform.name}' needs a model tensor the manifest "
                f"does not describe; a {kind} model returns the column itself from predict"
            )
        _no_bfloat16(spec.type, kind)
        dims: tuple[int | None, ...] = (None,) if pa.types.is_list(spec.type) else row_shape(spec.type)
        outputs.setdefault(spec.tensor, TensorSpec(spec.tensor, element_type(spec.type), (None, *dims),
                                                   type_name(spec.type)))
    return tuple(inputs), tuple(outputs.values())


def _no_bfloat16(t: pa.DataType, kind: str) -> None:
    if element_type(t) == BFLOAT16:
        raise ModelLoadError(f"{kind} models take no bfloat16 columns (numpy has no bfloat16); use float32")
