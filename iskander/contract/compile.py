"""Compiling a contract at model load: the manifest (or one column per tensor) checked against the
backend's neutral signature (``backends.TensorSpec``).

What a model format calls its types stays in the backend, quoted here only in messages
(``type_label``). Every mismatch is a ModelLoadError here, so the request path never meets one.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from iskander.arrow.tensor import compile_reader
from iskander.arrow.types import element_type, nest_type, row_shape, type_name
from iskander.backends.base import TensorSpec
from iskander.contract.bindings import InputBinding, OutputBinding, Part, TensorOutput
from iskander.contract.contract import Contract
from iskander.contract.manifest import ColumnSpec, LabelTransform, Manifest, RankTransform, SelectTransform
from iskander.contract.transforms import LabelOutput, RankOutput, SelectOutput
from iskander.errors import ModelLoadError


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


def _unit_dim(what: str, dims: tuple[int, ...], info: TensorSpec, role: str, kind: str) -> bool | None:
    """How a column of per-row shape ``dims`` fits the tensor ``info``: False as [N, *dims], True
    as [N, 1] (one value per row), None not at all. A static dimension that differs is an error."""
    rank = len(info.shape)
    if rank == 1 + len(dims):
        for want, have in zip(dims, info.shape[1:]):
            if have is not None and have != want:
                raise ModelLoadError(
                    f"{what} has per-row shape {list(dims)} but {kind} {role} '{info.name}' has shape "
                    f"{_dims_str(info.shape)}"
                )
        return False
    if not dims and rank == 2 and info.shape[1] in (1, None):
        return True
    return None


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
    unit = _unit_dim(what, dims, info, "input", kind)
    if unit is None:
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
    common = {"column": spec.name, "type": spec.type, "description": spec.description, "tensor": info.name}
    transform = spec.transform
    if isinstance(transform, LabelTransform):
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
        if is_scores and info.shape[1] is not None and info.shape[1] != len(transform.labels):
            raise ModelLoadError(
                f"{what} has {len(transform.labels)} labels but {kind} output '{info.name}' scores {info.shape[1]} "
                "classes"
            )
        return LabelOutput(labels=pa.array(transform.labels, pa.utf8()), **common)
    if isinstance(transform, SelectTransform):
        if rank != 2 or not _elem_matches(spec.type, info.element) or pa.types.is_nested(spec.type):
            raise ModelLoadError(
                f"{what} (transform 'select', {type_name(spec.type)}) needs an [N, k] {kind} output of the same "
                f"element type; '{info.name}' is {info.type_label} {_dims_str(info.shape)}"
            )
        if info.shape[1] is not None and transform.index >= info.shape[1]:
            raise ModelLoadError(
                f"{what} selects index {transform.index} but {kind} output '{info.name}' has {info.shape[1]} columns"
            )
        return SelectOutput(index=transform.index, **common)
    col_elem = element_type(spec.type)
    if not _elem_matches(col_elem, info.element) or (info.element == pa.utf8() and col_elem != pa.utf8()):
        raise ModelLoadError(f"{what} is {type_name(spec.type)} but {kind} output '{info.name}' is {info.type_label}")
    if pa.types.is_list(spec.type):
        if rank < 2:
            raise ModelLoadError(f"{what} is a list but {kind} output '{info.name}' has rank {rank}")
        return TensorOutput(row_shape=None, **common)
    dims = row_shape(spec.type)
    unit = _unit_dim(what, dims, info, "output", kind)
    if unit is None:
        raise ModelLoadError(
            f"{what} ({type_name(spec.type)}) does not fit {kind} output '{info.name}' of shape "
            f"{_dims_str(info.shape)}"
        )
    return TensorOutput(row_shape=dims, squeeze_unit_dim=unit, **common)


def _rank_output(
    spec: ColumnSpec, rank: RankTransform, outputs: dict[str, OutputBinding], request_columns: dict[str, pa.DataType]
) -> RankOutput:
    what = f"manifest output '{spec.name}'"
    if not pa.types.is_integer(spec.type):
        raise ModelLoadError(f"{what} has transform 'rank' and must be an integer type such as int32")
    source = outputs.get(rank.of)
    if source is None or isinstance(source, RankOutput):
        raise ModelLoadError(f"{what} ranks '{rank.of}', which is not a (non-rank) output column of this manifest")
    if not (pa.types.is_integer(source.type) or pa.types.is_floating(source.type)):
        raise ModelLoadError(f"{what} ranks '{rank.of}', which is {type_name(source.type)}, not a number per row")
    if rank.group_by is not None and rank.group_by not in request_columns:
        raise ModelLoadError(
            f"{what} groups by '{rank.group_by}', which is not a request column (inputs or passthrough)"
        )
    if rank.group_by is not None and pa.types.is_nested(request_columns[rank.group_by]):
        raise ModelLoadError(
            f"{what} groups by '{rank.group_by}', which is {type_name(request_columns[rank.group_by])}; "
            "group keys must be one value per row (ids, strings, numbers)"
        )
    return RankOutput(column=spec.name, type=spec.type, description=spec.description, of=rank.of,
                      group_by=rank.group_by, descending=rank.descending)


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
        if isinstance(spec.transform, RankTransform):
            continue  # computed from another output: compiled once those are known
        info = outs.get(spec.tensor)
        if info is None:
            raise ModelLoadError(
                f"manifest output '{spec.name}' maps to tensor '{spec.tensor}', but the model has no such "
                f"output; {kind} outputs: {', '.join(outs)}"
            )
        outputs[spec.name] = _check_output(spec, info, kind)
    request_columns = {s.name: s.type for s in [*in_specs, *pass_specs]}
    for spec in out_specs:
        if isinstance(spec.transform, RankTransform):
            outputs[spec.name] = _rank_output(spec, spec.transform, outputs, request_columns)
    ordered = [outputs[s.name] for s in out_specs]

    passthrough = [
        pa.field(s.name, s.type, nullable=True, metadata={"description": s.description} if s.description else None)
        for s in pass_specs
    ]
    return Contract(model, inputs, ordered, passthrough, from_manifest=manifest is not None, kind=kind)
