"""The answer side of a contract: which model outputs to run, and their results -> answer columns."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from iskander.contract.bindings import FromTensor, OutputBinding, TensorOutput, check_rows
from iskander.contract.inputs import Prepared
from iskander.contract.transforms import RankOutput
from iskander.errors import InternalError, InvalidInput


class ResponseBuilder:
    """Builds answers for one compiled contract; immutable after construction."""

    def __init__(self, model: str, outputs: tuple[OutputBinding, ...], passthrough: tuple[pa.Field, ...]) -> None:
        self.model = model
        self.outputs = outputs
        self.passthrough = passthrough
        self.schema = pa.schema(list(passthrough) + [b.arrow_field() for b in outputs])
        self._by_name = {b.column: b for b in outputs}
        self._all_needed: list[OutputBinding] | None = None
        self._all_tensors: list[str] | None = None
        self._all_needed = self._needed(outputs)  # the common case, computed once
        self._all_tensors = self.run_tensors(outputs)

    def select_outputs(self, requested: Sequence[str] | None) -> tuple[OutputBinding, ...]:
        if not requested:
            return self.outputs
        selected = []
        for name in dict.fromkeys(requested):  # a name asked for twice is answered once
            binding = self._by_name.get(name)
            if binding is None:
                if any(f.name == name for f in self.passthrough):
                    continue  # passthrough columns are always returned
                raise InvalidInput(
                    f"unexpected inference output '{name}' for model '{self.model}'; outputs: "
                    f"{', '.join(self.schema.names)}",
                    model=self.model, output=name, expected=list(self.schema.names),
                )
            selected.append(binding)
        return tuple(selected)

    def _needed(self, selected: Sequence[OutputBinding]) -> list[OutputBinding]:
        """Selected outputs plus the outputs that rank outputs are computed from."""
        if selected is self.outputs and self._all_needed is not None:
            return self._all_needed
        needed = {b.column: b for b in selected}
        for b in selected:
            if isinstance(b, RankOutput):
                needed.setdefault(b.of, self._by_name[b.of])
        return list(needed.values())

    def run_tensors(self, selected: Sequence[OutputBinding]) -> list[str]:
        """Model outputs to compute for these output columns (no duplicates)."""
        if selected is self.outputs and self._all_tensors is not None:
            return self._all_tensors
        return list(dict.fromkeys(b.tensor for b in self._needed(selected) if isinstance(b, FromTensor)))

    def assemble(
        self, prepared: Prepared, selected: Sequence[OutputBinding], results: dict[str, np.ndarray]
    ) -> pa.RecordBatch:
        n = prepared.rows
        columns: dict[str, pa.Array] = {}
        needed = self._needed(selected)
        for binding in needed:
            if isinstance(binding, FromTensor):
                result = check_rows(binding, results[binding.tensor], n, self.model)
                columns[binding.column] = binding.to_array(result, n, self.model)
        for binding in needed:  # after the columns they rank
            if isinstance(binding, RankOutput):
                columns[binding.column] = binding.rank(columns[binding.of], prepared.keys, n, self.model)
        arrays: list[pa.Array] = [prepared.passthrough[f.name] for f in self.passthrough]
        fields: list[pa.Field] = list(self.passthrough)
        for binding in selected:
            arrays.append(columns[binding.column])
            fields.append(binding.arrow_field())
        schema = self.schema if len(selected) == len(self.outputs) else pa.schema(fields)
        return pa.RecordBatch.from_arrays(arrays, schema=schema)

    def empty_output(self, prepared: Prepared, selected: Sequence[OutputBinding]) -> pa.RecordBatch:
        """A zero-row answer of the right schema, without running the model."""
        arrays = [prepared.passthrough[f.name] for f in self.passthrough]
        arrays += [pa.array([], type=b.type) for b in selected]
        fields = list(self.passthrough) + [b.arrow_field() for b in selected]
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))

    def tensors_out(
        self, selected: Sequence[OutputBinding], results: dict[str, np.ndarray], rows: int
    ) -> dict[str, np.ndarray]:
        """For a plain contract: each selected output column as a tensor [N, *row_shape]."""
        out = {}
        for binding in selected:
            if not isinstance(binding, TensorOutput):  # a caller that did not check Contract.plain
                raise InternalError(
                    f"model '{self.model}' output column '{binding.column}' is computed by the server; "
                    "it has no tensor of its own to return",
                    model=self.model, column=binding.column,
                )
            result = check_rows(binding, results[binding.tensor], rows, self.model)
            out[binding.column] = binding.shaped(result, rows, self.model)
        return out
