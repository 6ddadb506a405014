"""The quickstart example: configs/movielens-two-tower.toml serving iskander/demo/movielens_two_tower.onnx.

Trains a small seeded variant with the example's own training script, then serves the committed
model from the committed config and checks Flight and tritonclient answers against onnxruntime
run in this process on the same file.

Never import iskander._proto here (tritonclient defines the same protobuf symbols)."""

from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from helpers import exchange
from iskander.client.flight_status import error_details
from iskander.launch import spawn_server
from models import server_session
from iskander.contract.manifest import load_manifest

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "movielens-two-tower.toml"
SCRIPT = ROOT / "configs" / "movielens-two-tower" / "train_two_tower.py"
MODEL = ROOT / "iskander" / "demo" / "movielens_two_tower.onnx"
MANIFEST = ROOT / "iskander" / "demo" / "movielens_two_tower.manifest.toml"
NAME = "movielens-two-tower"
N_USERS, N_ITEMS, DIM = 943, 1682, 32
OUTPUTS = ("score", "user_embedding", "item_embedding")


def _load_script():
    spec = importlib.util.spec_from_file_location("movielens_train_two_tower", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def reference_session() -> ort.InferenceSession:
    """The committed model in this process, with the session options the config asks for."""
    return server_session(MODEL)


@pytest.fixture(scope="module")
def movielens_server(tmp_path_factory: pytest.TempPathFactory):
    running = spawn_server(CONFIG, tmp_path_factory.mktemp("movielens") / "server.log")
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture(scope="module")
def triton_client(movielens_server):
    client = triton.InferenceServerClient(movielens_server.grpc_url)
    yield client
    client.close()


def sample_ids(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, N_USERS, n).astype(np.int64)
    items = rng.integers(0, N_ITEMS, n).astype(np.int64)
    users[:2] = [0, N_USERS - 1]  # both ends of each range
    items[:2] = [N_ITEMS - 1, 0]
    return users, items


def reference(sess: ort.InferenceSession, users: np.ndarray, items: np.ndarray) -> dict[str, np.ndarray]:
    return dict(zip(OUTPUTS, sess.run(list(OUTPUTS), {"user_id": users, "item_id": items})))


def flight_exchange(server, batch: pa.RecordBatch) -> pa.RecordBatch:
    return exchange(server.flight_uri, NAME, [batch])[0]


def id_batch(users: np.ndarray, items: np.ndarray) -> pa.RecordBatch:
    return pa.record_batch({"user_id": pa.array(users, pa.int64()), "item_id": pa.array(items, pa.int64())})


def triton_inputs(users: np.ndarray, items: np.ndarray, shape: tuple[int, ...]) -> list:
    inputs = []
    for name, data in (("user_id", users), ("item_id", items)):
        data = np.ascontiguousarray(data.reshape(shape))
        t = triton.InferInput(name, list(data.shape), "INT64")
        t.set_data_from_numpy(data)
        inputs.append(t)
    return inputs


# --- training ---------------------------------------------------------------------------------------


def test_synthetic_data_has_movielens_100k_shape(script):
    data = script.generate_ratings(0)
    users, items, ratings = data["user_id"], data["item_id"], data["rating"]
    assert users.size == items.size == ratings.size == 100_000
    assert users.min() == 0 and users.max() == N_USERS - 1
    assert np.unique(items).size == N_ITEMS  # every item is rated at least once
    assert set(np.unique(ratings).tolist()) == {1.0, 2.0, 3.0, 4.0, 5.0}
    assert np.unique(users * N_ITEMS + items).size == users.size  # one rating per (user, item)
    per_user = np.bincount(users, minlength=N_USERS)
    assert per_user.min() >= 20
    per_item = np.bincount(items, minlength=N_ITEMS)
    assert per_item.max() > 15 * np.median(per_item) and per_item.min() < 10  # popularity is skewed
    again = script.generate_ratings(0)
    assert all(np.array_equal(data[k], again[k]) for k in ("user_id", "item_id", "rating"))


def test_small_training_run_learns_and_exports(script, tmp_path: Path):
    data = script.generate_ratings(5, n_users=300, n_items=500, n_ratings=30_000)
    weights, metrics = script.train(data, dim=16, epochs=8, seed=5, log=None)
    losses = metrics["train_loss"]
    assert len(losses) == 8
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert metrics["heldout_rmse"] < 0.9 * metrics["baseline_rmse"], metrics
    assert metrics["n_heldout"] == round(0.1 * data["rating"].size)
    assert metrics["n_train"] + metrics["n_heldout"] == data["rating"].size

    # Seeded: a second run gives the same weights.
    again, _ = script.train(data, dim=16, epochs=8, seed=5, log=None)
    assert all(np.array_equal(weights[k], again[k]) for k in weights)

    model_path, manifest_path = script.export(weights, tmp_path)
    manifest = load_manifest(manifest_path, "small")
    assert [(c.name, str(c.type)) for c in manifest.outputs] == [
        ("score", "float"),
        ("user_embedding", "fixed_size_list<item: float>[16]"),
        ("item_embedding", "fixed_size_list<item: float>[16]"),
    ]
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    held = metrics["heldout"]
    score = sess.run(["score"], {"user_id": held["user_id"], "item_id": held["item_id"]})[0]
    rmse = float(np.sqrt(np.mean((score.astype(np.float64) - held["rating"]) ** 2)))
    assert rmse == pytest.approx(metrics["heldout_rmse"], abs=1e-4)


# --- the committed artifacts ------------------------------------------------------------------------


def test_committed_model_and_manifest(script):
    model = onnx.load(str(MODEL))
    onnx.checker.check_model(model)
    assert model.ir_version == 9
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    inits = {t.name: tuple(t.dims) for t in model.graph.initializer}
    assert inits["user_table"] == (N_USERS, DIM) and inits["item_table"] == (N_ITEMS, DIM)
    assert [i.name for i in model.graph.input] == ["user_id", "item_id"]
    assert [o.name for o in model.graph.output] == list(OUTPUTS)
    assert MANIFEST.read_text() == script.manifest_text(DIM)
    config = tomllib.loads(CONFIG.read_text())
    assert config == {
        "models": [
            {
                "name": NAME,
                "backend": "onnx",
                "path": "../iskander/demo/movielens_two_tower.onnx",
                "execution_providers": ["cpu"],
                "intra_threads": 1,
                "inter_threads": 1,
                "optimization_level": "level3",
                "parallel_execution": False,
                "memory_pattern": True,
            }
        ]
    }


# --- serving ----------------------------------------------------------------------------------------


def test_flight_do_exchange_matches_onnxruntime(movielens_server, reference_session):
    users, items = sample_ids(257, seed=1)
    answer = flight_exchange(movielens_server, id_batch(users, items))
    assert answer.schema.names == list(OUTPUTS)
    assert answer.schema.field("score").type == pa.float32()
    assert answer.schema.field("user_embedding").type == pa.list_(pa.float32(), DIM)
    assert answer.schema.field("item_embedding").type == pa.list_(pa.float32(), DIM)
    want = reference(reference_session, users, items)
    np.testing.assert_array_equal(answer.column("score").to_numpy(), want["score"])
    for name in ("user_embedding", "item_embedding"):
        got = answer.column(name).values.to_numpy().reshape(-1, DIM)
        np.testing.assert_array_equal(got, want[name])
    # The scores are predicted ratings.
    assert 0.0 < want["score"].min() and want["score"].max() < 7.0


def test_flight_schema_carries_manifest_descriptions(movielens_server):
    client = flight.connect(movielens_server.flight_uri)
    try:
        schema = client.get_schema(flight.FlightDescriptor.for_path(NAME)).schema
    finally:
        client.close()
    assert schema.names == ["user_id", "item_id"]
    assert b"[0, 943)" in schema.field("user_id").metadata[b"description"]
    assert b"[0, 1682)" in schema.field("item_id").metadata[b"description"]


@pytest.mark.parametrize("shape", ["column", "flat"])
def test_tritonclient_matches_onnxruntime(triton_client, reference_session, shape):
    n = 64
    users, items = sample_ids(n, seed=2)
    dims = (n, 1) if shape == "column" else (n,)
    outputs = [triton.InferRequestedOutput(name) for name in OUTPUTS]
    result = triton_client.infer(NAME, triton_inputs(users, items, dims), outputs=outputs)
    want = reference(reference_session, users, items)
    score = result.as_numpy("score")
    assert score.dtype == np.float32 and score.shape == (n, 1)
    np.testing.assert_array_equal(score.reshape(n), want["score"])
    for name in ("user_embedding", "item_embedding"):
        got = result.as_numpy(name)
        assert got.shape == (n, DIM)
        np.testing.assert_array_equal(got, want[name])


def test_triton_metadata(triton_client):
    meta = triton_client.get_model_metadata(NAME, as_json=True)
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["inputs"]} == {
        "user_id": ("INT64", ["-1", "1"]),
        "item_id": ("INT64", ["-1", "1"]),
    }
    assert {t["name"]: (t["datatype"], t["shape"]) for t in meta["outputs"]} == {
        "score": ("FP32", ["-1", "1"]),
        "user_embedding": ("FP32", ["-1", str(DIM)]),
        "item_embedding": ("FP32", ["-1", str(DIM)]),
    }


