"""The Python backend: an operator's ``class Model`` run in ``workers`` separate processes.

Separate processes let GIL-bound model code use several cores and keep a crashing model out of the
server. Each worker is ``python -m iskander.backends.python_worker_main`` (spawned, not forked: the
server has threads) with one end of a socketpair; requests and answers travel on it as Arrow IPC
streams (``worker_wire``), never pickled. A worker serves one request at a time: ``run`` checks a
free one out of the pool, waiting when all are busy.

A worker that dies fails its request with UNAVAILABLE and is replaced in the background; one that
runs past ``worker_timeout_s`` is killed and replaced (DEADLINE_EXCEEDED). The signature is the
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
from iskander.backends.worker_wire import BATCH, INIT, LOAD_FAILED, RAISED, READY, batch_to_ipc, ipc_to_batch, recv_frame, send_frame

log = logging.getLogger("iskander.backends.python")

LOAD_TIMEOUT_S = 300.0  # import + Model.load; a model that loads longer is reported as failed
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding this iskander package


class _Worker:
    """One worker process and the server's end of its socket."""

    def __init__(self, settings: ModelSettings, index: int, extra_init: Mapping[str, object]) -> None:
        self.index = index
        self.sock, child = socket.socketpair()
        # The worker imports this same iskander, whatever the server's working directory.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))}
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "iskander.backends.python_worker_main", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno(), env=env,
                start_new_session=True,  # a Ctrl-C to the server's process group reaches the server only
            )
        finally:
            child.close()
        init = {
            "path": str(settings.path), "name": settings.name, "version": settings.version,
            "worker": index, **extra_init,
        }
        send_frame(self.sock, INIT, json.dumps(init, default=str).encode())  # TOML dates arrive as ISO text

    def wait_ready(self, deadline: float) -> str | None:
        """None once the model loaded, else why it did not."""
        try:
            kind, payload = recv_frame(self.sock, deadline)
        except TimeoutError:
            return f"load did not finish within {LOAD_TIMEOUT_S:.0f} s"
        except (EOFError, OSError):
            return f"the worker process {self.exit_status()} while loading"
        if kind == READY:
            self.sock.settimeout(None)
            return None
        return payload.decode(errors="replace") if kind == LOAD_FAILED else f"unexpected message {kind}"

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
        self._lock = threading.Lock()
        self._workers: set[_Worker] = set()  # alive, idle or busy; killed at close
        self._closed = False
        self.restarts = 0
        # What the worker's load(context) may check the model against (context.inputs / .outputs).
        self._extra_init = {
            "module": self.model_module,
            "parameters": options.parameters if isinstance(options, PythonOptions) else {},  # sklearn: none
            "inputs": [{"name": t.name, "width": _width(t.shape[1:])} for t in inputs],
            "outputs": [{"name": t.name, "element": str(t.element), "shape": list(t.shape[1:])} for t in outputs],
        }
        started = [_Worker(settings, i, self._extra_init) for i in range(options.workers)]  # load in parallel
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

    # --- requests ---------------------------------------------------------------------------------

    def run(self, output_names: Sequence[str], feeds: Mapping[str, np.ndarray], model: str) -> list[np.ndarray]:
        rows = len(next(iter(feeds.values()))) if feeds else 0
        batch = pa.RecordBatch.from_arrays(
            [self._to_arrow(feeds[t.name], t) for t in self.inputs], names=[t.name for t in self.inputs]
        )
        payload = batch_to_ipc(batch)
        worker = self._checkout(model)
        timeout = self.options.worker_timeout_s
        try:
            send_frame(worker.sock, BATCH, payload)
            kind, reply = recv_frame(worker.sock, time.monotonic() + timeout)
        except TimeoutError:
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
        self._checkin(worker)
        if kind == RAISED:
            raise InternalError(f"model '{model}' raised {reply.decode(errors='replace')}", model=model)
        if kind != BATCH:
            raise InternalError(f"model '{model}': its worker sent an unexpected message ({kind})", model=model)
        result = ipc_to_batch(reply)
        return [self._to_numpy(result, name, rows, model) for name in output_names]

    def _to_arrow(self, tensor: np.ndarray, spec: TensorSpec) -> pa.Array:
        # A contiguous numeric tensor becomes an Arrow array over the same memory (no copy); strings
        # and bools are converted (Arrow has no object arrays and packs bools into bits).
        flat = np.ascontiguousarray(tensor).reshape(-1)
        arr = pa.array(flat, type=spec.element)
        for d in reversed(spec.shape[1:]):
            arr = pa.FixedSizeListArray.from_arrays(arr, d)
        return arr

    def _to_numpy(self, batch: pa.RecordBatch, name: str, rows: int, model: str) -> np.ndarray:
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
        return values.to_numpy(zero_copy_only=False).reshape(rows, *dims)

    def _checkout(self, model: str) -> _Worker:
        # Bounded: if no worker frees up (all hung, or restarts keep failing) the request fails.
        deadline = time.monotonic() + self.options.worker_timeout_s
        while not self._closed:
            try:
                return self._idle.get(timeout=min(0.5, max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                if time.monotonic() >= deadline:
                    raise ModelNotReady(
                        f"model '{model}': no worker became free within {self.options.worker_timeout_s:g} s",
                        model=model,
                    ) from None
        raise ModelNotReady(f"model '{model}' was unloaded", model=model)

    def _checkin(self, worker: _Worker) -> None:
        with self._lock:
            closed = self._closed
        if closed:
            self._retire(worker)
        else:
            self._idle.put(worker)

    # --- restarts ---------------------------------------------------------------------------------

    def _retire(self, worker: _Worker) -> None:
        with self._lock:
            self._workers.discard(worker)
        worker.kill()

    def _replace(self, worker: _Worker, why: str) -> None:
        self._retire(worker)
        log.warning("model %s worker %d (pid %d) %s; restarting it", self.settings.name, worker.index,
                    worker.proc.pid, why)
        threading.Thread(target=self._restart, args=(worker.index,), name=f"restart-{self.settings.name}",
                         daemon=True).start()

    def _restart(self, index: int) -> None:
        delay = 0.5
        while not self._closed:
            started = time.monotonic()
            worker = _Worker(self.settings, index, self._extra_init)
            with self._lock:
                self._workers.add(worker)
            reason = worker.wait_ready(started + LOAD_TIMEOUT_S)
            if reason is None:
                with self._lock:
                    self.restarts += 1
                    closed = self._closed
                if closed:
                    self._retire(worker)
                    return
                log.info("model %s worker %d restarted (pid %d) in %.2f s", self.settings.name, index,
                         worker.proc.pid, time.monotonic() - started)
                self._idle.put(worker)
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
