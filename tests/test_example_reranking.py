"""Worked example C (configs/reranking): score candidate items per user, rank them per user.

Struct feature columns in both mapping styles: ``user_features`` is concatenated into one ONNX
input, ``item_features`` feeds one ONNX input per field (``field_tensors``). The model is rebuilt
into tmp_path with the example's own build script, served by a real server process, and driven
over Arrow Flight and the Triton gRPC API. Scores are compared with onnxruntime run in this
process on tensors built here by hand; ranks with a per-user sort done here in numpy.

Never import iskander._proto here (tritonclient defines the same protobuf symbols)."""

from __future__ import annotations

import importlib.util
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from helpers import exchange, serving
from models import server_session
from iskander.client.flight_status import error_details
from iskander.launch import ServerProcess, spawn_server

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "reranking"
MODEL = "reranker"
USER_TYPE = pa.struct([("age", pa.float32()), ("tenure_days", pa.float32()),
                       ("activity", pa.list_(pa.float32(), 4))])
ITEM_TYPE = pa.struct([("price", pa.float32()), ("popularity", pa.float32()),
                       ("category_embedding", pa.list_(pa.float32(), 4))])


def _load_build_script():
    spec = importlib.util.spec_from_file_location("reranking_build_model", EXAMPLE / "build_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_model = _load_build_script()


# --- request rows -------------------------------------------------------------------------------------


class Rows:
    """Candidate rows as plain numpy arrays, one entry per row.

    ``users``: id -> (age, tenure_days, activity[4]); ``items``: id -> (price, popularity,
    category_embedding[4]); ``pairs``: (user id, item id) per row."""

    def __init__(self, users: dict, items: dict, pairs: list[tuple[str, str]]) -> None:
        self.user_id = [u for u, _ in pairs]
        self.item_id = [i for _, i in pairs]
        self.age = np.array([users[u][0] for u, _ in pairs], np.float32)
        self.tenure_days = np.array([users[u][1] for u, _ in pairs], np.float32)
        self.activity = np.array([users[u][2] for u, _ in pairs], np.float32).reshape(-1, 4)
        self.price = np.array([items[i][0] for _, i in pairs], np.float32)
        self.popularity = np.array([items[i][1] for _, i in pairs], np.float32)
        self.category = np.array([items[i][2] for _, i in pairs], np.float32).reshape(-1, 4)

    def __len__(self) -> int:
        return len(self.user_id)

    def feeds(self) -> dict[str, np.ndarray]:
        """The ONNX feeds the manifest describes, built by hand: user struct concatenated in field
        order into user_x [N, 6]; item struct one input per field ([N, 1] scalars, [N, 4] list)."""
        n = len(self)
        return {
            "user_x": np.column_stack([self.age, self.tenure_days, self.activity]),
            "item_price": self.price.reshape(n, 1),
            "item_popularity": self.popularity.reshape(n, 1),
            "item_category": self.category,
        }

    def batch(self) -> pa.RecordBatch:
        def fsl(values: np.ndarray) -> pa.Array:
            return pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), values.shape[1])

        user = pa.StructArray.from_arrays([pa.array(self.age), pa.array(self.tenure_days), fsl(self.activity)],
                                          fields=list(USER_TYPE))
        item = pa.StructArray.from_arrays([pa.array(self.price), pa.array(self.popularity), fsl(self.category)],
                                          fields=list(ITEM_TYPE))
        return pa.RecordBatch.from_arrays(
            [pa.array(self.user_id), pa.array(self.item_id), user, item],
            names=["user_id", "item_id", "user_features", "item_features"],
        )

    def triton_tensors(self) -> dict[str, np.ndarray]:
        n = len(self)
        return {
            "user_id": np.array([u.encode() for u in self.user_id], dtype=np.object_).reshape(n, 1),
            "item_id": np.array([i.encode() for i in self.item_id], dtype=np.object_).reshape(n, 1),
            "user_features.age": self.age.reshape(n, 1),
            "user_features.tenure_days": self.tenure_days.reshape(n, 1),
            "user_features.activity": self.activity,
            "item_features.price": self.price.reshape(n, 1),
            "item_features.popularity": self.popularity.reshape(n, 1),
            "item_features.category_embedding": self.category,
        }


USERS = {
    "alice": (24.0, 30.0, [0.7, 0.1, 0.1, 0.1]),
    "bob": (58.0, 1500.0, [0.0, 0.1, 0.1, 0.8]),
    "carol": (35.0, 400.0, [0.1, 0.7, 0.1, 0.1]),
    "dave": (41.0, 90.0, [0.25, 0.25, 0.25, 0.25]),
}


