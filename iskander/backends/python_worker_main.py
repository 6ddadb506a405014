"""A Python model's worker process: ``python -m iskander.backends.python_worker_main FD [NAME VERSION]``.

Started by ``python_worker.PythonBackend`` (spawned, never forked: the server has threads). It
loads the operator's model file once, then answers one request at a time on the socket FD until
the server closes it. NAME and VERSION are only there for ``ps``. Batches arrive and leave through
the shared region named in the INIT message when they fit (``worker_wire.SharedRegion``), else on
the socket. Tracebacks go to stderr (the server's log); the server only ever gets the exception's
type and message.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import signal
import socket
import sys
import threading
import time
import traceback
import types
from pathlib import Path

import pyarrow as pa

from iskander.backends.worker_wire import (
    BATCH, INIT, LENGTH, LOAD_FAILED, NOT_A_BATCH, RAISED, READY, SHM_BATCH, SharedRegion, batch_to_ipc, ipc_size,
    ipc_to_batch, recv_frame, send_frame,
)


def _die_with_parent() -> None:
    # A worker stuck in predict never reads the socket's EOF, so a thread watches for the server's
    # exit (re-parenting). Not PR_SET_PDEATHSIG: it fires when the spawning *thread* ends, and
    # restarts are spawned from short-lived threads.
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]


def _load(init: dict) -> object:
    path = Path(init["path"])
    if init.get("module"):  # a built-in model (backend = "sklearn"); path is its data file
        module = importlib.import_module(init["module"])
    else:
        spec = importlib.util.spec_from_file_location(f"iskander_model_{init['name']}", path)
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path.name}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    cls = getattr(module, "Model", None)
    if cls is None:
        raise AttributeError(f"{path.name} defines no class Model")
    model = cls()
    context = types.SimpleNamespace(
        name=init["name"], version=init["version"], model_dir=path.parent, parameters=init["parameters"],
        worker=init["worker"], path=path, inputs=init.get("inputs", []), outputs=init.get("outputs", []),
    )
    load = getattr(model, "load", None)
    if load is not None:
        load(context)
    return model


def _as_batch(result: object) -> pa.RecordBatch | None:
    if isinstance(result, pa.Table):
        return result.combine_chunks().to_batches()[0] if result.num_rows else \
            pa.RecordBatch.from_pylist([], schema=result.schema)
    return result if isinstance(result, pa.RecordBatch) else None


def main(fd: int) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the server decides when workers stop
    sock = socket.socket(fileno=fd)
    kind, payload = recv_frame(sock)
    if kind != INIT:
        return
    init = json.loads(payload)
    shm = init.get("shm")
    region = SharedRegion(shm["fd"], shm["half"]) if shm else None
    try:
        model = _load(init)
    except BaseException as exc:  # noqa: BLE001 - any failure of the user's file is a load error
        traceback.print_exc()
        send_frame(sock, LOAD_FAILED, _describe(exc).encode())
        return
    send_frame(sock, READY)
    predict = model.predict  # type: ignore[attr-defined]
    while True:
        try:
            kind, payload = recv_frame(sock)
        except (EOFError, OSError):
            return  # the server closed the socket or exited
        try:
            if kind == SHM_BATCH and region is not None:
                # The arrays point into the region's request half: valid until the next request.
                batch = region.read("request", LENGTH.unpack(payload)[0])
            elif kind == BATCH:
                batch = ipc_to_batch(payload)
            else:
                raise ValueError(f"unexpected message {kind} from the server")
            result = predict(batch)
            del batch, payload
            answer = _as_batch(result)
            if answer is None:
                send_frame(sock, NOT_A_BATCH, f"{type(result).__name__}, expected a pyarrow.RecordBatch".encode())
                continue
            size = ipc_size(answer)
            if region is not None and size <= region.half:
                region.write("reply", answer, size)
                reply_kind, reply = SHM_BATCH, LENGTH.pack(size)
            else:
                reply_kind, reply = BATCH, batch_to_ipc(answer)
            del result, answer
        except Exception as exc:  # noqa: BLE001 - fails this request only
            traceback.print_exc()
            send_frame(sock, RAISED, _describe(exc).encode())
            continue
        send_frame(sock, reply_kind, reply)


if __name__ == "__main__":
    sys.stdout = sys.stderr  # the server's stdout carries its ready line; model prints go to the log
    main(int(sys.argv[1]))
    os._exit(0)
