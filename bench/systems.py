"""Systems under test, each started and stopped by the harness, all on 127.0.0.1 with the same
model files and onnxruntime settings (workloads.ORT_SETTINGS).

    iskander     python -m iskander with a bench config (Flight new stream, Flight kept open, OIP)
    minimal      bench/minimal_flight.py + bench/minimal_oip.py: the least a Python server can do
    mlserver     Seldon MLServer 1.7.1 + bench/mlserver_runtime.py, in its own venv (bench/.venv-mlserver)
    onnxruntime  no server: session.run inside the load generator's workers (the floor)

Every server is a child process; stop() sends SIGTERM, then SIGKILL after a timeout.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from iskander.launch import spawn_server, stop_process
from workloads import MODELS, write_iskander_config

BENCH_DIR = Path(__file__).resolve().parent
MLSERVER_VENV = BENCH_DIR / ".venv-mlserver"
MLSERVER_REQUIREMENTS = BENCH_DIR / "requirements-mlserver.txt"


def rss_kb(pid: int) -> int | None:
    """Resident set size from /proc (Linux); None once the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class System:
    label = "?"
    transports: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.endpoint: dict = {}
        self.procs: list[subprocess.Popen] = []

    @property
    def pid(self) -> int | None:
        """The process whose memory is the system's (first server process)."""
        return self.procs[0].pid if self.procs else None

    def start(self, workdir: Path, models: list[str]) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        for p in self.procs:
            stop_process(p, timeout=15)
        self.procs = []

    def describe(self) -> dict:
        return {"label": self.label, "transports": list(self.transports), "pids": [p.pid for p in self.procs]}


class Iskander(System):
    label = "iskander"
    transports = ("flight_kept", "flight_new", "oip")

    def __init__(self, dynamic_batching: dict | None = None, instances: int = 1) -> None:
        self.instances = instances
        super().__init__()
        self.dynamic_batching = dynamic_batching

    def start(self, workdir: Path, models: list[str]) -> None:
        config = write_iskander_config(workdir / "iskander", models, self.dynamic_batching, self.instances)
        server = spawn_server(config, workdir / ("iskander-dynbatch.log" if self.dynamic_batching else "iskander.log"))
        self.procs = [server.process]
        self.endpoint = {"flight_uri": server.flight_uri, "grpc_url": server.grpc_url}

    def describe(self) -> dict:
        return {**super().describe(), "dynamic_batching": self.dynamic_batching, "instances": self.instances}


class Minimal(System):
    """Two processes: the bare Flight server and the bare grpcio OIP server (never one process:
    the OIP one imports iskander._proto)."""

    label = "minimal"
    transports = ("flight_kept", "flight_new", "oip")

    def start(self, workdir: Path, models: list[str]) -> None:
        flight_proc, fport = _spawn_ready(
            [sys.executable, str(BENCH_DIR / "minimal_flight.py"), "--port", "0", *models],
            workdir / "minimal-flight.log", re.compile(r"^minimal-flight ready port=(\d+)$"),
        )
        self.procs.append(flight_proc)
        oip_proc, gport = _spawn_ready(
            [sys.executable, str(BENCH_DIR / "minimal_oip.py"), "--port", "0", *models],
            workdir / "minimal-oip.log", re.compile(r"^minimal-oip ready port=(\d+)$"),
        )
        self.procs.append(oip_proc)
        self.endpoint = {"flight_uri": f"grpc://127.0.0.1:{fport}", "grpc_url": f"127.0.0.1:{gport}"}


