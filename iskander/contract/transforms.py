"""The manifest's output transforms as output columns: label, select and rank (docs/manifest.md).

Each is computed by the server after the model ran: label and select from one model output
tensor, rank from another output column of the same answer.
"""

from __future__ import annotations

import attrs
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iskander.arrow.tensor import from_ndarray
from iskander.arrow.types import type_name
from iskander.contract.bindings import FromTensor, OutputBinding
from iskander.errors import InternalError, InvalidInput


@attrs.frozen(kw_only=True)
class LabelOutput(FromTensor):
    """transform = "label": a class index [N] (or class scores [N, k], best wins) -> its label."""

    labels: pa.Array = attrs.field(eq=False)  # utf8, indexed by class

    def to_array(self, result: np.ndarray, n: int, model: str) -> pa.Array:
        if result.dtype.kind == "f":  # probabilities or scores per class: the best class wins
            index = result.reshape(n, -1).argmax(axis=1)
        else:
            index = result.reshape(n).astype(np.int64)
        if n and (index.min() < 0 or index.max() >= len(self.labels)):
            bad = int(index[(index < 0) | (index >= len(self.labels))][0])
            raise InternalError(
                f"model '{model}' output '{self.tensor}' gave class index {bad}, but column "
                f"'{self.column}' has {len(self.labels)} labels",
                model=model, tensor=self.tensor,
            )
        return self.labels.take(pa.array(index)).cast(self.type)


@attrs.frozen(kw_only=True)
class SelectOutput(FromTensor):
    """transform = "select": column ``index`` of an [N, k] tensor."""

    index: int

    def to_array(self, result: np.ndarray, n: int, model: str) -> pa.Array:
        if result.ndim != 2 or result.shape[1] <= self.index:
            raise InternalError(
                f"model '{model}' output '{self.tensor}' returned shape {list(result.shape)}; "
                f"column '{self.column}' selects index {self.index}",
                model=model, tensor=self.tensor,
            )
        return from_ndarray(np.ascontiguousarray(result[:, self.index]), self.type)


@attrs.frozen(kw_only=True)
class RankOutput(OutputBinding):
    """transform = "rank": the rank of output column ``of`` within each ``group_by`` value."""

    of: str
    group_by: str | None = None  # a request column (input or passthrough)
    descending: bool = True

    def rank(self, scores: pa.Array, keys: dict[str, pa.Array], n: int, model: str) -> pa.Array:
        """1 = best (highest unless descending = false) within each group_by value; ties keep row order.
        ``keys`` holds the request's group_by columns (``Prepared.keys``)."""
        values = scores.to_numpy(zero_copy_only=False).astype(np.float64)
        if self.descending:
            values = -values
        if self.group_by:
            group = keys[self.group_by]
            codes = pc.dictionary_encode(group).indices.to_numpy(zero_copy_only=False)
            codes = np.where(group.is_null().to_numpy(zero_copy_only=False), -1, codes)
        else:
            codes = np.zeros(n, dtype=np.int64)
        order = np.lexsort((np.arange(n), values, codes))
        sorted_codes = codes[order]
        starts = np.flatnonzero(np.r_[True, sorted_codes[1:] != sorted_codes[:-1]])
        group_start = np.repeat(starts, np.diff(np.r_[starts, n]))
        dtype = np.dtype(self.type.to_pandas_dtype())
        if n > np.iinfo(dtype).max:
            raise InvalidInput(
                f"rank column '{self.column}' of model '{model}' is {type_name(self.type)} and cannot "
                f"rank {n} rows; send smaller batches or declare a wider integer type",
                model=model, column=self.column,
            )
        ranks = np.empty(n, dtype=dtype)
        ranks[order] = np.arange(n) - group_start + 1
        return pa.array(ranks, type=self.type)
