"""backend = "python": an operator's Model class served from worker processes, over both protocols.

One real server process serves several python models written by this module; results are compared
with the same Model class run in this process. Faults (raise, os._exit, hang, wrong output) fail
only their request, and the model serves again afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import textwrap
import threading
import time
import types
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from iskander.errors import ConfigError
from iskander.config.loader import parse_config

from helpers import Hammer, exchange, gone, serving, wait_for_pids, worker_pids

SCORING = '''
import os, time
import numpy as np
import pyarrow as pa


class Model:
    def load(self, context):
        self.threshold = float(context.parameters["threshold"])
        self.weights = np.asarray(context.parameters.get("weights", [0.5, 0.25, 0.25]), dtype=np.float32)
        self.name = context.name

    def predict(self, batch):
        tenure = batch.column("tenure").to_numpy()
        usage = batch.column("usage").flatten().to_numpy().reshape(len(batch), 2)
        score = (self.weights[0] * np.tanh(tenure / 12.0) + usage @ self.weights[1:]).astype(np.float32)
        return pa.RecordBatch.from_arrays(
            [pa.array(score), pa.array(score > self.threshold)], names=["score", "churn"])
'''

MANIFEST = '''
[[inputs]]
name = "tenure"
type = "float32"
[[inputs]]
name = "usage"
type = "fixed_size_list<float32>[2]"
[[outputs]]
name = "score"
type = "float32"
[[outputs]]
name = "churn"
type = "bool"
'''

FAULTY = '''
import os, time
import numpy as np
import pyarrow as pa


class Model:
    def load(self, context):
        pass

    def predict(self, batch):
        tenure = batch.column("tenure").to_numpy()
        if tenure[0] == -1:
            raise ValueError("tenure must not be negative")
        if tenure[0] == -2:
            os._exit(3)
        if tenure[0] == -3:
            time.sleep(30)
        if tenure[0] == -4:
            return pa.RecordBatch.from_arrays([pa.array(tenure[:1])], names=["score"])
        if tenure[0] == -5:
            return pa.RecordBatch.from_arrays([pa.array(tenure)], names=["scores"])
        if tenure[0] == -6:
            return pa.RecordBatch.from_arrays([pa.array(tenure.astype(np.float64))], names=["score"])
        if tenure[0] == -7:
            time.sleep(2)  # long enough to be killed from outside while it runs
        if tenure[0] == -8:
            return {"score": tenure * 2}
        if tenure[0] == -9:
            return pa.RecordBatch.from_arrays([pa.array([None] * len(tenure), pa.float32())], names=["score"])
        if tenure[0] == -10:
            return pa.Table.from_batches([pa.RecordBatch.from_arrays([pa.array(tenure[:1] * 3)], names=["score"]),
                                          pa.RecordBatch.from_arrays([pa.array(tenure[1:] * 3)], names=["score"])])
        return pa.RecordBatch.from_arrays([pa.array(tenure * 2)], names=["score"])
'''

FAULTY_MANIFEST = '''
[[inputs]]
name = "tenure"
type = "float32"
[[outputs]]
name = "score"
type = "float32"
'''

SLOW = '''
import time
import pyarrow as pa


class Model:
    def predict(self, batch):
        time.sleep(0.5)
        return pa.RecordBatch.from_arrays([batch.column("tenure")], names=["score"])
'''

CONFIG = '''
[observability]
metrics_port = 0

[[models]]
name = "churn-rules"
backend = "python"
path = "churn_rules.py"
workers = 2
parameters = { threshold = 0.7, weights = [0.5, 0.25, 0.25] }

[[models]]
name = "faulty"
backend = "python"
path = "faulty.py"
worker_timeout_s = 3

[[models]]
name = "faulty2"
backend = "python"
path = "faulty.py"
workers = 2
worker_timeout_s = 4

[[models]]
name = "slow"
backend = "python"
path = "slow.py"
workers = 2

[[models]]
name = "no-manifest"
backend = "python"
path = "lonely.py"
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_models(tmp_path_factory.mktemp("python_models"))


def write_models(d: Path) -> Path:
    for stem, code, manifest in (("churn_rules", SCORING, MANIFEST), ("faulty", FAULTY, FAULTY_MANIFEST),
                                 ("slow", SLOW, FAULTY_MANIFEST), ("lonely", SLOW, None)):
        (d / f"{stem}.py").write_text(textwrap.dedent(code))
        if manifest is not None:
            (d / f"{stem}.manifest.toml").write_text(manifest)
    return d


@pytest.fixture(scope="module")
def server(folder: Path):
    with serving(folder, CONFIG) as srv:
        yield srv


@pytest.fixture(scope="module")
def oip(server):
    client = triton.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def in_process(folder: Path, batch: pa.RecordBatch) -> pa.RecordBatch:
    """The same Model class, loaded and called here, as the reference."""
    spec = importlib.util.spec_from_file_location("churn_rules_ref", folder / "churn_rules.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.Model()
    model.load(types.SimpleNamespace(name="churn-rules", model_dir=folder,
                                     parameters={"threshold": 0.7, "weights": [0.5, 0.25, 0.25]}))
    return model.predict(batch)


def churn_batch(n: int, seed: int = 0) -> pa.RecordBatch:
    rng = np.random.default_rng(seed)
    tenure = rng.uniform(0, 48, n).astype(np.float32)
    usage = rng.uniform(0, 2, (n, 2)).astype(np.float32)
    return pa.RecordBatch.from_arrays(
        [pa.array(tenure), pa.FixedSizeListArray.from_arrays(pa.array(usage.reshape(-1)), 2)], names=["tenure", "usage"]
    )


def tenure_batch(value: float, n: int = 3) -> pa.RecordBatch:
    return pa.RecordBatch.from_arrays([pa.array(np.full(n, value, np.float32))], names=["tenure"])


def flight_error(server, model: str, batch: pa.RecordBatch) -> flight.FlightError:
    with pytest.raises(flight.FlightError) as info:
        exchange(server.flight_uri, model, [batch])
    return info.value


def test_flight_matches_the_model_run_in_process(server, folder):
    batch = churn_batch(64)
    (answer,) = exchange(server.flight_uri, "churn-rules", [batch])
    want = in_process(folder, batch)
    assert answer.schema.names == ["score", "churn"]
    np.testing.assert_array_equal(answer.column("score").to_numpy(), want.column("score").to_numpy())
    assert answer.column("churn").to_pylist() == want.column("churn").to_pylist()
    assert any(answer.column("churn").to_pylist()) and not all(answer.column("churn").to_pylist())


def test_oip_matches_the_model_run_in_process(oip, folder):
    batch = churn_batch(32, seed=1)
    tenure = batch.column("tenure").to_numpy()
    usage = batch.column("usage").flatten().to_numpy().reshape(32, 2)
    inputs = [triton.InferInput("tenure", [32], "FP32"), triton.InferInput("usage", [32, 2], "FP32")]
    inputs[0].set_data_from_numpy(tenure)
    inputs[1].set_data_from_numpy(usage)
    result = oip.infer("churn-rules", inputs, client_timeout=30)
    want = in_process(folder, batch)
    np.testing.assert_array_equal(result.as_numpy("score").reshape(-1), want.column("score").to_numpy())
    np.testing.assert_array_equal(result.as_numpy("churn").reshape(-1),
                                  want.column("churn").to_numpy(zero_copy_only=False))


def test_triton_config_names_the_python_backend(oip):
    config = oip.get_model_config("churn-rules", as_json=True, client_timeout=10)["config"]
    assert config["platform"] == "python" and config["backend"] == "python"
    assert int(config["instance_group"][0]["count"]) == 2


def test_two_workers_serve_concurrent_requests(server):
    # each predict sleeps 0.5 s: with 2 workers, 4 concurrent requests take ~1 s, not ~2 s
    results, errors = [], []

    def call(i: int) -> None:
        try:
            (answer,) = exchange(server.flight_uri, "slow", [tenure_batch(float(i))])
            results.append((i, answer.column("score").to_pylist()))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    exchange(server.flight_uri, "slow", [tenure_batch(0.0)])  # both workers loaded already; warm the client path
    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    elapsed = time.monotonic() - start
    assert not errors
    assert sorted(results) == [(i, [float(i)] * 3) for i in range(4)]
    assert elapsed < 1.9, elapsed  # serial on one worker would be >= 2.0 s


def test_a_model_that_raises_fails_only_that_request(server, oip):
    err = flight_error(server, "faulty", tenure_batch(-1))
    assert isinstance(err, flight.FlightInternalError)
    assert "model 'faulty' raised ValueError: tenure must not be negative" in str(err)
    assert "faulty.py" not in str(err) and "Traceback" not in str(err)
    (answer,) = exchange(server.flight_uri, "faulty", [tenure_batch(4.0)])
    assert answer.column("score").to_pylist() == [8.0] * 3
    inp = triton.InferInput("tenure", [2], "FP32")
    inp.set_data_from_numpy(np.array([-1, -1], np.float32))
    with pytest.raises(InferenceServerException) as info:
        oip.infer("faulty", [inp], client_timeout=30)
    assert str(info.value.status()) == "StatusCode.INTERNAL" and "raised ValueError" in info.value.message()


def wait_for_recovery(server, model: str, value: float, want: float, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            (answer,) = exchange(server.flight_uri, model, [tenure_batch(value)])
            assert answer.column("score").to_pylist() == [want] * 3
            return
        except flight.FlightUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def test_a_worker_that_exits_is_restarted(server, oip):
    err = flight_error(server, "faulty", tenure_batch(-2))
    assert isinstance(err, flight.FlightUnavailableError)
    assert "model 'faulty': its worker process exited with code 3" in str(err)
    wait_for_recovery(server, "faulty", 5.0, 10.0)
    # again over OIP: UNAVAILABLE, then the model serves again
    inp = triton.InferInput("tenure", [1], "FP32")
    inp.set_data_from_numpy(np.array([-2], np.float32))
    with pytest.raises(InferenceServerException) as info:
        oip.infer("faulty", [inp], client_timeout=30)
    assert str(info.value.status()) == "StatusCode.UNAVAILABLE" and "'faulty'" in info.value.message()
    wait_for_recovery(server, "faulty", 1.0, 2.0)
    assert "model faulty worker 0 restarted" in server.log()
    # counted: the Flight statistics action and the Prometheus counter read the backend's count
    client = flight.connect(server.flight_uri)
    stats = json.loads(next(iter(client.do_action(flight.Action("statistics", b"faulty")))).body.to_pybytes())
    client.close()
    restarts = stats[0]["worker_restarts"]
    assert restarts >= 2
    scrape = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    assert f'iskander_worker_restarts_total{{model="faulty",version="1"}} {float(restarts)}' in scrape


def test_a_hung_worker_is_replaced_after_worker_timeout(server):
    start = time.monotonic()
    err = flight_error(server, "faulty", tenure_batch(-3))
    assert isinstance(err, flight.FlightTimedOutError), err
    assert "did not answer within its worker_timeout_s (3 s)" in str(err)
    assert time.monotonic() - start < 15
    wait_for_recovery(server, "faulty", 3.0, 6.0)


@pytest.mark.parametrize(("value", "fragment"), [
    (-4, "model 'faulty' predict returned 1 rows in column 'score' for a request of 3 rows"),
    (-5, "model 'faulty' predict returned no column 'score' (expected float32; got columns: scores)"),
    (-6, "model 'faulty' predict returned column 'score' as float64, expected float32"),
    (-8, "model 'faulty' predict returned dict, expected a pyarrow.RecordBatch"),
    (-9, "model 'faulty' predict returned nulls in column 'score'"),
])
def test_a_wrong_answer_is_internal_naming_the_column(server, oip, value, fragment):
    err = flight_error(server, "faulty", tenure_batch(float(value)))
    assert isinstance(err, flight.FlightInternalError)
    assert fragment in str(err)
    assert "Traceback" not in str(err)
    inp = triton.InferInput("tenure", [3], "FP32")
    inp.set_data_from_numpy(np.full(3, value, np.float32))
    with pytest.raises(InferenceServerException) as info:
        oip.infer("faulty", [inp], client_timeout=30)
    assert str(info.value.status()) == "StatusCode.INTERNAL" and fragment in info.value.message()
    wait_for_recovery(server, "faulty", 2.0, 4.0, timeout=5)  # the same worker, still serving


def test_a_table_answer_in_several_chunks_is_accepted(server):
    (answer,) = exchange(server.flight_uri, "faulty", [tenure_batch(-10.0)])
    assert answer.column("score").to_pylist() == [-30.0] * 3


def test_missing_manifest_makes_only_that_model_unavailable(server, oip):
    err = flight_error(server, "no-manifest", tenure_batch(1.0))
    assert isinstance(err, flight.FlightUnavailableError)
    assert "python model lonely.py needs a manifest (lonely.manifest.toml not found)" in str(err)
    assert oip.is_model_ready("churn-rules") and not oip.is_model_ready("no-manifest")


def test_python_only_keys_are_refused_on_onnx_models(tmp_path):
    for key, owners in (("workers = 2", "'python' or 'sklearn'"), ("parameters = { a = 1 }", "'python'"),
                        ("worker_timeout_s = 5", "'python' or 'sklearn'")):
        data = {"models": [{"name": "m", "path": "m.onnx", **_toml_kv(key)}]}
        with pytest.raises(ConfigError, match=f"key '{key.split()[0]}': applies to backend {owners} only"):
            parse_config(data, "c.toml", tmp_path)
    data = {"models": [{"name": "m", "path": "m.joblib", "backend": "sklearn", "parameters": {"a": 1}}]}
    with pytest.raises(ConfigError, match="key 'parameters': applies to backend 'python' only; this model has "
                                          "backend 'sklearn'"):
        parse_config(data, "c.toml", tmp_path)
    data = {"models": [{"name": "m", "path": "m.py", "backend": "python", "instances": 2}]}
    with pytest.raises(ConfigError, match="key 'instances': applies to backend 'onnx' only"):
        parse_config(data, "c.toml", tmp_path)
    data = {"models": [{"name": "m", "path": "m.py", "backend": "python", "workers": 0}]}
    with pytest.raises(ConfigError, match="key 'workers': must be >= 1"):
        parse_config(data, "c.toml", tmp_path)


def _toml_kv(line: str) -> dict:
    import tomllib

    return tomllib.loads(line)


def test_workers_stop_with_the_server(tmp_path):
    import subprocess

    cfg = CONFIG.split("[[models]]")[1]
    with serving(write_models(tmp_path), "[[models]]" + cfg) as srv:
        children = subprocess.run(["pgrep", "-P", str(srv.process.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) == 2
    for pid in children:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_dynamic_batching_merges_requests_for_a_python_model(folder, tmp_path):
    """Concurrent requests to a batched python model run as fewer worker calls, and each request
    still gets exactly its own rows' answers (compared with the model run in process)."""
    config = f'''
[[models]]
name = "churn-rules"
backend = "python"
path = "{folder}/churn_rules.py"
workers = 1
parameters = {{ threshold = 0.7, weights = [0.5, 0.25, 0.25] }}
dynamic_batching = {{ max_queue_delay_us = 100000, max_batch_rows = 256 }}
'''
    with serving(tmp_path, config) as srv:
        batches = [churn_batch(5 + i, seed=i) for i in range(12)]
        barrier = threading.Barrier(len(batches))

        def one(batch: pa.RecordBatch) -> pa.RecordBatch:
            barrier.wait(timeout=10)
            return exchange(srv.flight_uri, "churn-rules", [batch])[0]

        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(len(batches)) as pool:
            answers = list(pool.map(one, batches, timeout=60))
        for batch, answer in zip(batches, answers):
            expected = in_process(folder, batch)
            np.testing.assert_allclose(answer.column("score").to_numpy(), expected.column("score").to_numpy(),
                                       rtol=1e-6)
            assert answer.column("churn").to_pylist() == expected.column("churn").to_pylist()
        client = flight.connect(srv.flight_uri)
        stats = json.loads(next(iter(client.do_action(flight.Action("statistics", b"churn-rules")))).body.to_pybytes())
        client.close()
        s = stats[0]
        assert s["inference_stats"]["success"]["count"] == len(batches)
        assert s["inference_count"] == sum(b.num_rows for b in batches)
        assert s["execution_count"] < len(batches), s  # merged into fewer predict calls


