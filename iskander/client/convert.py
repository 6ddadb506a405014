"""Data in and out of the client: Arrow, pandas, polars and Arrow streams as record batches, and
answers joined back onto the rows they answer.

Only pyarrow is imported: pandas and polars are touched only when the data is one of theirs.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

from iskander.client.errors import InternalError, InvalidArgument

__all__ = ["Data", "as_batches", "conform", "attach_outputs"]


Data = Any  # pa.Table | pa.RecordBatch | pa.RecordBatchReader | Iterable[pa.RecordBatch] | pandas/polars DataFrame


def _module(obj: object) -> str:
    return type(obj).__module__.split(".")[0]


def as_batches(data: Data) -> Iterator[pa.RecordBatch]:
    """Record batches from any supported input, without importing pandas or polars."""
    if isinstance(data, pa.RecordBatch):
        yield data
    elif isinstance(data, pa.Table):
        yield from data.to_batches()
    elif isinstance(data, pa.RecordBatchReader):
        yield from data
    elif _module(data) == "pandas":
        yield from pa.Table.from_pandas(data, preserve_index=False).to_batches()
    elif _module(data) == "polars":
        yield from data.to_arrow().to_batches()
    elif hasattr(data, "__arrow_c_stream__"):  # DuckDB relations and other Arrow PyCapsule producers
        yield from pa.RecordBatchReader.from_stream(data)
    elif isinstance(data, Iterable):
        for item in data:
            if not isinstance(item, pa.RecordBatch):
                raise TypeError(f"expected pyarrow.RecordBatch items, got {type(item).__name__}")
            yield item
    else:
        raise TypeError(f"cannot send {type(data).__name__}: give a pyarrow Table, RecordBatch, RecordBatchReader, "
                        "iterable of RecordBatch, or a pandas or polars DataFrame")


_STRINGS = (pa.types.is_large_string, pa.types.is_string_view)
_BINARIES = (pa.types.is_large_binary, pa.types.is_binary_view)


def _same_layout_family(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether ``have`` is another Arrow layout of the value type ``want`` (lossless to cast).

    Dataframe libraries produce large_string, string_view, dictionaries (categoricals) and variable
    lists (pandas has no fixed-size list) where a contract says utf8 or fixed_size_list. Numeric
    conversions are not layouts: those stay the server's business (the manifest's cast_from)."""
    if pa.types.is_dictionary(have):
        return _same_layout_family(have.value_type, want) or have.value_type == want
    if pa.types.is_string(want):
        return any(p(have) for p in _STRINGS)
    if pa.types.is_binary(want):
        return any(p(have) for p in _BINARIES)
    if pa.types.is_fixed_size_list(want):
        if pa.types.is_list(have) or pa.types.is_large_list(have) or pa.types.is_list_view(have) \
                or pa.types.is_fixed_size_list(have):
            inner = have.value_type
            return inner == want.value_type or _same_layout_family(inner, want.value_type)
    return False


def conform(batch: pa.RecordBatch, schema: pa.Schema, model: str = "") -> pa.RecordBatch:
    """The request columns of ``batch`` in the model's order, with layout-only casts (see above).

    A missing column is an InvalidArgument raised here; a column of a different value type is
    sent as it is, so that the server's contract (and its message) decides."""
    arrays = []
    for field in schema:
        index = batch.schema.get_field_index(field.name)
        if index < 0:
            raise InvalidArgument(
                f"column '{field.name}' of model '{model}' is missing; the data has columns: "
                f"{', '.join(batch.schema.names) or '(none)'}",
                {"model": model, "column": field.name},
            )
        column = batch.column(index)
        if column.type != field.type and _same_layout_family(column.type, field.type):
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:  # e.g. a list of the wrong length
                raise InvalidArgument(
                    f"column '{field.name}' of model '{model}' has type {column.type} and cannot become "
                    f"{field.type}: {exc}",
                    {"model": model, "column": field.name, "expected": str(field.type), "got": str(column.type)},
                ) from None
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, names=schema.names)


def attach_outputs(inputs: pa.RecordBatch, answer: pa.RecordBatch, outputs: list[str],
                   names: list[str] | None = None) -> pa.RecordBatch:
    """``inputs`` with the answer's ``outputs`` columns appended (renamed to ``names``).

    DoExchange answers each batch with one batch of the same rows in the same order, so joining is
    positional: columns the model never saw come back untouched, whatever their type."""
    if answer.num_rows != inputs.num_rows:
        raise InternalError(f"the answer has {answer.num_rows} rows for a batch of {inputs.num_rows}")
    clash = [n for n in names or outputs if n in inputs.schema.names]
    if clash:
        raise InvalidArgument(f"output column(s) {', '.join(clash)} would duplicate input columns; rename or drop them")
    arrays = list(inputs.columns) + [answer.column(name) for name in outputs]
    fields = list(inputs.schema) + [answer.schema.field(name).with_name(new)
                                    for name, new in zip(outputs, names or outputs)]
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))
