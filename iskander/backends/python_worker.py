"""The Python backend: an operator's ``class Model`` run in ``workers`` separate processes.

Separate processes let GIL-bound model code use several cores and keep a crashing model out of the
server. Each worker is ``python -m iskander.backends.python_worker_main`` (spawned, not forked: the
server has threads) with one end of a socketpair and a shared-memory region; a batch is written
once, as Arrow IPC, into the region and only its length goes on the socket (a batch too large for
the region goes on the socket itself); never pickled (``worker_wire``). A worker serves one request
at a time: ``run`` checks a free one out of the pool, waiting when all are busy.

A worker that dies fails its request with UNAVAILABLE and is replaced in the background; one that
runs past ``worker_timeout_s`` is killed and replaced (DEADLINE_EXCEEDED). A request whose own
deadline passes first is answered DEADLINE_EXCEEDED at once; its worker finishes (its answer is
dropped) and serves again, or is replaced if it passes ``worker_timeout_s``. The signature is the
manifest's (``manifest.declared_signature``): a Python model has no graph to derive it from.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iskander.arrow.types import nest_type, type_name
from iskander.errors import DeadlineExceeded, InternalError, ModelLoadError, ModelNotReady
from iskander.config.settings import ModelSettings, PythonOptions, WorkerOptions
from iskander.backends.base import TensorSpec
from iskander.backends.worker_wire import (
    BATCH, INIT, LENGTH, LOAD_FAILED, NOT_A_BATCH, RAISED, READY, SHM_BATCH, SharedRegion, batch_to_ipc, ipc_size,
    ipc_to_batch, recv_frame, send_frame,
)

log = logging.getLogger("iskander.backends.python")

LOAD_TIMEOUT_S = 300.0  # import + Model.load; a model that loads longer is reported as failed
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding this iskander package


class _Worker:
    """One worker process, the server's end of its socket and its shared region."""

    def __init__(self, settings: ModelSettings, index: int, extra_init: Mapping[str, object]) -> None:
        self.index = index
        self.sock, child = socket.socketpair()
        created = SharedRegion.create()
        self.region, region_fd = created if created is not None else (None, None)
        fds = (child.fileno(),) if region_fd is None else (child.fileno(), region_fd)
        # The worker imports this same iskander, whatever the server's working directory.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
        try:
            self.proc = subprocess.Popen(
                # name and version only label the process for ps / top
                [sys.executable, "-m", "iskander.backends.python_worker_main", str(child.fileno()),
                 settings.name, str(settings.version)],
                pass_fds=fds, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), env=env,
                start_new_session=True,  # a Ctrl-C to the server's process group reaches the server only
            )
        except BaseException:
            self.sock.close()
            if self.region is not None:
                self.region.close()
            raise
        finally:
            child.close()
            if region_fd is not None:
                os.close(region_fd)  # the worker has its own; the memory lives while either maps it
        init = {
            "path": str(settings.path), "name": settings.name, "version": settings.version,
            "worker": index, **extra_init,
            "shm": None if self.region is None else {"fd": region_fd, "half": self.region.half},
        }
        try:
            send_frame(self.sock, INIT, json.dumps(init, default=str).encode())  # TOML dates arrive as ISO text
        except OSError:
            pass  # the process is already gone: wait_ready reports how it ended

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, deadline: float) -> str | None:
        """None once the model loaded, else why it did not."""
        try:
            kind, payload = recv_frame(self.sock, deadline)
        except TimeoutError:
            return f"load did not finish within {LOAD_TIMEOUT_S:.0f} s"
        except (EOFError, OSError):
            return f"the worker process {self.exit_status()} while loading"
        if kind == READY:
            return None
        return payload.decode(errors="replace") if kind == LOAD_FAILED else f"unexpected message {kind}"

    def send(self, batch: pa.RecordBatch, deadline: float) -> None:
        """The request: written into the region with its length on the socket, or on the socket
        when it does not fit (or there is no region)."""
        if self.region is not None:
            size = ipc_size(batch)
            if size <= self.region.half:
                self.region.write("request", batch, size)
                send_frame(self.sock, SHM_BATCH, LENGTH.pack(size), deadline)
                return
        send_frame(self.sock, BATCH, batch_to_ipc(batch), deadline)

    def receive(self, deadline: float) -> tuple[int, bytearray]:
        return recv_frame(self.sock, deadline)

    def answer(self, kind: int, payload: bytearray) -> pa.RecordBatch:
        """The batch of a BATCH or SHM_BATCH frame; from the region it is valid until this worker
        gets its next request."""
        if kind == SHM_BATCH and self.region is not None:
            return self.region.read("reply", LENGTH.unpack(payload)[0])
        return ipc_to_batch(payload)

    def exit_status(self) -> str:
        try:
            code = self.proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            return "stopped answering"
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"

    def kill(self) -> None:
        try:
            self.sock.close()
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            if self.region is not None:
                self.region.close()


