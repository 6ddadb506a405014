"""OIP v2 gRPC frontend driven by tritonclient (the real Triton client) against a server process.

This module must never import iskander._proto: tritonclient defines the same `inference.*` protobuf
symbols, and the two cannot live in one process.
"""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from data import dtypes_feeds, two_tower_batch
from triton_inputs import make_input
from models import reference


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def two_tower_inputs(n: int, binary: bool = True, seed: int = 0):
    _, feeds = two_tower_batch(n, seed)
    ids = np.array([f"u{i}".encode() for i in range(n)], dtype=np.object_).reshape(n, 1)
    items = np.array([f"item-{i}".encode() for i in range(n)], dtype=np.object_).reshape(n, 1)
    inputs = []
    for name, data, dtype in (
        ("user_id", ids, "BYTES"),
        ("item_id", items, "BYTES"),
        ("user_features", feeds["user_features"], "FP32"),
        ("item_features", feeds["item_features"], "FP32"),
    ):
        inputs.append(make_input(name, data, dtype, binary))
    return inputs, feeds, ids


def status_of(exc: InferenceServerException) -> str:
    return str(exc.status())


def test_server_live_ready_metadata(client):
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata()
    assert meta.name == "iskander"
    # advertise exactly what is implemented
    assert sorted(meta.extensions) == ["model_configuration", "model_repository", "statistics"]


def test_model_ready(client):
    assert client.is_model_ready("two_tower")
    assert client.is_model_ready("tabular", "2")
    assert not client.is_model_ready("tabular", "9")
    assert not client.is_model_ready("nope")


def test_model_metadata(client):
    meta = client.get_model_metadata("two_tower", as_json=True)
    assert meta["name"] == "two_tower"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]}
    assert inputs == {
        "user_id": ("BYTES", [-1, 1]),
        "item_id": ("BYTES", [-1, 1]),
        "user_features": ("FP32", [-1, 16]),
        "item_features": ("FP32", [-1, 16]),
    }
    outputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]}
    assert outputs == {
        "user_id": ("BYTES", [-1, 1]),
        "item_id": ("BYTES", [-1, 1]),
        "score": ("FP32", [-1, 1]),
        "user_embedding": ("FP32", [-1, 32]),
    }
    assert client.get_model_metadata("tabular", as_json=True)["versions"] == ["1", "2"]


@pytest.mark.parametrize("binary", [True, False], ids=["raw", "typed-contents"])
def test_infer_matches_onnxruntime(client, models_dir, binary):
    inputs, feeds, ids = two_tower_inputs(32, binary=binary)
    result = client.infer("two_tower", inputs, request_id="req-42")
    ref = reference(models_dir / "two_tower.onnx", feeds)
    response = result.get_response()
    assert response.id == "req-42"
    assert response.model_name == "two_tower" and response.model_version == "1"
    np.testing.assert_array_equal(result.as_numpy("score"), ref["score"].reshape(32, 1))
    np.testing.assert_array_equal(result.as_numpy("user_embedding"), ref["user_embedding"])
    np.testing.assert_array_equal(result.as_numpy("user_id"), ids)  # passthrough BYTES round trip


def test_requested_outputs_select_a_subset(client, models_dir):
    inputs, feeds, _ = two_tower_inputs(8)
    result = client.infer("two_tower", inputs, outputs=[triton.InferRequestedOutput("score")])
    assert [o.name for o in result.get_response().outputs] == ["score"]
    ref = reference(models_dir / "two_tower.onnx", feeds)
    np.testing.assert_array_equal(result.as_numpy("score"), ref["score"].reshape(8, 1))


def test_async_infer(client, models_dir):
    inputs, feeds, _ = two_tower_inputs(16, seed=3)
    done = []
    client.async_infer("two_tower", inputs, lambda result, error: done.append((result, error)))
    import time

    deadline = time.monotonic() + 10
    while not done and time.monotonic() < deadline:
        time.sleep(0.01)
    result, error = done[0]
    assert error is None
    ref = reference(models_dir / "two_tower.onnx", feeds)
    np.testing.assert_array_equal(result.as_numpy("score").reshape(-1), ref["score"])


@pytest.mark.parametrize("binary", [True, False], ids=["raw", "typed-contents"])
def test_every_numeric_type_of_the_dtypes_model(client, models_dir, binary):
    feeds = dtypes_feeds(9, seed=1)
    types = {"x64": "FP64", "i32": "INT32", "i64x3": "INT64", "f32x2x3": "FP32", "flag": "BOOL"}
    inputs = []
    for name, data in feeds.items():
        inputs.append(make_input(name, data, types[name], binary))
    result = client.infer("dtypes", inputs)
    ref = reference(models_dir / "dtypes.onnx", feeds)
    np.testing.assert_array_equal(result.as_numpy("x64_sq").reshape(-1), ref["x64_sq"])
    np.testing.assert_array_equal(result.as_numpy("i32_twice").reshape(-1), ref["i32_twice"])
    np.testing.assert_array_equal(result.as_numpy("i64_sum").reshape(-1), ref["i64_sum"])
    np.testing.assert_array_equal(result.as_numpy("f32_neg"), ref["f32_neg"])
    np.testing.assert_array_equal(result.as_numpy("flag_not").reshape(-1), ref["flag_not"])


