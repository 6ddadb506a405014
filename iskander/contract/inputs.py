"""The request side of a contract: an Arrow batch (or a plain contract's tensors) -> model feeds.

It only looks up columns (cached per incoming schema), casts what the manifest allows, checks
nulls and hands numpy views to the backend; it never guesses shapes or types.
"""

from __future__ import annotations

from typing import Any

import attrs
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iskander.arrow.layouts import Converter, converter
from iskander.arrow.tensor import NullValues, first_null_row, read_filled
from iskander.arrow.types import STRING_TYPES, element_type, is_fixed_shape_tensor, row_shape, type_name
from iskander.contract.bindings import InputBinding, Part
from iskander.errors import InvalidInput


@attrs.frozen
class Prepared:
    """A validated request: ORT feeds plus the request columns returned or used beside outputs."""

    rows: int
    feeds: dict[str, np.ndarray]
    passthrough: dict[str, pa.Array]
    keys: dict[str, pa.Array]  # group_by columns for rank outputs


def types_compatible(got: pa.DataType, expected: pa.DataType) -> bool:
    """Type equality that ignores list child field names ('item' vs 'element': producers differ)."""
    if pa.types.is_fixed_size_list(expected):
        return (
            pa.types.is_fixed_size_list(got)
            and got.list_size == expected.list_size
            and types_compatible(got.value_type, expected.value_type)
        )
    if is_fixed_shape_tensor(expected):  # dim_names are labels only; a permutation changes the layout
        return (
            is_fixed_shape_tensor(got)
            and got.value_type == expected.value_type
            and list(got.shape) == list(expected.shape)
            and list(got.permutation or range(len(got.shape))) == list(expected.permutation or range(len(expected.shape)))
        )
    if pa.types.is_struct(expected):
        return (
            pa.types.is_struct(got)
            and [f.name for f in got] == [f.name for f in expected]
            and all(types_compatible(g.type, e.type) for g, e in zip(got, expected))
        )
    return got == expected


# How a column becomes the contract's type: None (it is), a declared cast_from target, or a lossless
# layout conversion (arrow/layouts.py)
_Fix = pa.DataType | Converter | None
# Where a schema's columns go: (input indices, passthrough indices, per-input fix, per-passthrough
# layout conversion: a passthrough column is answered in the contract's type too)
_Binding = tuple[tuple[int, ...], tuple[int, ...], tuple[_Fix, ...], tuple[Converter | None, ...]]


