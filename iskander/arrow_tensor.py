"""Arrow arrays <-> numpy tensors, zero-copy wherever the bytes allow it.

A non-null primitive or fixed_size_list column of a fixed-width type becomes a numpy view of the
Arrow value buffer (no copy); bool (bit-packed in Arrow) and strings are copied once. Outputs go the
other way: a contiguous numpy result is wrapped as an Arrow buffer without copying.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from .arrow_types import STRING_TYPES, element_type, row_shape


def first_null_row(arr: pa.Array) -> int | None:
    """Index of the first row that is null (or holds a null element in a list), else None."""
    if arr.null_count:
        return int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
    t = arr.type
    if pa.types.is_fixed_size_list(t):
        flat = arr.flatten()
        row = first_null_row(flat)
        if row is not None:
            return row // t.list_size
    return None


def has_nulls(arr: pa.Array) -> bool:
    while True:
        if arr.null_count:
            return True
        if not pa.types.is_fixed_size_list(arr.type):
            return False
        arr = arr.flatten()


def to_ndarray(arr: pa.Array) -> np.ndarray:
    """Tensor of shape [N, *row_shape] for a null-free column (caller checks nulls first)."""
    t = arr.type
    n = len(arr)
    dims = row_shape(t)
    flat = arr
    for _ in dims:
        flat = flat.flatten()  # honours slice offsets; no copy
    elem = flat.type
    if elem in STRING_TYPES:
        values = flat.to_numpy(zero_copy_only=False)  # object array of str/bytes: ORT's string tensor
    elif pa.types.is_boolean(elem):
        values = flat.to_numpy(zero_copy_only=False)  # bit-packed -> one byte per value (copy)
    else:
        values = flat.to_numpy(zero_copy_only=True)
    if dims:
        return values.reshape((n, *dims))
    return values


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
        if flat.dtype != elem.to_pandas_dtype():
            raise TypeError(f"tensor dtype {flat.dtype} does not match Arrow type {elem}")
        flat_arr = pa.Array.from_buffers(elem, flat.size, [None, pa.py_buffer(flat)])
    if pa.types.is_list(arrow_type):
        per_row = int(np.prod(values.shape[1:])) if values.ndim > 1 else 1
        offsets = pa.array(np.arange(0, (n + 1) * per_row, per_row, dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, flat_arr, type=arrow_type)
    out = flat_arr
    for d in reversed(row_shape(arrow_type)):
        out = pa.FixedSizeListArray.from_arrays(out, d)
    return out