def test_one_value_per_row_accepts_n_and_n_by_1(client, models_dir):
    feeds = dtypes_feeds(5, seed=2)
    types = {"x64": "FP64", "i32": "INT32", "i64x3": "INT64", "f32x2x3": "FP32", "flag": "BOOL"}
    outs = []
    for as_column in (False, True):
        inputs = []
        for name, data in feeds.items():
            if as_column and data.ndim == 1:
                data = data.reshape(-1, 1)
            t = triton.InferInput(name, list(data.shape), types[name])
            t.set_data_from_numpy(data)
            inputs.append(t)
        outs.append(client.infer("dtypes", inputs).as_numpy("x64_sq"))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_version_selection(client):
    inputs, _, _ = two_tower_inputs(2)
    assert client.infer("two_tower", inputs, model_version="1").get_response().model_version == "1"


# --- errors ---------------------------------------------------------------------------------------


def expect(client, code: str, *args, **kwargs) -> str:
    with pytest.raises(InferenceServerException) as info:
        client.infer(*args, **kwargs)
    assert status_of(info.value) == f"StatusCode.{code}", info.value.message()
    return info.value.message()


def test_unknown_model(client):
    inputs, _, _ = two_tower_inputs(2)
    msg = expect(client, "NOT_FOUND", "nope", inputs)
    assert "unknown model 'nope'" in msg


def test_unknown_version(client):
    inputs, _, _ = two_tower_inputs(2)
    msg = expect(client, "NOT_FOUND", "two_tower", inputs, model_version="3")
    assert "model 'two_tower' has no version '3'" in msg


def test_wrong_datatype(client):
    inputs, feeds, _ = two_tower_inputs(2)
    bad = triton.InferInput("user_features", [2, 16], "FP64")
    bad.set_data_from_numpy(feeds["user_features"].astype(np.float64))
    msg = expect(client, "INVALID_ARGUMENT", "two_tower", [inputs[0], inputs[1], bad, inputs[3]])
    assert msg == "inference input 'user_features' data-type is 'FP64', model 'two_tower' expects 'FP32'"


def test_wrong_shape(client):
    inputs, _, _ = two_tower_inputs(3)
    bad = triton.InferInput("item_features", [3, 5], "FP32")
    bad.set_data_from_numpy(np.ones((3, 5), np.float32))
    msg = expect(client, "INVALID_ARGUMENT", "two_tower", inputs[:3] + [bad])
    assert msg == "unexpected shape for input 'item_features' for model 'two_tower'. Expected [-1,16], got [3,5]"


def test_missing_input(client):
    inputs, _, _ = two_tower_inputs(2)
    msg = expect(client, "INVALID_ARGUMENT", "two_tower", inputs[:3])
    assert "missing input 'item_features'" in msg and "model 'two_tower'" in msg


def test_unexpected_input(client):
    inputs, _, _ = two_tower_inputs(2)
    extra = triton.InferInput("bogus", [2, 1], "FP32")
    extra.set_data_from_numpy(np.ones((2, 1), np.float32))
    msg = expect(client, "INVALID_ARGUMENT", "two_tower", inputs + [extra])
    assert "unexpected inference input 'bogus' for model 'two_tower'" in msg


def test_mismatched_batch_sizes(client):
    inputs, feeds, _ = two_tower_inputs(4)
    short = triton.InferInput("item_features", [3, 16], "FP32")
    short.set_data_from_numpy(feeds["item_features"][:3])
    msg = expect(client, "INVALID_ARGUMENT", "two_tower", inputs[:3] + [short])
    assert "batch size 3" in msg and "4" in msg


def test_unknown_requested_output(client):
    inputs, _, _ = two_tower_inputs(2)
    msg = expect(client, "INVALID_ARGUMENT", "two_tower", inputs, outputs=[triton.InferRequestedOutput("nah")])
    assert "unexpected inference output 'nah' for model 'two_tower'" in msg


def test_server_serves_after_errors(client, models_dir):
    for _ in range(3):
        with pytest.raises(InferenceServerException):
            client.infer("two_tower", two_tower_inputs(2)[0][:2])
    inputs, feeds, _ = two_tower_inputs(4)
    ref = reference(models_dir / "two_tower.onnx", feeds)
    np.testing.assert_array_equal(client.infer("two_tower", inputs).as_numpy("score").reshape(-1), ref["score"])


