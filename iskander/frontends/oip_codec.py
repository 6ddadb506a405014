"""OIP v2 tensors <-> Arrow columns.

Requests: each input tensor becomes the Arrow column the contract expects. Fixed-width raw contents
are wrapped without copying (the Arrow buffer points into the request's bytes); BOOL and BYTES are
copied once. Responses: each output column becomes one ``raw_output_contents`` entry (one copy into
the protobuf bytes). Shapes follow Triton's ONNX convention: a one-value-per-row column is [-1, 1]
in metadata and answers, and is accepted as [N, 1] or [N].
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from iskander.arrow.tensor import list_values
from iskander.arrow.types import BFLOAT16, STRING_TYPES, element_type, is_fixed_shape_tensor, row_shape
from iskander.errors import InvalidInput, Unimplemented
from iskander.text import clip

_FIXED: dict[pa.DataType, str] = {
    pa.bool_(): "BOOL",
    pa.uint8(): "UINT8",
    pa.uint16(): "UINT16",
    pa.uint32(): "UINT32",
    pa.uint64(): "UINT64",
    pa.int8(): "INT8",
    pa.int16(): "INT16",
    pa.int32(): "INT32",
    pa.int64(): "INT64",
    pa.float16(): "FP16",
    pa.float32(): "FP32",
    pa.float64(): "FP64",
    BFLOAT16: "BF16",
}

# numpy dtype of each datatype's raw little-endian encoding
RAW_DTYPE: dict[str, np.dtype] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BF16": np.dtype("<u2"),  # bit patterns; raw only
}

# InferTensorContents field that carries each datatype in typed (non-raw) form
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


# int_contents / uint_contents carry 32-bit values: the narrower datatypes need a range check
_WIRE_DTYPE: dict[str, np.dtype] = {
    "INT8": np.dtype("<i4"), "INT16": np.dtype("<i4"), "UINT8": np.dtype("<u4"), "UINT16": np.dtype("<u4"),
}

_U32 = struct.Struct("<I")


def oip_datatype(arrow_type: pa.DataType) -> str:
    """OIP datatype of a column's element type (timestamps and dates travel as their integers)."""
    elem = element_type(arrow_type)
    if elem in STRING_TYPES:
        return "BYTES"
    if pa.types.is_timestamp(elem) or pa.types.is_date64(elem) or pa.types.is_duration(elem):
        return "INT64"
    if pa.types.is_date32(elem):
        return "INT32"
    name = _FIXED.get(elem)
    if name is None:
        raise Unimplemented(f"Arrow type {arrow_type} has no OIP v2 datatype")
    return name


def oip_shape(arrow_type: pa.DataType) -> list[int]:
    """Metadata shape with the batch dimension as -1 (one-value-per-row columns as [-1, 1])."""
    if pa.types.is_list(arrow_type):
        return [-1, -1]  # per-row size known only at run time
    dims = row_shape(arrow_type)
    return [-1, *dims] if dims else [-1, 1]


def _fmt(shape: Sequence[int]) -> str:
    return clip("[" + ",".join(str(d) for d in shape[:64]) + ("" if len(shape) <= 64 else ",…") + "]")


def passthrough_lists(passthrough: Sequence[pa.Field]) -> frozenset[str]:
    """Passthrough list columns: no OIP request can send them, so answers leave them out too."""
    return frozenset(f.name for f in passthrough if pa.types.is_list(f.type))


def oip_view(
    schema: pa.Schema, requests: bool = False, skip: frozenset[str] = frozenset()
) -> list[tuple[str, pa.DataType]]:
    """The OIP tensors of an Arrow schema: one per column, struct columns as one tensor per field
    named 'column.field' (recursively); columns with no OIP datatype (Flight-only passthrough) are
    left out. With ``requests``, so are variable-size lists, which no request tensor can carry."""
    view = []
    for field in schema:
        if field.name in skip:
            continue
        if pa.types.is_struct(field.type):
            children = pa.schema([pa.field(f"{field.name}.{f.name}", f.type) for f in field.type])
            view += oip_view(children, requests)
            continue
        if requests and pa.types.is_list(field.type):
            continue
        try:
            oip_datatype(field.type)
        except Unimplemented:
            continue
        view.append((field.name, field.type))
    return view