class RequestReader:
    """Reads requests for one compiled contract; immutable after construction but for its schema cache."""

    def __init__(
        self,
        model: str,
        inputs: tuple[InputBinding, ...],
        passthrough: tuple[pa.Field, ...],
        key_names: tuple[str, ...],
        kind: str,
    ) -> None:
        self.model = model
        # the backend's name for its tensors, in messages ("an ONNX input")
        self._a_kind = f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"
        self.inputs = inputs
        self.passthrough = passthrough
        self.schema = pa.schema(list(passthrough) + [b.arrow_field() for b in inputs])
        self._expected = {f.name: f.type for f in self.schema}
        self._cast_from = {b.column: b.cast_from for b in inputs}
        self._concat = {
            p.tensor: max(q.slot for b in inputs for q in b.parts if q.tensor == p.tensor) + 1
            for b in inputs for p in b.parts if p.slot is not None
        }
        self._key_names = key_names  # group_by columns of rank outputs
        # Seen schemas -> their _Binding. Clients reuse a handful of schemas; a linear scan with
        # Schema.equals (~0.2 us) beats hashing (~8 us).
        self._bindings: list[tuple[pa.Schema, _Binding]] = []

    def cast_sources(self, column: str) -> tuple[pa.DataType, ...]:
        return self._cast_from.get(column, ())

    def _bind(self, schema: pa.Schema) -> _Binding:
        for known, bound in self._bindings:
            if schema.equals(known):
                return bound
        names = schema.names
        for name in names:
            if name not in self._expected:
                raise InvalidInput(
                    f"unexpected column '{name}' for model '{self.model}'; expected columns: "
                    f"{', '.join(self._expected)}",
                    model=self.model, column=name, expected=list(self._expected),
                )
        if len(set(names)) != len(names):
            dupe = next(n for n in names if names.count(n) > 1)
            raise InvalidInput(
                f"column '{dupe}' appears more than once in the batch for model '{self.model}'",
                model=self.model, column=dupe,
            )
        indices = []
        casts: list[_Fix] = []
        for field in self.schema:
            i = schema.get_field_index(field.name)
            if i < 0:
                raise InvalidInput(
                    f"missing column '{field.name}' for model '{self.model}': expected "
                    f"{type_name(field.type)}, got columns [{', '.join(names)}]",
                    model=self.model, column=field.name, expected=type_name(field.type), got=list(names),
                )
            got = schema.field(i).type
            sources = self._cast_from.get(field.name, ())
            if types_compatible(got, field.type):
                casts.append(None)
            elif any(types_compatible(got, src) for src in sources):
                casts.append(field.type)
            elif (convert := converter(got, field.type)) is not None:
                casts.append(convert)
            else:
                accepted = [type_name(field.type), *(type_name(t) for t in sources)]
                raise InvalidInput(
                    f"column '{field.name}' of model '{self.model}' has type {type_name(got)}, "
                    f"model expects {' or '.join(accepted)}",
                    model=self.model, column=field.name, expected=type_name(field.type), got=type_name(got),
                )
            indices.append(i)
        k = len(self.passthrough)
        pass_fixes = tuple(c if callable(c) else None for c in casts[:k])
        bound = (tuple(indices[k:]), tuple(indices[:k]), tuple(casts[k:]), pass_fixes)
        if len(self._bindings) < 16:  # bounded: a client cycling schemas cannot grow memory
            self._bindings = [*self._bindings, (schema, bound)]  # copy-on-write: no lock for readers
        return bound

    def _cast(self, binding: InputBinding, column: pa.Array, target: pa.DataType) -> pa.Array:
        try:
            return pc.cast(column, target, safe=True)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise InvalidInput(
                f"column '{binding.column}' of model '{self.model}' cannot be cast from "
                f"{type_name(column.type)} to {type_name(target)}: {exc}",
                model=self.model, column=binding.column, expected=type_name(target), got=type_name(column.type),
            ) from None

    def _read(self, binding: InputBinding, part: Part, arr: pa.Array) -> np.ndarray:
        try:
            return part.read(arr)
        except pa.ArrowException as exc:  # e.g. a utf8 column holding bytes that are not UTF-8
            what = "holds bytes that are not valid UTF-8" if element_type(part.type) in STRING_TYPES[:2] \
                else f"could not be read: {exc}"
            raise InvalidInput(
                f"column '{part.label}' of model '{self.model}' {what}", model=self.model, column=part.label
            ) from None
        except NullValues:
            if binding.nulls == "fill":
                return read_filled(arr, binding.fill, unit_dim=part.unit_dim)
            row = first_null_row(arr)
            raise InvalidInput(
                f"column '{part.label}' of model '{self.model}' has a null at row {row}; "
                "the model expects non-null values",
                model=self.model, column=part.label, row=row,
            ) from None

    def _wrong_rows(self, binding: InputBinding, n: int) -> InvalidInput:
        return InvalidInput(
            f"model '{self.model}' takes exactly {binding.fixed_rows} rows per batch (column "
            f"'{binding.column}' feeds {self._a_kind} input with a fixed batch dimension), got {n}",
            model=self.model, column=binding.column, expected=binding.fixed_rows, got=n,
        )

    def prepare(self, batch: pa.RecordBatch) -> Prepared:
        input_idx, pass_idx, casts, pass_fixes = self._bind(batch.schema)
        n = batch.num_rows
        feeds: dict[str, np.ndarray] = {}
        pieces: dict[str, list[Any]] = {t: [None] * slots for t, slots in self._concat.items()} if self._concat else {}
        for binding, i, target in zip(self.inputs, input_idx, casts):
            column = batch.column(i)
            if binding.fixed_rows is not None and n != binding.fixed_rows:
                raise self._wrong_rows(binding, n)
            if isinstance(target, pa.DataType):
                column = self._cast(binding, column, target)
            elif target is not None:
                column = target(column, self.model, binding.column)
            children = None
            if binding.parts[0].field is not None:  # struct: null structs make their fields null
                children = column.flatten() if column.null_count else [column.field(j) for j in
                                                                         range(column.type.num_fields)]
            for part in binding.parts:
                arr = children[part.field] if children is not None and part.field is not None else column
                tensor = self._read(binding, part, arr)
                if part.slot is None:
                    feeds[part.tensor] = tensor
                else:
                    pieces[part.tensor][part.slot] = tensor
        for name, parts in pieces.items():
            feeds[name] = np.concatenate(parts, axis=1)  # parts are [N, w] each; one copy
        passthrough = {f.name: batch.column(i) if fix is None else fix(batch.column(i), self.model, f.name)
                       for f, i, fix in zip(self.passthrough, pass_idx, pass_fixes)}
        keys = {}
        for name in self._key_names:  # usually none
            keys[name] = passthrough[name] if name in passthrough else batch.column(batch.schema.get_field_index(name))
        return Prepared(rows=n, feeds=feeds, passthrough=passthrough, keys=keys)

    def prepare_tensors(self, columns: dict[str, np.ndarray], rows: int) -> Prepared:
        """For a plain contract: tensors [N, *row_shape] (or [N] / [N, 1] for one value per row)
        keyed by column name, already checked for dtype and shape by the caller."""
        feeds: dict[str, np.ndarray] = {}
        for binding in self.inputs:
            part = binding.parts[0]
            if binding.fixed_rows is not None and rows != binding.fixed_rows:
                raise self._wrong_rows(binding, rows)
            tensor = columns[binding.column]
            if part.unit_dim:
                tensor = tensor.reshape(rows, 1)
            elif tensor.ndim == 2 and not row_shape(binding.type):
                tensor = tensor.reshape(rows)
            feeds[part.tensor] = tensor
        return Prepared(rows=rows, feeds=feeds, passthrough={}, keys={})