def sample_rows(seed: int = 5) -> tuple[Rows, tuple[int, int]]:
    """Six random candidates each for alice, bob and carol, one for dave, users interleaved (the
    rank groups are not contiguous), plus one of alice's rows repeated at the end: a tie. Returns
    the rows and the two row numbers of the tie."""
    rng = np.random.default_rng(seed)
    items = {
        f"item-{j}": (rng.uniform(1, 500), rng.uniform(0, 1), np.eye(4)[j % 4] * rng.uniform(0.5, 1.5))
        for j in range(12)
    }
    pairs = [(u, f"item-{j}") for u in ("alice", "bob", "carol") for j in rng.choice(12, 6, replace=False)]
    pairs.append(("dave", "item-0"))
    pairs = [pairs[i] for i in rng.permutation(len(pairs))]
    first = next(i for i, (u, _) in enumerate(pairs) if u == "alice")
    pairs.append(pairs[first])
    return Rows(USERS, items, pairs), (first, len(pairs) - 1)


def expected_ranks(user_ids: list[str], scores: np.ndarray) -> list[int]:
    """1 = highest score among the rows of the same user; equal scores keep row order."""
    ranks = [0] * len(user_ids)
    for user in set(user_ids):
        rows = [i for i, u in enumerate(user_ids) if u == user]
        for rank, i in enumerate(sorted(rows, key=lambda i: (-float(scores[i]), i)), start=1):
            ranks[i] = rank
    return ranks


# --- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("reranking")
    path = build_model.build(out)
    assert path == out / "reranker.onnx"
    shutil.copy(EXAMPLE / "reranker.manifest.toml", out)
    return out


@pytest.fixture(scope="module")
def rerank_server(model_dir: Path) -> Iterator[ServerProcess]:
    with serving(model_dir, f'[[models]]\nname = "{MODEL}"\npath = "reranker.onnx"\n') as running:
        yield running


@pytest.fixture(scope="module")
def session(model_dir: Path) -> ort.InferenceSession:
    return server_session(model_dir / "reranker.onnx")


@pytest.fixture(scope="module")
def sample() -> tuple[Rows, tuple[int, int]]:
    return sample_rows()


@pytest.fixture(scope="module")
def rows(sample) -> Rows:
    return sample[0]


def reference(session: ort.InferenceSession, rows: Rows) -> np.ndarray:
    (scores,) = session.run(["relevance_score"], rows.feeds())
    return scores


def flight_exchange(server: ServerProcess, batch: pa.RecordBatch) -> pa.RecordBatch:
    return exchange(server.flight_uri, MODEL, [batch])[0]


def triton_infer(server: ServerProcess, tensors: dict[str, np.ndarray], outputs: list[str] | None = None):
    client = triton.InferenceServerClient(server.grpc_url)
    try:
        inputs = []
        for name, data in tensors.items():
            tensor = triton.InferInput(name, list(data.shape), "BYTES" if data.dtype == np.object_ else "FP32")
            tensor.set_data_from_numpy(data)
            inputs.append(tensor)
        requested = [triton.InferRequestedOutput(o) for o in outputs] if outputs else None
        return client.infer(MODEL, inputs, outputs=requested)
    finally:
        client.close()


# --- the model itself ---------------------------------------------------------------------------------


def test_built_model_matches_committed_artifact(model_dir: Path):
    assert (model_dir / "reranker.onnx").read_bytes() == (EXAMPLE / "reranker.onnx").read_bytes()


def test_model_is_affinity_plus_dense_towers(session, rows: Rows):
    """What the graph is meant to compute, written out in numpy (float64)."""
    w = {k: v.astype(np.float64) for k, v in build_model.weights().items()}
    f = {k: v.astype(np.float64) for k, v in rows.feeds().items()}
    user_dense = np.tanh((f["user_x"] - build_model.USER_MEAN) / build_model.USER_SCALE @ w["user_w"] + w["user_b"])
    item_x = np.column_stack([np.log1p(f["item_price"]), f["item_popularity"], f["item_category"]])
    item_dense = np.tanh((item_x - build_model.ITEM_MEAN) / build_model.ITEM_SCALE @ w["item_w"] + w["item_b"])
    want = build_model.AFFINITY * (f["user_x"][:, 2:] * f["item_category"]).sum(axis=1) \
        + (user_dense * item_dense).sum(axis=1)
    np.testing.assert_allclose(reference(session, rows), want, rtol=0, atol=1e-5)