# --- faults from outside the model: kill -9, hangs past deadlines, unload under load ------------------


def statistics(server, model: str) -> dict:
    client = flight.connect(server.flight_uri)
    try:
        return json.loads(next(iter(client.do_action(flight.Action("statistics", model.encode())))).body.to_pybytes())[0]
    finally:
        client.close()


def restarts_metric(server, model: str) -> float:
    scrape = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    prefix = f'iskander_worker_restarts_total{{model="{model}",version="1"}} '
    values = [float(line[len(prefix):]) for line in scrape.splitlines() if line.startswith(prefix)]
    assert values, f"no {prefix!r} in the scrape"
    return values[0]


def test_a_worker_killed_with_sigkill_fails_its_request_and_is_restarted(server, folder):
    """kill -9 from outside (as the OOM killer does) while a request runs: that request is
    UNAVAILABLE naming the model, a new worker serves without operator action, the restart is
    counted, and another model on the server answers throughout."""
    (pid,) = wait_for_pids(server.process.pid, "faulty", 1)
    before = statistics(server, "faulty")["worker_restarts"]
    batch = churn_batch(16, seed=2)
    want = in_process(folder, batch).column("score").to_pylist()

    def other_model() -> None:
        (answer,) = exchange(server.flight_uri, "churn-rules", [batch], timeout=20)
        assert answer.column("score").to_pylist() == want

    outcome: dict = {}

    def in_flight() -> None:
        try:
            outcome["answer"] = exchange(server.flight_uri, "faulty", [tenure_batch(-7.0)], timeout=30)
        except flight.FlightError as exc:
            outcome["error"] = exc

    with Hammer(other_model) as hammer:
        request = threading.Thread(target=in_flight)
        request.start()
        time.sleep(0.5)  # the request is in predict's 2 s sleep (or, if slower, about to be sent to the dead worker)
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        request.join(timeout=30)
        assert not request.is_alive()
        wait_for_recovery(server, "faulty", 5.0, 10.0)
        recovered = time.monotonic()
        time.sleep(0.2)
    err = outcome.get("error")
    assert isinstance(err, flight.FlightUnavailableError), outcome
    assert ("model 'faulty': its worker process was killed by SIGKILL while running the request; it is being "
            "restarted") in str(err)
    (new_pid,) = wait_for_pids(server.process.pid, "faulty", 1)
    assert new_pid != pid and not Path(f"/proc/{pid}").exists()  # reaped, not a zombie
    assert not hammer.errors, hammer.errors[:3]
    assert any(killed <= t <= recovered for t in hammer.ok), "the other model did not answer during the restart"
    after = statistics(server, "faulty")["worker_restarts"]
    assert after == before + 1
    assert restarts_metric(server, "faulty") == float(after)
    assert f"model faulty worker 0 (pid {pid}) was killed by SIGKILL; restarting it" in server.log()


