"""Worked example A (configs/embeddings): raw text in, embeddings out, tokenisation inside the model.

The model is rebuilt into tmp_path with the example's own build script, served by a real server
process, and driven over Arrow Flight and the Triton gRPC API. Answers are compared with
onnxruntime run in this process on the same file, and with a plain numpy reading of what the
graph is meant to compute.

Never import iskander._proto here (tritonclient defines the same protobuf symbols)."""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow as pa
import pytest
import tritonclient.grpc as triton

from helpers import exchange, serving
from models import server_session
from iskander.launch import ServerProcess

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "embeddings"
MODEL = "text-embedder"
DIM = 32


def _load_build_script():
    spec = importlib.util.spec_from_file_location("embeddings_build_model", EXAMPLE / "build_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_model = _load_build_script()

LONG_TEXT = " ".join(["the", "Cat", "and", "the", "DOG", "zzzunknown", "run", "to", "the", "River"] * 200)
TEXTS = [
    "The Cat sat by the River",  # mixed case, all in the vocabulary
    "the cat sat by the river",
    "THE CAT SAT BY THE RIVER",
    "zyzzyva quux blorft",  # only unknown words -> the [UNK] vector
    "",  # no tokens -> all zeros
    "   ",  # only spaces -> no tokens either
    "good  music   and   good food",  # runs of spaces are one separator
    "cat",
    "machine learning model server data network",
    LONG_TEXT,  # 2000 tokens: every other row is padded to this length
]
IDS = [f"doc-{i}" for i in range(len(TEXTS))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("embeddings")
    path = build_model.build(out)
    assert path == out / "text_embedder.onnx"
    shutil.copy(EXAMPLE / "text_embedder.manifest.toml", out)
    return out


@pytest.fixture(scope="module")
def embed_server(model_dir: Path) -> Iterator[ServerProcess]:
    with serving(model_dir, f'[[models]]\nname = "{MODEL}"\npath = "text_embedder.onnx"\n') as running:
        yield running


@pytest.fixture(scope="module")
def session(model_dir: Path) -> ort.InferenceSession:
    return server_session(model_dir / "text_embedder.onnx")


def reference(session: ort.InferenceSession, texts: list[str]) -> np.ndarray:
    (out,) = session.run(["embedding"], {"text": np.array(texts, dtype=np.object_)})
    return out


def numpy_embed(texts: list[str]) -> np.ndarray:
    """What the graph is meant to compute, written out in numpy."""
    vocab = {w: i + 1 for i, w in enumerate(build_model.vocabulary())}
    table = build_model.embedding_table(len(vocab))
    ascii_lower = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")  # locale "C"
    out = np.zeros((len(texts), DIM), dtype=np.float64)
    for row, text in enumerate(texts):
        tokens = [t for t in text.translate(ascii_lower).split(" ") if t]
        if tokens:
            mean = table[[vocab.get(t, build_model.UNK_ID) for t in tokens]].astype(np.float64).mean(axis=0)
            out[row] = mean / np.linalg.norm(mean)
    return out


def flight_embed(server: ServerProcess, batch: pa.RecordBatch) -> pa.RecordBatch:
    return exchange(server.flight_uri, MODEL, [batch])[0]


def triton_embed(server: ServerProcess, ids: list[str], texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    client = triton.InferenceServerClient(server.grpc_url)
    try:
        inputs = []
        for name, values in (("id", ids), ("text", texts)):
            data = np.array([v.encode() for v in values], dtype=np.object_).reshape(-1, 1)
            tensor = triton.InferInput(name, list(data.shape), "BYTES")
            tensor.set_data_from_numpy(data)
            inputs.append(tensor)
        outputs = [triton.InferRequestedOutput("id"), triton.InferRequestedOutput("embedding")]
        result = client.infer(MODEL, inputs, outputs=outputs)
        return result.as_numpy("id"), result.as_numpy("embedding")
    finally:
        client.close()


def embeddings_of(batch: pa.RecordBatch) -> np.ndarray:
    return batch.column("embedding").flatten().to_numpy().reshape(batch.num_rows, DIM)


# --- the model itself ---------------------------------------------------------------------------------


def test_built_model_matches_committed_artifact(model_dir: Path):
    # The build is deterministic, so the committed file is exactly what the script makes.
    built = (model_dir / "text_embedder.onnx").read_bytes()
    assert built == (EXAMPLE / "text_embedder.onnx").read_bytes()


def test_model_computes_masked_mean_of_token_vectors(session):
    got = reference(session, TEXTS)
    assert got.shape == (len(TEXTS), DIM) and got.dtype == np.float32
    # float32 sums in ORT vs float64 here: equal to well within 1e-5 for unit vectors
    np.testing.assert_allclose(got, numpy_embed(TEXTS), rtol=0, atol=1e-5)
    norms = np.linalg.norm(got, axis=1)
    empty = [i for i, t in enumerate(TEXTS) if not t.strip()]
    assert not got[empty].any()  # no tokens: zeros, not NaN
    np.testing.assert_allclose(np.delete(norms, empty), 1.0, atol=1e-6)


def test_padding_does_not_count(session):
    # "cat" is padded to 2000 tokens when it shares a batch with LONG_TEXT; the padding is masked.
    alone = reference(session, ["cat"])[0]
    batched = reference(session, TEXTS)[TEXTS.index("cat")]
    np.testing.assert_array_equal(alone, batched)


# --- through the server -------------------------------------------------------------------------------


def test_server_logs_the_contract(embed_server: ServerProcess):
    assert (
        f"model {MODEL} version 1 ready (manifest) inputs [id: utf8, text: utf8] -> "
        f"outputs [id: utf8, embedding: fixed_size_list<float32>[{DIM}]]"
    ) in embed_server.log()


def test_flight_exchange_matches_onnxruntime(embed_server: ServerProcess, session):
    batch = pa.RecordBatch.from_pydict({"id": IDS, "text": TEXTS})
    out = flight_embed(embed_server, batch)
    assert out.schema.names == ["id", "embedding"]
    assert out.schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    assert out.column("id").equals(batch.column("id"))
    np.testing.assert_array_equal(embeddings_of(out), reference(session, TEXTS))


def test_flight_passthrough_ids_keep_nulls(embed_server: ServerProcess, session):
    batch = pa.RecordBatch.from_pydict({"id": [None, "b"], "text": ["Cat", "dog"]})
    out = flight_embed(embed_server, batch)
    assert out.column("id").to_pylist() == [None, "b"]
    np.testing.assert_array_equal(embeddings_of(out), reference(session, ["Cat", "dog"]))


def test_triton_bytes_inputs_match_onnxruntime_and_flight(embed_server: ServerProcess, session):
    ids, emb = triton_embed(embed_server, IDS, TEXTS)
    assert ids.reshape(-1).tolist() == [i.encode() for i in IDS]
    assert emb.dtype == np.float32 and emb.shape == (len(TEXTS), DIM)
    np.testing.assert_array_equal(emb, reference(session, TEXTS))
    flight_out = flight_embed(embed_server, pa.RecordBatch.from_pydict({"id": IDS, "text": TEXTS}))
    np.testing.assert_array_equal(emb, embeddings_of(flight_out))


def test_case_does_not_change_the_embedding(embed_server: ServerProcess):
    variants = ["The Cat sat by the River", "the cat sat by the river", "THE CAT SAT BY THE RIVER", "tHe CaT sAt By ThE rIvEr"]
    out = embeddings_of(flight_embed(embed_server, pa.RecordBatch.from_pydict({"id": list("abcd"), "text": variants})))
    for row in out[1:]:
        np.testing.assert_array_equal(row, out[0])
    _, tri = triton_embed(embed_server, list("abcd"), variants)
    np.testing.assert_array_equal(tri, out)
    # and the vectors carry meaning: a different sentence points elsewhere
    other = embeddings_of(flight_embed(embed_server, pa.RecordBatch.from_pydict({"id": ["x"], "text": ["machine learning server"]})))
    assert float(out[0] @ other[0]) < 0.9