class PythonBackend:
    kind = "python"
    platform = "python"  # as Triton's python backend reports itself
    backend_name = "python"
    instance_kind = "cpu"
    signature_from_manifest = True
    model_module: str | None = None  # a built-in module defining Model, instead of the operator's file

    def __init__(self, settings: ModelSettings, inputs: tuple[TensorSpec, ...], outputs: tuple[TensorSpec, ...]) -> None:
        options = settings.options
        if not isinstance(options, WorkerOptions):
            raise ModelLoadError(f"backend '{settings.backend}' needs WorkerOptions, got {type(options).__name__}")
        if not settings.path.is_file():
            raise ModelLoadError(f"model file {settings.path.name} not found")
        self.settings = settings
        self.options = options
        self.inputs = inputs
        self.outputs = outputs
        self.instance_count = options.workers
        self._in_types = {t.name: nest_type(t.element, t.shape[1:]) for t in inputs}  # type: ignore[arg-type]
        self._out_specs = {t.name: t for t in outputs}
        self._idle: queue.Queue[_Worker] = queue.Queue()
        self._lock = threading.Lock()  # guards _closed against _idle.put: nothing is put once closed
        self._workers: set[_Worker] = set()  # alive: idle, busy, draining or starting
        self._closed = False
        self.restarts = 0
        # What the worker's load(context) may check the model against (context.inputs / .outputs).
        self._extra_init = {
            "module": self.model_module,
            "parameters": options.parameters if isinstance(options, PythonOptions) else {},  # sklearn: none
            "inputs": [{"name": t.name, "width": _width(t.shape[1:])} for t in inputs],
            "outputs": [{"name": t.name, "element": str(t.element), "shape": list(t.shape[1:])} for t in outputs],
        }
        started: list[_Worker] = []
        try:
            for i in range(options.workers):  # all spawned first: they load in parallel
                started.append(_Worker(settings, i, self._extra_init))
        except OSError as exc:
            for w in started:
                w.kill()
            raise ModelLoadError(f"{self.kind} model {settings.path.name} failed to load: could not start a "
                                 f"worker process: {exc}") from None
        self._workers.update(started)
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        for worker in started:
            reason = worker.wait_ready(deadline)
            if reason is not None:
                self._closed = True
                for w in started:
                    self._retire(w)
                raise ModelLoadError(f"{self.kind} model {settings.path.name} failed to load: {reason}")
            self._idle.put(worker)

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers (for logs and diagnostics)."""
        with self._lock:
            return sorted(w.pid for w in self._workers)

    # --- requests ---------------------------------------------------------------------------------

    def run(
        self, output_names: Sequence[str], feeds: Mapping[str, np.ndarray], model: str, deadline: float | None = None
    ) -> list[np.ndarray]:
        """``deadline`` (time.monotonic()) is the request's own: past it the request fails with
        DEADLINE_EXCEEDED at once, while the worker finishes in the background."""
        rows = len(next(iter(feeds.values()))) if feeds else 0
        batch = pa.RecordBatch.from_arrays(
            [self._to_arrow(feeds[t.name], t) for t in self.inputs], names=[t.name for t in self.inputs]
        )
        worker = self._checkout(model, deadline)
        timeout = self.options.worker_timeout_s
        limit = time.monotonic() + timeout  # the worker's own: past it, it is hung
        until = limit if deadline is None else min(limit, deadline)
        sent = False
        try:
            worker.send(batch, until)
            sent = True
            kind, reply = worker.receive(until)
        except TimeoutError:
            if sent and until < limit:
                self._finish_later(worker, limit)
                raise DeadlineExceeded(
                    f"model '{model}': the request's deadline passed while its worker was running it; its answer "
                    "will be dropped", model=model,
                ) from None
            self._replace(worker, f"ran longer than worker_timeout_s ({timeout:g} s)")
            raise DeadlineExceeded(
                f"model '{model}' did not answer within its worker_timeout_s ({timeout:g} s); the worker was "
                "replaced", model=model,
            ) from None
        except (EOFError, OSError):
            status = worker.exit_status()
            self._replace(worker, status)
            raise ModelNotReady(
                f"model '{model}': its worker process {status} while running the request; it is being restarted",
                model=model,
            ) from None
        try:
            if kind == RAISED:
                raise InternalError(f"model '{model}' raised {reply.decode(errors='replace')}", model=model)
            if kind == NOT_A_BATCH:
                raise InternalError(f"model '{model}' predict returned {reply.decode(errors='replace')}", model=model)
            if kind not in (BATCH, SHM_BATCH):
                raise InternalError(f"model '{model}': its worker sent an unexpected message ({kind})", model=model)
            try:
                result = worker.answer(kind, reply)
            except (pa.ArrowException, ValueError) as exc:
                raise InternalError(f"model '{model}': its worker's answer could not be read: {exc}",
                                    model=model) from None
            # Answers in the shared region are overwritten by the worker's next request: copied out
            # (the requested columns only) before the worker is checked back in.
            copy = kind == SHM_BATCH
            return [self._to_numpy(result, name, rows, model, copy) for name in output_names]
        finally:
            result = None
            self._checkin(worker)

    def _to_arrow(self, tensor: np.ndarray, spec: TensorSpec) -> pa.Array:
        # A contiguous numeric tensor becomes an Arrow array over the same memory (no copy); strings
        # and bools are converted (Arrow has no object arrays and packs bools into bits).
        flat = np.ascontiguousarray(tensor).reshape(-1)
        arr = pa.array(flat, type=spec.element)
        for d in reversed(spec.shape[1:]):
            arr = pa.FixedSizeListArray.from_arrays(arr, d)
        return arr

    def _to_numpy(self, batch: pa.RecordBatch, name: str, rows: int, model: str, copy: bool = False) -> np.ndarray:
        spec = self._out_specs[name]
        expected = pa.list_(spec.element) if spec.shape[1:] == (None,) else nest_type(spec.element, spec.shape[1:])  # type: ignore[arg-type]

        def broken(what: str) -> InternalError:
            return InternalError(f"model '{model}' predict returned {what}", model=model, column=name)

        index = batch.schema.get_field_index(name)
        if index < 0:
            raise broken(f"no column '{name}' (expected {type_name(expected)}; got columns: "
                         f"{', '.join(batch.schema.names) or 'none'})")
        col = batch.column(index)
        if len(col) != rows:
            raise broken(f"{len(col)} rows in column '{name}' for a request of {rows} rows")
        if not _same_type(col.type, expected):
            raise broken(f"column '{name}' as {type_name(col.type)}, expected {type_name(expected)}")
        dims: list[int] = []
        values: pa.Array = col
        if pa.types.is_list(expected):
            lengths = pc.list_value_length(col)
            width = pc.min(lengths).as_py() or 0
            if rows and pc.max(lengths).as_py() != width:
                raise broken(f"column '{name}' with rows of different lengths; a tensor needs one length")
            dims = [width]
            values = col.flatten()
        else:
            for d in spec.shape[1:]:
                dims.append(d)  # type: ignore[arg-type]
                values = values.flatten()  # accounts for the column's offset
        if col.null_count or values.null_count:
            raise broken(f"nulls in column '{name}'")
        out = values.to_numpy(zero_copy_only=False).reshape(rows, *dims)
        # a numeric column comes out as a view of ``batch``'s memory; bools and strings are converted
        viewed = pa.types.is_primitive(values.type) and not pa.types.is_boolean(values.type)
        return out.copy() if copy and viewed else out

    def _checkout(self, model: str, deadline: float | None) -> _Worker:
        # Bounded: if no worker frees up (all hung, or restarts keep failing) the request fails.
        wait = self.options.worker_timeout_s
        limit = time.monotonic() + wait
        until = limit if deadline is None else min(limit, deadline)
        while not self._closed:
            try:
                return self._idle.get(timeout=min(0.5, max(0.0, until - time.monotonic())))
            except queue.Empty:
                if time.monotonic() < until:
                    continue
                if until < limit:
                    raise DeadlineExceeded(
                        f"model '{model}': the request's deadline passed while it waited for a free worker "
                        f"(all {self.options.workers} busy); it was not run", model=model,
                    ) from None
                raise ModelNotReady(
                    f"model '{model}': no worker became free within {wait:g} s (worker_timeout_s; "
                    f"{self.options.workers} workers, busy or restarting)", model=model,
                ) from None
        raise ModelNotReady(f"model '{model}' was unloaded (or reloaded) while the request waited for a worker; "
                            "it was not run", model=model)

    def _checkin(self, worker: _Worker) -> None:
        with self._lock:
            if not self._closed:
                self._idle.put(worker)  # under the lock: close() then finds it and stops it
                return
        self._retire(worker)

    def _finish_later(self, worker: _Worker, limit: float) -> None:
        """A worker whose request was given up (its deadline passed): wait for its answer in the
        background, drop it and check the worker back in; replace it if it passes ``limit``."""
        def drain() -> None:
            try:
                worker.receive(limit)
            except TimeoutError:
                self._replace(worker, f"ran longer than worker_timeout_s ({self.options.worker_timeout_s:g} s)")
                return
            except (EOFError, OSError):
                self._replace(worker, worker.exit_status())
                return
            self._checkin(worker)

        threading.Thread(target=drain, name=f"drain-{self.settings.name}", daemon=True).start()

    # --- restarts ---------------------------------------------------------------------------------

    def _retire(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.discard(worker)
        worker.kill()

    def _replace(self, worker: _Worker, why: str) -> None:
        self._retire(worker)
        if self._closed:
            log.info("model %s worker %d (pid %d) %s; the model is unloaded, not restarting it",
                     self.settings.name, worker.index, worker.pid, why)
            return
        log.warning("model %s worker %d (pid %d) %s; restarting it", self.settings.name, worker.index,
                    worker.pid, why)
        threading.Thread(target=self._restart, args=(worker.index,), name=f"restart-{self.settings.name}",
                         daemon=True).start()

    def _restart(self, index: int) -> None:
        delay = 0.5
        while not self._closed:
            started = time.monotonic()
            try:
                worker = _Worker(self.settings, index, self._extra_init)
            except OSError as exc:
                reason = f"could not start a worker process: {exc}"
            else:
                with self._lock:
                    self._workers.add(worker)
                reason = worker.wait_ready(started + LOAD_TIMEOUT_S)
                if reason is None:
                    with self._lock:
                        if not self._closed:
                            self.restarts += 1
                            self._idle.put(worker)
                            log.info("model %s worker %d restarted (pid %d) in %.2f s", self.settings.name, index,
                                     worker.pid, time.monotonic() - started)
                            return
                    self._retire(worker)
                    return
                self._retire(worker)
            log.error("model %s worker %d failed to restart: %s; retrying in %.1f s", self.settings.name, index,
                      reason, delay)
            time.sleep(delay)
            delay = min(delay * 2, 30.0)

    def close(self) -> None:
        """Stop idle workers now; busy ones stop when their request ends (``_checkin``)."""
        with self._lock:
            self._closed = True
        while True:
            try:
                worker = self._idle.get_nowait()
            except queue.Empty:
                break
            self._retire(worker)


class SklearnBackend(PythonBackend):
    """A joblib-saved scikit-learn estimator on the same workers: the Model is ``sklearn_model``."""

    kind = "sklearn"
    platform = "sklearn"
    backend_name = "sklearn"
    model_module = "iskander.backends.sklearn_model"


def _width(row_shape: tuple[int | None, ...]) -> int | None:
    """Values per row of a tensor (features it contributes); None when a dimension is not fixed."""
    width = 1
    for d in row_shape:
        if d is None:
            return None
        width *= d
    return width


def _same_type(got: pa.DataType, want: pa.DataType) -> bool:
    """Equality that ignores list child field names ('item' vs 'element': producers differ)."""
    if pa.types.is_list(want):
        return pa.types.is_list(got) and _same_type(got.value_type, want.value_type)
    if pa.types.is_fixed_size_list(want):
        return (pa.types.is_fixed_size_list(got) and got.list_size == want.list_size
                and _same_type(got.value_type, want.value_type))
    return got == want