# --- through the server -------------------------------------------------------------------------------


def test_server_logs_the_contract(rerank_server: ServerProcess):
    assert (
        f"model {MODEL} version 1 ready (manifest) inputs [user_id: utf8, item_id: utf8, "
        f"user_features: struct<age: float32, tenure_days: float32, activity: fixed_size_list<float32>[4]>, "
        f"item_features: struct<price: float32, popularity: float32, category_embedding: fixed_size_list<float32>[4]>] "
        f"-> outputs [user_id: utf8, item_id: utf8, relevance_score: float32, rank: int32]"
    ) in rerank_server.log()


def test_flight_scores_and_per_user_ranks(rerank_server: ServerProcess, session, sample):
    rows, (first, second) = sample
    batch = rows.batch()
    out = flight_exchange(rerank_server, batch)
    assert out.schema.names == ["user_id", "item_id", "relevance_score", "rank"]
    assert out.schema.field("relevance_score").type == pa.float32()
    assert out.schema.field("rank").type == pa.int32()
    assert out.column("user_id").equals(batch.column("user_id"))
    assert out.column("item_id").equals(batch.column("item_id"))
    scores = reference(session, rows)
    np.testing.assert_array_equal(out.column("relevance_score").to_numpy(), scores)
    ranks = out.column("rank").to_pylist()
    assert ranks == expected_ranks(rows.user_id, scores)
    # every user's ranks are 1..k; dave has a single candidate
    for user in set(rows.user_id):
        got = sorted(r for r, u in zip(ranks, rows.user_id) if u == user)
        assert got == list(range(1, len(got) + 1))
    assert ranks[rows.user_id.index("dave")] == 1
    # the repeated candidate: equal scores, the earlier row gets the better rank
    assert scores[first] == scores[second]
    assert ranks[second] == ranks[first] + 1


def test_flight_rank_follows_the_category_affinity(rerank_server: ServerProcess):
    """The model's explicit part: a user active in one category ranks that category's item first."""
    items = {
        "book": (12.0, 0.9, [1, 0, 0, 0]),
        "lamp": (45.0, 0.5, [0, 1, 0, 0]),
        "sofa": (900.0, 0.2, [0, 0, 0, 1]),
    }
    rows = Rows(USERS, items, [("bob", "book"), ("bob", "lamp"), ("bob", "sofa")])
    out = flight_exchange(rerank_server, rows.batch())
    assert out.column("rank").to_pylist() == [2, 3, 1]  # the sofa (category 3, bob's 0.8) first


def test_triton_matches_onnxruntime_and_flight(rerank_server: ServerProcess, session, rows: Rows):
    result = triton_infer(rerank_server, rows.triton_tensors())
    scores = result.as_numpy("relevance_score")
    ranks = result.as_numpy("rank")
    assert scores.dtype == np.float32 and scores.shape == (len(rows), 1)
    assert ranks.dtype == np.int32 and ranks.shape == (len(rows), 1)
    assert result.as_numpy("user_id").reshape(-1).tolist() == [u.encode() for u in rows.user_id]
    assert result.as_numpy("item_id").reshape(-1).tolist() == [i.encode() for i in rows.item_id]
    np.testing.assert_array_equal(scores.reshape(-1), reference(session, rows))
    assert ranks.reshape(-1).tolist() == expected_ranks(rows.user_id, reference(session, rows))
    flight_out = flight_exchange(rerank_server, rows.batch())
    np.testing.assert_array_equal(scores.reshape(-1), flight_out.column("relevance_score").to_numpy())
    # asking for rank alone still computes the scores it ranks
    only = triton_infer(rerank_server, rows.triton_tensors(), outputs=["rank"])
    assert [o["name"] for o in only.get_response(as_json=True)["outputs"]] == ["rank"]
    np.testing.assert_array_equal(only.as_numpy("rank"), ranks)


