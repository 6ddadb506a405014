"""Arrow arrays <-> numpy tensors, zero-copy wherever the bytes allow it.

A non-null primitive or fixed_size_list column of a fixed-width type becomes a numpy view of the
Arrow value buffer (no copy); bool (bit-packed in Arrow) and strings are copied once. Outputs go the
other way: a contiguous numpy result is wrapped as an Arrow buffer without copying.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from .arrow_types import STRING_TYPES, element_type, row_shape


def list_values(arr: pa.FixedSizeListArray) -> pa.Array:
    """The child values of exactly these rows, without copying.

    Cheaper than ``flatten()`` (which always builds a new slice) on the common unsliced array.
    """
    size = arr.type.list_size
    values = arr.values
    if arr.offset or len(values) != len(arr) * size:
        values = values.slice(arr.offset * size, len(arr) * size)
    return values


def first_null_row(arr: pa.Array) -> int | None:
    """Index of the first row that is null (or holds a null element in a list), else None."""
    if arr.null_count:
        return int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
    t = arr.type
    if pa.types.is_fixed_size_list(t):
        row = first_null_row(list_values(arr))
        if row is not None:
            return row // t.list_size
    return None


class NullValues(Exception):
    """Raised by a reader when the column (or a list element in it) holds a null."""


Reader = Callable[[pa.Array], np.ndarray]


def compile_reader(arrow_type: pa.DataType, unit_dim: bool = False) -> Reader:
    """A function column -> tensor [N, *row_shape] (or [N, 1] with ``unit_dim``), built once per
    contract column so the request path does no type inspection. Raises NullValues on nulls."""
    depth = len(row_shape(arrow_type))
    elem = element_type(arrow_type)
    tail = row_shape(arrow_type) or ((1,) if unit_dim else ())
    zero_copy = not (elem in STRING_TYPES or pa.types.is_boolean(elem))  # bit-packed/str: one copy
    extension = isinstance(elem, pa.ExtensionType)  # bfloat16: read the uint16 storage

    def read(arr: pa.Array) -> np.ndarray:
        if arr.null_count:
            raise NullValues
        n = len(arr)
        flat = arr
        for _ in range(depth):
            flat = list_values(flat)
            if flat.null_count:
                raise NullValues
        if extension:
            flat = flat.storage
        values = flat.to_numpy(zero_copy_only=zero_copy)
        return values.reshape(n, *tail) if tail else values

    return read


def to_ndarray(arr: pa.Array) -> np.ndarray:
    """Tensor of shape [N, *row_shape] for a null-free column (see compile_reader)."""
    return compile_reader(arr.type)(arr)


def from_ndarray(values: np.ndarray, arrow_type: pa.DataType) -> pa.Array:
    """Arrow column of ``arrow_type`` over a tensor of shape [N, *row_shape(arrow_type)].

    Fixed-width results are wrapped without copying; ``list<T>`` types take the trailing
    dimensions whole per row (for outputs whose non-batch size is only known at run time).
    """
    n = values.shape[0]
    elem = element_type(arrow_type)
    if elem in STRING_TYPES:
        flat_arr = pa.array(values.reshape(-1).tolist(), type=elem)
    elif pa.types.is_boolean(elem):
        flat_arr = pa.array(values.reshape(-1), type=elem)
    else:
        flat = np.ascontiguousarray(values).reshape(-1)
        if isinstance(elem, pa.ExtensionType):
            storage = pa.Array.from_buffers(elem.storage_type, flat.size, [None, pa.py_buffer(flat)])
            flat_arr = pa.ExtensionArray.from_storage(elem, storage)
        elif flat.dtype != elem.to_pandas_dtype():
            raise TypeError(f"tensor dtype {flat.dtype} does not match Arrow type {elem}")
        else:
            flat_arr = pa.Array.from_buffers(elem, flat.size, [None, pa.py_buffer(flat)])
    if pa.types.is_list(arrow_type):
        per_row = int(np.prod(values.shape[1:])) if values.ndim > 1 else 1
        offsets = pa.array(np.arange(0, (n + 1) * per_row, per_row, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, flat_arr, type=arrow_type)
    out = flat_arr
    for d in reversed(row_shape(arrow_type)):
        out = pa.FixedSizeListArray.from_arrays(out, d)
    return out
