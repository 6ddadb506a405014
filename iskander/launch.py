"""Start ``python -m iskander`` as a child process and wait for its ready line (tests, bench, scripts)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import attrs

READY = re.compile(r"^iskander ready flight=(?P<flight>\S+) grpc=(?P<grpc>\S+)(?: metrics=(?P<metrics>\S+))?$")


@attrs.frozen
class ServerProcess:
    flight_uri: str  # grpc://127.0.0.1:PORT
    grpc_url: str  # 127.0.0.1:PORT
    process: subprocess.Popen
    log_path: Path
    metrics_url: str | None = None  # http://127.0.0.1:PORT/metrics when metrics are on

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = 15.0) -> int | None:
        return stop_process(self.process, timeout)


def spawn_server(config: Path | None, log_path: Path, *extra: str, timeout: float = 60.0) -> ServerProcess:
    """Run the server on free ports (port 0) and return once it prints its ready line."""
    args = [sys.executable, "-m", "iskander", "--flight-port", "0", "--grpc-port", "0", *extra]
    if config is not None:
        args += ["--config", str(config)]
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=log_file, text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    lines: queue.Queue[str | None] = queue.Queue()
    stdout = proc.stdout
    if stdout is None:  # cannot happen with stdout=PIPE; a real check, not an assert (python -O)
        raise RuntimeError("the server process has no stdout pipe")

    def pump() -> None:
        for line in stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            stop_process(proc)
            raise RuntimeError(f"server did not become ready in {timeout}s:\n{log_path.read_text()}")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            stop_process(proc)
            raise RuntimeError(f"server exited before ready (code {proc.returncode}):\n{log_path.read_text()}")
        m = READY.match(line)
        if m:
            metrics = m.group("metrics")
            return ServerProcess(m.group("flight"), m.group("grpc"), proc, log_path,
                                 f"http://{metrics}/metrics" if metrics else None)


def stop_process(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGTERM, wait, then SIGKILL if it would not stop."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # the server dumps its threads' stacks to its log
            time.sleep(0.5)
            proc.kill()
            proc.wait(timeout=10)
    return proc.returncode
