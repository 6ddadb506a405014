"""Arrow arrays <-> numpy tensors, zero-copy wherever the bytes allow it.

A non-null primitive or fixed_size_list column of a fixed-width type becomes a numpy view of the
Arrow value buffer (no copy); bool (bit-packed in Arrow) and strings are copied once. Outputs go the
other way: a contiguous numpy result is wrapped as an Arrow buffer without copying.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from iskander.arrow.types import STRING_TYPES, element_type, is_fixed_shape_tensor, row_shape

# pyarrow imports pandas, when it is installed, the first time pa.array() is given a numpy array
# (~0.3 s). Pay that when the server starts, not inside its first request, where it can exceed a
# short request_timeout_s.
pa.array(np.zeros(0, np.float32))


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
    if is_fixed_shape_tensor(t):
        return first_null_row(arr.storage)
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
    tensor_ext = is_fixed_shape_tensor(arrow_type)  # storage is one fixed_size_list of prod(shape)
    depth = 1 if tensor_ext else len(row_shape(arrow_type))
    elem = element_type(arrow_type)
    tail = row_shape(arrow_type) or ((1,) if unit_dim else ())
    zero_copy = not (elem in STRING_TYPES or pa.types.is_boolean(elem))  # bit-packed/str: one copy
    extension = isinstance(elem, pa.ExtensionType)  # bfloat16: read the uint16 storage

    def read(arr: pa.Array) -> np.ndarray:
        if arr.null_count:
            raise NullValues
        n = len(arr)
        flat = arr.storage if tensor_ext else arr
        for _ in range(depth):
            flat = list_values(flat)
            if flat.null_count:
                raise NullValues
        if extension:
            flat = flat.storage
        values = flat.to_numpy(zero_copy_only=zero_copy)
        return values.reshape(n, *tail) if tail else values

    return read


def read_filled(arr: pa.Array, fill: object, unit_dim: bool = False) -> np.ndarray:
    """Like a reader, for a column with nulls: null rows and null elements take ``fill``.
    The exceptional path: it copies (Arrow's fill_null, then numpy's masked assignment)."""
    t = arr.type
    n = len(arr)
    tail = row_shape(t) or ((1,) if unit_dim else ())
    flat = arr.storage if is_fixed_shape_tensor(t) else arr
    valid = flat.is_valid().to_numpy(zero_copy_only=False)
    while pa.types.is_fixed_size_list(flat.type):
        size = flat.type.list_size
        flat = list_values(flat)
        valid = np.repeat(valid, size) & flat.is_valid().to_numpy(zero_copy_only=False)
    if isinstance(flat.type, pa.ExtensionType):
        flat = flat.storage
    values = np.array(flat.fill_null(pa.scalar(fill, flat.type)).to_numpy(zero_copy_only=False))
    values[~valid] = fill
    return values.reshape(n, *tail) if tail else values


def to_ndarray(arr: pa.Array) -> np.ndarray:
    """Tensor of shape [N, *row_shape] for a null-free column (see compile_reader)."""
    return compile_reader(arr.type)(arr)


Writer = Callable[[np.ndarray], pa.Array]


def compile_writer(arrow_type: pa.DataType) -> Writer:
    """A function tensor -> Arrow column of ``arrow_type``, built once per output column: plain
    numeric primitives and fixed_size_lists get a lean wrapper; every other type goes through
    from_ndarray."""
    elem = element_type(arrow_type)
    plain = (pa.types.is_integer(elem) or pa.types.is_floating(elem)) and not isinstance(elem, pa.ExtensionType) \
        and (not pa.types.is_nested(arrow_type) or pa.types.is_fixed_size_list(arrow_type)) \
        and not isinstance(arrow_type, pa.ExtensionType) and not is_fixed_shape_tensor(arrow_type)
    if not plain:
        return lambda values: from_ndarray(values, arrow_type)
    dtype = np.dtype(elem.to_pandas_dtype())
    dims = row_shape(arrow_type)

    def write(values: np.ndarray) -> pa.Array:
        if values.dtype != dtype:
            raise TypeError(f"tensor dtype {values.dtype} does not match Arrow type {elem}")
        if not values.flags.c_contiguous:
            values = np.ascontiguousarray(values)
        out = pa.Array.from_buffers(elem, values.size, [None, pa.py_buffer(values)])
        for d in reversed(dims):
            out = pa.FixedSizeListArray.from_arrays(out, d)
        return out

    return write


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
    if is_fixed_shape_tensor(arrow_type):
        storage = pa.FixedSizeListArray.from_arrays(flat_arr, int(np.prod(arrow_type.shape)))
        return pa.ExtensionArray.from_storage(arrow_type, storage)
    out = flat_arr
    for d in reversed(row_shape(arrow_type)):
        out = pa.FixedSizeListArray.from_arrays(out, d)
    return out
