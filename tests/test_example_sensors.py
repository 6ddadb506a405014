"""Worked example F (configs/sensor-windows): anomaly scores for windows of sensor readings.

The request column is a ``fixed_shape_tensor<float32>[64, 3]`` (Arrow's canonical tensor extension
type); over OIP it is an FP32 tensor [N, 64, 3]. The model is rebuilt into tmp_path with the
example's own build script, served by a real server process, and driven over Arrow Flight and the
Triton gRPC API. Answers are compared with onnxruntime run in this process on the same file, and
with a plain numpy reading of what the graph is meant to compute.

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
from tritonclient.utils import InferenceServerException

from helpers import exchange, serving
from models import server_session
from iskander.client.flight_status import error_details
from iskander.launch import ServerProcess

EXAMPLE = Path(__file__).resolve().parent.parent / "configs" / "sensor-windows"
MODEL = "sensor-anomaly"
STEPS, CHANNELS = 64, 3
WINDOW_TYPE = pa.fixed_shape_tensor(pa.float32(), [STEPS, CHANNELS])
OUTPUTS = ["anomaly_score", "is_anomaly", "channel_scores", "deviation"]


def _load_build_script():
    spec = importlib.util.spec_from_file_location("sensor_windows_build_model", EXAMPLE / "build_model.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build_model = _load_build_script()


def sample_windows(seed: int = 11) -> tuple[list[str], np.ndarray]:
    """Device ids and windows [N, 64, 3] (g): three devices at rest, then three anomalies."""
    rng = np.random.default_rng(seed)
    rest = np.array([0.0, 0.0, 1.0])
    t = np.arange(STEPS) / 100.0  # 100 Hz

    def noise() -> np.ndarray:
        return rng.normal(0.0, 0.02, (STEPS, CHANNELS))

    windows = {
        "rest-1": rest + noise(),
        "rest-2": rest + noise(),
        "rest-3": rest + noise(),
        "vibration": rest + noise() + np.outer(np.sin(2 * np.pi * 25 * t), [0.0, 0.0, 0.12]),
        "tilt": np.array([0.0, 0.17, 0.985]) + noise(),
        "spike": rest + noise() + np.outer(np.arange(STEPS) == 40, [0.3, 0.0, 0.0]),
    }
    return list(windows), np.stack(list(windows.values())).astype(np.float32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("sensor-windows")
    path = build_model.build(out)
    assert path == out / "sensor_anomaly.onnx"
    shutil.copy(EXAMPLE / "sensor_anomaly.manifest.toml", out)
    return out


@pytest.fixture(scope="module")
def sensor_server(model_dir: Path) -> Iterator[ServerProcess]:
    with serving(model_dir, f'[[models]]\nname = "{MODEL}"\npath = "sensor_anomaly.onnx"\n') as running:
        yield running


@pytest.fixture(scope="module")
def session(model_dir: Path) -> ort.InferenceSession:
    return server_session(model_dir / "sensor_anomaly.onnx")


def reference(session: ort.InferenceSession, windows: np.ndarray) -> dict[str, np.ndarray]:
    return dict(zip(OUTPUTS, session.run(OUTPUTS, {"window": windows})))


def flight_exchange(server: ServerProcess, batch: pa.RecordBatch) -> pa.RecordBatch:
    return exchange(server.flight_uri, MODEL, [batch])[0]


def triton_infer(server: ServerProcess, ids: list[str], windows: np.ndarray, outputs: list[str] | None = None):
    client = triton.InferenceServerClient(server.grpc_url)
    try:
        id_data = np.array([i.encode() for i in ids], dtype=np.object_).reshape(-1, 1)
        inputs = [triton.InferInput("device_id", list(id_data.shape), "BYTES"),
                  triton.InferInput("window", list(windows.shape), "FP32")]
        inputs[0].set_data_from_numpy(id_data)
        inputs[1].set_data_from_numpy(windows)
        requested = [triton.InferRequestedOutput(o) for o in outputs] if outputs else None
        return client.infer(MODEL, inputs, outputs=requested)
    finally:
        client.close()


def window_batch(ids: list[str], windows: np.ndarray) -> pa.RecordBatch:
    return pa.RecordBatch.from_pydict({
        "device_id": ids, "window": pa.FixedShapeTensorArray.from_numpy_ndarray(windows),
    })


# --- the model itself ---------------------------------------------------------------------------------


def test_built_model_matches_committed_artifact(model_dir: Path):
    assert (model_dir / "sensor_anomaly.onnx").read_bytes() == (EXAMPLE / "sensor_anomaly.onnx").read_bytes()


def test_model_is_mean_squared_z_score(session):
    _, windows = sample_windows()
    got = reference(session, windows)
    z = (windows.astype(np.float64) - build_model.BASELINE_MEAN) / build_model.BASELINE_STD
    np.testing.assert_allclose(got["deviation"], z, rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(got["channel_scores"], (z**2).mean(axis=1), rtol=1e-5)
    np.testing.assert_allclose(got["anomaly_score"], (z**2).mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_array_equal(got["is_anomaly"], (got["anomaly_score"] > build_model.THRESHOLD).astype(np.int64))


# --- through the server -------------------------------------------------------------------------------


def test_server_logs_the_contract(sensor_server: ServerProcess):
    assert (
        f"model {MODEL} version 1 ready (manifest) inputs [device_id: utf8, "
        f"window: fixed_shape_tensor<float32>[64, 3]] -> outputs [device_id: utf8, anomaly_score: float32, is_anomaly: utf8, channel_scores: "
        f"fixed_size_list<float32>[3], deviation: fixed_shape_tensor<float32>[64, 3]]"
    ) in sensor_server.log()


def test_flight_types_and_values_match_onnxruntime(sensor_server: ServerProcess, session):
    ids, windows = sample_windows()
    out = flight_exchange(sensor_server, window_batch(ids, windows))
    # the answer's types: fixed-width buffers a client reads as numpy views, no per-row lists
    assert [(f.name, f.type) for f in out.schema] == [
        ("device_id", pa.utf8()),
        ("anomaly_score", pa.float32()),
        ("is_anomaly", pa.utf8()),
        ("channel_scores", pa.list_(pa.float32(), CHANNELS)),
        ("deviation", WINDOW_TYPE),
    ]
    assert out.column("device_id").to_pylist() == ids
    ref = reference(session, windows)
    np.testing.assert_array_equal(out.column("anomaly_score").to_numpy(), ref["anomaly_score"])
    np.testing.assert_array_equal(out.column("channel_scores").flatten().to_numpy().reshape(-1, CHANNELS),
                                  ref["channel_scores"])
    deviation = out.column("deviation").to_numpy_ndarray()
    assert deviation.shape == (len(ids), STEPS, CHANNELS) and deviation.dtype == np.float32
    np.testing.assert_array_equal(deviation, ref["deviation"])
    assert out.column("is_anomaly").to_pylist() == [["normal", "anomaly"][i] for i in ref["is_anomaly"]]


def test_anomalous_windows_score_higher_than_normal_ones(sensor_server: ServerProcess):
    ids, windows = sample_windows()
    out = flight_exchange(sensor_server, window_batch(ids, windows))
    score = dict(zip(ids, out.column("anomaly_score").to_pylist()))
    label = dict(zip(ids, out.column("is_anomaly").to_pylist()))
    channels = dict(zip(ids, out.column("channel_scores").to_pylist()))
    normal = [i for i in ids if i.startswith("rest")]
    for device in normal:
        assert 0.5 < score[device] < 1.5 and label[device] == "normal"  # baseline noise scores about 1
    for device in ("vibration", "tilt"):
        assert score[device] > build_model.THRESHOLD > max(score[n] for n in normal)
        assert label[device] == "anomaly"
    # channel_scores says where: vibration on z, tilt on y
    assert int(np.argmax(channels["vibration"])) == 2 and int(np.argmax(channels["tilt"])) == 1
    # one spike of 0.3 g (15 standard deviations) on x adds about 15^2 / 64 / 3 = 1.2: not past the threshold...
    assert max(score[n] for n in normal) < score["spike"] < build_model.THRESHOLD
    # ...and deviation finds it: row 40, axis x
    deviation = out.column("deviation").to_numpy_ndarray()[ids.index("spike")]
    assert np.unravel_index(np.abs(deviation).argmax(), deviation.shape) == (40, 0)


def test_nan_reading_is_an_anomaly(sensor_server: ServerProcess):
    ids, windows = sample_windows()
    windows[0, 10, 1] = np.nan  # rest-1 drops one reading
    out = flight_exchange(sensor_server, window_batch(ids, windows))
    assert np.isnan(out.column("anomaly_score").to_numpy()[0])
    assert out.column("is_anomaly").to_pylist()[:2] == ["anomaly", "normal"]


def test_flight_accepts_the_flat_storage_type(sensor_server: ServerProcess):
    # cast_from: a producer without the extension type sends fixed_size_list<float32>[192], time-major
    ids, windows = sample_windows()
    flat = pa.FixedSizeListArray.from_arrays(pa.array(windows.reshape(-1)), STEPS * CHANNELS)
    out = flight_exchange(sensor_server, pa.RecordBatch.from_pydict({"device_id": ids, "window": flat}))
    want = flight_exchange(sensor_server, window_batch(ids, windows))
    assert out.equals(want)


def test_triton_matches_onnxruntime_and_flight(sensor_server: ServerProcess, session):
    ids, windows = sample_windows()
    result = triton_infer(sensor_server, ids, windows)
    ref = reference(session, windows)
    assert result.as_numpy("device_id").reshape(-1).tolist() == [i.encode() for i in ids]
    score = result.as_numpy("anomaly_score")
    assert score.dtype == np.float32 and score.shape == (len(ids), 1)
    np.testing.assert_array_equal(score.reshape(-1), ref["anomaly_score"])
    assert result.as_numpy("is_anomaly").reshape(-1).tolist() == [[b"normal", b"anomaly"][i] for i in ref["is_anomaly"]]
    np.testing.assert_array_equal(result.as_numpy("channel_scores"), ref["channel_scores"])
    deviation = result.as_numpy("deviation")
    assert deviation.dtype == np.float32 and deviation.shape == (len(ids), STEPS, CHANNELS)
    np.testing.assert_array_equal(deviation, ref["deviation"])
    flight_out = flight_exchange(sensor_server, window_batch(ids, windows))
    np.testing.assert_array_equal(score.reshape(-1), flight_out.column("anomaly_score").to_numpy())
    # a client that wants only the verdict leaves the [N, 64, 3] deviation tensor out of the answer
    small = triton_infer(sensor_server, ids, windows, outputs=["device_id", "is_anomaly"])
    assert [o["name"] for o in small.get_response(as_json=True)["outputs"]] == ["device_id", "is_anomaly"]


def test_triton_metadata_shapes(sensor_server: ServerProcess):
    client = triton.InferenceServerClient(sensor_server.grpc_url)
    try:
        meta = client.get_model_metadata(MODEL)
    finally:
        client.close()
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("device_id", "BYTES", [-1, 1]), ("window", "FP32", [-1, STEPS, CHANNELS]),
    ]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("device_id", "BYTES", [-1, 1]), ("anomaly_score", "FP32", [-1, 1]), ("is_anomaly", "BYTES", [-1, 1]),
        ("channel_scores", "FP32", [-1, CHANNELS]), ("deviation", "FP32", [-1, STEPS, CHANNELS]),
    ]


# --- errors -------------------------------------------------------------------------------------------


def test_flight_window_of_the_wrong_shape_is_invalid_argument(sensor_server: ServerProcess):
    ids, windows = sample_windows()
    short = pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(windows[:, :32]))
    with pytest.raises(pa.ArrowException) as exc:
        flight_exchange(sensor_server, pa.RecordBatch.from_pydict({"device_id": ids, "window": short}))
    info = error_details(exc.value)
    assert info["code"] == "INVALID_ARGUMENT" and info["column"] == "window"
    assert info["message"] == (
        "column 'window' of model 'sensor-anomaly' has type fixed_shape_tensor<float32>[32, 3], model expects "
        "fixed_shape_tensor<float32>[64, 3] or fixed_size_list<float32>[192]"
    )
    assert "[INVALID_ARGUMENT]" in str(exc.value)


def test_triton_window_of_the_wrong_shape_is_invalid_argument(sensor_server: ServerProcess):
    ids, windows = sample_windows()
    with pytest.raises(InferenceServerException) as exc:
        triton_infer(sensor_server, ids, np.ascontiguousarray(windows[:, :32]))
    assert str(exc.value.status()) == "StatusCode.INVALID_ARGUMENT"
    assert exc.value.message() == (
        "unexpected shape for input 'window' for model 'sensor-anomaly'. Expected [-1,64,3], got [6,32,3]"
    )