class MLServer(System):
    label = "mlserver"
    transports = ("oip",)

    def __init__(self, parallel_workers: int = 0) -> None:
        super().__init__()
        # 0: inference in the server process itself, like Iskander (and MLServer 1.7.1's default of 1
        # needs uvloop<0.22, which requirements-mlserver.txt pins, so --mlserver-workers 1 works too).
        self.parallel_workers = parallel_workers

    def start(self, workdir: Path, models: list[str]) -> None:
        exe = ensure_mlserver_venv()
        root = workdir / "mlserver"
        root.mkdir(parents=True, exist_ok=True)
        http_port, grpc_port, metrics_port = _free_ports(3)
        (root / "settings.json").write_text(json.dumps({
            "debug": False, "host": "127.0.0.1", "parallel_workers": self.parallel_workers,
            "http_port": http_port, "grpc_port": grpc_port, "metrics_port": metrics_port,
            "grpc_max_message_length": 256 * 1024 * 1024,  # as Iskander's max_message_bytes
        }, indent=2))
        for name in models:
            folder = root / name
            folder.mkdir(exist_ok=True)
            shutil.copy(BENCH_DIR / "mlserver_runtime.py", folder / "mlserver_runtime.py")
            (folder / "model-settings.json").write_text(json.dumps({
                "name": name, "implementation": "mlserver_runtime.OnnxModel",
                "parameters": {"uri": str(MODELS[name].onnx_file)},
            }, indent=2))
        log = open(workdir / "mlserver.log", "w")
        try:
            proc = subprocess.Popen(
                [str(exe), "start", str(root)], stdout=log, stderr=subprocess.STDOUT, cwd=root,
                env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
            )
        finally:
            log.close()
        self.procs = [proc]
        self.endpoint = {"grpc_url": f"127.0.0.1:{grpc_port}"}
        try:
            _wait_oip_ready(self.endpoint["grpc_url"], models, proc, timeout=180)
        except Exception:
            self.stop()
            raise RuntimeError(f"MLServer did not become ready; log: {workdir / 'mlserver.log'}") from None

    def stop(self) -> None:
        # MLServer forks workers when parallel_workers > 0: signal its whole session (it was started
        # with start_new_session), wait, then SIGKILL whatever is left of that group.
        for p in self.procs:
            for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 10)):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
            try:  # orphaned parallel workers, if any
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.procs = []

    def describe(self) -> dict:
        return {**super().describe(), "parallel_workers": self.parallel_workers, "version": "1.7.1"}


class OnnxRuntimeFloor(System):
    label = "onnxruntime"
    transports = ("ort",)

    def start(self, workdir: Path, models: list[str]) -> None:
        self.endpoint = {}


SYSTEMS = {"iskander": Iskander, "minimal": Minimal, "mlserver": MLServer, "onnxruntime": OnnxRuntimeFloor}


# --- helpers -------------------------------------------------------------------------------------

def ensure_mlserver_venv() -> Path:
    """Create bench/.venv-mlserver on first use: MLServer pins its own grpcio/protobuf/fastapi, which
    must not disturb the project venv. onnxruntime is pinned to the harness's version."""
    exe = MLSERVER_VENV / "bin" / "mlserver"
    if exe.exists():
        return exe
    import onnxruntime

    print(f"[bench] creating {MLSERVER_VENV} (MLServer 1.7.1, onnxruntime=={onnxruntime.__version__}) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)  # venv uses the base interpreter
    pip = [str(MLSERVER_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-r", str(MLSERVER_REQUIREMENTS), f"onnxruntime=={onnxruntime.__version__}"], check=True)
    return exe


def _free_ports(n: int) -> list[int]:
    """Ports the OS hands out now (MLServer cannot take port 0); a small race, retried by the caller's error."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _spawn_ready(args: list[str], log_path: Path, pattern: re.Pattern, timeout: float = 60.0) -> tuple[subprocess.Popen, int]:
    """Start a child that prints a ready line on stdout; return it and the port in that line."""
    with open(log_path, "w") as log:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=log, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"}, cwd=BENCH_DIR)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:  # keep draining so the child never blocks on a full pipe
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        if line is None:
            break
        m = pattern.match(line)
        if m:
            return proc, int(m.group(1))
    stop_process(proc)
    raise RuntimeError(f"{args[1]} did not become ready:\n{log_path.read_text()}")


def _wait_oip_ready(url: str, models: list[str], proc: subprocess.Popen, timeout: float) -> None:
    """Poll OIP ModelReady with hand-encoded protobuf bytes: the harness process must import neither
    tritonclient nor iskander._proto (the two clash), and this needs neither."""
    import grpc

    channel = grpc.insecure_channel(url)
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelReady")
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"exited with code {proc.returncode}")
            try:
                # ModelReadyRequest{name=1}; ModelReadyResponse{ready=1: true} is b"\x08\x01".
                if all(call(b"\x0a" + bytes([len(m)]) + m.encode(), timeout=2) == b"\x08\x01" for m in models):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"not ready after {timeout}s")
    finally:
        channel.close()
