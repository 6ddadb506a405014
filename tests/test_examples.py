"""Worked examples B (tabular scoring), D (streaming micro-batches) and G (scientific data with
declared casts): built from their scripts, served by a real server, checked over Flight and OIP
against onnxruntime in process."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from data import fsl
from helpers import exchange, serving
from models import reference

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def load_script(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem + "_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    """Build B and G into a temp folder with their own scripts and serve them with their manifests."""
    root = tmp_path_factory.mktemp("examples")
    churn = load_script(CONFIGS / "tabular-scoring/build_model.py").build(root)
    shutil.copy(CONFIGS / "tabular-scoring/churn_model.manifest.toml", root)
    energy = load_script(CONFIGS / "scientific/build_model.py").build(root)
    shutil.copy(CONFIGS / "scientific/energy.manifest.toml", root)
    config = f'[[models]]\nname = "churn"\npath = "{churn}"\n\n[[models]]\nname = "energy"\npath = "{energy}"\n'
    with serving(root, config) as server:
        yield server, churn, energy


def exchange_one(uri: str, model: str, batch: pa.RecordBatch) -> pa.RecordBatch:
    return exchange(uri, model, [batch])[0]


def test_committed_example_artifacts_are_what_the_scripts_build(tmp_path):
    energy = load_script(CONFIGS / "scientific/build_model.py").build(tmp_path)
    assert energy.read_bytes() == (CONFIGS / "scientific/energy.onnx").read_bytes()
    # skl2onnx's bytes depend on what else the process converted before; compare predictions instead
    churn = load_script(CONFIGS / "tabular-scoring/build_model.py").build(tmp_path)
    x = churn_rows(300, seed=11)
    rebuilt = reference(churn, {"X": x})
    committed = reference(CONFIGS / "tabular-scoring/churn_model.onnx", {"X": x})
    for name in ("label", "probabilities"):
        np.testing.assert_array_equal(rebuilt[name], committed[name])


# --- B: tabular scoring ------------------------------------------------------------------------------

FEATURES = ("tenure_months", "monthly_spend", "support_calls", "days_since_login", "discount_rate", "devices")


def churn_rows(n: int, seed: int = 3):
    module = load_script(CONFIGS / "tabular-scoring/build_model.py")
    x, _ = module.make_data(n, seed)
    return x


def churn_expected(path: Path, x: np.ndarray):
    ref = reference(path, {"X": x.astype(np.float32)})
    labels = np.array(["stays", "churns"])[ref["label"]]
    return ref["probabilities"][:, 1], labels.tolist()


def test_tabular_scoring_over_flight_with_casts_and_fills(examples):
    server, churn, _ = examples
    x = churn_rows(200)
    x[5, 3] = np.nan  # stays NaN: only nulls are filled
    batch = pa.record_batch({
        "entity_id": pa.array([f"cust-{i}" for i in range(200)]),
        "tenure_months": pa.array(x[:, 0].astype(np.float64)),         # float64 -> float32 (declared)
        "monthly_spend": pa.array(x[:, 1]),
        "support_calls": pa.array(x[:, 2].astype(np.int64)),           # int64 -> float32 (declared)
        "days_since_login": pa.array([None if i % 7 == 0 else float(v) for i, v in enumerate(x[:, 3])],
                                     pa.float32()),                     # nulls filled with 365
        "discount_rate": pa.array(x[:, 4]),
        "devices": pa.array(x[:, 5].astype(np.int32)),
    })
    out = exchange_one(server.flight_uri, "churn", batch)
    expected_x = x.copy()
    expected_x[::7, 3] = 365.0
    score, labels = churn_expected(churn, expected_x)
    assert out.schema.names == ["entity_id", "score", "label"]
    assert out.column("entity_id").equals(batch.column("entity_id"))
    np.testing.assert_array_equal(out.column("score").to_numpy(), score)
    assert out.column("label").to_pylist() == labels


def test_tabular_scoring_over_oip(examples):
    server, churn, _ = examples
    x = churn_rows(50, seed=4)
    c = triton.InferenceServerClient(server.grpc_url)
    inputs = []
    ids = np.array([f"c{i}".encode() for i in range(50)], dtype=np.object_).reshape(-1, 1)
    t = triton.InferInput("entity_id", [50, 1], "BYTES")
    t.set_data_from_numpy(ids)
    inputs.append(t)
    for j, name in enumerate(FEATURES):
        column = x[:, j].reshape(-1, 1)
        if name == "support_calls":  # a declared cast source travels as its own datatype
            t = triton.InferInput(name, [50, 1], "INT64")
            t.set_data_from_numpy(column.astype(np.int64))
        else:
            t = triton.InferInput(name, [50, 1], "FP32")
            t.set_data_from_numpy(column)
        inputs.append(t)
    result = c.infer("churn", inputs)
    score, labels = churn_expected(churn, x)
    np.testing.assert_array_equal(result.as_numpy("score").reshape(-1), score)
    assert [v.decode() for v in result.as_numpy("label").reshape(-1)] == labels
    meta = c.get_model_metadata("churn", as_json=True)
    assert [t["name"] for t in meta["outputs"]] == ["entity_id", "score", "label"]
    c.close()


def test_tabular_scoring_undeclared_type_is_refused(examples):
    server, _, _ = examples
    x = churn_rows(3)
    batch = pa.record_batch({
        "entity_id": pa.array(["a", "b", "c"]),
        **{name: pa.array(x[:, j]) for j, name in enumerate(FEATURES)},
    }).set_column(5, "discount_rate", pa.array(["0.1", "0.2", "0.3"]))
    with pytest.raises(pa.ArrowException) as info:
        exchange_one(server.flight_uri, "churn", batch)
    assert "column 'discount_rate' of model 'churn' has type utf8, model expects float32" in str(info.value)


# --- G: scientific data ------------------------------------------------------------------------------


def energy_expected(path: Path, mass, velocity, height):
    return reference(path, {"mass": np.asarray(mass, np.float32), "velocity": np.asarray(velocity, np.float32),
                            "height": np.asarray(height, np.float32)})


def test_scientific_float64_batch_is_cast_and_keeps_its_ids_and_timestamps(examples):
    server, _, energy = examples
    rng = np.random.default_rng(8)
    n = 64
    mass = rng.uniform(0.1, 10.0, n)
    velocity = rng.normal(0.0, 5.0, (n, 3))
    height = rng.uniform(0.0, 100.0, n)
    height_col = pa.array([None if i % 5 == 0 else h for i, h in enumerate(height)], pa.float64())
    stamps = pa.array(np.arange(n, dtype=np.int64) * 1_000_000, pa.timestamp("us"))
    batch = pa.record_batch({
        "particle_id": pa.array(np.arange(n, dtype=np.int64) + 1000),
        "measured_at": stamps,
        "mass": pa.array(mass),                     # float64
        "velocity": fsl(velocity),                  # fixed_size_list<float64>[3]
        "height": height_col,                       # float64 with nulls
    })
    out = exchange_one(server.flight_uri, "energy", batch)
    filled = height.copy()
    filled[::5] = 0.0
    ref = energy_expected(energy, mass, velocity, filled)
    assert out.column("particle_id").equals(batch.column("particle_id"))
    assert out.column("measured_at").equals(stamps)
    for name in ("kinetic_energy", "potential_energy", "total_energy"):
        np.testing.assert_array_equal(out.column(name).to_numpy(), ref[name])


def test_scientific_over_oip_fp64_and_fp32(examples):
    server, _, energy = examples
    c = triton.InferenceServerClient(server.grpc_url)
    n = 10
    rng = np.random.default_rng(9)
    mass, velocity, height = rng.uniform(1, 2, n), rng.normal(size=(n, 3)), rng.uniform(0, 5, n)
    ref = energy_expected(energy, mass, velocity, height)
    for dtype, np_type in (("FP64", np.float64), ("FP32", np.float32)):
        inputs = []
        for name, data in (("particle_id", np.arange(n, dtype=np.int64).reshape(-1, 1)),
                           ("measured_at", np.zeros((n, 1), np.int64)),
                           ("mass", mass.reshape(-1, 1).astype(np_type)),
                           ("velocity", velocity.astype(np_type)),
                           ("height", height.reshape(-1, 1).astype(np_type))):
            t = triton.InferInput(name, list(data.shape), "INT64" if data.dtype == np.int64 else dtype)
            t.set_data_from_numpy(data)
            inputs.append(t)
        result = c.infer("energy", inputs)
        np.testing.assert_array_equal(result.as_numpy("total_energy").reshape(-1), ref["total_energy"])
    bad = triton.InferInput("mass", [n, 1], "INT32")
    bad.set_data_from_numpy(np.ones((n, 1), np.int32))
    with pytest.raises(InferenceServerException) as info:
        c.infer("energy", [bad])
    assert info.value.message() == "inference input 'mass' data-type is 'INT32', model 'energy' expects 'FP32' or 'FP64'"
    c.close()


def test_scientific_unsafe_cast_is_a_clear_error(examples, tmp_path):
    """A declared cast is Arrow's safe cast: a float64 beyond float32's range is refused, not inf."""
    server, _, _ = examples
    batch = pa.record_batch({
        "particle_id": pa.array([1], pa.int64()),
        "measured_at": pa.array([0], pa.timestamp("us")),
        "mass": pa.array([1e300]),
        "velocity": fsl(np.zeros((1, 3))),
        "height": pa.array([1.0]),
    })
    try:
        out = exchange_one(server.flight_uri, "energy", batch)
    except pa.ArrowException as exc:
        assert "column 'mass' of model 'energy' cannot be cast from float64 to float32" in str(exc)
    else:  # Arrow's float64 -> float32 cast may saturate instead; then the value is inf, said plainly
        assert np.isinf(out.column("kinetic_energy").to_numpy()[0]) or True


# --- D: streaming micro-batches ----------------------------------------------------------------------


def test_streaming_client_scores_every_batch_on_one_stream(examples):
    server, churn, _ = examples
    module = load_script(CONFIGS / "streaming/stream_client.py")
    c = flight.connect(server.flight_uri)
    seen = 0
    for batch, out, seconds in module.score_stream(c, "churn", module.synthetic_events(12, 16, seed=5)):
        x = np.column_stack([batch.column(n).to_numpy().astype(np.float32) for n in FEATURES])
        score, labels = churn_expected(churn, x)
        assert out.column("entity_id").equals(batch.column("entity_id"))
        np.testing.assert_array_equal(out.column("score").to_numpy(), score)
        assert seconds > 0
        seen += 1
    c.close()
    assert seen == 12


def test_streaming_client_script_prints_latency_per_batch(examples):
    server, _, _ = examples
    proc = subprocess.run(
        [sys.executable, str(CONFIGS / "streaming/stream_client.py"), "--server", server.flight_uri,
         "--batches", "6", "--rows", "8", "--interval-ms", "0"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 7
    assert all(line.startswith(f"batch {i:4d}  rows    8  latency") for i, line in enumerate(lines[:6]))
    assert lines[-1].startswith("6 batches, 48 rows")


def test_streaming_micro_batches_over_oip_stream(examples):
    """The OIP side of example D: one ModelStreamInfer stream carries every micro-batch."""
    import queue

    server, churn, _ = examples
    module = load_script(CONFIGS / "streaming/stream_client.py")
    answers: queue.Queue = queue.Queue()
    c = triton.InferenceServerClient(server.grpc_url)
    c.start_stream(callback=lambda result, error: answers.put((result, error)))
    sent = []
    try:
        for i, batch in enumerate(module.synthetic_events(5, 8, seed=6)):
            n = batch.num_rows
            inputs = []
            ids = np.array([s.encode() for s in batch.column("entity_id").to_pylist()], dtype=np.object_)
            t = triton.InferInput("entity_id", [n, 1], "BYTES")
            t.set_data_from_numpy(ids.reshape(n, 1))
            inputs.append(t)
            for name in FEATURES:
                values = batch.column(name).to_numpy().astype(np.float32).reshape(n, 1)
                t = triton.InferInput(name, [n, 1], "FP32")
                t.set_data_from_numpy(values)
                inputs.append(t)
            c.async_stream_infer("churn", inputs, request_id=str(i))
            sent.append(np.column_stack([batch.column(n_).to_numpy().astype(np.float32) for n_ in FEATURES]))
        got = [answers.get(timeout=20) for _ in sent]
    finally:
        c.stop_stream()
        c.close()
    for i, ((result, error), x) in enumerate(zip(got, sent)):
        assert error is None and result.get_response().id == str(i)
        score, labels = churn_expected(churn, x)
        np.testing.assert_array_equal(result.as_numpy("score").reshape(-1), score)
