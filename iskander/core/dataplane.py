"""The protocol-agnostic core both frontends call: Arrow RecordBatch in, Arrow RecordBatch out.

It imports neither grpc nor pyarrow.flight; frontends translate their wire format to Arrow and
map ``IskanderError`` codes to their status codes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Sequence

import attrs
import numpy as np
import pyarrow as pa

from iskander.arrow.types import element_type, numpy_dtype
from iskander.contract import OutputBinding, Prepared
from iskander.errors import DeadlineExceeded, InvalidInput, ResourceExhausted
from iskander.observability.observer import Call, Observer, Timings
from iskander.core.registry import ModelRegistry, ModelVersion

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
    def __init__(
        self, registry: ModelRegistry, default_max_inflight: int = 0, default_max_batch_size: int = 0,
        observer: Observer | None = None,
    ) -> None:
        self.registry = registry
        self.observer = observer or Observer()
        self.live = True
        self.default_max_inflight = default_max_inflight
        self.default_max_batch_size = default_max_batch_size
        self._inflight: dict[str, int] = {}  # model version key -> requests admitted and not finished
        self._inflight_lock = threading.Lock()

    @contextlib.contextmanager
    def _admitted(self, entry: ModelVersion, call: Call) -> Iterator[None]:
        """Hold one of the model's max_inflight places for the request; a refusal counts as a failure."""
        try:
            self._admit(entry)
        except ResourceExhausted as exc:
            self.observer.failure(entry, call, exc)
            raise
        try:
            yield
        finally:
            self._release(entry)

    def _admit(self, entry: ModelVersion) -> None:
        """Bounded queue per model: beyond max_inflight a request is refused at once, not piled up."""
        limit = entry.settings.max_inflight or self.default_max_inflight
        key = entry.settings.key
        with self._inflight_lock:
            current = self._inflight.get(key, 0)
            if limit and current >= limit:
                raise ResourceExhausted(
                    f"model '{entry.name}' already has {current} requests running or queued "
                    f"(max_inflight = {limit}); retry later",
                    model=entry.name, limit="max_inflight", expected=limit, got=current,
                )
            self._inflight[key] = current + 1

    def _release(self, entry: ModelVersion) -> None:
        with self._inflight_lock:
            self._inflight[entry.settings.key] -= 1

    def inflight(self) -> dict[str, int]:
        """Requests admitted and not finished, by model version key (for the metrics)."""
        with self._inflight_lock:
            return dict(self._inflight)

    def model(self, name: str, version: str | None = None) -> ModelVersion:
        """A ready model version (raises NOT_FOUND / UNAVAILABLE errors otherwise)."""
        return self.registry.get_ready(name, version)

    def ready(self) -> bool:
        """Ready when every configured model is loaded (Triton's ServerReady semantics)."""
        return self.live and self.registry.all_ready()

    def record_failure(self, entry: ModelVersion, call: Call, exc: BaseException) -> None:
        """Count a request that a frontend rejected before it reached ``infer`` (e.g. bad tensors)."""
        if entry.stats is not None:
            self.observer.failure(entry, call, exc)

    def infer(
        self,
        model: str,
        version: str | None,
        batch: pa.RecordBatch,
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
        call: Call | None = None,
    ) -> InferResult:
        """Run one batch. ``call.received_ns`` (perf_counter_ns when the frontend got the request)
        lets the statistics count the frontend's decoding as compute_input, as Triton does."""
        entered = time.perf_counter_ns()
        call = call or Call("internal", "infer", entered)
        entry = self.registry.get_ready(model, version)
        contract, stats = entry.contract, entry.stats
        assert contract is not None and stats is not None
        with self._admitted(entry, call):
            return self._infer_admitted(entry, batch, outputs, call, entered, deadline)

    def _infer_admitted(
        self, entry: ModelVersion, batch: pa.RecordBatch, outputs: Sequence[str] | None, call: Call,
        entered: int, deadline: float | None,
    ) -> InferResult:
        model = entry.name
        contract = entry.contract
        assert contract is not None
        try:
            if not isinstance(batch, pa.RecordBatch):
                raise InvalidInput(f"model '{model}' expects an Arrow RecordBatch", model=model)
            self._check_rows(entry, batch.num_rows)
            selected = contract.select_outputs(outputs)
            start = time.perf_counter_ns()
            prepared = contract.prepare(batch)
            if prepared.rows == 0:
                out = contract.empty_output(prepared, selected)
                self.observer.success(entry, call, None, 0)
                return InferResult(model, entry.version, out)
            results, run = self._run(entry, prepared, selected, deadline)
            out = contract.assemble(prepared, selected, results)
            done = time.perf_counter_ns()
        except Exception as exc:  # client mistakes and server faults alike count as failures
            self.observer.failure(entry, call, exc)
            raise
        self.observer.success(entry, call, run.timings(entered, start, done), prepared.rows)
        return InferResult(model, entry.version, out)

    def infer_tensors(
        self,
        entry: ModelVersion,
        columns: dict[str, np.ndarray],
        rows: int,
        outputs: Sequence[str] | None = None,
        deadline: float | None = None,
        call: Call | None = None,
    ) -> tuple[tuple[OutputBinding, ...], dict[str, np.ndarray]]:
        """The same as ``infer`` for a plain contract (``contract.plain``), with numpy tensors keyed
        by column name in and out: for frontends that already hold tensors (OIP raw contents)."""
        entered = time.perf_counter_ns()
        call = call or Call("internal", "infer", entered)
        contract, stats = entry.contract, entry.stats
        assert contract is not None and contract.plain and stats is not None
        with self._admitted(entry, call):
            return self._infer_tensors_admitted(entry, columns, rows, outputs, call, entered, deadline)

    def _infer_tensors_admitted(
        self, entry: ModelVersion, columns: dict[str, np.ndarray], rows: int, outputs: Sequence[str] | None,
        call: Call, entered: int, deadline: float | None,
    ) -> tuple[tuple[OutputBinding, ...], dict[str, np.ndarray]]:
        contract = entry.contract
        assert contract is not None
        try:
            self._check_rows(entry, rows)
            selected = contract.select_outputs(outputs)
            start = time.perf_counter_ns()
            prepared = contract.prepare_tensors(columns, rows)
            if rows == 0:
                empty = {b.column: np.empty((0, *(b.row_shape or ())), dtype=numpy_dtype(element_type(b.type)))
                         for b in selected}
                self.observer.success(entry, call, None, 0)
                return selected, empty
            results, run = self._run(entry, prepared, selected, deadline)
            out = contract.tensors_out(selected, results, rows)
            done = time.perf_counter_ns()
        except Exception as exc:
            self.observer.failure(entry, call, exc)
            raise
        self.observer.success(entry, call, run.timings(entered, start, done), rows)
        return selected, out

    # --- shared by both entry points ------------------------------------------------------------

    def max_batch_size(self, entry: ModelVersion) -> int:
        """Rows per request for this model: its own max_batch_size, else the server's default."""
        return entry.settings.max_batch_size or self.default_max_batch_size

    def _check_rows(self, entry: ModelVersion, rows: int) -> None:
        limit = self.max_batch_size(entry)
        if limit and rows > limit:
            raise InvalidInput(
                f"inference request batch-size must be <= {limit} for '{entry.name}', got {rows}",
                model=entry.name, expected=limit, got=rows,
            )

    @staticmethod
    def _run(
        entry: ModelVersion, prepared: Prepared, selected: Sequence[OutputBinding], deadline: float | None = None
    ) -> tuple[dict[str, np.ndarray], _Run]:
        """The backend, directly or through the model's dynamic batcher; an expired request is not run."""
        prepared_at = time.perf_counter_ns()
        if deadline is not None and time.monotonic() >= deadline:
            raise DeadlineExceeded(
                f"model '{entry.name}': the request's deadline passed before it ran; it was not run",
                model=entry.name,
            )
        if entry.batcher is not None:
            batch_run = entry.batcher.run(prepared.feeds, prepared.rows, deadline)
            return batch_run.results, _Run(
                prepared_at, batch_run.queue_ns, batch_run.infer_ns, batch_run.batch_rows, batch_run.first,
                time.perf_counter_ns(),
            )
        assert entry.contract is not None and entry.backend is not None
        tensors = entry.contract.run_tensors(selected)
        results = dict(zip(tensors, entry.backend.run(tensors, prepared.feeds, entry.name)))
        ran_at = time.perf_counter_ns()
        return results, _Run(prepared_at, 0, ran_at - prepared_at, prepared.rows, True, ran_at)


@attrs.frozen
class _Run:
    prepared_at: int
    queued_ns: int
    infer_ns: int
    batch_rows: int
    new_execution: bool
    ran_at: int

    def timings(self, entered: int, start: int, done: int) -> Timings:
        return Timings(entered, start, self.prepared_at, self.queued_ns, self.infer_ns, self.ran_at, done,
                       self.batch_rows, self.new_execution)
