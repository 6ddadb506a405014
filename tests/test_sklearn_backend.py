"""backend = "sklearn": a joblib-saved scikit-learn Pipeline served from worker processes.

The worked example (configs/churn-sklearn) is rebuilt into tmp_path by its own build script and
served by a real server process over Flight and OIP; labels and probabilities are compared with
the same estimator's predict / predict_proba run in this process. Beside it: a model fitted on a
DataFrame (named features), and one whose manifest gives the wrong feature count.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import threading
import time
import urllib.request
from pathlib import Path

import joblib
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from helpers import Hammer, exchange, gone, serving, wait_for_pids

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "churn-sklearn"


def _load_build_script():
    spec = importlib.util.spec_from_file_location("churn_sklearn_build_model", EXAMPLE / "build_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_model = _load_build_script()

NAMED_MANIFEST = '''
[[inputs]]
name = "tenure_months"
type = "float64"
[[inputs]]
name = "plan"
type = "utf8"
[[outputs]]
name = "churned"
tensor = "label"
type = "int64"
'''

CONFIG = '''
[observability]
metrics_port = 0

[[models]]
name = "churn-sklearn"
backend = "sklearn"
path = "churn-sklearn/churn.joblib"
workers = 2

[[models]]
name = "churn-kill"
backend = "sklearn"
path = "churn-sklearn/churn.joblib"
workers = 1
worker_timeout_s = 3

[[models]]
name = "churn-hang"
backend = "sklearn"
path = "churn-sklearn/churn.joblib"
workers = 2
worker_timeout_s = 3

[[models]]
name = "named"
backend = "sklearn"
path = "named.joblib"

[[models]]
name = "six-features"
backend = "sklearn"
path = "six.joblib"
manifest = "churn-sklearn/churn.manifest.toml"

[[models]]
name = "three-probabilities"
backend = "sklearn"
path = "churn-sklearn/churn.joblib"
manifest = "three.manifest.toml"
'''


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("sklearn_models")
    assert build_model.build(d / "churn-sklearn") == d / "churn-sklearn" / "churn.joblib"
    from sklearn.compose import make_column_transformer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    # fitted on a DataFrame: the ColumnTransformer selects its columns by name
    frame = pd.DataFrame({"tenure_months": [1.0, 30.0, 2.0, 40.0, 3.0, 50.0], "plan": ["a", "b", "a", "b", "c", "c"]})
    named = make_pipeline(
        make_column_transformer((StandardScaler(), ["tenure_months"]), (OneHotEncoder(), ["plan"])),
        LogisticRegression(),
    ).fit(frame, [1, 0, 1, 0, 1, 0])
    joblib.dump(named, d / "named.joblib")
    (d / "named.manifest.toml").write_text(NAMED_MANIFEST)
    (d / "three.manifest.toml").write_text(build_model.MANIFEST.replace("float32>[2]", "float32>[3]"))
    x, y = build_model.make_data(200)
    joblib.dump(LogisticRegression().fit(np.column_stack([x, x[:, :1]]), y), d / "six.joblib")
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


def customers(n: int, seed: int) -> tuple[pa.RecordBatch, np.ndarray]:
    x, _ = build_model.make_data(n, seed)
    columns = [pa.array([f"c{i}" for i in range(n)])] + [pa.array(x[:, j]) for j in range(x.shape[1])]
    return pa.RecordBatch.from_arrays(columns, names=["customer_id", *build_model.FEATURES]), x


def test_the_example_config_loads_and_serves(folder):
    from iskander.core.registry import ModelRegistry, ModelState
    from iskander.config.loader import load_config

    config = folder / "churn-sklearn.toml"  # beside the built churn-sklearn/, as in configs/
    shutil.copy(EXAMPLE.parent / "churn-sklearn.toml", config)
    registry = ModelRegistry(load_config(config).models)
    registry.load_all()
    try:
        assert [(e.name, e.state) for e in registry.all()] == [("churn-sklearn", ModelState.READY)], \
            [e.reason for e in registry.all()]
    finally:
        registry.close()


def test_committed_manifest_is_what_the_build_script_writes():
    assert (EXAMPLE / "churn.manifest.toml").read_text() == build_model.MANIFEST


def test_flight_matches_the_estimator_run_in_process(server, folder):
    batch, x = customers(300, seed=5)
    (answer,) = exchange(server.flight_uri, "churn-sklearn", [batch])
    pipeline = joblib.load(folder / "churn-sklearn" / "churn.joblib")
    assert answer.schema.names == ["customer_id", "label", "probabilities"]
    assert answer.schema.field("probabilities").type == pa.list_(pa.float32(), 2)
    assert answer.column("customer_id").to_pylist() == batch.column("customer_id").to_pylist()
    labels = answer.column("label").to_pylist()
    assert labels == list(pipeline.predict(x)) and set(labels) == {"churn", "stay"}
    proba = answer.column("probabilities").flatten().to_numpy().reshape(300, 2)
    np.testing.assert_allclose(proba, pipeline.predict_proba(x), rtol=1e-6, atol=1e-7)


def test_oip_matches_the_estimator_run_in_process(oip, folder):
    _, x = customers(40, seed=6)
    ids = triton.InferInput("customer_id", [40], "BYTES")
    ids.set_data_from_numpy(np.array([f"c{i}".encode() for i in range(40)], dtype=object))
    inputs = [ids]
    for j, name in enumerate(build_model.FEATURES):
        inp = triton.InferInput(name, [40], "FP64")
        inp.set_data_from_numpy(np.ascontiguousarray(x[:, j]))
        inputs.append(inp)
    outputs = [triton.InferRequestedOutput("label"), triton.InferRequestedOutput("probabilities")]
    result = oip.infer("churn-sklearn", inputs, outputs=outputs, client_timeout=30)
    pipeline = joblib.load(folder / "churn-sklearn" / "churn.joblib")
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label").reshape(-1)]
    assert labels == list(pipeline.predict(x))
    np.testing.assert_allclose(result.as_numpy("probabilities"), pipeline.predict_proba(x), rtol=1e-6, atol=1e-7)


def test_a_model_fitted_on_a_dataframe_gets_its_named_columns(server, folder):
    frame = pd.DataFrame({"tenure_months": [0.5, 45.0, 2.5, 60.0], "plan": ["a", "b", "c", "a"]})
    batch = pa.RecordBatch.from_arrays([pa.array(frame["tenure_months"].to_numpy()), pa.array(list(frame["plan"]))],
                                       names=["tenure_months", "plan"])
    (answer,) = exchange(server.flight_uri, "named", [batch])
    want = joblib.load(folder / "named.joblib").predict(frame)
    assert answer.schema.field("churned").type == pa.int64()
    assert answer.column("churned").to_pylist() == list(want)


def test_a_feature_count_mismatch_makes_only_that_model_unavailable(server, oip):
    batch, _ = customers(3, seed=7)
    with pytest.raises(flight.FlightUnavailableError) as info:
        exchange(server.flight_uri, "six-features", [batch])
    message = str(info.value)
    assert "sklearn model six.joblib failed to load" in message
    assert "model 'six-features': the manifest's inputs give 5 features per row but the estimator was fitted on 6" \
        in message
    assert not oip.is_model_ready("six-features")
    assert oip.is_model_ready("churn-sklearn") and oip.is_model_ready("named")


def test_probabilities_of_the_wrong_width_are_refused_at_load(server, oip):
    batch, _ = customers(3, seed=8)
    with pytest.raises(flight.FlightUnavailableError) as info:
        exchange(server.flight_uri, "three-probabilities", [batch])
    assert "model 'three-probabilities': output 'probabilities' must be declared fixed_size_list<float32>[2]" \
        in str(info.value)
    assert not oip.is_model_ready("three-probabilities") and oip.is_model_ready("churn-sklearn")


def test_triton_config_names_the_sklearn_backend(oip):
    config = oip.get_model_config("churn-sklearn", as_json=True, client_timeout=10)["config"]
    assert config["platform"] == "sklearn" and config["backend"] == "sklearn"
    assert int(config["instance_group"][0]["count"]) == 2



# --- worker faults: kill -9 and hangs (SIGSTOP) from outside, the other models answering throughout -----


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


def labels_of(server, model: str, batch: pa.RecordBatch, timeout: float = 20) -> list:
    (answer,) = exchange(server.flight_uri, model, [batch], timeout=timeout)
    return answer.column("label").to_pylist()


def wait_until_served(server, model: str, batch: pa.RecordBatch, want: list, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            assert labels_of(server, model, batch) == want
            return
        except flight.FlightUnavailableError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


class OtherModels(Hammer):
    """churn-sklearn answered correctly over Flight and OIP in the background."""

    def __init__(self, server, folder: Path) -> None:
        batch, x = customers(20, seed=11)
        want = list(joblib.load(folder / "churn-sklearn" / "churn.joblib").predict(x))
        client = triton.InferenceServerClient(server.grpc_url)
        inputs = []
        ids = triton.InferInput("customer_id", [20], "BYTES")
        ids.set_data_from_numpy(np.array([f"c{i}".encode() for i in range(20)], dtype=object))
        inputs.append(ids)
        for j, name in enumerate(build_model.FEATURES):
            inp = triton.InferInput(name, [20], "FP64")
            inp.set_data_from_numpy(np.ascontiguousarray(x[:, j]))
            inputs.append(inp)
        self.client = client
        turn = iter(range(1 << 30))

        def call() -> None:
            if next(turn) % 2:
                assert labels_of(server, "churn-sklearn", batch) == want
            else:
                result = client.infer("churn-sklearn", inputs, outputs=[triton.InferRequestedOutput("label")],
                                      client_timeout=20)
                assert [v.decode() for v in result.as_numpy("label").reshape(-1)] == want

        super().__init__(call)

    def __exit__(self, *exc_info: object) -> None:
        try:
            super().__exit__(*exc_info)
        finally:
            self.client.close()


def test_a_killed_sklearn_worker_fails_its_request_and_is_restarted(server, folder):
    """kill -9 of the worker (as an OOM kill) while a request is in it: UNAVAILABLE naming the
    model; a new worker serves without operator action; counted in statistics and metrics; the
    other sklearn model answers throughout. The worker is stopped (SIGSTOP) first so the request is
    certainly in flight when it dies."""
    batch, x = customers(12, seed=9)
    want = list(joblib.load(folder / "churn-sklearn" / "churn.joblib").predict(x))
    assert labels_of(server, "churn-kill", batch) == want
    (pid,) = wait_for_pids(server.process.pid, "churn-kill", 1)
    before = statistics(server, "churn-kill")["worker_restarts"]
    outcome: dict = {}

    def in_flight() -> None:
        try:
            outcome["answer"] = labels_of(server, "churn-kill", batch, timeout=30)
        except flight.FlightError as exc:
            outcome["error"] = exc

    with OtherModels(server, folder) as other:
        os.kill(pid, signal.SIGSTOP)
        request = threading.Thread(target=in_flight)
        request.start()
        time.sleep(0.5)  # sent, waiting for the stopped worker's answer
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        request.join(timeout=30)
        assert not request.is_alive()
        wait_until_served(server, "churn-kill", batch, want)
        recovered = time.monotonic()
        time.sleep(0.2)
    err = outcome.get("error")
    assert isinstance(err, flight.FlightUnavailableError), outcome
    assert ("model 'churn-kill': its worker process was killed by SIGKILL while running the request; it is being "
            "restarted") in str(err)
    (new_pid,) = wait_for_pids(server.process.pid, "churn-kill", 1)
    assert new_pid != pid and gone([pid], timeout=1)
    assert not other.errors, other.errors[:3]
    assert any(killed <= t <= recovered for t in other.ok), "the other model did not answer during the restart"
    after = statistics(server, "churn-kill")["worker_restarts"]
    assert after == before + 1
    assert restarts_metric(server, "churn-kill") == float(after)
    assert f"model churn-kill worker 0 (pid {pid}) was killed by SIGKILL; restarting it" in server.log()


def test_a_hung_sklearn_worker_is_replaced_and_does_not_block_the_other(server, oip, folder):
    """One of churn-hang's two workers stops answering (SIGSTOP): the request in it fails with
    DEADLINE_EXCEEDED at worker_timeout_s (3 s) and the worker is killed and replaced, while the
    other worker keeps answering; then a client's own deadline (OIP client_timeout) on a hung
    single-worker model is DEADLINE_EXCEEDED, and the model serves again."""
    batch, x = customers(12, seed=10)
    want = list(joblib.load(folder / "churn-sklearn" / "churn.joblib").predict(x))
    pids = wait_for_pids(server.process.pid, "churn-hang", 2)
    stopped = pids[0]
    os.kill(stopped, signal.SIGSTOP)
    outcome: dict = {"sent": 0}

    def until_one_hangs() -> None:
        # idle workers are taken in turn, so one of the first two requests lands in the stopped one
        try:
            for _ in range(2):
                outcome["sent"] += 1
                outcome["started"] = time.monotonic()
                assert labels_of(server, "churn-hang", batch, timeout=30) == want
        except flight.FlightError as exc:
            outcome["error"], outcome["at"] = exc, time.monotonic()

    with OtherModels(server, folder) as other:
        hung = threading.Thread(target=until_one_hangs)
        hung.start()
        deadline = time.monotonic() + 20
        # a request pending for 1 s is in the stopped worker (a 12-row request takes milliseconds)
        while "error" not in outcome and not (outcome.get("started") and time.monotonic() - outcome["started"] > 1.0):
            assert time.monotonic() < deadline and hung.is_alive(), outcome
            time.sleep(0.05)
        for _ in range(5):  # the other worker answers while one hangs
            assert labels_of(server, "churn-hang", batch, timeout=2.5) == want
        served = time.monotonic()
        hung.join(timeout=30)
        assert not hung.is_alive()
    err = outcome.get("error")
    assert isinstance(err, flight.FlightTimedOutError), outcome
    assert "model 'churn-hang' did not answer within its worker_timeout_s (3 s); the worker was replaced" in str(err)
    assert served < outcome["at"]
    assert gone([stopped], timeout=5)  # a stopped process is killed all the same
    assert stopped not in wait_for_pids(server.process.pid, "churn-hang", 2)
    assert not other.errors, other.errors[:3]
    wait_until_served(server, "churn-hang", batch, want)

    # the client's own deadline, shorter than worker_timeout_s
    (pid,) = wait_for_pids(server.process.pid, "churn-kill", 1)
    os.kill(pid, signal.SIGSTOP)
    ids = triton.InferInput("customer_id", [1], "BYTES")
    ids.set_data_from_numpy(np.array([b"c0"], dtype=object))
    inputs = [ids]
    for j, name in enumerate(build_model.FEATURES):
        inp = triton.InferInput(name, [1], "FP64")
        inp.set_data_from_numpy(np.ascontiguousarray(x[:1, j]))
        inputs.append(inp)
    start = time.monotonic()
    with pytest.raises(InferenceServerException) as info:
        oip.infer("churn-kill", inputs, client_timeout=1.0)
    assert str(info.value.status()) == "StatusCode.DEADLINE_EXCEEDED", info.value
    assert time.monotonic() - start < 2.5
    assert gone([pid], timeout=10)  # killed at worker_timeout_s
    wait_until_served(server, "churn-kill", batch, want)
    assert f"model churn-kill worker 0 (pid {pid}) ran longer than worker_timeout_s (3 s); restarting it" \
        in server.log()
