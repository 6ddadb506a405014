"""The wire between the server and a Python model's worker process: framed messages on a socketpair.

A frame is a 9-byte header (kind, payload length) and the payload. Batches travel as Arrow IPC
streams, never pickled; everything else is UTF-8 JSON or text. Imported by both sides, so it
imports nothing but the standard library and pyarrow.
"""

from __future__ import annotations

import socket
import struct
import time

import pyarrow as pa

HEADER = struct.Struct("!BQ")

# kinds
INIT = 1  # server -> worker: JSON {path, name, version, model_dir, parameters, worker}
READY = 2  # worker -> server: the model loaded
LOAD_FAILED = 3  # worker -> server: text, why the model could not load
BATCH = 4  # both ways: an Arrow IPC stream with one record batch
RAISED = 5  # worker -> server: text "ValueError: ...", predict raised


def send_frame(sock: socket.socket, kind: int, payload: bytes | memoryview | pa.Buffer = b"") -> None:
    # sendmsg gathers header and payload in one system call without concatenating them (no copy).
    views = [memoryview(HEADER.pack(kind, len(payload)))]
    if len(payload):
        views.append(memoryview(payload).cast("B"))  # type: ignore[arg-type]
    while views:
        sent = sock.sendmsg(views)
        while sent:
            if sent >= len(views[0]):
                sent -= len(views.pop(0))
            else:
                views[0] = views[0][sent:]
                sent = 0


def recv_frame(sock: socket.socket, deadline: float | None = None) -> tuple[int, bytearray]:
    """The next frame; EOFError when the peer is gone, TimeoutError past ``deadline`` (monotonic)."""
    kind, length = HEADER.unpack(_recv_exact(sock, HEADER.size, deadline))
    return kind, _recv_exact(sock, length, deadline)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        if deadline is not None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError
        got += k
    return buf


def batch_to_ipc(batch: pa.RecordBatch) -> pa.Buffer:
    """One copy: the batch's buffers into one IPC stream buffer (sized exactly, no regrowth)."""
    mock = pa.MockOutputStream()
    with pa.ipc.new_stream(mock, batch.schema) as writer:
        writer.write_batch(batch)
    out = pa.allocate_buffer(mock.size())
    with pa.ipc.new_stream(pa.FixedSizeBufferWriter(out), batch.schema) as writer:
        writer.write_batch(batch)
    return out


def ipc_to_batch(payload: bytearray) -> pa.RecordBatch:
    """No copy: the batch's arrays point into ``payload``."""
    return pa.ipc.open_stream(pa.py_buffer(payload)).read_next_batch()
