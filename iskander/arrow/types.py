"""Arrow type names used in manifests, and Arrow element types as numpy sees them.

Manifest type strings: primitive names (``float32``, ``int64``, ``utf8``, ...) and
``fixed_size_list<T>[k]`` (nestable, e.g. ``fixed_size_list<fixed_size_list<float32>[3]>[16]``), and
``list<T>`` for outputs whose per-row size is known only at run time.
"""

from __future__ import annotations

import functools

import re

import numpy as np
import pyarrow as pa

class BFloat16Type(pa.ExtensionType):
    """bfloat16 values as their uint16 bit patterns: Arrow has no bfloat16 type of its own."""

    def __init__(self) -> None:
        super().__init__(pa.uint16(), "iskander.bfloat16")

    def __arrow_ext_serialize__(self) -> bytes:
        return b""

    def __hash__(self) -> int:  # parameterless: every instance is the same type
        return hash("iskander.bfloat16")

    @classmethod
    def __arrow_ext_deserialize__(cls, storage_type: pa.DataType, serialized: bytes) -> "BFloat16Type":
        # Called by the IPC reader for any field whose metadata names this type, over whatever storage
        # the sender declared: over anything but uint16 the values would be read past their buffer.
        # ValueError: pyarrow's Flight server answers it INVALID_ARGUMENT (it is read before any handler).
        if storage_type != pa.uint16():
            raise ValueError(
                f"a column declared as iskander.bfloat16 must be stored as uint16, got {storage_type}")
        return cls()


BFLOAT16 = BFloat16Type()
try:
    pa.register_extension_type(BFLOAT16)
except pa.ArrowKeyError:  # already registered (module reloaded)
    pass

PRIMITIVE_TYPES: dict[str, pa.DataType] = {
    "bool": pa.bool_(),
    "int8": pa.int8(),
    "int16": pa.int16(),
    "int32": pa.int32(),
    "int64": pa.int64(),
    "uint8": pa.uint8(),
    "uint16": pa.uint16(),
    "uint32": pa.uint32(),
    "uint64": pa.uint64(),
    "float16": pa.float16(),
    "halffloat": pa.float16(),
    "bfloat16": BFLOAT16,
    "float32": pa.float32(),
    "float": pa.float32(),
    "float64": pa.float64(),
    "double": pa.float64(),
    "utf8": pa.utf8(),
    "string": pa.utf8(),
    "large_utf8": pa.large_utf8(),
    "large_string": pa.large_utf8(),
    "binary": pa.binary(),
    "large_binary": pa.large_binary(),
    "date32": pa.date32(),
    "date64": pa.date64(),
    "timestamp[s]": pa.timestamp("s"),
    "timestamp[ms]": pa.timestamp("ms"),
    "timestamp[us]": pa.timestamp("us"),
    "timestamp[ns]": pa.timestamp("ns"),
    "null": pa.null(),
}

STRING_TYPES = (pa.utf8(), pa.large_utf8(), pa.binary(), pa.large_binary())

_FSL = re.compile(r"^fixed_size_list\s*<(?P<inner>.+)>\s*\[\s*(?P<size>\d+)\s*\]$")
_LIST = re.compile(r"^list\s*<(?P<inner>.+)>$")
_FST = re.compile(r"^fixed_shape_tensor\s*<(?P<inner>.+)>\s*\[(?P<shape>[\d,\s]+)\]$")
_STRUCT = re.compile(r"^struct\s*<(?P<fields>.*)>$")