def test_triton_struct_fields_are_separate_tensors(rerank_server: ServerProcess):
    client = triton.InferenceServerClient(rerank_server.grpc_url)
    try:
        meta = client.get_model_metadata(MODEL)
    finally:
        client.close()
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("user_id", "BYTES", [-1, 1]),
        ("item_id", "BYTES", [-1, 1]),
        ("user_features.age", "FP32", [-1, 1]),
        ("user_features.tenure_days", "FP32", [-1, 1]),
        ("user_features.activity", "FP32", [-1, 4]),
        ("item_features.price", "FP32", [-1, 1]),
        ("item_features.popularity", "FP32", [-1, 1]),
        ("item_features.category_embedding", "FP32", [-1, 4]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("user_id", "BYTES", [-1, 1]),
        ("item_id", "BYTES", [-1, 1]),
        ("relevance_score", "FP32", [-1, 1]),
        ("rank", "INT32", [-1, 1]),
    ]


def test_ranks_stay_per_request_when_dynamic_batching_merges_requests(model_dir: Path, session, rows: Rows):
    """With dynamic batching two requests (one per protocol) run as one onnxruntime call, but each
    answer is ranked on its own rows: the same user in the other request does not count."""
    config = model_dir / "batched.toml"
    # run when exactly 20 rows are queued: the two 10-row requests below, whatever their timing
    config.write_text(
        f'[[models]]\nname = "{MODEL}"\npath = "reranker.onnx"\n'
        "dynamic_batching = { max_queue_delay_us = 30000000, preferred_batch_rows = [20] }\n"
    )
    first, second = rows.batch().slice(0, 10), rows.batch().slice(10, 10)
    assert set(first.column("user_id").to_pylist()) & set(second.column("user_id").to_pylist())
    server = spawn_server(config, model_dir / "batched.log")
    try:
        answers: dict[str, object] = {}

        def over_flight() -> None:
            answers["flight"] = flight_exchange(server, first)

        thread = threading.Thread(target=over_flight)
        thread.start()
        tensors = {name: data[10:20] for name, data in rows.triton_tensors().items()}
        answers["triton"] = triton_infer(server, tensors)
        thread.join(timeout=60)
        client = triton.InferenceServerClient(server.grpc_url)
        try:
            stats = client.get_inference_statistics(MODEL, as_json=True)["model_stats"][0]
        finally:
            client.close()
    finally:
        server.stop()
    assert (int(stats["inference_count"]), int(stats["execution_count"])) == (20, 1)
    scores = reference(session, rows)
    flight_out = answers["flight"]
    assert flight_out.column("rank").to_pylist() == expected_ranks(rows.user_id[:10], scores[:10])
    triton_ranks = answers["triton"].as_numpy("rank").reshape(-1).tolist()
    assert triton_ranks == expected_ranks(rows.user_id[10:20], scores[10:20])
    np.testing.assert_allclose(flight_out.column("relevance_score").to_numpy(), scores[:10], rtol=1e-6)


# --- errors -------------------------------------------------------------------------------------------


def test_flight_struct_missing_a_field_is_invalid_argument(rerank_server: ServerProcess, rows: Rows):
    batch = rows.batch()
    item = batch.column("item_features")
    short = pa.StructArray.from_arrays([item.field("price"), item.field("category_embedding")],
                                       names=["price", "category_embedding"])
    bad = batch.set_column(3, "item_features", short)
    with pytest.raises(pa.ArrowException) as exc:
        flight_exchange(rerank_server, bad)
    info = error_details(exc.value)
    assert info["code"] == "INVALID_ARGUMENT" and info["column"] == "item_features"
    assert info["message"] == (
        "column 'item_features' of model 'reranker' has type "
        "struct<price: float32, category_embedding: fixed_size_list<float32>[4]>, model expects "
        "struct<price: float32, popularity: float32, category_embedding: fixed_size_list<float32>[4]>"
    )
    assert "[INVALID_ARGUMENT]" in str(exc.value)


def test_triton_missing_field_tensor_is_invalid_argument(rerank_server: ServerProcess, rows: Rows):
    tensors = rows.triton_tensors()
    del tensors["item_features.popularity"]
    with pytest.raises(InferenceServerException) as exc:
        triton_infer(rerank_server, tensors)
    assert str(exc.value.status()) == "StatusCode.INVALID_ARGUMENT"
    assert exc.value.message() == (
        "expected 8 inputs but got 7 inputs for model 'reranker'; missing input 'item_features.popularity'"
    )


def test_flight_empty_batch_gets_an_empty_answer(rerank_server: ServerProcess, rows: Rows):
    # a user with no candidates: zero rows in, zero rows out (the concatenated user_x is [0, 6])
    out = flight_exchange(rerank_server, rows.batch().slice(0, 0))
    assert out.num_rows == 0
    assert out.schema.names == ["user_id", "item_id", "relevance_score", "rank"]