def test_a_client_deadline_is_deadline_exceeded_and_the_hung_worker_is_replaced(server, oip):
    """The client's own deadline (Flight call timeout, OIP client_timeout) ends its wait with
    DEADLINE_EXCEEDED; the hung worker is killed at worker_timeout_s (3 s) and replaced."""
    for protocol in ("flight", "oip"):
        (pid,) = wait_for_pids(server.process.pid, "faulty", 1)
        start = time.monotonic()
        if protocol == "flight":
            with pytest.raises(flight.FlightTimedOutError):
                exchange(server.flight_uri, "faulty", [tenure_batch(-3.0)], timeout=1.0)
        else:
            inp = triton.InferInput("tenure", [1], "FP32")
            inp.set_data_from_numpy(np.array([-3], np.float32))
            with pytest.raises(InferenceServerException) as info:
                oip.infer("faulty", [inp], client_timeout=1.0)
            assert str(info.value.status()) == "StatusCode.DEADLINE_EXCEEDED", info.value
        assert time.monotonic() - start < 2.5
        wait_for_recovery(server, "faulty", 3.0, 6.0)
        assert f"model faulty worker 0 (pid {pid}) ran longer than worker_timeout_s (3 s); restarting it" \
            in server.log()
        assert gone([pid])


def test_a_hung_worker_does_not_block_the_models_other_worker(server):
    pids = wait_for_pids(server.process.pid, "faulty2", 2)
    outcome: dict = {}

    def hang() -> None:
        try:
            exchange(server.flight_uri, "faulty2", [tenure_batch(-3.0)], timeout=30)
        except flight.FlightError as exc:
            outcome["error"], outcome["at"] = exc, time.monotonic()

    hung = threading.Thread(target=hang)
    hung.start()
    time.sleep(0.3)  # it holds one worker
    for i in range(6):
        # each answered by the other worker: a request stuck behind the hung one would time out here
        (answer,) = exchange(server.flight_uri, "faulty2", [tenure_batch(float(i))], timeout=3)
        assert answer.column("score").to_pylist() == [2.0 * i] * 3
    served = time.monotonic()
    hung.join(timeout=30)
    assert not hung.is_alive()
    err = outcome["error"]
    assert isinstance(err, flight.FlightTimedOutError), err
    assert "model 'faulty2' did not answer within its worker_timeout_s (4 s); the worker was replaced" in str(err)
    assert served < outcome["at"]
    now = wait_for_pids(server.process.pid, "faulty2", 2)
    assert len(set(now) & set(pids)) == 1  # the hung one replaced, the other kept
    wait_for_recovery(server, "faulty2", 7.0, 14.0)