def _split_top_level(text: str) -> list[str]:
    """Split 'a: int64, b: fixed_size_list<float32>[3]' at commas outside <> and []."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "<[":
            depth += 1
        elif ch in ">]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


def is_fixed_shape_tensor(t: pa.DataType) -> bool:
    return isinstance(t, pa.FixedShapeTensorType)


def parse_type(text: str) -> pa.DataType:
    """Parse a manifest type string; raises ValueError with the accepted forms."""
    s = text.strip()
    if s.lower() in PRIMITIVE_TYPES:
        return PRIMITIVE_TYPES[s.lower()]
    m = _FSL.match(s)
    if m:
        size = int(m.group("size"))
        if size < 1:
            raise ValueError(f"fixed_size_list size must be >= 1 in {text!r}")
        return pa.list_(parse_type(m.group("inner")), size)
    m = _LIST.match(s)
    if m:
        return pa.list_(parse_type(m.group("inner")))
    m = _FST.match(s)
    if m:
        shape = [int(d) for d in m.group("shape").split(",") if d.strip()]
        if not shape or min(shape) < 1:
            raise ValueError(f"fixed_shape_tensor needs a shape of positive sizes in {text!r}")
        return pa.fixed_shape_tensor(parse_type(m.group("inner")), shape)
    m = _STRUCT.match(s)
    if m:
        fields = []
        for part in _split_top_level(m.group("fields")):
            name, sep, ftype = part.partition(":")
            if not sep or not name.strip():
                raise ValueError(f"struct fields are 'name: type', got {part!r} in {text!r}")
            fields.append(pa.field(name.strip(), parse_type(ftype)))
        if not fields:
            raise ValueError(f"struct needs at least one field in {text!r}")
        return pa.struct(fields)
    raise ValueError(
        f"unknown Arrow type {text!r}; use a primitive ({', '.join(sorted(set(PRIMITIVE_TYPES)))}), "
        "fixed_size_list<T>[k], fixed_shape_tensor<T>[d1, d2, ...], struct<name: T, ...> or list<T>"
    )


def type_name(t: pa.DataType) -> str:
    """The manifest spelling of an Arrow type (inverse of parse_type where possible)."""
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{type_name(t.value_type)}>[{t.list_size}]"
    if pa.types.is_list(t):
        return f"list<{type_name(t.value_type)}>"
    if is_fixed_shape_tensor(t):
        name = f"fixed_shape_tensor<{type_name(t.value_type)}>[{', '.join(str(d) for d in t.shape)}]"
        if t.permutation and list(t.permutation) != list(range(len(t.shape))):
            name += f" permutation={list(t.permutation)}"
        return name
    if pa.types.is_struct(t):
        return "struct<" + ", ".join(f"{f.name}: {type_name(f.type)}" for f in t) + ">"
    names = {
        pa.float32(): "float32", pa.float64(): "float64", pa.float16(): "float16",
        pa.utf8(): "utf8", pa.large_utf8(): "large_utf8", pa.bool_(): "bool", BFLOAT16: "bfloat16",
        pa.date32(): "date32", pa.date64(): "date64",
    }
    return names.get(t, str(t))


def element_type(t: pa.DataType) -> pa.DataType:
    """Innermost value type of a (nested) fixed-size/variable list or fixed-shape tensor type."""
    if is_fixed_shape_tensor(t):
        return t.value_type
    while pa.types.is_fixed_size_list(t) or pa.types.is_list(t):
        t = t.value_type
    return t


@functools.cache  # asked per request on hot paths; a type's shape never changes
def row_shape(t: pa.DataType) -> tuple[int, ...]:
    """Per-row tensor shape of a column type: () for primitives, (a, b) for fsl<fsl<T>[b]>[a] and
    for fixed_shape_tensor<T>[a, b]."""
    if is_fixed_shape_tensor(t):
        return tuple(t.shape)
    dims = []
    while pa.types.is_fixed_size_list(t):
        dims.append(t.list_size)
        t = t.value_type
    return tuple(dims)


def nest_type(elem: pa.DataType, dims: tuple[int, ...]) -> pa.DataType:
    """fixed_size_list nesting for a per-row shape (inverse of row_shape)."""
    t = elem
    for d in reversed(dims):
        t = pa.list_(t, d)
    return t


def numpy_dtype(elem: pa.DataType) -> np.dtype:
    """numpy dtype a backend receives for an Arrow element type (object for strings)."""
    if elem in STRING_TYPES:
        return np.dtype(object)
    if isinstance(elem, pa.ExtensionType):
        elem = elem.storage_type
    return np.dtype(elem.to_pandas_dtype())
