"""Open-loop and closed-loop load generation from worker processes.

Open loop (fixed offered rate): each of W worker processes owns rate/W of the load and a schedule
of intended send times (constant spacing, or Poisson: exponential gaps). A dispatcher thread waits
for each intended time and hands it to a free in-flight slot (a thread with its own client); the
latency of a request is measured from its INTENDED time, so a server that stalls is charged for
every request that should have gone out meanwhile (no coordinated omission). If no slot frees up
within `slack_ms` of the intended time, the request is a drop: concurrency stays bounded and an
overloaded system shows as drops and lower achieved rate instead of an unbounded client backlog.

Closed loop (peak throughput): W x S slots send back to back for a duration or a request count.

Workers are processes (spawn), not threads, so the client does not share one GIL with itself; each
worker records latencies in a histogram (hdr.py) and the parent merges them.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from hdr import Histogram

MAX_SCHEDULE = 5_000_000  # per worker: bounds memory and loop length whatever rate x duration says
# The dispatcher reserves a slot this long before a request's intended time and the slot thread
# sleeps the rest itself, so the thread wake-up (~100-200 us here) is not added to every latency.
HANDOFF_LEAD_S = 0.001


@dataclass(frozen=True)
class LoadSpec:
    client: str  # key of clients.CLIENTS
    endpoint: dict
    model: str
    batch: int
    mode: str = "open"  # "open" | "closed"
    rate: float = 100.0  # offered requests/s in total (open loop)
    arrival: str = "poisson"  # "poisson" | "constant"
    duration_s: float = 10.0
    workers: int = 2
    slots: int = 8  # in-flight requests per worker (open) / concurrent clients per worker (closed)
    slack_ms: float = 5.0
    warmup: int = 20  # requests per slot before the clock starts, not recorded
    max_requests: int = 0  # closed loop: stop after this many in total (0: duration only)
    seed: int = 7
    labels: dict = field(default_factory=dict)  # copied into the result (system, transport, ...)


# --- worker side ---------------------------------------------------------------------------------

class _Recorder:
    """Per-slot latency lists plus error counts; merged into one Histogram at the end."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.lags: list[float] = []
        self.errors: dict[str, int] = {}
        self.examples: dict[str, str] = {}
        self.last_done = 0.0

    def error(self, exc: BaseException) -> None:
        from clients import error_kind

        kind = error_kind(exc)
        with self.lock:
            self.errors[kind] = self.errors.get(kind, 0) + 1
            self.examples.setdefault(kind, str(exc)[:300])


def _schedule(spec: LoadSpec, index: int, t0: float) -> np.ndarray:
    per_worker = spec.rate / spec.workers
    n = min(int(per_worker * spec.duration_s * 1.5) + 10, MAX_SCHEDULE)
    if spec.arrival == "constant":
        times = (index / spec.workers) / spec.rate + np.arange(n) / per_worker  # workers interleave evenly
    else:
        rng = np.random.default_rng(spec.seed * 1000 + index)
        times = np.cumsum(rng.exponential(1.0 / per_worker, size=n))
    return t0 + times[times < spec.duration_s]


def _open_loop(spec: LoadSpec, index: int, clients: list, t0: float, rec: _Recorder) -> dict:
    free: queue.Queue[int] = queue.Queue()
    inboxes = [queue.SimpleQueue() for _ in clients]

    def slot(i: int) -> None:
        client = clients[i]
        while True:
            intended = inboxes[i].get()
            if intended is None:
                return
            delay = intended - time.monotonic()
            if delay > 0:  # handed over up to HANDOFF_LEAD_S early: only this sleep's overshoot remains
                time.sleep(delay)
            start = time.monotonic()
            try:
                client.send_one()
            except Exception as exc:  # noqa: BLE001 - counted by kind
                rec.error(exc)
            else:
                done = time.monotonic()
                rec.latencies.append((done - intended) * 1e6)
                rec.lags.append((start - intended) * 1e6)
                rec.last_done = max(rec.last_done, done)
            free.put(i)

    threads = [threading.Thread(target=slot, args=(i,), daemon=True) for i in range(len(clients))]
    for i, t in enumerate(threads):
        t.start()
        free.put(i)

    slack = spec.slack_ms / 1000.0
    sent = drops = 0
    for intended in _schedule(spec, index, t0):
        delay = intended - HANDOFF_LEAD_S - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            i = free.get(timeout=max(0.0, intended + slack - time.monotonic()))
        except queue.Empty:
            drops += 1
            continue
        inboxes[i].put(intended)
        sent += 1

    # Drain: every slot returns to `free` when its last request ends; bounded by the client timeout.
    from clients import TIMEOUT_S

    returned = 0
    deadline = time.monotonic() + TIMEOUT_S + 5
    while returned < len(clients) and time.monotonic() < deadline:
        try:
            free.get(timeout=max(0.01, deadline - time.monotonic()))
            returned += 1
        except queue.Empty:
            break
    for box in inboxes:
        box.put(None)
    unfinished = len(clients) - returned
    if unfinished:
        rec.errors["unfinished_at_end"] = rec.errors.get("unfinished_at_end", 0) + unfinished
    return {"sent": sent, "drops": drops}


