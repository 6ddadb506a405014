"""Structural validation of record batches received from the network, before anything reads them.

Arrow's IPC reader trusts the message header: a batch whose header claims more rows than its
buffers hold, or offsets that point past the data, is handed out as is, and reading it reads
past the received buffers (other requests' bytes, or a segfault inside onnxruntime). Every batch
a frontend receives in Arrow form goes through ``check_batch`` first.

Cost (docs/memory_model.md): the cheap check (``validate()``: buffer sizes against length and
type) is O(columns); the full check (offsets monotonic and in bounds, UTF-8, dictionary indices) is
O(rows) and only runs for columns whose layout has offsets or indices.
"""

from __future__ import annotations

import pyarrow as pa

from iskander.errors import InvalidInput
from iskander.text import clip


def _needs_full(t: pa.DataType) -> bool:
    """True when reading ``t`` follows offsets, indices or type ids held in the data itself."""
    if isinstance(t, pa.ExtensionType):
        return _needs_full(t.storage_type)
    if pa.types.is_fixed_size_list(t):
        return _needs_full(t.value_type)
    if pa.types.is_struct(t):
        return any(_needs_full(f.type) for f in t)
    return not (pa.types.is_primitive(t) or pa.types.is_null(t) or pa.types.is_fixed_size_binary(t)
                or pa.types.is_decimal(t))


def needs_full(schema: pa.Schema) -> bool:
    """Whether any column needs the full (O(rows)) check. A stream keeps one schema: decide once
    per stream (hashing a schema to cache this costs more than the whole cheap check)."""
    return any(_needs_full(f.type) for f in schema)


def check_batch(batch: pa.RecordBatch, model: str, full: bool | None = None) -> None:
    """Raise InvalidInput naming the column if ``batch`` is not structurally sound.

    One ``RecordBatch.validate`` call (column lengths, buffer sizes, and with ``full`` offsets,
    UTF-8 and indices, all in C++: ~0.3 us for a fixed-width batch); only a failing batch is
    walked column by column to name the culprit."""
    rows = batch.num_rows
    if rows < 0:  # a header can say anything; len() of such a column is not even defined
        raise InvalidInput(f"record batch for model '{clip(model)}' claims {rows} rows", model=model)
    if full is None:
        full = needs_full(batch.schema)
    try:
        batch.validate(full=full)
        return
    except pa.ArrowException as exc:
        batch_error = str(exc)
    for name, column in zip(batch.schema.names, batch.columns):
        try:
            length = len(column)
        except (SystemError, OverflowError, ValueError):  # a negative length from the header
            length = -1
        if length != rows:
            raise InvalidInput(
                f"column '{clip(name)}' for model '{clip(model)}' has {length} rows, the batch claims {rows}",
                model=model, column=name, expected=rows, got=length,
            )
        try:
            column.validate(full=full)
        except pa.ArrowException as exc:
            raise InvalidInput(
                f"column '{clip(name)}' for model '{clip(model)}' is malformed ({column.type} with {rows} rows): "
                f"{clip(str(exc), 300)}",
                model=model, column=name,
            ) from None
    raise InvalidInput(f"record batch for model '{clip(model)}' is malformed: {clip(batch_error, 300)}", model=model)
