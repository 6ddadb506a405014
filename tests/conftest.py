"""Fixtures: test models on disk and real server processes on free loopback ports."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest

from models import build_all

READY = re.compile(r"^iskander ready flight=(?P<flight>\S+) grpc=(?P<grpc>\S+)$")
START_TIMEOUT = 60.0


@attrs.frozen
class RunningServer:
    flight_uri: str  # grpc://127.0.0.1:PORT
    grpc_url: str  # 127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(config: Path, log_path: Path, *extra: str) -> RunningServer:
    """Start `python -m iskander` on port 0 and wait (bounded) for its ready line."""
    log_file = open(log_path, "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "iskander", "--config", str(config), "--flight-port", "0", "--grpc-port", "0", *extra],
        stdout=subprocess.PIPE, stderr=log_file, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    log_file.close()
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            stop_server(proc)
            raise RuntimeError(f"server did not become ready in {START_TIMEOUT}s:\n{log_path.read_text()}")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            stop_server(proc)
            raise RuntimeError(f"server exited before ready (code {proc.returncode}):\n{log_path.read_text()}")
        m = READY.match(line)
        if m:
            return RunningServer(m.group("flight"), m.group("grpc"), proc, log_path)


def stop_server(proc: subprocess.Popen) -> int | None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_all(tmp_path_factory.mktemp("models"))


MAIN_CONFIG = """\
[[models]]
name = "two_tower"
path = "{root}/two_tower.onnx"

[[models]]
name = "tabular"
path = "{root}/tabular.onnx"

[[models]]
name = "tabular"
version = 2
path = "{root}/tabular.onnx"

[[models]]
name = "dtypes"
path = "{root}/dtypes.onnx"

[[models]]
name = "sklearn"
path = "{root}/sklearn.onnx"
"""


@pytest.fixture(scope="session")
def server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """One server with every good test model, shared by the protocol tests."""
    tmp = tmp_path_factory.mktemp("server")
    config = tmp / "config.toml"
    config.write_text(MAIN_CONFIG.format(root=models_dir))
    running = start_server(config, tmp / "server.log")
    yield running
    stop_server(running.process)


FAULTY_CONFIG = """\
[[models]]
name = "two_tower"
path = "{root}/two_tower.onnx"

[[models]]
name = "broken"
path = "{root}/broken.onnx"
"""


@pytest.fixture(scope="session")
def faulty_server(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """A server where one model fails to load while another serves."""
    tmp = tmp_path_factory.mktemp("faulty")
    config = tmp / "config.toml"
    config.write_text(FAULTY_CONFIG.format(root=models_dir))
    running = start_server(config, tmp / "server.log")
    yield running
    stop_server(running.process)