class TensorDecoder:
    """Decodes one contract column from an OIP input tensor; built once per model version.
    ``alternatives`` are decoders for the datatypes of declared cast sources."""

    def __init__(
        self, model: str, column: str, arrow_type: pa.DataType, cast_from: Sequence[pa.DataType] = ()
    ) -> None:
        self.alternatives: list[TensorDecoder] = []
        for source in cast_from:
            try:
                self.alternatives.append(TensorDecoder(model, column, source))
            except Unimplemented:
                continue
        self.model = model
        self.column = column
        self.arrow_type = arrow_type
        self.elem = element_type(arrow_type)
        self.datatype = oip_datatype(arrow_type)
        self.row_shape = row_shape(arrow_type)
        self.per_row = int(np.prod(self.row_shape)) if self.row_shape else 1
        self.metadata_shape = oip_shape(arrow_type)

    def select(self, datatype: str, shape: Sequence[int]) -> TensorDecoder:
        """This decoder, or a declared cast source's, whichever takes this datatype and shape."""
        candidates = [d for d in (self, *self.alternatives) if d.datatype == datatype]
        if not candidates:
            expected = "' or '".join(dict.fromkeys([self.datatype, *(a.datatype for a in self.alternatives)]))
            raise InvalidInput(
                f"inference input '{self.column}' data-type is '{clip(datatype)}', model '{self.model}' expects "
                f"'{expected}'",
                model=self.model, column=self.column, expected=self.datatype, got=clip(datatype),
            )
        for decoder in candidates:
            if decoder._shape_ok(list(shape)):
                return decoder
        return candidates[0]  # its rows() names the expected shape

    def _shape_ok(self, shape: list[int]) -> bool:
        return len(shape) >= 1 and all(d >= 0 for d in shape) and (
            tuple(shape[1:]) == self.row_shape or (not self.row_shape and shape[1:] == [1])
        )

    def rows(self, shape: Sequence[int], datatype: str) -> int:
        """Validate datatype and shape; return the batch size N."""
        if datatype != self.datatype:
            return self.select(datatype, shape).rows(shape, datatype)
        shape = list(shape)
        ok = self._shape_ok(shape)
        if not ok:
            raise InvalidInput(
                f"unexpected shape for input '{self.column}' for model '{self.model}'. Expected "
                f"{_fmt(self.metadata_shape)}, got {_fmt(shape)}",
                model=self.model, column=self.column, expected=self.metadata_shape, got=shape[:64],
            )
        return shape[0]

    def _check_raw_size(self, data: bytes, count: int) -> np.dtype:
        dtype = RAW_DTYPE[self.datatype]
        if len(data) != count * dtype.itemsize:
            raise InvalidInput(
                f"input '{self.column}' for model '{self.model}' has {len(data)} bytes of raw data, "
                f"expected {count * dtype.itemsize} for {count} {self.datatype} elements",
                model=self.model, column=self.column, expected=count * dtype.itemsize, got=len(data),
            )
        return dtype

    def ndarray_from_raw(self, data: bytes, rows: int) -> np.ndarray:
        """Fixed-width numbers only: a numpy view of the request bytes, shaped [N, *row_shape]."""
        dtype = self._check_raw_size(data, rows * self.per_row)
        values = np.frombuffer(data, dtype=dtype)
        return values.reshape(rows, *self.row_shape) if self.row_shape else values

    def ndarray_from_contents(self, contents: object, rows: int) -> np.ndarray:
        """Fixed-width numbers only: the typed contents as a numpy array shaped [N, *row_shape]."""
        values = self._typed_array(self._typed_values(contents, rows * self.per_row))
        return values.reshape(rows, *self.row_shape) if self.row_shape else values

    def from_raw(self, data: bytes, rows: int) -> pa.Array:
        count = rows * self.per_row
        if self.datatype == "BYTES":
            flat = _raw_bytes_to_arrow(data, count, self.elem, self.column, self.model)
        else:
            self._check_raw_size(data, count)
            if self.datatype == "BOOL":
                flat = pa.array(np.frombuffer(data, dtype=np.uint8).astype(bool), type=pa.bool_())
            else:
                # zero-copy: the Arrow buffer is a view of the request bytes
                flat = _fixed_width(self.elem, count, pa.py_buffer(data))
        return self._nest(flat)

    def _typed_values(self, contents: object, count: int) -> Any:
        field = CONTENTS_FIELD.get(self.datatype)
        if field is None:
            raise InvalidInput(
                f"input '{self.column}' for model '{self.model}' is {self.datatype}, which travels only in "
                "raw_input_contents",
                model=self.model, column=self.column,
            )
        values = getattr(contents, field)
        if len(values) != count:
            raise InvalidInput(
                f"input '{self.column}' for model '{self.model}' has {len(values)} elements in {field}, "
                f"expected {count}",
                model=self.model, column=self.column, expected=count, got=len(values),
            )
        return values

    def _typed_array(self, values: Any) -> np.ndarray:
        """Typed contents as the datatype's numpy array. int_contents / uint_contents are 32-bit on the
        wire, so an INT8/INT16/UINT8/UINT16 value can be out of range: the client's mistake, named."""
        dtype = RAW_DTYPE[self.datatype]
        wide = _WIRE_DTYPE.get(self.datatype)
        if wide is None:
            return np.asarray(values, dtype=dtype)
        array = np.asarray(values, dtype=wide)
        info = np.iinfo(dtype)
        bad = (array < info.min) | (array > info.max)
        if bad.any():
            index = int(bad.argmax())
            raise InvalidInput(
                f"input '{self.column}' for model '{self.model}': {CONTENTS_FIELD[self.datatype]} value "
                f"{int(array[index])} at element {index} is out of range for {self.datatype} "
                f"({info.min}..{info.max})",
                model=self.model, column=self.column, expected=f"{info.min}..{info.max}", got=int(array[index]),
            )
        return array.astype(dtype)

    def from_contents(self, contents: object, rows: int) -> pa.Array:
        count = rows * self.per_row
        values = self._typed_values(contents, count)
        if self.datatype == "BYTES":
            flat = self._bytes_array(list(values))
        else:
            array = self._typed_array(values)
            flat = _fixed_width(self.elem, count, pa.py_buffer(array)) if self.datatype != "BOOL" \
                else pa.array(array, type=pa.bool_())
        return self._nest(flat)

    def _bytes_array(self, items: list[bytes]) -> pa.Array:
        binary = pa.array(items, type=pa.binary())
        if self.elem in (pa.binary(), pa.large_binary()):
            return binary.cast(self.elem)
        try:
            return binary.cast(self.elem)  # utf8: validates the encoding
        except (pa.ArrowInvalid, UnicodeDecodeError):
            raise InvalidInput(
                f"input '{self.column}' for model '{self.model}' holds bytes that are not valid UTF-8; the "
                "column is a utf8 string column",
                model=self.model, column=self.column,
            ) from None

    def _nest(self, flat: pa.Array) -> pa.Array:
        if is_fixed_shape_tensor(self.arrow_type):
            storage = pa.FixedSizeListArray.from_arrays(flat, self.per_row)
            return pa.ExtensionArray.from_storage(self.arrow_type, storage)
        out = flat
        for d in reversed(self.row_shape):
            out = pa.FixedSizeListArray.from_arrays(out, d)
        return out


