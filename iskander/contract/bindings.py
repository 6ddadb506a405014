"""What a compiled contract binds: request columns to model inputs, model outputs to answer columns.

An output column's kind is its class: ``TensorOutput`` (a model tensor as it is) and the manifest
transforms (``transforms.LabelOutput``, ``SelectOutput``, ``RankOutput``). Each holds exactly
the fields its kind needs, non-optional, so the request path dispatches on the class.
"""

from __future__ import annotations

import json
from typing import Any

import attrs
import numpy as np
import pyarrow as pa

from iskander.arrow.tensor import Reader, Writer, compile_writer
from iskander.arrow.types import type_name
from iskander.errors import InternalError


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

    def arrow_field(self) -> pa.Field:
        """Schema field of the column; manifest details travel as field metadata."""
        meta: dict[str, str] = {}
        if self.description:
            meta["description"] = self.description
        if self.cast_from:
            meta["iskander.cast_from"] = ", ".join(type_name(t) for t in self.cast_from)
        if self.nulls == "fill":
            meta["iskander.fill"] = json.dumps(self.fill)
        return pa.field(self.column, self.type, nullable=self.nulls == "fill", metadata=meta or None)


@attrs.frozen(kw_only=True)
class OutputBinding:
    """An answer column; never instantiated itself (see the module docstring for the kinds)."""

    column: str
    type: pa.DataType
    description: str = ""
    # per-row shape of the column's values as a tensor: () for one value per row; None for list<T>
    # outputs (size known only at run time)
    row_shape: tuple[int, ...] | None = ()

    def arrow_field(self) -> pa.Field:
        meta = {"description": self.description} if self.description else None
        return pa.field(self.column, self.type, nullable=False, metadata=meta)


@attrs.frozen(kw_only=True)
class FromTensor(OutputBinding):
    """An output column computed from one model output tensor."""

    tensor: str

    def to_array(self, result: np.ndarray, n: int, model: str) -> pa.Array:
        """The column for ``result``, a tensor already checked to hold ``n`` rows."""
        raise NotImplementedError


def check_rows(binding: FromTensor, result: Any, n: int, model: str) -> np.ndarray:
    """``result`` as an array of ``n`` rows; a backend that answers otherwise has a bug."""
    result = np.asarray(result)
    if result.ndim == 0 or result.shape[0] != n:
        raise InternalError(
            f"model '{model}' output '{binding.tensor}' returned shape {list(result.shape)} "
            f"for {n} input rows; expected {n} rows",
            model=model, tensor=binding.tensor,
        )
    return result


@attrs.frozen(kw_only=True)
class TensorOutput(FromTensor):
    """A model output tensor as a column, unchanged: [N, *row_shape], or [N, 1] squeezed to [N]."""

    squeeze_unit_dim: bool = False  # [N, 1] tensor -> primitive column
    write: Writer = attrs.field(init=False, eq=False, repr=False)  # tensor -> column, compiled at load

    @write.default
    def _compile_writer(self) -> Writer:
        return compile_writer(self.type)

    def shaped(self, result: np.ndarray, n: int, model: str) -> np.ndarray:
        """``result`` (``n`` rows) in the column's per-row shape, checked against the declared one."""
        if self.squeeze_unit_dim:
            return result.reshape(n)
        if self.row_shape is not None and result.shape[1:] != self.row_shape:
            raise InternalError(
                f"model '{model}' output '{self.tensor}' returned per-row shape "
                f"{list(result.shape[1:])}, manifest declares {list(self.row_shape)}",
                model=model, tensor=self.tensor,
            )
        return result

    def to_array(self, result: np.ndarray, n: int, model: str) -> pa.Array:
        return self.write(self.shaped(result, n, model))
