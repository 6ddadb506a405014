"""The schema contract: Arrow columns <-> ONNX tensors, checked and compiled once at model load.

At request time the contract only looks up columns (cached per incoming schema), checks nulls and
hands numpy views to the backend; it never guesses shapes or types.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs
import numpy as np
import pyarrow as pa

from .arrow_tensor import NullValues, Reader, compile_reader, first_null_row, from_ndarray
from .arrow_types import ONNX_TO_ARROW, STRING_TYPES, element_type, nest_type, numpy_dtype, row_shape, type_name
from .errors import InternalError, InvalidInput, ModelLoadError
from .manifest import ColumnSpec, Manifest


@attrs.frozen
class TensorInfo:
    """A model input/output as the backend reports it. ``shape`` uses None for symbolic dims."""

    name: str
    onnx_type: str
    shape: tuple[int | None, ...]

    @property
    def elem(self) -> pa.DataType | None:
        return ONNX_TO_ARROW.get(self.onnx_type)


@attrs.frozen
class InputBinding:
    column: str
    type: pa.DataType
    tensor: str
    add_unit_dim: bool  # primitive column feeding an [N, 1] tensor
    fixed_rows: int | None  # the ONNX input has a static batch dimension
    description: str
    read: Reader = attrs.field(eq=False, repr=False)  # column -> tensor, compiled at load


@attrs.frozen
class OutputBinding:
    column: str
    type: pa.DataType
    tensor: str
    row_shape: tuple[int, ...] | None  # None for list<T> outputs (size known only at run time)
    squeeze_unit_dim: bool  # [N, 1] tensor -> primitive column
    description: str = ""


@attrs.frozen
class Prepared:
    """A validated request: ORT feeds plus the passthrough arrays to return beside the outputs."""

    rows: int
    feeds: dict[str, np.ndarray]
    passthrough: dict[str, pa.Array]


def _field(binding: InputBinding | OutputBinding) -> pa.Field:
    """Schema field of a model column; the manifest's description travels as field metadata."""
    meta = {"description": binding.description} if binding.description else None
    return pa.field(binding.column, binding.type, nullable=False, metadata=meta)


def types_compatible(got: pa.DataType, expected: pa.DataType) -> bool:
    """Type equality that ignores list child field names ('item' vs 'element': producers differ)."""
    if pa.types.is_fixed_size_list(expected):
        return (
            pa.types.is_fixed_size_list(got)
            and got.list_size == expected.list_size
            and types_compatible(got.value_type, expected.value_type)
        )
    return got == expected


def _elem_matches(col_elem: pa.DataType, tensor_elem: pa.DataType | None) -> bool:
    if tensor_elem is None:
        return False
    if tensor_elem == pa.utf8():
        return col_elem in STRING_TYPES
    return col_elem == tensor_elem


def _nested(t: pa.DataType) -> list[pa.DataType]:
    out = []
    while pa.types.is_fixed_size_list(t) or pa.types.is_list(t):
        t = t.value_type
        out.append(t)
    return out


def _numpy_dtype(t: pa.DataType) -> np.dtype:
    return numpy_dtype(element_type(t))


def _dims_str(shape: Sequence[int | None]) -> str:
    return "[" + ",".join("-1" if d is None else str(d) for d in shape) + "]"


