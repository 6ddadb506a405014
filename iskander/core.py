"""The protocol-agnostic core both frontends call: Arrow RecordBatch in, Arrow RecordBatch out.

It imports neither grpc nor pyarrow.flight; frontends translate their wire format to Arrow and
map ``IskanderError`` codes to their status codes.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs
import pyarrow as pa

from .errors import InvalidInput
from .registry import ModelRegistry, ModelVersion

SERVER_NAME = "iskander"


def server_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("iskander")
    except PackageNotFoundError:
        return "0.0.0"


@attrs.frozen
class InferResult:
    model: str
    version: str
    batch: pa.RecordBatch


class InferenceCore:
    def __init__(self, registry: ModelRegistry) -> None:
        self.registry = registry
        self.live = True

    def model(self, name: str, version: str | None = None) -> ModelVersion:
        """A ready model version (raises NOT_FOUND / UNAVAILABLE errors otherwise)."""
        return self.registry.get_ready(name, version)

    def ready(self) -> bool:
        """Ready when every configured model is loaded (Triton's ServerReady semantics)."""
        return self.live and self.registry.all_ready()

    def infer(
        self,
        model: str,
        version: str | None,
        batch: pa.RecordBatch,
        outputs: Sequence[str] | None = None,
    ) -> InferResult:
        entry = self.registry.get_ready(model, version)
        contract, backend = entry.contract, entry.backend
        assert contract is not None and backend is not None
        if not isinstance(batch, pa.RecordBatch):
            raise InvalidInput(f"model '{model}' expects an Arrow RecordBatch", model=model)
        selected = contract.select_outputs(outputs)
        prepared = contract.prepare(batch)
        if prepared.rows == 0:
            return InferResult(model, entry.version, contract.empty_output(prepared, selected))
        results = backend.run([b.tensor for b in selected], prepared.feeds, model)
        return InferResult(model, entry.version, contract.assemble(prepared, selected, results))