UNLOAD_CONFIG = '''
[[models]]
name = "churn-rules"
backend = "python"
path = "{folder}/churn_rules.py"
workers = 2
parameters = {{ threshold = 0.7, weights = [0.5, 0.25, 0.25] }}
'''


def test_unload_and_load_while_clients_stream_requests(folder, tmp_path):
    """Flight streams and OIP clients keep sending while the model is unloaded and loaded again
    (and reloaded in place), alternating OIP RepositoryModelUnload/Load and the Flight actions.
    Every answer is the model's, every failure is UNAVAILABLE naming the model, nothing hangs,
    and the unloaded model's worker processes are gone."""
    batch = churn_batch(24, seed=3)
    want = in_process(folder, batch)
    want_score, want_churn = want.column("score").to_pylist(), want.column("churn").to_pylist()
    tenure = batch.column("tenure").to_numpy()
    usage = batch.column("usage").flatten().to_numpy().reshape(24, 2)
    stop = threading.Event()
    lock = threading.Lock()
    ok: dict[str, int] = {"flight": 0, "oip": 0}
    unavailable: dict[str, int] = {"flight": 0, "oip": 0}
    bad: list[str] = []

    def failed(protocol: str, code: str, message: str) -> None:
        with lock:
            if code == "UNAVAILABLE" and "'churn-rules'" in message:
                unavailable[protocol] += 1
            else:
                bad.append(f"{protocol} {code}: {message}")

    def succeeded(protocol: str, score: list, churn: list) -> None:
        with lock:
            if score == want_score and churn == want_churn:
                ok[protocol] += 1
            else:
                bad.append(f"{protocol}: a wrong answer")

    def flight_client() -> None:
        client = flight.connect(srv.flight_uri)
        try:
            while not stop.is_set():
                try:  # a stream of up to 20 batches, then a new one
                    writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("churn-rules"),
                                                        options=flight.FlightCallOptions(timeout=30))
                    with writer:
                        writer.begin(batch.schema)
                        for _ in range(20):
                            if stop.is_set():
                                break
                            writer.write_batch(batch)
                            answer = reader.read_chunk().data
                            succeeded("flight", answer.column("score").to_pylist(), answer.column("churn").to_pylist())
                        writer.done_writing()
                except flight.FlightUnavailableError as exc:
                    failed("flight", "UNAVAILABLE", str(exc))
                    time.sleep(0.02)
                except Exception as exc:  # noqa: BLE001 - anything else is a finding
                    failed("flight", type(exc).__name__, str(exc))
                    time.sleep(0.02)
        finally:
            client.close()

    def oip_client() -> None:
        client = triton.InferenceServerClient(srv.grpc_url)
        inputs = [triton.InferInput("tenure", [24], "FP32"), triton.InferInput("usage", [24, 2], "FP32")]
        inputs[0].set_data_from_numpy(tenure)
        inputs[1].set_data_from_numpy(usage)
        try:
            while not stop.is_set():
                try:
                    result = client.infer("churn-rules", inputs, client_timeout=30)
                    succeeded("oip", result.as_numpy("score").reshape(-1).tolist(),
                              result.as_numpy("churn").reshape(-1).tolist())
                except InferenceServerException as exc:
                    failed("oip", str(exc.status()).removeprefix("StatusCode."), exc.message() or "")
                    time.sleep(0.02)
        finally:
            client.close()

    def served_again(timeout: float = 30.0) -> None:
        with lock:
            start = dict(ok)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with lock:
                if all(ok[p] > start[p] for p in ok):
                    return
            time.sleep(0.05)
        raise AssertionError(f"no answers after load: {ok} (errors: {bad[:3]})")

    with serving(tmp_path, UNLOAD_CONFIG.format(folder=folder)) as srv:
        admin = triton.InferenceServerClient(srv.grpc_url)
        actions = flight.connect(srv.flight_uri)
        clients = [threading.Thread(target=f, daemon=True) for f in (flight_client, flight_client, oip_client, oip_client)]
        try:
            for t in clients:
                t.start()
            served_again()
            for cycle in range(3):
                pids = wait_for_pids(srv.process.pid, "churn-rules", 2)
                if cycle % 2 == 0:
                    admin.unload_model("churn-rules", client_timeout=30)
                else:
                    list(actions.do_action(flight.Action("unload_model", b"churn-rules")))
                assert gone(pids), f"worker processes {pids} still running after unload"
                assert worker_pids(srv.process.pid) == []
                time.sleep(0.3)  # clients meet the unloaded model
                if cycle % 2 == 0:
                    list(actions.do_action(flight.Action("load_model", b"churn-rules")))
                else:
                    admin.load_model("churn-rules", client_timeout=60)
                assert not set(wait_for_pids(srv.process.pid, "churn-rules", 2)) & set(pids)
                served_again()
            # reloaded in place (loaded while READY): the new workers take over, the old ones end
            pids = wait_for_pids(srv.process.pid, "churn-rules", 2)
            admin.load_model("churn-rules", client_timeout=60)
            assert gone(pids), f"worker processes {pids} still running after the reload"
            assert len(wait_for_pids(srv.process.pid, "churn-rules", 2)) == 2
            served_again()
        finally:
            stop.set()
            for t in clients:
                t.join(timeout=60)
            admin.close()
            actions.close()
        print("answers", ok, "unavailable", unavailable)
        assert not any(t.is_alive() for t in clients), "a client hung"
        assert not bad, bad[:5]
        assert unavailable["flight"] and unavailable["oip"], unavailable  # the unloaded model was met
        assert len(worker_pids(srv.process.pid)) == 2  # no leaked processes



