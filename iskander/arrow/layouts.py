"""Lossless physical-layout equivalents of a contract's logical types.

Producers spell the same values differently: DuckDB and Polars send ``large_string`` or
``string_view``, Spark and DuckDB ``FLOAT[]`` arrive as ``list`` (or ``large_list`` /
``list_view``) whose rows all hold k values, dictionary-encoded strings, timestamps in another
unit. A contract column accepts these and converts them once, in C++ (``pyarrow.compute.cast``),
before the usual checks. Only conversions that cannot change a value are accepted: a list row
that does not hold exactly k values, a timestamp that would lose precision or overflow, or a
large offset that does not fit is INVALID_ARGUMENT naming the column (and the row where there is
one). Declared ``cast_from`` casts (which may change values) stay explicit in the manifest.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iskander.errors import InvalidInput

Converter = Callable[[pa.Array, str, str], pa.Array]  # (column, model, column name) -> converted column

_STRINGS = (pa.types.is_string, pa.types.is_large_string, pa.types.is_string_view)
_BINARIES = (pa.types.is_binary, pa.types.is_large_binary, pa.types.is_binary_view)
_LISTS = (pa.types.is_list, pa.types.is_large_list, pa.types.is_list_view, pa.types.is_large_list_view)


def _family(t: pa.DataType, family: tuple[Callable[[pa.DataType], bool], ...]) -> bool:
    return any(test(t) for test in family)


def converter(got: pa.DataType, expected: pa.DataType) -> Converter | None:
    """How to turn a column of type ``got`` into ``expected`` without changing a value; None if
    ``got`` is no lossless equivalent (the caller reports the type mismatch)."""
    if pa.types.is_dictionary(got):
        inner = got.value_type
        if inner == expected:
            return _decode_dictionary
        then = converter(inner, expected)
        if then is None:
            return None
        return lambda column, model, name: then(_decode_dictionary(column, model, name), model, name)
    if _family(expected, _STRINGS) and _family(got, _STRINGS) or \
            _family(expected, _BINARIES) and _family(got, _BINARIES):
        return _cast_to(expected)
    if pa.types.is_fixed_size_list(expected) and _family(got, _LISTS) and got.value_type == expected.value_type:
        return _to_fixed_size(expected)
    if pa.types.is_timestamp(expected) and pa.types.is_timestamp(got) and got.tz == expected.tz \
            and got.unit != expected.unit:
        return _cast_to(expected)  # safe cast: refuses truncation and overflow
    return None


def _decode_dictionary(column: pa.Array, model: str, name: str) -> pa.Array:
    return column.dictionary_decode()


def _cast_to(target: pa.DataType) -> Converter:
    def convert(column: pa.Array, model: str, name: str) -> pa.Array:
        try:
            return pc.cast(column, target, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InvalidInput(
                f"column '{name}' of model '{model}' ({column.type}) cannot be converted to {target} without "
                f"changing values: {str(exc).splitlines()[0]}",
                model=model, column=name, expected=str(target), got=str(column.type),
            ) from None

    return convert


def _to_fixed_size(target: pa.FixedSizeListType) -> Converter:
    k = target.list_size

    def wrong_size(model: str, name: str, row: int, got: int) -> InvalidInput:
        return InvalidInput(
            f"column '{name}' of model '{model}' is a list whose rows must each hold {k} values "
            f"(the model expects fixed_size_list<{target.value_type}>[{k}]); row {row} holds {got}",
            model=model, column=name, row=row, expected=k, got=got,
        )

    def convert(column: pa.Array, model: str, name: str) -> pa.Array:
        n = len(column)
        view = pa.types.is_list_view(column.type) or pa.types.is_large_list_view(column.type)
        if column.null_count == 0:
            # the common case, in numpy: sizes from the offsets, and when the rows lie back to back
            # the answer is a zero-copy view of the values
            starts = np.asarray(column.offsets, dtype=np.int64)
            sizes = np.asarray(column.sizes, dtype=np.int64) if view else np.diff(starts)
            starts = starts[:n]
            bad = sizes != k
            if bad.any():
                row = int(np.argmax(bad))
                raise wrong_size(model, name, row, int(sizes[row]))
            if n == 0 or (starts == starts[0] + k * np.arange(n)).all():
                first = int(starts[0]) if n else 0
                return pa.FixedSizeListArray.from_arrays(column.values.slice(first, n * k), k)
            return _gather_view(column, target)
        lengths = pc.list_value_length(column)  # null for a null row (the contract's null rule applies)
        wrong = pc.and_kleene(pc.is_valid(lengths), pc.not_equal(lengths, k))
        if pc.any(wrong).as_py():
            row = pc.index(wrong, True).as_py()
            raise wrong_size(model, name, row, lengths[row].as_py())
        if view:
            return _gather_view(column, target)
        return _cast_to(target)(column, model, name)

    return convert


def _gather_view(column: pa.Array, target: pa.FixedSizeListType) -> pa.Array:
    """A list_view whose valid rows hold k values each -> fixed_size_list: one gather (views may
    overlap or come in any order). pyarrow 26's list_view -> list cast returns wrong offsets, so
    the cast is not used here."""
    k = target.list_size
    valid = column.is_valid().to_numpy(zero_copy_only=False)
    starts = np.asarray(column.offsets, dtype=np.int64)
    index = (starts[:, None] + np.arange(k, dtype=np.int64)).reshape(-1)
    mask = np.repeat(~valid, k)
    index[mask] = 0
    values = pc.take(column.values, pa.array(index, mask=mask)) if len(index) else column.values.slice(0, 0)
    return pa.FixedSizeListArray.from_arrays(values, k, mask=pa.array(~valid) if not valid.all() else None)
