"""``Contract``: the compiled contract of one model version, its request and answer sides together."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from iskander.arrow.types import element_type, is_fixed_shape_tensor
from iskander.contract.bindings import InputBinding, OutputBinding, TensorOutput
from iskander.contract.inputs import Prepared, RequestReader
from iskander.contract.outputs import ResponseBuilder
from iskander.contract.transforms import RankOutput


def _fixed_width(t: pa.DataType) -> bool:
    """A (nested) tensor of plain numbers: one numpy dtype, no bit-packing, no extension storage."""
    elem = element_type(t)
    return (pa.types.is_integer(elem) or pa.types.is_floating(elem)) and not isinstance(elem, pa.ExtensionType) \
        and not pa.types.is_list(t) and not pa.types.is_struct(t) and not is_fixed_shape_tensor(t)


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
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.passthrough = tuple(passthrough)
        self.from_manifest = from_manifest
        key_names = tuple(dict.fromkeys(b.group_by for b in self.outputs if isinstance(b, RankOutput) and b.group_by))
        self._request = RequestReader(model, self.inputs, self.passthrough, key_names, kind)
        self._response = ResponseBuilder(model, self.outputs, self.passthrough)
        self.input_schema = self._request.schema
        self.output_schema = self._response.schema
        self.output_names = tuple(b.column for b in self.outputs)
        # Plain: every column is one fixed-width tensor, 1:1, no casts/structs/transforms/passthrough.
        # Such a contract can also take and give numpy tensors directly (prepare_tensors/tensors_out),
        # which spares frontends that already hold tensors (OIP) two Arrow round trips.
        self.plain = not self.passthrough and all(
            len(b.parts) == 1 and b.parts[0].field is None and b.parts[0].slot is None and not b.cast_from
            and _fixed_width(b.type) for b in self.inputs
        ) and all(isinstance(b, TensorOutput) and b.row_shape is not None and _fixed_width(b.type)
                  for b in self.outputs)

    def cast_sources(self, column: str) -> tuple[pa.DataType, ...]:
        """Arrow types a request may send for ``column`` instead of its declared type."""
        return self._request.cast_sources(column)

    # --- request path: see inputs.RequestReader and outputs.ResponseBuilder -----------------------

    def prepare(self, batch: pa.RecordBatch) -> Prepared:
        return self._request.prepare(batch)

    def prepare_tensors(self, columns: dict[str, np.ndarray], rows: int) -> Prepared:
        return self._request.prepare_tensors(columns, rows)

    def select_outputs(self, requested: Sequence[str] | None) -> tuple[OutputBinding, ...]:
        return self._response.select_outputs(requested)

    def run_tensors(self, selected: Sequence[OutputBinding]) -> list[str]:
        return self._response.run_tensors(selected)

    def assemble(
        self, prepared: Prepared, selected: Sequence[OutputBinding], results: dict[str, np.ndarray]
    ) -> pa.RecordBatch:
        return self._response.assemble(prepared, selected, results)

    def empty_output(self, prepared: Prepared, selected: Sequence[OutputBinding]) -> pa.RecordBatch:
        return self._response.empty_output(prepared, selected)

    def tensors_out(
        self, selected: Sequence[OutputBinding], results: dict[str, np.ndarray], rows: int
    ) -> dict[str, np.ndarray]:
        return self._response.tensors_out(selected, results, rows)