class Contract:
    """Compiled contract of one model version; immutable after construction."""

    def __init__(
        self,
        model: str,
        inputs: Sequence[InputBinding],
        outputs: Sequence[OutputBinding],
        passthrough: Sequence[pa.Field],
        from_manifest: bool,
    ) -> None:
        self.model = model
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.passthrough = tuple(passthrough)
        self.from_manifest = from_manifest
        self.input_schema = pa.schema(list(self.passthrough) + [_field(b) for b in self.inputs])
        self.output_schema = pa.schema(list(self.passthrough) + [_field(b) for b in self.outputs])
        self.output_names = tuple(b.column for b in self.outputs)
        self._outputs_by_name = {b.column: b for b in self.outputs}
        self._expected = {f.name: f.type for f in self.input_schema}
        # Seen schemas -> column indices (inputs, passthrough). Clients reuse a handful of schemas;
        # a linear scan with Schema.equals (~0.2 us) beats hashing a Schema (~8 us) here.
        self._bindings: list[tuple[pa.Schema, tuple[tuple[int, ...], tuple[int, ...]]]] = []

    # --- request path ---------------------------------------------------------------------------

    def _bind(self, schema: pa.Schema) -> tuple[tuple[int, ...], tuple[int, ...]]:
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
        for field in self.input_schema:
            i = schema.get_field_index(field.name)
            if i < 0:
                raise InvalidInput(
                    f"missing column '{field.name}' for model '{self.model}': expected "
                    f"{type_name(field.type)}, got columns [{', '.join(names)}]",
                    model=self.model, column=field.name, expected=type_name(field.type), got=list(names),
                )
            got = schema.field(i).type
            if not types_compatible(got, field.type):
                raise InvalidInput(
                    f"column '{field.name}' of model '{self.model}' has type {type_name(got)}, "
                    f"model expects {type_name(field.type)}",
                    model=self.model, column=field.name, expected=type_name(field.type), got=type_name(got),
                )
            indices.append(i)
        k = len(self.passthrough)
        bound = (tuple(indices[k:]), tuple(indices[:k]))
        if len(self._bindings) < 16:  # bounded: a client cycling schemas cannot grow memory
            self._bindings = [*self._bindings, (schema, bound)]  # copy-on-write: no lock for readers
        return bound

    def prepare(self, batch: pa.RecordBatch) -> Prepared:
        input_idx, pass_idx = self._bind(batch.schema)
        feeds: dict[str, np.ndarray] = {}
        for binding, i in zip(self.inputs, input_idx):
            column = batch.column(i)
            if binding.fixed_rows is not None and len(column) != binding.fixed_rows:
                raise InvalidInput(
                    f"model '{self.model}' takes exactly {binding.fixed_rows} rows per batch (ONNX input "
                    f"'{binding.tensor}' has a fixed batch dimension), got {len(column)}",
                    model=self.model, column=binding.column, expected=binding.fixed_rows, got=len(column),
                )
            try:
                feeds[binding.tensor] = binding.read(column)
            except NullValues:
                row = first_null_row(column)
                raise InvalidInput(
                    f"column '{binding.column}' of model '{self.model}' has a null at row {row}; "
                    "the model expects non-null values",
                    model=self.model, column=binding.column, row=row,
                ) from None
        passthrough = {f.name: batch.column(i) for f, i in zip(self.passthrough, pass_idx)}
        return Prepared(rows=batch.num_rows, feeds=feeds, passthrough=passthrough)

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

    def assemble(
        self, prepared: Prepared, selected: Sequence[OutputBinding], results: Sequence[np.ndarray]
    ) -> pa.RecordBatch:
        n = prepared.rows
        arrays: list[pa.Array] = []
        fields: list[pa.Field] = []
        for field in self.passthrough:
            arrays.append(prepared.passthrough[field.name])
            fields.append(field)
        for binding, result in zip(selected, results):
            arrays.append(self._output_array(binding, result, n))
            fields.append(_field(binding))
        schema = self.output_schema if len(selected) == len(self.outputs) else pa.schema(fields)
        return pa.RecordBatch.from_arrays(arrays, schema=schema)

    def empty_output(self, prepared: Prepared, selected: Sequence[OutputBinding]) -> pa.RecordBatch:
        """A zero-row answer of the right schema, without running the model."""
        empty = [np.empty((0, *(b.row_shape or ())), dtype=_numpy_dtype(b.type)) for b in selected]
        return self.assemble(prepared, selected, empty)

    def _output_array(self, binding: OutputBinding, result: Any, n: int) -> pa.Array:
        result = np.asarray(result)
        if result.ndim == 0 or result.shape[0] != n:
            raise InternalError(
                f"model '{self.model}' output '{binding.tensor}' returned shape {list(result.shape)} "
                f"for {n} input rows; expected {n} rows",
                model=self.model, tensor=binding.tensor,
            )
        if binding.squeeze_unit_dim:
            result = result.reshape(n)
        elif binding.row_shape is not None and result.shape[1:] != binding.row_shape:
            raise InternalError(
                f"model '{self.model}' output '{binding.tensor}' returned per-row shape "
                f"{list(result.shape[1:])}, manifest declares {list(binding.row_shape)}",
                model=self.model, tensor=binding.tensor,
            )
        return from_ndarray(result, binding.type)


# --- compilation at load time ---------------------------------------------------------------------


def _check_input(model: str, spec: ColumnSpec, info: TensorInfo) -> InputBinding:
    if pa.types.is_list(spec.type) or any(pa.types.is_list(t) for t in _nested(spec.type)):
        raise ModelLoadError(
            f"manifest input '{spec.name}' is {type_name(spec.type)}: variable-size lists are for outputs; "
            "declare fixed_size_list<T>[k]"
        )
    col_elem = element_type(spec.type)
    if not _elem_matches(col_elem, info.elem):
        raise ModelLoadError(
            f"manifest input '{spec.name}' is {type_name(spec.type)} but ONNX input '{info.name}' is "
            f"{info.onnx_type}"
        )
    dims = row_shape(spec.type)
    rank = len(info.shape)
    add_unit = False
    if rank == 1 + len(dims):
        for want, have in zip(dims, info.shape[1:]):
            if have is not None and have != want:
                raise ModelLoadError(
                    f"manifest input '{spec.name}' has per-row shape {list(dims)} but ONNX input "
                    f"'{info.name}' has shape {_dims_str(info.shape)}"
                )
    elif not dims and rank == 2 and info.shape[1] in (1, None):
        add_unit = True
    else:
        raise ModelLoadError(
            f"manifest input '{spec.name}' ({type_name(spec.type)}, tensor rank {1 + len(dims)}) does not "
            f"fit ONNX input '{info.name}' of shape {_dims_str(info.shape)}"
        )
    return InputBinding(
        column=spec.name, type=spec.type, tensor=info.name, add_unit_dim=add_unit,
        fixed_rows=info.shape[0] if info.shape else None, description=spec.description,
        read=compile_reader(spec.type, unit_dim=add_unit),
    )


