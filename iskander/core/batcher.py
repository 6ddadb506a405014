"""Dynamic batching: requests for one model version, from both frontends, queue together, run as
one backend call and are split back in order.

Requests are validated and converted to tensors before they queue, so a malformed request fails
alone before batching. If a merged run fails (a bad value that only the model notices), each
request of that batch is re-run on its own so only the culprit fails. Worker threads (one per
backend instance) take batches off one shared queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence

import attrs
import numpy as np

from iskander.errors import DeadlineExceeded
from iskander.backends import Backend
from iskander.config.settings import DynamicBatching

log = logging.getLogger("iskander.core.batcher")


@attrs.define
class BatchRun:
    """What a request gets back: its rows of every output tensor and the batch's timings."""

    results: dict[str, np.ndarray]
    queue_ns: int
    infer_ns: int
    batch_rows: int
    first: bool  # the first request of its execution (counts the execution once)


@attrs.define(eq=False)
class _Pending:
    feeds: dict[str, np.ndarray]
    rows: int
    enqueued: int
    done: threading.Event = attrs.Factory(threading.Event)
    outcome: BatchRun | BaseException | None = None  # set before ``done``
    taken: bool = False  # claimed by a worker (or, after close, by its own requester)
    deadline: float | None = None  # time.monotonic(); expired items are answered without running


_STOP = object()


class Batcher:
    def __init__(
        self, backend: Backend, tensors: Sequence[str], settings: DynamicBatching, model: str, workers: int = 1
    ) -> None:
        self.backend = backend
        self.tensors = list(tensors)
        self.settings = settings
        self.model = model
        self.delay_ns = settings.max_queue_delay_us * 1000
        self.preferred = frozenset(settings.preferred_batch_rows)
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._claim = threading.Lock()
        self._threads = [
            threading.Thread(target=self._loop, name=f"batcher-{model}-{i}", daemon=True) for i in range(workers)
        ]
        for t in self._threads:
            t.start()

    # --- request side -------------------------------------------------------------------------------

    def run(self, feeds: dict[str, np.ndarray], rows: int, deadline: float | None = None) -> BatchRun:
        """Queue one request's tensors and wait for its share of a batched execution. A request
        whose ``deadline`` (time.monotonic()) passes while it waits is answered without running."""
        now = time.perf_counter_ns()
        if self._closed or rows >= self.settings.max_batch_rows:
            return self._run_alone(feeds, rows, now, deadline)  # nothing to gain from waiting
        item = _Pending(feeds, rows, now, deadline=deadline)
        self._queue.put(item)
        while not item.done.wait(0.1):
            # close() raced with this put: the workers may be gone, so run it here unless one took it
            if self._closed and self._take(item):
                return self._run_alone(feeds, rows, now, deadline)
        outcome = item.outcome
        if isinstance(outcome, BatchRun):
            return outcome
        raise outcome if outcome is not None else RuntimeError("batcher signalled a request without an outcome")

    def _take(self, item: _Pending) -> bool:
        with self._claim:
            if item.taken:
                return False
            item.taken = True
            return True

    def _run_alone(
        self, feeds: dict[str, np.ndarray], rows: int, enqueued: int, deadline: float | None = None
    ) -> BatchRun:
        start = time.perf_counter_ns()
        results = self.backend.run(self.tensors, feeds, self.model, deadline)
        return BatchRun(dict(zip(self.tensors, results)), start - enqueued, time.perf_counter_ns() - start, rows, True)

    def queued(self) -> int:
        """Requests waiting for a batch (approximate, as any queue length read from outside)."""
        return self._queue.qsize()

    def close(self) -> None:
        """Stop the workers after the queued requests ran; later requests run unbatched."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(_STOP)

    # --- worker side --------------------------------------------------------------------------------

    def _next(self, timeout: float | None = None, block: bool = True) -> object:
        """The next queued item this worker may run (skipping ones their requesters took back)."""
        while True:
            item = self._queue.get(timeout=timeout) if block else self._queue.get_nowait()
            if item is _STOP or self._take(item):
                return item

    def _loop(self) -> None:
        carry = None
        while True:
            first = carry if carry is not None else self._next()
            carry = None
            if first is _STOP:
                return
            group = [first]
            rows = first.rows
            deadline = first.enqueued + self.delay_ns
            while rows < self.settings.max_batch_rows and rows not in self.preferred:
                remaining = (deadline - time.perf_counter_ns()) / 1e9
                try:
                    item = self._next(timeout=remaining) if remaining > 0 else self._next(block=False)
                except queue.Empty:
                    break
                if item is _STOP or rows + item.rows > self.settings.max_batch_rows:
                    carry = item  # starts the next batch (or stops this worker after this batch)
                    break
                group.append(item)
                rows += item.rows
            self._execute(group, rows)

    def _execute(self, group: list[_Pending], rows: int) -> None:
        now = time.monotonic()
        expired = [g for g in group if g.deadline is not None and g.deadline <= now]
        if expired:
            for item in expired:
                item.outcome = DeadlineExceeded(
                    f"model '{self.model}': the request's deadline passed while it waited in the batch queue; "
                    "it was not run",
                    model=self.model,
                )
                item.done.set()
            group = [g for g in group if g not in expired]
            if not group:
                return
            rows = sum(g.rows for g in group)
        start = time.perf_counter_ns()
        # a merged run may take as long as its most patient request allows (None: one has no deadline)
        deadline = None if any(g.deadline is None for g in group) else max(g.deadline for g in group)
        try:
            if len(group) == 1:
                results = self.backend.run(self.tensors, group[0].feeds, self.model, deadline)
            else:
                merged = {name: np.concatenate([g.feeds[name] for g in group]) for name in group[0].feeds}
                results = self.backend.run(self.tensors, merged, self.model, deadline)
        except Exception as exc:  # noqa: BLE001 - answered per request below
            if len(group) == 1:
                group[0].outcome = exc
                group[0].done.set()
                return
            log.info("batched run of %d requests for model %s failed; running them one by one", len(group), self.model)
            for item in group:
                try:
                    item.outcome = self._run_alone(item.feeds, item.rows, item.enqueued, item.deadline)
                except Exception as single:  # noqa: BLE001
                    item.outcome = single
                item.done.set()
            return
        infer_ns = time.perf_counter_ns() - start
        offset = 0
        for i, item in enumerate(group):
            share = {name: r[offset:offset + item.rows] for name, r in zip(self.tensors, results)}
            offset += item.rows
            item.outcome = BatchRun(share, start - item.enqueued, infer_ns, rows, i == 0)
            item.done.set()