# --- the worker wire, on the backend itself (real worker processes, no server) ----------------------

ECHO = """
import time
import pyarrow as pa
import pyarrow.compute as pc


class Model:
    def predict(self, batch):
        x = batch.column("x")
        if len(x) and x[0].as_py() < 0:
            time.sleep(-x[0].as_py())
        return pa.RecordBatch.from_arrays([pc.multiply(x, pa.scalar(3.0, pa.float32()))], names=["score"])
"""


def echo_backend(d: Path, worker_timeout_s: float = 60.0):
    from iskander.backends.base import TensorSpec
    from iskander.backends.python_worker import PythonBackend
    from iskander.config.settings import ModelSettings, PythonOptions

    (d / "echo.py").write_text(ECHO)
    return PythonBackend(
        ModelSettings(name="echo", path=d / "echo.py", backend="python",
                      options=PythonOptions(worker_timeout_s=worker_timeout_s)),
        (TensorSpec("x", pa.float32(), (None,), "float32"),), (TensorSpec("score", pa.float32(), (None,), "float32"),),
    )


@pytest.mark.parametrize("half", [64 * 1024, 0])
def test_batches_larger_than_the_shared_region_go_on_the_socket(tmp_path, monkeypatch, half):
    """With a 64 KiB region half, 1,000 rows travel through it and 100,000 rows (400 KB each way)
    on the socket; with no region (0) everything goes on the socket. Answers read from the region
    are copied out: a later request does not change an earlier answer."""
    from iskander.backends import worker_wire

    monkeypatch.setattr(worker_wire, "REGION_HALF_BYTES", half)
    backend = echo_backend(tmp_path)
    try:
        small = np.arange(1000, dtype=np.float32)
        big = np.arange(100_000, dtype=np.float32)
        assert worker_wire.ipc_size(pa.record_batch([pa.array(small)], names=["x"])) <= 64 * 1024
        assert worker_wire.ipc_size(pa.record_batch([pa.array(big)], names=["x"])) > 64 * 1024
        (first,) = backend.run(["score"], {"x": small}, "echo")
        (second,) = backend.run(["score"], {"x": big}, "echo")
        (third,) = backend.run(["score"], {"x": small + 1}, "echo")
        np.testing.assert_array_equal(first, small * 3)
        np.testing.assert_array_equal(second, big * 3)
        np.testing.assert_array_equal(third, (small + 1) * 3)
        assert backend.restarts == 0
    finally:
        backend.close()


