"""The schema contract: Arrow columns <-> model tensors, checked and compiled once at model load.

It is compiled against the backend's neutral signature (``backends.TensorSpec``); what a model
format calls its types stays in the backend, quoted here only in messages (``type_label``).

At request time the contract only looks up columns (cached per incoming schema), checks nulls and
hands numpy views to the backend; it never guesses shapes or types.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iskander.arrow.tensor import (
    NullValues,
    Reader,
    Writer,
    compile_reader,
    compile_writer,
    first_null_row,
    from_ndarray,
    read_filled,
)
from iskander.arrow.types import (
    STRING_TYPES,
    element_type,
    is_fixed_shape_tensor,
    nest_type,
    row_shape,
    type_name,
)
from iskander.backends.base import TensorSpec
from iskander.errors import InternalError, InvalidInput, ModelLoadError
from iskander.contract.manifest import ColumnSpec, Manifest


@attrs.frozen
class Part:
    """What one column (or one field of a struct column) contributes to one model input."""

    tensor: str
    field: int | None  # struct child index; None for the column itself
    label: str  # 'col' or 'col.field', for messages
    type: pa.DataType
    slot: int | None  # position in a concatenated tensor; None when it feeds the tensor alone
    unit_dim: bool  # read as [N, 1]
    read: Reader = attrs.field(eq=False, repr=False)  # compiled at load


@attrs.frozen
class InputBinding:
    column: str
    type: pa.DataType
    description: str
    parts: tuple[Part, ...]
    nulls: str = "reject"
    fill: Any = None
    cast_from: tuple[pa.DataType, ...] = ()
    fixed_rows: int | None = None  # a model input it feeds has a static batch dimension


@attrs.frozen
class OutputBinding:
    column: str
    type: pa.DataType
    tensor: str | None  # None for rank outputs (computed from another output)
    row_shape: tuple[int, ...] | None  # None for list<T> outputs (size known only at run time)
    squeeze_unit_dim: bool  # [N, 1] tensor -> primitive column
    description: str = ""
    transform: str | None = None
    labels: pa.Array | None = attrs.field(default=None, eq=False)
    index: int | None = None
    of: str | None = None
    group_by: str | None = None
    descending: bool = True
    write: Writer = attrs.field(default=None, eq=False, repr=False)  # tensor -> column, compiled at load

    def __attrs_post_init__(self) -> None:
        if self.write is None:
            object.__setattr__(self, "write", compile_writer(self.type))


@attrs.frozen
class Prepared:
    """A validated request: ORT feeds plus the request columns returned or used beside outputs."""

    rows: int
    feeds: dict[str, np.ndarray]
    passthrough: dict[str, pa.Array]
    keys: dict[str, pa.Array]  # group_by columns for rank outputs


def _field(binding: InputBinding | OutputBinding) -> pa.Field:
    """Schema field of a model column; manifest details travel as field metadata."""
    meta: dict[str, str] = {}
    if binding.description:
        meta["description"] = binding.description
    if isinstance(binding, InputBinding):
        if binding.cast_from:
            meta["iskander.cast_from"] = ", ".join(type_name(t) for t in binding.cast_from)
        if binding.nulls == "fill":
            meta["iskander.fill"] = json.dumps(binding.fill)
        nullable = binding.nulls == "fill"
    else:
        nullable = False
    return pa.field(binding.column, binding.type, nullable=nullable, metadata=meta or None)


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


def _fixed_width(t: pa.DataType) -> bool:
    """A (nested) tensor of plain numbers: one numpy dtype, no bit-packing, no extension storage."""
    elem = element_type(t)
    return (pa.types.is_integer(elem) or pa.types.is_floating(elem)) and not isinstance(elem, pa.ExtensionType) \
        and not pa.types.is_list(t) and not pa.types.is_struct(t) and not is_fixed_shape_tensor(t)


def _elem_matches(col_elem: pa.DataType, tensor_elem: pa.DataType | None) -> bool:
    if tensor_elem is None:
        return False
    if tensor_elem == pa.utf8():
        # a string tensor takes text (numpy str objects); binary columns would arrive as reprs
        return col_elem in (pa.utf8(), pa.large_utf8())
    return col_elem == tensor_elem


def _nested(t: pa.DataType) -> list[pa.DataType]:
    out = []
    while pa.types.is_fixed_size_list(t) or pa.types.is_list(t):
        t = t.value_type
        out.append(t)
    return out


def _dims_str(shape: Sequence[int | None]) -> str:
    return "[" + ",".join("-1" if d is None else str(d) for d in shape) + "]"


_Binding = tuple[tuple[int, ...], tuple[int, ...], tuple["pa.DataType | None", ...]]


class Contract:
    """Compiled contract of one model version; immutable after construction."""

    def __init__(
        self,
        model: str,
        inputs: Sequence[InputBinding],
        outputs: Sequence[OutputBinding],
        passthrough: Sequence[pa.Field],
        from_manifest: bool,
        kind: str = "model",
    ) -> None:
        self.model = model
        # the backend's name for its tensors, in messages ("an ONNX input")
        self._a_kind = f"{'an' if kind[:1].lower() in 'aeiou' else 'a'} {kind}"
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.passthrough = tuple(passthrough)
        self.from_manifest = from_manifest
        self.input_schema = pa.schema(list(self.passthrough) + [_field(b) for b in self.inputs])
        self.output_schema = pa.schema(list(self.passthrough) + [_field(b) for b in self.outputs])
        self.output_names = tuple(b.column for b in self.outputs)
        self._outputs_by_name = {b.column: b for b in self.outputs}
        self._expected = {f.name: f.type for f in self.input_schema}
        self._cast_from = {b.column: b.cast_from for b in self.inputs}
        self._concat = {
            p.tensor: max(q.slot for b in self.inputs for q in b.parts if q.tensor == p.tensor) + 1
            for b in self.inputs for p in b.parts if p.slot is not None
        }
        self._key_names = tuple(dict.fromkeys(b.group_by for b in self.outputs if b.group_by))
        # Plain: every column is one fixed-width tensor, 1:1, no casts/structs/transforms/passthrough.
        # Such a contract can also take and give numpy tensors directly (prepare_tensors/tensors_out),
        # which spares frontends that already hold tensors (OIP) two Arrow round trips.
        self.plain = not self.passthrough and all(
            len(b.parts) == 1 and b.parts[0].field is None and b.parts[0].slot is None and not b.cast_from
            and _fixed_width(b.type) for b in self.inputs
        ) and all(b.transform is None and b.row_shape is not None and _fixed_width(b.type) for b in self.outputs)
        self._input_names = {b.column for b in self.inputs}
        self._all_needed: list[OutputBinding] | None = None
        self._all_tensors: list[str] | None = None
        self._all_needed = self._needed(self.outputs)  # the common case, computed once
        self._all_tensors = self.run_tensors(self.outputs)
        # Seen schemas -> (input indices, passthrough indices, per-input cast target). Clients reuse
        # a handful of schemas; a linear scan with Schema.equals (~0.2 us) beats hashing (~8 us).
        self._bindings: list[tuple[pa.Schema, _Binding]] = []

    def cast_sources(self, column: str) -> tuple[pa.DataType, ...]:
        """Arrow types a request may send for ``column`` instead of its declared type."""
        return self._cast_from.get(column, ())

    # --- request path ---------------------------------------------------------------------------

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
        casts: list[pa.DataType | None] = []
        for field in self.input_schema:
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
            else:
                accepted = [type_name(field.type), *(type_name(t) for t in sources)]
                raise InvalidInput(
                    f"column '{field.name}' of model '{self.model}' has type {type_name(got)}, "
                    f"model expects {' or '.join(accepted)}",
                    model=self.model, column=field.name, expected=type_name(field.type), got=type_name(got),
                )
            indices.append(i)
        k = len(self.passthrough)
        bound = (tuple(indices[k:]), tuple(indices[:k]), tuple(casts[k:]))
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

    def prepare(self, batch: pa.RecordBatch) -> Prepared:
        input_idx, pass_idx, casts = self._bind(batch.schema)
        n = batch.num_rows
        feeds: dict[str, np.ndarray] = {}
        pieces: dict[str, list[Any]] = {t: [None] * slots for t, slots in self._concat.items()} if self._concat else {}
        for binding, i, target in zip(self.inputs, input_idx, casts):
            column = batch.column(i)
            if binding.fixed_rows is not None and n != binding.fixed_rows:
                raise InvalidInput(
                    f"model '{self.model}' takes exactly {binding.fixed_rows} rows per batch (column "
                    f"'{binding.column}' feeds {self._a_kind} input with a fixed batch dimension), got {n}",
                    model=self.model, column=binding.column, expected=binding.fixed_rows, got=n,
                )
            if target is not None:
                column = self._cast(binding, column, target)
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
        passthrough = {f.name: batch.column(i) for f, i in zip(self.passthrough, pass_idx)}
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
                raise InvalidInput(
                    f"model '{self.model}' takes exactly {binding.fixed_rows} rows per batch (column "
                    f"'{binding.column}' feeds {self._a_kind} input with a fixed batch dimension), got {rows}",
                    model=self.model, column=binding.column, expected=binding.fixed_rows, got=rows,
                )
            tensor = columns[binding.column]
            if part.unit_dim:
                tensor = tensor.reshape(rows, 1)
            elif tensor.ndim == 2 and not row_shape(binding.type):
                tensor = tensor.reshape(rows)
            feeds[part.tensor] = tensor
        return Prepared(rows=rows, feeds=feeds, passthrough={}, keys={})

    def tensors_out(
        self, selected: Sequence[OutputBinding], results: dict[str, np.ndarray], rows: int
    ) -> dict[str, np.ndarray]:
        """For a plain contract: each selected output column as a tensor [N, *row_shape]."""
        out = {}
        for binding in selected:
            assert binding.tensor is not None
            result = np.asarray(results[binding.tensor])
            if result.ndim == 0 or result.shape[0] != rows:
                raise InternalError(
                    f"model '{self.model}' output '{binding.tensor}' returned shape {list(result.shape)} "
                    f"for {rows} input rows; expected {rows} rows",
                    model=self.model, tensor=binding.tensor,
                )
            if binding.squeeze_unit_dim:
                result = result.reshape(rows)
            elif result.shape[1:] != binding.row_shape:
                raise InternalError(
                    f"model '{self.model}' output '{binding.tensor}' returned per-row shape "
                    f"{list(result.shape[1:])}, manifest declares {list(binding.row_shape or ())}",
                    model=self.model, tensor=binding.tensor,
                )
            out[binding.column] = result
        return out

    def select_outputs(self, requested: Sequence[str] | None) -> tuple[OutputBinding, ...]:
        if not requested:
            return self.outputs
        selected = []
        for name in dict.fromkeys(requested):  # a name asked for twice is answered once
            binding = self._outputs_by_name.get(name)
            if binding is None:
                if any(f.name == name for f in self.passthrough):
                    continue  # passthrough columns are always returned
                raise InvalidInput(
                    f"unexpected inference output '{name}' for model '{self.model}'; outputs: "
                    f"{', '.join(self.output_schema.names)}",
                    model=self.model, output=name, expected=list(self.output_schema.names),
                )
            selected.append(binding)
        return tuple(selected)

    def _needed(self, selected: Sequence[OutputBinding]) -> list[OutputBinding]:
        """Selected outputs plus the outputs that rank outputs are computed from."""
        if selected is self.outputs and self._all_needed is not None:
            return self._all_needed
        needed = {b.column: b for b in selected}
        for b in selected:
            if b.transform == "rank":
                assert b.of is not None
                needed.setdefault(b.of, self._outputs_by_name[b.of])
        return list(needed.values())

    def run_tensors(self, selected: Sequence[OutputBinding]) -> list[str]:
        """Model outputs to compute for these output columns (no duplicates)."""
        if selected is self.outputs and self._all_tensors is not None:
            return self._all_tensors
        return list(dict.fromkeys(b.tensor for b in self._needed(selected) if b.tensor is not None))

    def assemble(
        self, prepared: Prepared, selected: Sequence[OutputBinding], results: dict[str, np.ndarray]
    ) -> pa.RecordBatch:
        n = prepared.rows
        columns: dict[str, pa.Array] = {}
        needed = self._needed(selected)
        for binding in needed:
            if binding.transform != "rank":
                assert binding.tensor is not None
                columns[binding.column] = self._output_array(binding, results[binding.tensor], n)
        for binding in needed:
            if binding.transform == "rank":
                columns[binding.column] = self._rank(binding, columns[binding.of], prepared, n)
        arrays: list[pa.Array] = [prepared.passthrough[f.name] for f in self.passthrough]
        fields: list[pa.Field] = list(self.passthrough)
        for binding in selected:
            arrays.append(columns[binding.column])
            fields.append(_field(binding))
        schema = self.output_schema if len(selected) == len(self.outputs) else pa.schema(fields)
        return pa.RecordBatch.from_arrays(arrays, schema=schema)

    def empty_output(self, prepared: Prepared, selected: Sequence[OutputBinding]) -> pa.RecordBatch:
        """A zero-row answer of the right schema, without running the model."""
        arrays = [prepared.passthrough[f.name] for f in self.passthrough]
        arrays += [pa.array([], type=b.type) for b in selected]
        fields = list(self.passthrough) + [_field(b) for b in selected]
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))

    def _output_array(self, binding: OutputBinding, result: Any, n: int) -> pa.Array:
        result = np.asarray(result)
        if result.ndim == 0 or result.shape[0] != n:
            raise InternalError(
                f"model '{self.model}' output '{binding.tensor}' returned shape {list(result.shape)} "
                f"for {n} input rows; expected {n} rows",
                model=self.model, tensor=binding.tensor,
            )
        if binding.transform == "label":
            return self._labels(binding, result, n)
        if binding.transform == "select":
            assert binding.index is not None
            if result.ndim != 2 or result.shape[1] <= binding.index:
                raise InternalError(
                    f"model '{self.model}' output '{binding.tensor}' returned shape {list(result.shape)}; "
                    f"column '{binding.column}' selects index {binding.index}",
                    model=self.model, tensor=binding.tensor,
                )
            return from_ndarray(np.ascontiguousarray(result[:, binding.index]), binding.type)
        if binding.squeeze_unit_dim:
            result = result.reshape(n)
        elif binding.row_shape is not None and result.shape[1:] != binding.row_shape:
            raise InternalError(
                f"model '{self.model}' output '{binding.tensor}' returned per-row shape "
                f"{list(result.shape[1:])}, manifest declares {list(binding.row_shape)}",
                model=self.model, tensor=binding.tensor,
            )
        return binding.write(result)

    def _labels(self, binding: OutputBinding, result: np.ndarray, n: int) -> pa.Array:
        assert binding.labels is not None
        if result.dtype.kind == "f":  # probabilities or scores per class: the best class wins
            index = result.reshape(n, -1).argmax(axis=1)
        else:
            index = result.reshape(n).astype(np.int64)
        if n and (index.min() < 0 or index.max() >= len(binding.labels)):
            bad = int(index[(index < 0) | (index >= len(binding.labels))][0])
            raise InternalError(
                f"model '{self.model}' output '{binding.tensor}' gave class index {bad}, but column "
                f"'{binding.column}' has {len(binding.labels)} labels",
                model=self.model, tensor=binding.tensor,
            )
        return binding.labels.take(pa.array(index)).cast(binding.type)

    def _rank(self, binding: OutputBinding, scores: pa.Array, prepared: Prepared, n: int) -> pa.Array:
        """1 = best (highest unless descending = false) within each group_by value; ties keep row order."""
        values = scores.to_numpy(zero_copy_only=False).astype(np.float64)
        if binding.descending:
            values = -values
        if binding.group_by:
            keys = prepared.keys[binding.group_by]
            codes = pc.dictionary_encode(keys).indices.to_numpy(zero_copy_only=False)
            codes = np.where(keys.is_null().to_numpy(zero_copy_only=False), -1, codes)
        else:
            codes = np.zeros(n, dtype=np.int64)
        order = np.lexsort((np.arange(n), values, codes))
        sorted_codes = codes[order]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
        dtype = np.dtype(binding.type.to_pandas_dtype())
        if n > np.iinfo(dtype).max:
            raise InvalidInput(
                f"rank column '{binding.column}' of model '{self.model}' is {type_name(binding.type)} and cannot "
                f"rank {n} rows; send smaller batches or declare a wider integer type",
                model=self.model, column=binding.column,
            )
        ranks = np.empty(n, dtype=dtype)
        ranks[order] = np.arange(n) - group_start + 1
        return pa.array(ranks, type=binding.type)


# --- compilation at load time ---------------------------------------------------------------------


def _check_elem(what: str, arrow_type: pa.DataType, info: TensorSpec, kind: str) -> None:
    if not _elem_matches(element_type(arrow_type), info.element):
        raise ModelLoadError(f"{what} is {type_name(arrow_type)} but {kind} input '{info.name}' is {info.type_label}")


def _single_part(spec: ColumnSpec, label: str, arrow_type: pa.DataType, field: int | None,
                 info: TensorSpec, kind: str) -> Part:
    """A column (or struct field) that feeds a model input on its own."""
    what = f"manifest input '{label}'"
    if pa.types.is_list(arrow_type) or any(pa.types.is_list(t) for t in _nested(arrow_type)):
        raise ModelLoadError(
            f"{what} is {type_name(arrow_type)}: variable-size lists are for outputs; declare fixed_size_list<T>[k]"
        )
    if pa.types.is_struct(arrow_type):
        raise ModelLoadError(f"{what} is a struct inside a struct; map its fields to tensors one level down")
    _check_elem(what, arrow_type, info, kind)
    dims = row_shape(arrow_type)
    rank = len(info.shape)
    unit = False
    if rank == 1 + len(dims):
        for want, have in zip(dims, info.shape[1:]):
            if have is not None and have != want:
                raise ModelLoadError(
                    f"{what} has per-row shape {list(dims)} but {kind} input '{info.name}' has shape "
                    f"{_dims_str(info.shape)}"
                )
    elif not dims and rank == 2 and info.shape[1] in (1, None):
        unit = True
    else:
        raise ModelLoadError(
            f"{what} ({type_name(arrow_type)}, tensor rank {1 + len(dims)}) does not fit {kind} input "
            f"'{info.name}' of shape {_dims_str(info.shape)}"
        )
    return Part(info.name, field, label, arrow_type, None, unit, compile_reader(arrow_type, unit_dim=unit))


def _concat_parts(
    members: list[tuple[ColumnSpec, str, pa.DataType, int | None]], info: TensorSpec, kind: str
) -> list[Part]:
    """Several columns (or a struct's fields) concatenated, in manifest order, into one [N, k] input."""
    labels = ", ".join(f"'{label}'" for _, label, _, _ in members)
    if len(info.shape) != 2:
        raise ModelLoadError(
            f"columns {labels} are concatenated into {kind} input '{info.name}', which must have shape [N, k]; "
            f"it has {_dims_str(info.shape)}"
        )
    parts, width = [], 0
    for slot, (_, label, arrow_type, field) in enumerate(members):
        what = f"manifest input '{label}'"
        dims = row_shape(arrow_type)
        if len(dims) > 1 or pa.types.is_struct(arrow_type) or pa.types.is_list(arrow_type):
            raise ModelLoadError(f"{what} ({type_name(arrow_type)}) cannot be concatenated: use a primitive or "
                                 "fixed_size_list<T>[k]")
        _check_elem(what, arrow_type, info, kind)
        width += dims[0] if dims else 1
        parts.append(Part(info.name, field, label, arrow_type, slot, not dims,
                          compile_reader(arrow_type, unit_dim=not dims)))
    if info.shape[1] is not None and info.shape[1] != width:
        raise ModelLoadError(
            f"columns {labels} give {width} values per row but {kind} input '{info.name}' has shape "
            f"{_dims_str(info.shape)}"
        )
    return parts


def _compile_inputs(specs: Sequence[ColumnSpec], ins: dict[str, TensorSpec], kind: str) -> list[InputBinding]:
    # Every (column or struct field) -> tensor assignment, in manifest order.
    members: dict[str, list[tuple[ColumnSpec, str, pa.DataType, int | None]]] = {}
    for spec in specs:
        if pa.types.is_struct(spec.type) and spec.field_tensors:
            names = [f.name for f in spec.type]
            mapping = dict(spec.field_tensors)
            unknown = [f for f in mapping if f not in names]
            if unknown:
                raise ModelLoadError(
                    f"manifest input '{spec.name}' maps field '{unknown[0]}', which its struct type does not have "
                    f"(fields: {', '.join(names)})"
                )
            unmapped = [f for f in names if f not in mapping]
            if unmapped:
                raise ModelLoadError(f"manifest input '{spec.name}': struct field '{unmapped[0]}' is not in field_tensors")
            for j, f in enumerate(spec.type):
                members.setdefault(mapping[f.name], []).append((spec, f"{spec.name}.{f.name}", f.type, j))
        elif pa.types.is_struct(spec.type):
            for j, f in enumerate(spec.type):
                members.setdefault(spec.tensor, []).append((spec, f"{spec.name}.{f.name}", f.type, j))
        else:
            members.setdefault(spec.tensor, []).append((spec, spec.name, spec.type, None))
    parts_of: dict[str, list[Part]] = {s.name: [] for s in specs}
    fixed: dict[str, int | None] = {s.name: None for s in specs}
    for tensor, group in members.items():
        info = ins.get(tensor)
        if info is None:
            raise ModelLoadError(
                f"manifest input '{group[0][1]}' maps to tensor '{tensor}', but the model has no such input; "
                f"{kind} inputs: {', '.join(ins)}"
            )
        is_struct_concat = len(group) > 1 or (group[0][3] is not None and not group[0][0].field_tensors)
        parts = _concat_parts(group, info, kind) if is_struct_concat else [_single_part(*group[0][:4], info, kind)]
        for (spec, _, _, _), part in zip(group, parts):
            parts_of[spec.name].append(part)
            if info.shape and info.shape[0] is not None:
                fixed[spec.name] = info.shape[0]
    unfed = [name for name in ins if name not in members]
    if unfed:
        raise ModelLoadError(f"{kind} input '{unfed[0]}' is not fed by any manifest input column")
    bindings = []
    for spec in specs:
        for source in spec.cast_from:
            try:
                pa.array([], type=source).cast(spec.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise ModelLoadError(
                    f"manifest input '{spec.name}' declares cast_from {type_name(source)}, which Arrow cannot "
                    f"cast to {type_name(spec.type)}"
                ) from None
        if spec.nulls == "fill":
            for leaf in _leaf_types(spec.type):
                try:
                    pa.scalar(spec.fill, type=leaf)
                except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
                    raise ModelLoadError(
                        f"manifest input '{spec.name}' fill value {spec.fill!r} is not a {type_name(leaf)}"
                    ) from None
        bindings.append(InputBinding(
            column=spec.name, type=spec.type, description=spec.description, parts=tuple(parts_of[spec.name]),
            nulls=spec.nulls, fill=spec.fill, cast_from=spec.cast_from, fixed_rows=fixed[spec.name],
        ))
    return bindings


def _leaf_types(t: pa.DataType) -> list[pa.DataType]:
    """Element types a fill value must fit: one per struct field, else the column's."""
    if pa.types.is_struct(t):
        return [element_type(f.type) for f in t]
    return [element_type(t)]


def _check_output(spec: ColumnSpec, info: TensorSpec, kind: str) -> OutputBinding:
    what = f"manifest output '{spec.name}'"
    if info.not_returnable is not None:
        raise ModelLoadError(
            f"{kind} output '{info.name}' is {info.type_label}, which {info.not_returnable}, "
            "or leave it out of a manifest's [[outputs]]"
        )
    rank = len(info.shape)
    common = {"description": spec.description, "transform": spec.transform}
    if spec.transform == "label":
        if spec.type not in (pa.utf8(), pa.large_utf8()):
            raise ModelLoadError(f"{what} has transform 'label' and must be utf8 or large_utf8")
        elem = info.element
        is_index = elem is not None and pa.types.is_integer(elem) and (rank == 1 or info.shape[1:] == (1,))
        is_scores = elem is not None and pa.types.is_floating(elem) and rank == 2
        if not (is_index or is_scores):
            raise ModelLoadError(
                f"{what} (transform 'label') needs a class index [N] or class scores [N, k] from {kind} output "
                f"'{info.name}', which is {info.type_label} {_dims_str(info.shape)}"
            )
        if is_scores and info.shape[1] is not None and info.shape[1] != len(spec.labels):
            raise ModelLoadError(
                f"{what} has {len(spec.labels)} labels but {kind} output '{info.name}' scores {info.shape[1]} classes"
            )
        return OutputBinding(spec.name, spec.type, info.name, (), False, labels=pa.array(spec.labels, pa.utf8()),
                             **common)
    if spec.transform == "select":
        assert spec.index is not None
        if rank != 2 or not _elem_matches(spec.type, info.element) or pa.types.is_nested(spec.type):
            raise ModelLoadError(
                f"{what} (transform 'select', {type_name(spec.type)}) needs an [N, k] {kind} output of the same "
                f"element type; '{info.name}' is {info.type_label} {_dims_str(info.shape)}"
            )
        if info.shape[1] is not None and spec.index >= info.shape[1]:
            raise ModelLoadError(
                f"{what} selects index {spec.index} but {kind} output '{info.name}' has {info.shape[1]} columns"
            )
        return OutputBinding(spec.name, spec.type, info.name, (), False, index=spec.index, **common)
    col_elem = element_type(spec.type)
    if not _elem_matches(col_elem, info.element) or (info.element == pa.utf8() and col_elem != pa.utf8()):
        raise ModelLoadError(f"{what} is {type_name(spec.type)} but {kind} output '{info.name}' is {info.type_label}")
    if pa.types.is_list(spec.type):
        if rank < 2:
            raise ModelLoadError(f"{what} is a list but {kind} output '{info.name}' has rank {rank}")
        return OutputBinding(spec.name, spec.type, info.name, None, False, **common)
    dims = row_shape(spec.type)
    if rank == 1 + len(dims):
        for want, have in zip(dims, info.shape[1:]):
            if have is not None and have != want:
                raise ModelLoadError(
                    f"{what} has per-row shape {list(dims)} but {kind} output '{info.name}' has shape "
                    f"{_dims_str(info.shape)}"
                )
        return OutputBinding(spec.name, spec.type, info.name, dims, False, **common)
    if not dims and rank == 2 and info.shape[1] in (1, None):
        return OutputBinding(spec.name, spec.type, info.name, (), True, **common)
    raise ModelLoadError(
        f"{what} ({type_name(spec.type)}) does not fit {kind} output '{info.name}' of shape {_dims_str(info.shape)}"
    )


def _rank_output(
    spec: ColumnSpec, outputs: dict[str, OutputBinding], request_columns: dict[str, pa.DataType]
) -> OutputBinding:
    what = f"manifest output '{spec.name}'"
    if not pa.types.is_integer(spec.type):
        raise ModelLoadError(f"{what} has transform 'rank' and must be an integer type such as int32")
    source = outputs.get(spec.of or "")
    if source is None or source.transform == "rank":
        raise ModelLoadError(f"{what} ranks '{spec.of}', which is not a (non-rank) output column of this manifest")
    if not (pa.types.is_integer(source.type) or pa.types.is_floating(source.type)):
        raise ModelLoadError(f"{what} ranks '{spec.of}', which is {type_name(source.type)}, not a number per row")
    if spec.group_by is not None and spec.group_by not in request_columns:
        raise ModelLoadError(
            f"{what} groups by '{spec.group_by}', which is not a request column (inputs or passthrough)"
        )
    if spec.group_by is not None and pa.types.is_nested(request_columns[spec.group_by]):
        raise ModelLoadError(
            f"{what} groups by '{spec.group_by}', which is {type_name(request_columns[spec.group_by])}; "
            "group keys must be one value per row (ids, strings, numbers)"
        )
    return OutputBinding(spec.name, spec.type, None, (), False, spec.description, "rank", of=spec.of,
                         group_by=spec.group_by, descending=spec.descending)


def _derived_type(info: TensorSpec, role: str, kind: str) -> pa.DataType:
    elem = info.element
    if elem is None:
        hint = "Iskander cannot feed it" if role == "input" else "leave it out of a manifest's [[outputs]]"
        raise ModelLoadError(f"{kind} {role} '{info.name}' has type {info.type_label}, which has no Arrow column type; {hint}")
    if len(info.shape) == 0:
        raise ModelLoadError(f"{kind} {role} '{info.name}' is a scalar (no batch dimension); it cannot map to a column")
    rest = info.shape[1:]
    if rest == (1,):
        return elem  # one value per row
    if all(d is not None for d in rest):
        return nest_type(elem, tuple(rest))  # type: ignore[arg-type]
    if role == "output":
        return pa.list_(elem)  # per-row size known only at run time
    raise ModelLoadError(
        f"{kind} input '{info.name}' has shape {_dims_str(info.shape)} with a dynamic non-batch dimension; "
        "declare its column type in a manifest"
    )


def compile_contract(
    model: str,
    manifest: Manifest | None,
    model_inputs: Sequence[TensorSpec],
    model_outputs: Sequence[TensorSpec],
    kind: str = "model",
) -> Contract:
    """Check the manifest (or derive one column per tensor) against the model and compile it.
    ``kind`` names the model's tensors in load errors ("ONNX input 'x'")."""
    ins = {t.name: t for t in model_inputs}
    outs = {t.name: t for t in model_outputs}
    if manifest is None:
        in_specs = [ColumnSpec(t.name, _derived_type(t, "input", kind), t.name) for t in model_inputs]
        out_specs = [ColumnSpec(t.name, _derived_type(t, "output", kind), t.name) for t in model_outputs]
        pass_specs: tuple[ColumnSpec, ...] = ()
    else:
        in_specs, out_specs, pass_specs = list(manifest.inputs), list(manifest.outputs), manifest.passthrough

    inputs = _compile_inputs(in_specs, ins, kind)
    outputs: dict[str, OutputBinding] = {}
    for spec in out_specs:
        if spec.transform == "rank":
            continue
        info = outs.get(spec.tensor)
        if info is None:
            raise ModelLoadError(
                f"manifest output '{spec.name}' maps to tensor '{spec.tensor}', but the model has no such "
                f"output; {kind} outputs: {', '.join(outs)}"
            )
        outputs[spec.name] = _check_output(spec, info, kind)
    request_columns = {s.name: s.type for s in [*in_specs, *pass_specs]}
    for spec in out_specs:
        if spec.transform == "rank":
            outputs[spec.name] = _rank_output(spec, outputs, request_columns)
    ordered = [outputs[s.name] for s in out_specs]

    passthrough = [
        pa.field(s.name, s.type, nullable=True, metadata={"description": s.description} if s.description else None)
        for s in pass_specs
    ]
    return Contract(model, inputs, ordered, passthrough, from_manifest=manifest is not None, kind=kind)