def _check_output(model: str, spec: ColumnSpec, info: TensorInfo) -> OutputBinding:
    if info.onnx_type == "tensor(bfloat16)":
        raise ModelLoadError(
            f"ONNX output '{info.name}' is tensor(bfloat16), which onnxruntime's Python API cannot return; "
            "cast it to float32 in the model, or leave it out of a manifest's [[outputs]]"
        )
    col_elem = element_type(spec.type)
    if not _elem_matches(col_elem, info.elem) or (info.elem == pa.utf8() and col_elem != pa.utf8()):
        raise ModelLoadError(
            f"manifest output '{spec.name}' is {type_name(spec.type)} but ONNX output '{info.name}' is "
            f"{info.onnx_type}"
        )
    rank = len(info.shape)
    if pa.types.is_list(spec.type):
        if rank < 2:
            raise ModelLoadError(f"manifest output '{spec.name}' is a list but ONNX output '{info.name}' has rank {rank}")
        return OutputBinding(spec.name, spec.type, info.name, None, False, spec.description)
    dims = row_shape(spec.type)
    if rank == 1 + len(dims):
        for want, have in zip(dims, info.shape[1:]):
            if have is not None and have != want:
                raise ModelLoadError(
                    f"manifest output '{spec.name}' has per-row shape {list(dims)} but ONNX output "
                    f"'{info.name}' has shape {_dims_str(info.shape)}"
                )
        return OutputBinding(spec.name, spec.type, info.name, dims, False, spec.description)
    if not dims and rank == 2 and info.shape[1] in (1, None):
        return OutputBinding(spec.name, spec.type, info.name, (), True, spec.description)
    raise ModelLoadError(
        f"manifest output '{spec.name}' ({type_name(spec.type)}) does not fit ONNX output '{info.name}' "
        f"of shape {_dims_str(info.shape)}"
    )


def _derived_type(info: TensorInfo, role: str) -> pa.DataType:
    elem = info.elem
    if elem is None:
        hint = "Iskander cannot feed it" if role == "input" else "leave it out of a manifest's [[outputs]]"
        raise ModelLoadError(f"ONNX {role} '{info.name}' has type {info.onnx_type}, which has no Arrow column type; {hint}")
    if len(info.shape) == 0:
        raise ModelLoadError(f"ONNX {role} '{info.name}' is a scalar (no batch dimension); it cannot map to a column")
    rest = info.shape[1:]
    if rest == (1,):
        return elem  # one value per row
    if all(d is not None for d in rest):
        return nest_type(elem, tuple(rest))  # type: ignore[arg-type]
    if role == "output":
        return pa.list_(elem)  # per-row size known only at run time
    raise ModelLoadError(
        f"ONNX input '{info.name}' has shape {_dims_str(info.shape)} with a dynamic non-batch dimension; "
        "declare its column type in a manifest"
    )


def compile_contract(
    model: str,
    manifest: Manifest | None,
    onnx_inputs: Sequence[TensorInfo],
    onnx_outputs: Sequence[TensorInfo],
) -> Contract:
    """Check the manifest (or derive one column per tensor) against the model and compile it."""
    ins = {t.name: t for t in onnx_inputs}
    outs = {t.name: t for t in onnx_outputs}
    if manifest is None:
        in_specs = [ColumnSpec(t.name, _derived_type(t, "input"), t.name) for t in onnx_inputs]
        out_specs = [ColumnSpec(t.name, _derived_type(t, "output"), t.name) for t in onnx_outputs]
        pass_specs: tuple[ColumnSpec, ...] = ()
    else:
        in_specs, out_specs, pass_specs = list(manifest.inputs), list(manifest.outputs), manifest.passthrough

    inputs = []
    fed: dict[str, str] = {}
    for spec in in_specs:
        info = ins.get(spec.tensor)
        if info is None:
            raise ModelLoadError(
                f"manifest input '{spec.name}' maps to tensor '{spec.tensor}', but the model has no such "
                f"input; ONNX inputs: {', '.join(ins)}"
            )
        if spec.tensor in fed:
            raise ModelLoadError(
                f"ONNX input '{spec.tensor}' is fed by two columns: '{fed[spec.tensor]}' and '{spec.name}'"
            )
        fed[spec.tensor] = spec.name
        inputs.append(_check_input(model, spec, info))
    unfed = [name for name in ins if name not in fed]
    if unfed:
        raise ModelLoadError(f"ONNX input '{unfed[0]}' is not fed by any manifest input column")

    outputs = []
    for spec in out_specs:
        info = outs.get(spec.tensor)
        if info is None:
            raise ModelLoadError(
                f"manifest output '{spec.name}' maps to tensor '{spec.tensor}', but the model has no such "
                f"output; ONNX outputs: {', '.join(outs)}"
            )
        outputs.append(_check_output(model, spec, info))

    passthrough = [
        pa.field(s.name, s.type, nullable=True, metadata={"description": s.description} if s.description else None)
        for s in pass_specs
    ]
    return Contract(model, inputs, outputs, passthrough, from_manifest=manifest is not None)
