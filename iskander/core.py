"""The protocol-agnostic core both frontends call: Arrow RecordBatch in, Arrow RecordBatch out.

It imports neither grpc nor pyarrow.flight; frontends translate their wire format to Arrow and
map ``IskanderError`` codes to their status codes.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import attrs
import pyarrow as pa

from .errors import InvalidInput
from .registry import ModelRegistry, ModelVersion
from .stats import Execution

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

    def record_failure(self, entry: ModelVersion, received_ns: int) -> None:
        """Count a request that a frontend rejected before it reached ``infer`` (e.g. bad tensors)."""
        if entry.stats is not None:
            entry.stats.record_failure(time.perf_counter_ns() - received_ns)

    def infer(
        self,
        model: str,
        version: str | None,
        batch: pa.RecordBatch,
        outputs: Sequence[str] | None = None,
        received_ns: int | None = None,
    ) -> InferResult:
        """Run one batch. ``received_ns`` (perf_counter_ns when the frontend got the request) lets
        the statistics count the frontend's decoding as compute_input, as Triton does."""
        entered = time.perf_counter_ns()
        received = received_ns or entered
        entry = self.registry.get_ready(model, version)
        contract, backend, stats = entry.contract, entry.backend, entry.stats
        assert contract is not None and backend is not None and stats is not None
        try:
            if not isinstance(batch, pa.RecordBatch):
                raise InvalidInput(f"model '{model}' expects an Arrow RecordBatch", model=model)
            limit = entry.settings.max_batch_size
            if limit and batch.num_rows > limit:
                raise InvalidInput(
                    f"inference request batch-size must be <= {limit} for '{model}', got {batch.num_rows}",
                    model=model, expected=limit, got=batch.num_rows,
                )
            selected = contract.select_outputs(outputs)
            start = time.perf_counter_ns()
            prepared = contract.prepare(batch)
            if prepared.rows == 0:
                out = contract.empty_output(prepared, selected)
                stats.record_success(time.perf_counter_ns() - received, None, 0)
                return InferResult(model, entry.version, out)
            prepared_at = time.perf_counter_ns()
            if entry.batcher is not None:
                run = entry.batcher.run(prepared.feeds, prepared.rows)
                results, queued_ns, infer_ns = run.results, run.queue_ns, run.infer_ns
                batch_rows, new_execution = run.batch_rows, run.first
            else:
                tensors = contract.run_tensors(selected)
                results = dict(zip(tensors, backend.run(tensors, prepared.feeds, model)))
                queued_ns, batch_rows, new_execution = 0, prepared.rows, True
                infer_ns = time.perf_counter_ns() - prepared_at
            ran_at = time.perf_counter_ns()
            out = contract.assemble(prepared, selected, results)
            done = time.perf_counter_ns()
        except Exception:  # client mistakes and server faults alike count as failures
            stats.record_failure(time.perf_counter_ns() - received)
            raise
        stats.record_success(
            done - received,
            Execution(
                queue_ns=(start - entered) + queued_ns,
                input_ns=(entered - received) + (prepared_at - start),
                infer_ns=infer_ns,
                output_ns=done - ran_at,
                rows=batch_rows,
                new_execution=new_execution,
            ),
            prepared.rows,
        )
        return InferResult(model, entry.version, out)