def _closed_loop(spec: LoadSpec, clients: list, t0: float, rec: _Recorder, claimed, progress) -> dict:
    end = t0 + spec.duration_s
    sent = [0] * len(clients)

    def slot(i: int) -> None:
        client = clients[i]
        while time.monotonic() < end:
            if claimed is not None:  # global request budget shared by all workers
                with claimed.get_lock():
                    if claimed.value >= spec.max_requests:
                        return
                    claimed.value += 1
            start = time.monotonic()
            sent[i] += 1
            try:
                client.send_one()
            except Exception as exc:  # noqa: BLE001
                rec.error(exc)
            else:
                done = time.monotonic()
                rec.latencies.append((done - start) * 1e6)
                rec.last_done = max(rec.last_done, done)
            if progress is not None:
                with progress.get_lock():
                    progress.value += 1

    from clients import TIMEOUT_S

    threads = [threading.Thread(target=slot, args=(i,), daemon=True) for i in range(len(clients))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, end - time.monotonic()) + TIMEOUT_S + 5)
    unfinished = sum(t.is_alive() for t in threads)
    if unfinished:
        rec.errors["unfinished_at_end"] = unfinished
    return {"sent": sum(sent), "drops": 0}


def _tight_timer_slack() -> None:
    """Linux adds up to 50 us of 'timer slack' to every sleep; 1 ns makes time.sleep() land close to
    the intended send time. Threads inherit it, so call before starting slot threads."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(29, 1, 0, 0, 0)  # PR_SET_TIMERSLACK
    except (OSError, AttributeError):
        pass


def _worker(index: int, spec: LoadSpec, ready_q, start_evt, start_at, result_q, claimed, progress) -> None:
    from clients import make_client
    from workloads import Workload

    _tight_timer_slack()
    try:
        workload = Workload(spec.model, spec.batch)
        clients = [make_client(spec.client, spec.endpoint, workload) for _ in range(spec.slots)]
        for c in clients:
            c.connect()
            for _ in range(spec.warmup):
                c.send_one()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which aborts the point
        ready_q.put((index, f"{type(exc).__name__}: {exc}"))
        return
    ready_q.put((index, None))
    if not start_evt.wait(timeout=300):
        return
    t0 = start_at.value
    rec = _Recorder()
    if spec.mode == "open":
        counts = _open_loop(spec, index, clients, t0, rec)
    else:
        counts = _closed_loop(spec, clients, t0, rec, claimed, progress)
    for c in clients:
        try:
            c.close()
        except Exception:  # noqa: BLE001 - closing after a failure may fail too; the numbers are in
            pass
    hist, lag = Histogram(), Histogram()
    hist.record_many(rec.latencies)
    lag.record_many(rec.lags)
    result_q.put({
        "index": index, **counts, "ok": hist.count, "errors": rec.errors, "error_examples": rec.examples,
        "hist": hist.to_dict(), "lag": lag.to_dict(), "last_done": rec.last_done, "t0": t0,
    })


# --- parent side ---------------------------------------------------------------------------------

def run_load(spec: LoadSpec, progress=None, on_start=None, ready_timeout: float = 180.0) -> dict[str, Any]:
    """Run one load point and return its merged result. `progress` (an mp.Value('q')) counts
    completed requests in closed loop; `on_start(t0)` is called once the clock starts."""
    ctx = mp.get_context("spawn")  # fresh interpreters: no inherited gRPC state, no shared GIL
    ready_q, result_q = ctx.Queue(), ctx.Queue()
    start_evt = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    claimed = ctx.Value("q", 0) if spec.mode == "closed" and spec.max_requests > 0 else None
    procs = [
        ctx.Process(target=_worker, args=(i, spec, ready_q, start_evt, start_at, result_q, claimed, progress), daemon=True)
        for i in range(spec.workers)
    ]
    for p in procs:
        p.start()
    try:
        for _ in procs:
            index, err = ready_q.get(timeout=ready_timeout)
            if err is not None:
                raise RuntimeError(f"worker {index} could not connect/warm up: {err}")
        start_at.value = time.monotonic() + 0.05  # CLOCK_MONOTONIC is shared by all processes on Linux
        start_evt.set()
        if on_start is not None:
            on_start(start_at.value)
        from clients import TIMEOUT_S

        budget = spec.duration_s + TIMEOUT_S + 60
        parts = [result_q.get(timeout=budget) for _ in procs]
    finally:
        for p in procs:
            p.join(timeout=10)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    return _merge(spec, parts)


def _merge(spec: LoadSpec, parts: list[dict]) -> dict[str, Any]:
    hist, lag = Histogram(), Histogram()
    errors: dict[str, int] = {}
    examples: dict[str, str] = {}
    for part in parts:
        hist.merge(Histogram.from_dict(part["hist"]))
        lag.merge(Histogram.from_dict(part["lag"]))
        for k, v in part["errors"].items():
            errors[k] = errors.get(k, 0) + v
        examples.update(part["error_examples"])
    t0 = parts[0]["t0"]
    last = max(p["last_done"] for p in parts)
    elapsed = max(spec.duration_s, last - t0) if spec.max_requests == 0 else max(last - t0, 1e-9)
    sent = sum(p["sent"] for p in parts)
    spec_d = asdict(spec)
    spec_d.pop("endpoint")
    return {
        **spec.labels, "spec": spec_d,
        "offered_rps": spec.rate if spec.mode == "open" else None,
        "achieved_rps": hist.count / elapsed, "elapsed_s": elapsed,
        "scheduled_rps": (sent + sum(p["drops"] for p in parts)) / spec.duration_s if spec.mode == "open" else None,
        "sent": sent, "ok": hist.count, "drops": sum(p["drops"] for p in parts),
        "errors": errors, "error_count": sum(errors.values()), "error_examples": examples,
        "latency": hist.summary(), "dispatch_lag": lag.summary() if lag.count else None,
        "histogram": hist.to_dict(), "client_pid": os.getpid(),
    }
