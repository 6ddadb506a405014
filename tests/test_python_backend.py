"""backend = "python": an operator's Model class served from worker processes, over both protocols.

One real server process serves several python models written by this module; results are compared
with the same Model class run in this process. Faults (raise, os._exit, hang, wrong output) fail
only their request, and the model serves again afterwards.
"""

from __future__ import annotations

import importlib.util
import json
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

from helpers import exchange, serving

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
])
def test_a_wrong_answer_is_internal_naming_the_column(server, value, fragment):
    err = flight_error(server, "faulty", tenure_batch(float(value)))
    assert isinstance(err, flight.FlightInternalError)
    assert fragment in str(err)
    wait_for_recovery(server, "faulty", 2.0, 4.0, timeout=5)


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