def _fixed_width(elem: pa.DataType, count: int, buffer: pa.Buffer) -> pa.Array:
    if isinstance(elem, pa.ExtensionType):
        return pa.ExtensionArray.from_storage(elem, pa.Array.from_buffers(elem.storage_type, count, [None, buffer]))
    return pa.Array.from_buffers(elem, count, [None, buffer])


def _equal_lengths(raw: np.ndarray, count: int) -> np.ndarray | None:
    """Fast path when every element has the same length (ids, hashes, generated load): the
    prefixes sit on a fixed stride and are checked in one vectorised comparison."""
    if count == 0 or raw.size < 4:
        return None
    first = int(raw[:4].view("<u4")[0])
    if raw.size != count * (4 + first):
        return None
    prefixes = raw.reshape(count, 4 + first)[:, :4]
    if not (np.ascontiguousarray(prefixes).view("<u4").reshape(-1) == first).all():
        return None
    return np.full(count, first, dtype=np.int64)


def _walk_lengths(data: bytes, count: int, column: str, model: str) -> np.ndarray:
    size = len(data)
    unpack = _U32.unpack_from
    lengths = []
    append = lengths.append
    offset = 0
    for i in range(count):
        if offset + 4 > size:
            raise InvalidInput(
                f"input '{column}' for model '{model}': raw BYTES data ends before element {i} of {count}",
                model=model, column=column,
            )
        (length,) = unpack(data, offset)
        offset += 4
        if offset + length > size:
            raise InvalidInput(
                f"input '{column}' for model '{model}': BYTES element {i} declares {length} bytes but only "
                f"{size - offset} remain",
                model=model, column=column,
            )
        append(length)
        offset += length
    if offset != size:
        raise InvalidInput(
            f"input '{column}' for model '{model}': {size - offset} bytes left after {count} BYTES elements",
            model=model, column=column,
        )
    return np.array(lengths, dtype=np.int64)