def test_a_request_deadline_ends_the_wait_and_the_worker_is_kept_or_replaced(tmp_path):
    """``run(..., deadline=)``: past the request's deadline the caller gets DEADLINE_EXCEEDED at
    once; the worker finishes in the background and serves the next request (not restarted), and a
    worker that then also passes worker_timeout_s is replaced."""
    from iskander.errors import DeadlineExceeded

    backend = echo_backend(tmp_path, worker_timeout_s=3.0)
    try:
        (pid,) = backend.worker_pids()
        backend.run(["score"], {"x": np.ones(2, np.float32)}, "echo")  # the first pa.array call here takes ~1 s
        start = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="model 'echo': the request's deadline passed while its worker "
                                                   "was running it"):
            backend.run(["score"], {"x": np.full(2, -1.0, np.float32)}, "echo", deadline=time.monotonic() + 0.3)
        assert time.monotonic() - start < 0.9
        (answer,) = backend.run(["score"], {"x": np.ones(2, np.float32)}, "echo")  # waits for the same worker
        assert answer.tolist() == [3.0, 3.0] and backend.worker_pids() == [pid] and backend.restarts == 0
        busy = threading.Thread(target=backend.run, args=(["score"], {"x": np.full(1, -1.0, np.float32)}, "echo"))
        busy.start()  # holds the only worker for 1 s: the next request's deadline passes in the queue
        time.sleep(0.2)
        with pytest.raises(DeadlineExceeded, match="model 'echo': the request's deadline passed while it waited "
                                                   r"for a free worker \(all 1 busy\); it was not run"):
            backend.run(["score"], {"x": np.ones(1, np.float32)}, "echo", deadline=time.monotonic() + 0.2)
        busy.join(timeout=30)
        with pytest.raises(DeadlineExceeded, match="while its worker was running it"):  # and past worker_timeout_s
            backend.run(["score"], {"x": np.full(1, -30.0, np.float32)}, "echo", deadline=time.monotonic() + 1.0)
        deadline = time.monotonic() + 30
        while backend.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert backend.restarts == 1 and pid not in backend.worker_pids() and not Path(f"/proc/{pid}").exists()
        (answer,) = backend.run(["score"], {"x": np.ones(1, np.float32)}, "echo")
        assert answer.tolist() == [3.0]
        pids = backend.worker_pids()
    finally:
        backend.close()
    assert gone(pids)
