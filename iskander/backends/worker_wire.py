"""The wire between the server and a Python model's worker process: framed messages on a socketpair,
batches in a shared-memory region beside it.

A frame is a 9-byte header (kind, payload length) and the payload. Batches travel as Arrow IPC
streams, never pickled; everything else is UTF-8 JSON or text. A batch is written once, as IPC,
into the sender's half of the worker's shared region (``SharedRegion``) and only its length goes on
the socket (``SHM_BATCH``); a batch larger than the half, or a worker without a region, goes on
the socket itself (``BATCH``). Imported by both sides, so it imports nothing but the standard
library and pyarrow.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
import time

import pyarrow as pa

HEADER = struct.Struct("!BQ")
LENGTH = struct.Struct("!Q")

# kinds
INIT = 1  # server -> worker: JSON {path, name, version, parameters, worker, module, inputs, outputs, shm}
READY = 2  # worker -> server: the model loaded
LOAD_FAILED = 3  # worker -> server: text, why the model could not load
BATCH = 4  # both ways: an Arrow IPC stream with one record batch, on the socket
RAISED = 5  # worker -> server: text "ValueError: ...", predict raised
SHM_BATCH = 6  # both ways: 8-byte length of the IPC stream written at the start of the sender's half
NOT_A_BATCH = 7  # worker -> server: text, what predict returned instead of a record batch

# Each direction's half of a worker's region, read when a worker starts (0: no region, every batch on
# the socket). Pages are only committed when written, so a worker's region costs the largest batch
# it has carried each way, not this size.
REGION_HALF_BYTES = 64 * 1024 * 1024


def send_frame(sock: socket.socket, kind: int, payload: bytes | memoryview | pa.Buffer = b"",
               deadline: float | None = None) -> None:
    """Header and payload in one gathering ``sendmsg`` (not concatenated: no copy). TimeoutError past
    ``deadline`` (monotonic) if the peer stops reading; without one, blocks as long as it takes."""
    views = [memoryview(HEADER.pack(kind, len(payload)))]
    if len(payload):
        views.append(memoryview(payload).cast("B"))  # type: ignore[arg-type]
    while views:
        _set_timeout(sock, deadline)
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


def _set_timeout(sock: socket.socket, deadline: float | None) -> None:
    if deadline is None:
        sock.settimeout(None)
        return
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    sock.settimeout(remaining)


def _recv_exact(sock: socket.socket, n: int, deadline: float | None) -> bytearray:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        _set_timeout(sock, deadline)
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError
        got += k
    return buf


def ipc_size(batch: pa.RecordBatch) -> int:
    """Bytes of ``batch`` as an IPC stream, counted without writing them."""
    mock = pa.MockOutputStream()
    with pa.ipc.new_stream(mock, batch.schema) as writer:
        writer.write_batch(batch)
    return mock.size()


def write_ipc(batch: pa.RecordBatch, target: pa.Buffer) -> None:
    """One copy: the batch's buffers into ``target`` (mutable, exactly ``ipc_size`` bytes)."""
    with pa.ipc.new_stream(pa.FixedSizeBufferWriter(target), batch.schema) as writer:
        writer.write_batch(batch)


def batch_to_ipc(batch: pa.RecordBatch) -> pa.Buffer:
    """One copy: the batch's buffers into one new IPC stream buffer (sized exactly, no regrowth)."""
    out = pa.allocate_buffer(ipc_size(batch))
    write_ipc(batch, out)
    return out


def ipc_to_batch(payload: bytearray | memoryview | pa.Buffer) -> pa.RecordBatch:
    """No copy: the batch's arrays point into ``payload``."""
    return pa.ipc.open_stream(pa.py_buffer(payload)).read_next_batch()


class SharedRegion:
    """A worker's shared memory: an anonymous memfd mapped by the server and by its worker, in two
    halves, one per direction (the server writes requests into ``"request"``, the worker answers in
    ``"reply"``). Each side only writes its own half, and only while the other waits for its frame,
    so the halves need no lock. Nothing is named in the filesystem: the memory is freed when the
    last process unmaps it, whichever way the worker ends."""

    def __init__(self, fd: int, half: int, owns_fd: bool = True) -> None:
        self.half = half
        self.map = mmap.mmap(fd, 2 * half)
        if owns_fd:
            os.close(fd)  # the mapping keeps the memory
        self._view = memoryview(self.map)  # writable; its slices are views

    @classmethod
    def create(cls, half: int | None = None) -> tuple[SharedRegion, int] | None:
        """A new region (halves of ``REGION_HALF_BYTES`` unless given) and the fd to hand to the
        worker (close it once handed); None where memfds are not available or the size is 0 (then
        batches go on the socket)."""
        half = REGION_HALF_BYTES if half is None else half
        if half <= 0 or not hasattr(os, "memfd_create"):
            return None
        try:
            fd = os.memfd_create("iskander-worker", os.MFD_CLOEXEC)
            os.ftruncate(fd, 2 * half)
            region = cls(os.dup(fd), half)
        except OSError:
            return None
        return region, fd

    def _offset(self, side: str) -> int:
        return 0 if side == "request" else self.half

    def write(self, side: str, batch: pa.RecordBatch, size: int) -> None:
        """``batch`` as IPC at the start of ``side`` (``size`` from ``ipc_size``, <= ``half``)."""
        start = self._offset(side)
        write_ipc(batch, pa.py_buffer(self._view[start:start + size]))  # a mutable Arrow buffer over the view

    def read(self, side: str, size: int) -> pa.RecordBatch:
        """No copy: the batch's arrays point into the region, valid until ``side`` is written again."""
        if size > self.half:
            raise ValueError(f"a batch of {size} bytes cannot be in a region half of {self.half}")
        start = self._offset(side)
        return ipc_to_batch(self._view[start:start + size])

    def close(self) -> None:
        try:
            self._view.release()
            self.map.close()
        except BufferError:
            pass  # a batch still points into it; the mapping goes when that does