def _raw_bytes_to_arrow(data: bytes, count: int, elem: pa.DataType, column: str, model: str) -> pa.Array:
    """Raw BYTES (each element: little-endian uint32 length, then the bytes) -> one Arrow string or
    binary array. Payloads are gathered in one numpy copy; only variable lengths need a Python walk."""
    raw = np.frombuffer(data, dtype=np.uint8)
    lengths = _equal_lengths(raw, count)
    if lengths is not None:
        values = np.ascontiguousarray(raw.reshape(count, -1)[:, 4:]).reshape(-1)
    else:
        lengths = _walk_lengths(data, count, column, model)
        keep = np.ones(raw.size, dtype=bool)
        prefix_at = np.arange(count, dtype=np.int64) * 4
        prefix_at[1:] += np.cumsum(lengths[:-1])
        keep[(prefix_at[:, None] + np.arange(4)).reshape(-1)] = False
        values = raw[keep]
    large = elem in (pa.large_utf8(), pa.large_binary())
    if not large and values.size >= 2**31:
        raise InvalidInput(
            f"input '{column}' for model '{model}' holds {values.size} bytes of strings; a utf8/binary column "
            "holds less than 2 GiB (declare large_utf8 or large_binary)",
            model=model, column=column,
        )
    offsets = np.zeros(count + 1, dtype=np.int64 if large else np.int32)
    np.cumsum(lengths, out=offsets[1:])
    array = pa.Array.from_buffers(elem, count, [None, pa.py_buffer(offsets), pa.py_buffer(values)])
    if elem in (pa.utf8(), pa.large_utf8()):
        try:
            array.validate(full=True)  # checks the UTF-8 encoding
        except pa.ArrowInvalid:
            raise InvalidInput(
                f"input '{column}' for model '{model}' holds bytes that are not valid UTF-8; the column is a "
                "utf8 string column",
                model=model, column=column,
            ) from None
    return array


def _encode_bytes(flat: pa.Array) -> bytes:
    """Arrow string/binary array -> raw BYTES, vectorised (nulls travel as empty elements)."""
    n = len(flat)
    if n <= 32:  # a handful of ids: a Python join beats a dozen small numpy calls
        pack = _U32.pack
        values = flat.cast(pa.binary()).to_pylist() if pa.types.is_string(flat.type) or pa.types.is_large_string(
            flat.type) else flat.to_pylist()
        return b"".join(pack(len(v or b"")) + (v or b"") for v in values)
    large = flat.type in (pa.large_utf8(), pa.large_binary())
    offsets = np.frombuffer(flat.buffers()[1], dtype=np.int64 if large else np.int32, count=flat.offset + n + 1)
    offsets = offsets[flat.offset:].astype(np.int64)
    lengths = np.diff(offsets)
    if flat.null_count:
        lengths = np.where(flat.is_null().to_numpy(zero_copy_only=False), 0, lengths)
        values = b"".join(v or b"" for v in flat.cast(pa.binary()).to_pylist())
        payload = np.frombuffer(values, dtype=np.uint8)
    else:
        data = flat.buffers()[2]
        payload = np.frombuffer(data, dtype=np.uint8)[offsets[0]:offsets[-1]] if data is not None \
            else np.empty(0, np.uint8)
    out = np.empty(4 * n + int(lengths.sum()), dtype=np.uint8)
    prefix_at = np.arange(n, dtype=np.int64) * 4
    prefix_at[1:] += np.cumsum(lengths[:-1])
    prefix_idx = (prefix_at[:, None] + np.arange(4)).reshape(-1)
    out[prefix_idx] = lengths.astype("<u4").view(np.uint8)
    keep = np.ones(out.size, dtype=bool)
    keep[prefix_idx] = False
    out[keep] = payload
    return out.tobytes()


def encode_column(array: pa.Array) -> tuple[str, list[int], bytes]:
    """(datatype, shape, raw bytes) of an output column, Triton-style shapes ([N, 1] for scalars)."""
    n = len(array)
    t = array.type
    datatype = oip_datatype(t)
    flat = array
    dims: list[int] = []
    if is_fixed_shape_tensor(t):
        dims = list(t.shape)
        flat = list_values(array.storage)
    while pa.types.is_fixed_size_list(flat.type):
        dims.append(flat.type.list_size)
        flat = list_values(flat)
    if pa.types.is_list(flat.type):  # run-time sized rows: all rows must agree to form a tensor
        lengths = np.diff(flat.offsets.to_numpy())
        width = int(lengths[0]) if n else 0
        if n and not (lengths == width).all():
            raise InvalidInput("output rows have different lengths and cannot form one tensor")
        dims.append(width)
        flat = flat.flatten()
    shape = [n, *dims] if dims else [n, 1]
    if datatype == "BYTES":
        return datatype, shape, _encode_bytes(flat)
    if datatype == "BOOL":
        return datatype, shape, flat.fill_null(False).to_numpy(zero_copy_only=False).astype(np.uint8).tobytes()
    if flat.null_count:
        flat = flat.fill_null(0)  # passthrough nulls: OIP has no nulls
    dtype = RAW_DTYPE[datatype]
    values = np.frombuffer(flat.buffers()[1], dtype=dtype, count=flat.offset + len(flat))[flat.offset:]
    return datatype, shape, values.tobytes()