# --- out-of-range ids -------------------------------------------------------------------------------


def test_reference_session_refuses_out_of_range_ids(reference_session):
    """In process: ids outside [0, n) fail (plain Gather would wrap -1 to the last row)."""
    for user, item, node, embedding in (
        (N_USERS, 0, "user_id_must_be_below_943", "user_embedding"),
        (-1, 0, "user_id_must_not_be_negative", "user_embedding"),
        (0, N_ITEMS, "item_id_must_be_below_1682", "item_embedding"),
        (0, -1, "item_id_must_not_be_negative", "item_embedding"),
    ):
        feeds = {"user_id": np.array([user], np.int64), "item_id": np.array([item], np.int64)}
        with pytest.raises(Exception, match=node):
            reference_session.run(["score"], feeds)
        # The check also guards the tower's embedding, not only the score.
        with pytest.raises(Exception, match=node):
            reference_session.run([embedding], feeds)


def test_out_of_range_user_id_over_flight_is_invalid_argument(movielens_server, reference_session):
    users, items = sample_ids(4, seed=3)
    users[2] = N_USERS  # one bad row fails the whole batch
    with pytest.raises(pa.ArrowException) as info:
        flight_exchange(movielens_server, id_batch(users, items))
    detail = error_details(info.value)
    assert detail["code"] == "INVALID_ARGUMENT"
    assert detail["model"] == NAME
    assert detail["message"].startswith(f"model '{NAME}' rejected the input: ")
    assert "user_id_must_be_below_943" in detail["message"]
    assert "idx=943" in detail["message"]
    assert str(info.value).startswith("[INVALID_ARGUMENT] ")

    # The server keeps serving, on the same frontend and the same model.
    assert movielens_server.process.poll() is None
    users[2] = N_USERS - 1
    answer = flight_exchange(movielens_server, id_batch(users, items))
    np.testing.assert_array_equal(answer.column("score").to_numpy(), reference(reference_session, users, items)["score"])


def test_out_of_range_ids_over_triton_are_invalid_argument(triton_client, movielens_server, reference_session):
    for user, node in ((-1, "user_id_must_not_be_negative"), (10_000, "user_id_must_be_below_943")):
        users = np.array([0, user], np.int64)
        items = np.array([0, 1], np.int64)
        with pytest.raises(InferenceServerException) as info:
            triton_client.infer(NAME, triton_inputs(users, items, (2, 1)))
        assert str(info.value.status()) == "StatusCode.INVALID_ARGUMENT"
        assert info.value.message().startswith(f"model '{NAME}' rejected the input: ")
        assert node in info.value.message()

    assert movielens_server.process.poll() is None
    users, items = sample_ids(8, seed=4)
    result = triton_client.infer(NAME, triton_inputs(users, items, (8, 1)))
    np.testing.assert_array_equal(
        result.as_numpy("score").reshape(8), reference(reference_session, users, items)["score"]
    )
    assert triton_client.is_model_ready(NAME)
