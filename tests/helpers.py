"""Small client-side helpers shared by the tests: serve a config, exchange batches over Flight, find a
server's worker processes, keep a model busy in the background."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.flight as flight

from iskander.launch import ServerProcess, spawn_server


@contextmanager
def serving(folder: Path, config_text: str) -> Iterator[ServerProcess]:
    """Write ``config_text`` to folder/config.toml, run a server on free ports, always stop it."""
    config = folder / "config.toml"
    config.write_text(config_text)
    server = spawn_server(config, folder / "server.log")
    try:
        yield server
    finally:
        server.stop()


def exchange(
    target: str | flight.FlightClient, model: str, batches: Sequence[pa.RecordBatch], version: str | None = None,
    timeout: float | None = None,
) -> list[pa.RecordBatch]:
    """Send batches on one DoExchange stream; one answer per batch, in order. ``timeout`` (s) is the
    client's deadline for the whole stream (FlightTimedOutError past it)."""
    client = flight.connect(target) if isinstance(target, str) else target
    path = (model,) if version is None else (model, version)
    options = flight.FlightCallOptions(timeout=timeout) if timeout else None
    try:
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_path(*path), options=options)
        with writer:
            writer.begin(batches[0].schema)
            answers = []
            for batch in batches:
                writer.write_batch(batch)
                answers.append(reader.read_chunk().data)
            writer.done_writing()
        return answers
    finally:
        if isinstance(target, str):
            client.close()


def worker_pids(server_pid: int, model: str | None = None) -> list[int]:
    """Python-backend worker processes of the server (children of its process, from /proc), of one
    model if given: a worker's command line is ``python -m iskander.backends.python_worker_main FD
    NAME VERSION``. Zombies (exited, not yet reaped) are left out."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # exited meanwhile
        state, ppid = stat.rpartition(")")[2].split()[:2]  # the name in parentheses may hold spaces
        if int(ppid) != server_pid or state == "Z" or b"iskander.backends.python_worker_main" not in argv:
            continue
        args = [a.decode() for a in argv if a]
        if model is None or args[-2] == model:
            found.append(int(entry.name))
    return sorted(found)


def wait_for_pids(server_pid: int, model: str, count: int, timeout: float = 30.0) -> list[int]:
    """The model's worker pids once there are ``count`` of them (bounded)."""
    deadline = time.monotonic() + timeout
    while True:
        pids = worker_pids(server_pid, model)
        if len(pids) == count or time.monotonic() > deadline:
            assert len(pids) == count, f"model {model}: worker pids {pids}, expected {count}"
            return pids
        time.sleep(0.1)


def gone(pids: Sequence[int], timeout: float = 15.0) -> bool:
    """Whether every one of ``pids`` has exited (or is a zombie) within ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


class Hammer:
    """Background threads sending requests to a model until stopped; every outcome recorded.

    ``call`` sends one request and raises on failure; ok and errors are counted per thread-safe
    list. Used to show that other models keep answering while one model's workers fail."""

    def __init__(self, call, threads: int = 1, pause: float = 0.02) -> None:  # type: ignore[no-untyped-def]
        self.call = call
        self.pause = pause
        self.ok: list[float] = []  # monotonic time of each success
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(threads)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.call()
                self.ok.append(time.monotonic())
            except Exception as exc:  # noqa: BLE001 - recorded, asserted on by the test
                self.errors.append(exc)
            self._stop.wait(self.pause)

    def __enter__(self) -> "Hammer":
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)
        assert not any(t.is_alive() for t in self._threads), "a hammer thread did not stop"
