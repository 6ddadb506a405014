"""iskander.client must never abort the process when the server refuses a batch (issue 12).

The bug: stream()'s feeder thread called done_writing() while the reader, having received the
server's refusal, finished the call (which also sends WritesDone); pyarrow's flag for it is not
locked, gRPC saw two WritesDone and aborted the process ("API misuse of type
GRPC_CALL_ERROR_TOO_MANY_OPERATIONS"). Large batches make the window wide (the reader's WritesDone
waits behind a write stuck on flow control): before the fix, 8 of 12 processes of 400 such calls
aborted. Here several client processes in parallel each make many refused calls, and every one must
exit 0 having seen only the typed error.

Run this file as a script to be one such client process:
    python tests/test_client_abort.py HOST:PORT CALLS
and scale the test by hand with ISKANDER_ABORT_PROCESSES (default 6) and ISKANDER_ABORT_CALLS
(default 150), e.g. 12 and 1500 as in the issue's report.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers import serving

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """\
[[models]]
name = "tiny_limit"
path = "{root}/tabular.onnx"
max_message_bytes = 2048
"""

PROCESSES = int(os.environ.get("ISKANDER_ABORT_PROCESSES", "6"))
CALLS = int(os.environ.get("ISKANDER_ABORT_CALLS", "150"))
DEADLINE_S = 60 + 0.02 * PROCESSES * CALLS  # ~10 s at the defaults on 2 busy vCPUs
ROWS = 20_000  # ~0.6 MB a batch: past the gRPC flow-control window, so a write blocks while the refusal arrives


def client_process(target: str, calls: int) -> int:
    """Many refused calls through infer() and stream(); print what was seen as JSON."""
    import faulthandler

    faulthandler.enable(all_threads=True)  # an abort then shows which thread did what
    from data import tabular_batch
    from iskander.client import IskanderClient, IskanderClientError, ResourceExhausted

    batch, _ = tabular_batch(ROWS)
    seen: collections.Counter[str] = collections.Counter()
    with IskanderClient(target, timeout=30) as client:
        for i in range(calls):
            try:
                if i % 4 == 0:
                    client.infer("tiny_limit", batch)
                elif i % 4 == 1:
                    client.infer("tiny_limit", [batch] * (1 + i % 5))
                elif i % 4 == 3:  # single-threaded: refused, then spent
                    with client.exchange("tiny_limit") as stream:
                        stream.send(batch)
                else:
                    for _ in client.stream("tiny_limit", [batch] * (1 + i % 5), window=1 + i % 4):
                        pass
                seen["answered"] += 1
            except ResourceExhausted as exc:
                seen["ResourceExhausted" if "max_message_bytes" in exc.message else f"other message: {exc}"] += 1
            except IskanderClientError as exc:
                seen[f"{type(exc).__name__}: {exc}"[:200]] += 1
    print(json.dumps(dict(seen)))
    return 0 if set(seen) == {"ResourceExhausted"} else 3


@pytest.fixture(scope="module")
def limited(models_dir, tmp_path_factory):
    with serving(tmp_path_factory.mktemp("abort"), CONFIG.format(root=models_dir)) as server:
        yield server


def test_refused_batches_never_abort_client_processes(limited):
    target = limited.flight_uri.removeprefix("grpc://")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    started = time.monotonic()
    procs = [subprocess.Popen([sys.executable, __file__, target, str(CALLS)], stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
             for _ in range(PROCESSES)]
    outputs = []
    try:
        for proc in procs:
            out, _ = proc.communicate(timeout=max(5.0, DEADLINE_S - (time.monotonic() - started)))
            outputs.append((proc.returncode, out))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
    failed = [(code, out[-3000:]) for code, out in outputs if code != 0]
    assert not failed, f"{len(failed)} of {PROCESSES} client processes failed:\n" + "\n---\n".join(
        f"exit {code}:\n{out}" for code, out in failed)
    for _, out in outputs:
        assert json.loads(out.strip().splitlines()[-1]) == {"ResourceExhausted": CALLS}
    assert limited.process.poll() is None  # the server is still up


def _bounded(call, timeout: float = 30.0):
    """Run ``call`` in a thread; fail (instead of hanging the suite) if it does not return in time."""
    outcome: list = []

    def run() -> None:
        try:
            outcome.append(("value", call()))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(("error", exc))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    assert outcome, f"still running after {timeout}s"
    return outcome[0]


@pytest.fixture(scope="module")
def client(limited):
    from iskander.client import IskanderClient

    with IskanderClient(limited.flight_uri.removeprefix("grpc://"), timeout=30) as c:
        yield c


def test_local_write_error_ends_the_stream_instead_of_hanging(client):
    """A batch whose schema differs from the first fails in pyarrow's writer, on a call the server
    still holds open: the stream must raise it (cancelling the call), not wait for an answer."""
    import pyarrow as pa

    from data import tabular_batch
    from iskander.client import InvalidArgument

    first, _ = tabular_batch(3)
    second = first.set_column(2, "category", pa.array([1, 2, 3], pa.int32()))  # int32: not a layout cast
    kind, value = _bounded(lambda: list(client.stream("tiny_limit", [first, second], window=1)))
    assert kind == "error" and isinstance(value, InvalidArgument), value
    kind, value = _bounded(lambda: client.infer("tiny_limit", first))  # the connection still works
    assert kind == "value" and value.num_rows == 3


def test_a_refused_exchange_is_spent_and_says_why(client):
    from data import tabular_batch
    from iskander.client import ResourceExhausted

    small, _ = tabular_batch(3)
    big, _ = tabular_batch(ROWS)
    with client.exchange("tiny_limit") as stream:
        assert stream.send(small).num_rows == 3
        with pytest.raises(ResourceExhausted):
            stream.send(big)
        with pytest.raises(ResourceExhausted):  # the call is over: no gRPC operation on it again
            stream.send(small)


if __name__ == "__main__":
    sys.exit(client_process(sys.argv[1], int(sys.argv[2])))