def test_broken_model_unavailable_others_serve(faulty_server, models_dir):
    c = triton.InferenceServerClient(faulty_server.grpc_url)
    inputs, feeds, _ = two_tower_inputs(3)
    with pytest.raises(InferenceServerException) as info:
        c.infer("broken", inputs)
    assert status_of(info.value) == "StatusCode.UNAVAILABLE"
    assert "model 'broken' version 1 is not ready" in info.value.message()
    assert not c.is_server_ready()
    assert not c.is_model_ready("broken")
    assert c.is_model_ready("two_tower")
    ref = reference(models_dir / "two_tower.onnx", feeds)
    np.testing.assert_array_equal(c.infer("two_tower", inputs).as_numpy("score").reshape(-1), ref["score"])
    c.close()


def test_grpc_health_check(server, faulty_server):
    for srv, model_status in ((server, {"two_tower": "SERVING"}),
                              (faulty_server, {"two_tower": "SERVING", "broken": "NOT_SERVING"})):
        with grpc.insecure_channel(srv.grpc_url) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            assert stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status == \
                health_pb2.HealthCheckResponse.SERVING
            for name, want in model_status.items():
                got = stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=5).status
                assert health_pb2.HealthCheckResponse.ServingStatus.Name(got) == want


def test_raw_and_typed_contents_cannot_mix(client):
    inputs, feeds, _ = two_tower_inputs(2)
    typed = make_input("item_features", feeds["item_features"], "FP32", binary=False)
    msg = expect(client, "INVALID_ARGUMENT", "two_tower", inputs[:3] + [typed])
    assert "input 'item_features' for model 'two_tower' sets contents while the request uses raw_input_contents" in msg


# Hand-built requests (tritonclient's own generated protobuf module) for malformed raw data that the
# high-level client would refuse to produce.
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()


def raw_request(n: int, user_raw: bytes | None = None, id_raw: bytes | None = None):
    _, feeds = two_tower_batch(n)
    req = service_pb2.ModelInferRequest(model_name="two_tower")
    ids = b"".join(len(s).to_bytes(4, "little") + s for s in (f"u{i}".encode() for i in range(n)))
    for name, dtype, shape, data in (
        ("user_id", "BYTES", [n, 1], id_raw if id_raw is not None else ids),
        ("item_id", "BYTES", [n, 1], ids),
        ("user_features", "FP32", [n, 16], user_raw if user_raw is not None else feeds["user_features"].tobytes()),
        ("item_features", "FP32", [n, 16], feeds["item_features"].tobytes()),
    ):
        req.inputs.add(name=name, datatype=dtype, shape=shape)
        req.raw_input_contents.append(data)
    return req


def expect_rpc(stub, request, code: grpc.StatusCode) -> str:
    with pytest.raises(grpc.RpcError) as info:
        stub.ModelInfer(request, timeout=10)
    assert info.value.code() == code, info.value.details()
    return info.value.details()


def test_raw_byte_size_mismatch(stub):
    msg = expect_rpc(stub, raw_request(2, user_raw=b"\x00" * 100), grpc.StatusCode.INVALID_ARGUMENT)
    assert msg == ("input 'user_features' for model 'two_tower' has 100 bytes of raw data, expected 128 "
                   "for 32 FP32 elements")


def test_malformed_bytes_length_prefix(stub):
    msg = expect_rpc(stub, raw_request(2, id_raw=b"\xff\x00\x00\x00ab"), grpc.StatusCode.INVALID_ARGUMENT)
    assert "input 'user_id' for model 'two_tower'" in msg and "declares 255 bytes" in msg


def test_raw_contents_count_mismatch(stub):
    req = raw_request(2)
    del req.raw_input_contents[-1]
    msg = expect_rpc(stub, req, grpc.StatusCode.INVALID_ARGUMENT)
    assert "expected 4 raw_input_contents entries" in msg and "got 3" in msg


def test_negative_shape(stub):
    req = raw_request(2)
    req.inputs[2].shape[:] = [-2, 16]
    msg = expect_rpc(stub, req, grpc.StatusCode.INVALID_ARGUMENT)
    assert "unexpected shape for input 'user_features'" in msg and "got [-2,16]" in msg


def test_invalid_utf8_in_string_column(stub):
    req = raw_request(1, id_raw=b"\x02\x00\x00\x00\xff\xfe")
    msg = expect_rpc(stub, req, grpc.StatusCode.INVALID_ARGUMENT)
    assert "input 'user_id'" in msg and "UTF-8" in msg


def test_unimplemented_rpc_says_so(stub):
    with pytest.raises(grpc.RpcError) as info:
        stub.TraceSetting(service_pb2.TraceSettingRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_output_requested_twice_is_answered_once(client):
    inputs, _, _ = two_tower_inputs(2)
    outs = [triton.InferRequestedOutput("score"), triton.InferRequestedOutput("score")]
    result = client.infer("two_tower", inputs, outputs=outs)
    assert [o.name for o in result.get_response().outputs] == ["score"]
