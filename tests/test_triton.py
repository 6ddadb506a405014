"""The Triton surface that Triton's own tools rely on: ModelConfig, statistics, repository control,
streaming, every datatype and health, driven by tritonclient against a server process.

Never import iskander._proto here (tritonclient defines the same protobuf symbols)."""

from __future__ import annotations

import json
import queue
import threading
import time

import grpc
import ml_dtypes
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from iskander.client.flight_status import error_details
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from data import tabular_batch, two_tower_batch
from helpers import exchange, serving
from models import ALLTYPES, alltypes_feeds, reference


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(server.grpc_url)
    yield c
    c.close()


def tabular_inputs(n: int, seed: int = 0, ids_as_column: bool = True):
    batch, feeds = tabular_batch(n, seed)
    ids = np.array([s.encode() for s in batch.column("entity_id").to_pylist()], dtype=np.object_)
    cat = feeds["category"]
    inputs = []
    for name, data, dtype in (
        ("entity_id", ids.reshape(n, 1) if ids_as_column else ids, "BYTES"),
        ("features", feeds["numeric"], "FP32"),
        ("category", cat.reshape(n, 1), "INT64"),
    ):
        t = triton.InferInput(name, list(data.shape), dtype)
        t.set_data_from_numpy(data)
        inputs.append(t)
    return inputs, feeds


# --- ModelConfig ------------------------------------------------------------------------------------


def test_model_config_follows_triton_onnx_conventions(client):
    config = client.get_model_config("tabular", as_json=True)["config"]
    assert config["name"] == "tabular"
    assert config["platform"] == "onnxruntime_onnx"
    assert config["backend"] == "onnxruntime"
    assert int(config["max_batch_size"]) == 2**31 - 1
    assert "dynamic_batching" not in config  # requests are not batched together
    inputs = {t["name"]: t for t in config["input"]}
    assert inputs["features"]["data_type"] == "TYPE_FP32" and inputs["features"]["dims"] == ["4"]
    assert "reshape" not in inputs["features"]
    assert inputs["category"]["data_type"] == "TYPE_INT64" and inputs["category"]["dims"] == ["1"]
    assert inputs["category"]["reshape"] == {}  # reshape { shape: [] }
    assert inputs["entity_id"]["data_type"] == "TYPE_STRING"
    outputs = {t["name"]: t for t in config["output"]}
    assert outputs["score"]["data_type"] == "TYPE_FP32" and outputs["score"]["dims"] == ["1"]
    assert outputs["score"]["reshape"] == {}
    assert config["instance_group"][0]["kind"] == "KIND_CPU"
    assert config["version_policy"]["specific"]["versions"] == ["1", "2"]


def test_model_config_reports_configured_limits(client):
    config = client.get_model_config("small_batch", as_json=True)["config"]
    assert int(config["max_batch_size"]) == 8
    assert config["instance_group"][0]["count"] == 2


def test_max_batch_size_is_enforced(client):
    inputs, _ = tabular_inputs(9)
    with pytest.raises(InferenceServerException) as info:
        client.infer("small_batch", inputs)
    assert str(info.value.status()) == "StatusCode.INVALID_ARGUMENT"
    assert info.value.message() == "inference request batch-size must be <= 8 for 'small_batch', got 9"
    ok, _ = tabular_inputs(8)
    assert client.infer("small_batch", ok).as_numpy("score").shape == (8, 1)


def test_model_config_unknown_model(client):
    with pytest.raises(InferenceServerException) as info:
        client.get_model_config("nope")
    assert str(info.value.status()) == "StatusCode.NOT_FOUND"


# --- statistics ------------------------------------------------------------------------------------


def stats_of(client, model: str, version: str = "1") -> dict:
    data = client.get_inference_statistics(model, version, as_json=True)
    (entry,) = data["model_stats"]
    return entry


def count(entry: dict, key: str) -> int:
    return int(entry["inference_stats"].get(key, {}).get("count", 0))


def test_statistics_grow_exactly_with_requests(client, server):
    before = stats_of(client, "sklearn")
    rng = np.random.default_rng(0)
    for n in (3, 3, 5):
        ids = np.array([b"x"] * n, dtype=np.object_).reshape(n, 1)
        feats = rng.standard_normal((n, 4)).astype(np.float32)
        inputs = []
        for name, data, dtype in (("entity_id", ids, "BYTES"), ("features", feats, "FP32")):
            t = triton.InferInput(name, list(data.shape), dtype)
            t.set_data_from_numpy(data)
            inputs.append(t)
        client.infer("sklearn", inputs)
    bad = triton.InferInput("features", [2, 3], "FP32")
    bad.set_data_from_numpy(np.ones((2, 3), np.float32))
    with pytest.raises(InferenceServerException):
        client.infer("sklearn", [bad])
    after = stats_of(client, "sklearn")

    assert after["name"] == "sklearn" and after["version"] == "1"
    assert count(after, "success") - count(before, "success") == 3
    assert count(after, "fail") - count(before, "fail") == 1
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert count(after, key) - count(before, key) == 3, key  # executions, growing together
        assert int(after["inference_stats"][key]["ns"]) > 0
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 11  # rows
    assert int(after["execution_count"]) - int(before.get("execution_count", 0)) == 3
    assert int(after["last_inference"]) >= int(time.time() * 1000) - 60_000
    sizes = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in after["batch_stats"]}
    old = {int(b["batch_size"]): int(b["compute_infer"]["count"]) for b in before.get("batch_stats", [])}
    assert sizes.get(3, 0) - old.get(3, 0) == 2 and sizes.get(5, 0) - old.get(5, 0) == 1


def test_statistics_are_shared_by_both_protocols(client, server):
    before = stats_of(client, "tabular")
    batch, _ = tabular_batch(4)
    fc = flight.connect(server.flight_uri)
    exchange(fc, "tabular", [batch], version="1")
    inputs, _ = tabular_inputs(4)
    client.infer("tabular", inputs, model_version="1")
    after = stats_of(client, "tabular")
    assert count(after, "success") - count(before, "success") == 2
    via_flight = json.loads(
        next(iter(fc.do_action(flight.Action("statistics", b'{"name": "tabular", "version": "1"}')))).body.to_pybytes()
    )
    fc.close()
    (snap,) = via_flight
    assert snap["inference_stats"]["success"]["count"] == count(after, "success")
    assert snap["inference_count"] == int(after["inference_count"])
    assert snap["execution_count"] == int(after["execution_count"])


def test_all_statistics(client):
    data = client.get_inference_statistics(as_json=True)
    names = {(m["name"], m["version"]) for m in data["model_stats"]}
    assert {("tabular", "1"), ("tabular", "2"), ("two_tower", "1")} <= names


# --- streaming ---------------------------------------------------------------------------------------


def test_stream_answers_in_order_and_survives_a_bad_request(client, models_dir):
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        sent = []
        for i in range(6):
            if i == 2:
                bad = triton.InferInput("features", [2, 5], "FP32")
                bad.set_data_from_numpy(np.ones((2, 5), np.float32))
                client.async_stream_infer("tabular", [bad], request_id=f"r{i}")
                sent.append(None)
                continue
            inputs, feeds = tabular_inputs(3 + i, seed=i)
            client.async_stream_infer("tabular", inputs, request_id=f"r{i}")
            sent.append(feeds)
        got = [results.get(timeout=20) for _ in sent]
    finally:
        client.stop_stream()
    for i, ((result, error), feeds) in enumerate(zip(got, sent)):
        if feeds is None:
            assert result is None
            assert "unexpected shape for input 'features' for model 'tabular'" in error.message()
            continue
        assert error is None
        assert result.get_response().id == f"r{i}"
        ref = reference(models_dir / "tabular.onnx", feeds)["probability"]
        np.testing.assert_array_equal(result.as_numpy("score"), ref)


def test_stream_empty_final_response_marks_every_answer_final(client, models_dir):
    """tritonclient's enable_empty_final_response: clients wait for triton_final_response; each
    request here has one response, which carries it (an error response too)."""
    results: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        inputs, feeds = tabular_inputs(3)
        client.async_stream_infer("tabular", inputs, request_id="ok", enable_empty_final_response=True)
        bad = triton.InferInput("features", [2, 5], "FP32")
        bad.set_data_from_numpy(np.ones((2, 5), np.float32))
        client.async_stream_infer("tabular", [bad], request_id="bad", enable_empty_final_response=True)
        client.async_stream_infer("tabular", inputs, request_id="plain")
        got = [results.get(timeout=20) for _ in range(3)]
    finally:
        client.stop_stream()
    (ok, ok_error), (bad_result, bad_error), (plain, _) = got
    assert ok_error is None and ok.get_response().id == "ok"
    assert ok.get_response().parameters["triton_final_response"].bool_param is True
    np.testing.assert_array_equal(ok.as_numpy("score"),
                                  reference(models_dir / "tabular.onnx", feeds)["probability"])
    assert bad_result is None and "unexpected shape for input 'features'" in bad_error.message()
    assert "triton_final_response" not in plain.get_response().parameters  # only when asked for


# --- datatypes ---------------------------------------------------------------------------------------


def test_every_integer_width_fp16_and_bf16(client, models_dir):
    feeds = alltypes_feeds(7)
    oip = {"int8": "INT8", "int16": "INT16", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
           "uint64": "UINT64", "float16": "FP16"}
    inputs = []
    for name, (_, dtype) in ALLTYPES.items():
        t = triton.InferInput(name, [7, 2], oip[dtype])
        t.set_data_from_numpy(feeds[name])
        inputs.append(t)
    bf16_values = np.array([1.5, -2.25, 3.0, 0.1, 1e10, -7.0, 65504.0], dtype=ml_dtypes.bfloat16)
    t = triton.InferInput("bf16", [7], "BF16")
    t.set_data_from_numpy(bf16_values)
    inputs.append(t)
    result = client.infer("alltypes", inputs)
    ref = reference(models_dir / "alltypes.onnx", {**feeds, "bf16": bf16_values.view(np.uint16)})
    for name in ALLTYPES:
        got = result.as_numpy(f"{name}_out")
        assert got.dtype == feeds[name].dtype
        np.testing.assert_array_equal(got, ref[f"{name}_out"])
    np.testing.assert_array_equal(result.as_numpy("bf16_as_f32").reshape(-1), ref["bf16_as_f32"])


def test_alltypes_metadata_and_config(client):
    meta = client.get_model_metadata("alltypes", as_json=True)
    dtypes = {t["name"]: t["datatype"] for t in meta["inputs"]}
    assert dtypes == {"i8": "INT8", "i16": "INT16", "u8": "UINT8", "u16": "UINT16", "u32": "UINT32",
                      "u64": "UINT64", "f16": "FP16", "bf16": "BF16"}
    config = client.get_model_config("alltypes", as_json=True)["config"]
    types = {t["name"]: t["data_type"] for t in config["input"]}
    assert types["bf16"] == "TYPE_BF16" and types["f16"] == "TYPE_FP16" and types["u64"] == "TYPE_UINT64"


# --- repository control -------------------------------------------------------------------------------

REPO_CONFIG = """\
[[models]]
name = "two_tower"
path = "{root}/two_tower.onnx"

[[models]]
name = "tabular"
path = "{root}/tabular.onnx"
"""


@pytest.fixture(scope="module")
def repo_server(models_dir, tmp_path_factory):
    with serving(tmp_path_factory.mktemp("repo"), REPO_CONFIG.format(root=models_dir)) as running:
        yield running


def health(url: str, service: str) -> str:
    with grpc.insecure_channel(url) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)


def two_tower_oip_inputs(n: int):
    _, feeds = two_tower_batch(n)
    ids = np.array([b"u"] * n, dtype=np.object_).reshape(n, 1)
    inputs = []
    for name, data, dtype in (("user_id", ids, "BYTES"), ("item_id", ids, "BYTES"),
                              ("user_features", feeds["user_features"], "FP32"),
                              ("item_features", feeds["item_features"], "FP32")):
        t = triton.InferInput(name, list(data.shape), dtype)
        t.set_data_from_numpy(data)
        inputs.append(t)
    return inputs


def test_unload_and_load_round_trip_without_disturbing_other_models(repo_server):
    c = triton.InferenceServerClient(repo_server.grpc_url)
    index = {(m["name"], m["version"]): m["state"] for m in c.get_model_repository_index(as_json=True)["models"]}
    assert index == {("tabular", "1"): "READY", ("two_tower", "1"): "READY"}

    # keep traffic on two_tower running while tabular is unloaded and loaded again
    stop = threading.Event()
    outcomes: list[object] = []

    def traffic() -> None:
        tc = triton.InferenceServerClient(repo_server.grpc_url)
        inputs = two_tower_oip_inputs(8)
        while not stop.is_set() and len(outcomes) < 2000:
            try:
                tc.infer("two_tower", inputs)
                outcomes.append(True)
            except InferenceServerException as exc:
                outcomes.append(exc)
        tc.close()

    worker = threading.Thread(target=traffic)
    worker.start()
    try:
        c.unload_model("tabular")
        assert not c.is_model_ready("tabular")
        assert c.is_server_ready()  # unloaded on request: the server is still ready
        assert health(repo_server.grpc_url, "tabular") == "NOT_SERVING"
        entry = next(m for m in c.get_model_repository_index(as_json=True)["models"] if m["name"] == "tabular")
        assert entry["state"] == "UNAVAILABLE" and entry["reason"] == "unloaded"
        inputs, _ = tabular_inputs(2)
        with pytest.raises(InferenceServerException) as info:
            c.infer("tabular", inputs)
        assert str(info.value.status()) == "StatusCode.UNAVAILABLE"
        assert "model 'tabular' version 1 is not ready (unavailable): unloaded" in info.value.message()
        ready_only = c.get_model_repository_index(as_json=True)
        assert ready_only["models"]  # two_tower still listed

        c.load_model("tabular")
        assert c.is_model_ready("tabular")
        assert health(repo_server.grpc_url, "tabular") == "SERVING"
        assert c.infer("tabular", inputs).as_numpy("score").shape == (2, 1)
    finally:
        stop.set()
        worker.join(timeout=30)
    assert outcomes and all(o is True for o in outcomes), [o for o in outcomes if o is not True][:3]
    c.close()


def test_load_accepts_only_configured_models(repo_server):
    c = triton.InferenceServerClient(repo_server.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        c.load_model("/etc/passwd")
    assert str(info.value.status()) == "StatusCode.NOT_FOUND"
    assert "not in the server's configuration" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        c.load_model("tabular", config='{"backend": "python"}')
    assert str(info.value.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "accepts no config or file overrides" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        c.load_model("tabular", files={"file:1/model.onnx": b"garbage"})
    assert str(info.value.status()) == "StatusCode.INVALID_ARGUMENT"
    assert c.is_model_ready("tabular")
    c.close()


def test_kserve_numbering_of_the_repository_model_name(repo_server):
    """KServe's open_inference_grpc.proto numbers RepositoryModelLoad/Unload's model_name 1
    (Triton: repository_name = 1, model_name = 2): a bare field 1 names the model."""
    channel = grpc.insecure_channel(repo_server.grpc_url)
    kserve_request = b"\x0a\x07tabular"  # field 1 (string) = "tabular", as KServe's stub sends it
    for method in ("RepositoryModelUnload", "RepositoryModelLoad"):
        call = channel.unary_unary(f"/inference.GRPCInferenceService/{method}")
        assert call(kserve_request, timeout=30) == b""
        c = triton.InferenceServerClient(repo_server.grpc_url)
        assert c.is_model_ready("tabular") is (method == "RepositoryModelLoad")
        c.close()
    channel.close()


def test_flight_repository_actions(repo_server):
    fc = flight.connect(repo_server.flight_uri)

    def act(kind: str, body: bytes = b""):
        return json.loads(next(iter(fc.do_action(flight.Action(kind, body)))).body.to_pybytes())

    assert {m["name"] for m in act("repository_index")} == {"tabular", "two_tower"}
    out = act("unload_model", b"two_tower")
    assert out == {"name": "two_tower", "versions": [
        {"name": "two_tower", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"}]}
    assert [m["name"] for m in act("repository_index", b'{"ready": true}')] == ["tabular"]
    c = triton.InferenceServerClient(repo_server.grpc_url)
    assert not c.is_model_ready("two_tower")  # one registry behind both frontends
    act("load_model", b"two_tower")
    assert c.is_model_ready("two_tower")
    with pytest.raises(pa.ArrowException) as info:
        act("load_model", b"nope")
    assert error_details(info.value)["code"] == "NOT_FOUND"
    c.close()
    fc.close()


def test_unimplemented_extensions_say_so(client):
    for call in (client.get_system_shared_memory_status, client.get_cuda_shared_memory_status,
                 client.get_trace_settings, client.get_log_settings):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert str(info.value.status()) == "StatusCode.UNIMPLEMENTED"
        assert "Iskander does not implement" in info.value.message()


def test_message_size_limit_on_both_frontends(models_dir, tmp_path):
    config = f'[server]\nmax_message_bytes = 65536\n\n[[models]]\nname = "tabular"\npath = "{models_dir}/tabular.onnx"\n'
    with serving(tmp_path, config) as running:
        c = triton.InferenceServerClient(running.grpc_url)
        big, _ = tabular_inputs(5000)  # ~100 KB of features
        with pytest.raises(InferenceServerException) as info:
            c.infer("tabular", big)
        assert str(info.value.status()) == "StatusCode.RESOURCE_EXHAUSTED"
        small, _ = tabular_inputs(10)
        assert c.infer("tabular", small).as_numpy("score").shape == (10, 1)
        c.close()

        fc = flight.connect(running.flight_uri)
        batch, _ = tabular_batch(5000)
        writer, reader = fc.do_exchange(flight.FlightDescriptor.for_path("tabular"))
        with pytest.raises(pa.ArrowException) as ferr:
            with writer:
                writer.begin(batch.schema)
                writer.write_batch(batch)
                reader.read_chunk()
        detail = error_details(ferr.value)
        assert detail["code"] == "RESOURCE_EXHAUSTED" and detail["limit"] == "max_message_bytes"
        assert "exceeds max_message_bytes (65536)" in str(ferr.value)
        small_batch, _ = tabular_batch(10)
        assert exchange(fc, "tabular", [small_batch])[0].num_rows == 10
        fc.close()


def test_typed_contents_for_every_integer_width(client, models_dir):
    from triton_inputs import make_input

    feeds = {k: v for k, v in alltypes_feeds(4, seed=5).items() if k != "f16"}
    oip = {"int8": "INT8", "int16": "INT16", "uint8": "UINT8", "uint16": "UINT16", "uint32": "UINT32",
           "uint64": "UINT64"}
    inputs = [make_input(name, feeds[name], oip[ALLTYPES[name][1]], binary=False) for name in feeds]
    result = client.infer("ints", inputs)
    ref = reference(models_dir / "ints.onnx", feeds)
    for name in feeds:
        np.testing.assert_array_equal(result.as_numpy(f"{name}_out"), ref[f"{name}_out"])


def test_fp16_in_typed_contents_is_refused(server):
    """FP16 and BF16 have no typed field in the protocol; a client that puts them in fp32_contents
    gets a clear error."""
    from tritonclient.grpc import service_pb2, service_pb2_grpc

    feeds = alltypes_feeds(3, seed=6)
    fields = {"int8": "int_contents", "int16": "int_contents", "uint8": "uint_contents",
              "uint16": "uint_contents", "uint32": "uint_contents", "uint64": "uint64_contents"}
    with grpc.insecure_channel(server.grpc_url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        req = service_pb2.ModelInferRequest(model_name="alltypes")
        for name, (_, dtype) in ALLTYPES.items():
            if dtype == "float16":
                continue
            t = req.inputs.add(name=name, datatype=dtype.upper(), shape=[3, 2])
            getattr(t.contents, fields[dtype]).extend(feeds[name].reshape(-1).tolist())
        req.inputs.add(name="f16", datatype="FP16", shape=[3, 2]).contents.fp32_contents.extend([1.0] * 6)
        req.inputs.add(name="bf16", datatype="BF16", shape=[3]).contents.fp32_contents.extend([1.0] * 3)
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(req, timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == (
        "input 'f16' for model 'alltypes' is FP16, which travels only in raw_input_contents"
    )


EDGE_MANIFEST = """\
[[passthrough]]
name = "meta"
type = "struct<id: int64, origin: struct<site: utf8, ok: bool>>"

[[passthrough]]
name = "tags"
type = "list<utf8>"

[[inputs]]
name = "w"
type = "fixed_shape_tensor<float32>[4, 3]"
cast_from = ["fixed_size_list<float32>[12]"]

[[outputs]]
name = "neg"
type = "fixed_shape_tensor<float32>[4, 3]"
"""


def test_oip_view_of_nested_structs_lists_and_same_datatype_casts(tmp_path):
    """Nested struct passthrough travels as 'meta.origin.site' tensors; a list passthrough is
    Flight-only (sent as nulls over OIP); a cast source with the same datatype is chosen by shape."""
    from onnx import TensorProto, helper

    from models import _save

    graph = helper.make_graph([helper.make_node("Neg", ["w"], ["neg"])], "edge",
                              [helper.make_tensor_value_info("w", TensorProto.FLOAT, ["N", 4, 3])],
                              [helper.make_tensor_value_info("neg", TensorProto.FLOAT, ["N", 4, 3])])
    _save(graph, tmp_path / "edge.onnx")
    (tmp_path / "edge.manifest.toml").write_text(EDGE_MANIFEST)
    with serving(tmp_path, f'[[models]]\nname = "edge"\npath = "{tmp_path}/edge.onnx"\n') as running:
        c = triton.InferenceServerClient(running.grpc_url)
        meta = c.get_model_metadata("edge", as_json=True)
        assert [t["name"] for t in meta["inputs"]] == ["meta.id", "meta.origin.site", "meta.origin.ok", "w"]
        w = np.arange(24, dtype=np.float32).reshape(2, 4, 3)
        for shape in ([2, 4, 3], [2, 12]):  # the declared type, and its flat cast source
            inputs = []
            for name, data, dtype in (("meta.id", np.array([[1], [2]], np.int64), "INT64"),
                                      ("meta.origin.site", np.array([[b"a"], [b"b"]], np.object_), "BYTES"),
                                      ("meta.origin.ok", np.array([[True], [False]]), "BOOL"),
                                      ("w", w.reshape(shape), "FP32")):
                t = triton.InferInput(name, list(data.shape), dtype)
                t.set_data_from_numpy(data)
                inputs.append(t)
            result = c.infer("edge", inputs)
            np.testing.assert_array_equal(result.as_numpy("neg"), -w)
            np.testing.assert_array_equal(result.as_numpy("meta.origin.site").reshape(-1), [b"a", b"b"])
            assert "tags" not in {o.name for o in result.get_response().outputs}
        c.close()


PLAIN_MANIFEST = """\
[[inputs]]
name = "features"
type = "fixed_size_list<float32>[4]"
tensor = "numeric"

[[inputs]]
name = "category"
type = "int64"

[[outputs]]
name = "score"
type = "float32"
tensor = "probability"
"""


@pytest.fixture(scope="module")
def plain_server(models_dir, tmp_path_factory):
    """A tensor-only contract (no passthrough, no casts): OIP decodes straight to numpy views."""
    tmp = tmp_path_factory.mktemp("plain")
    (tmp / "plain.manifest.toml").write_text(PLAIN_MANIFEST)
    config = (f'[[models]]\nname = "plain"\npath = "{models_dir}/tabular.onnx"\nmanifest = "{tmp}/plain.manifest.toml"\n'
              f'\n[[models]]\nname = "plain_batched"\npath = "{models_dir}/tabular.onnx"\n'
              f'manifest = "{tmp}/plain.manifest.toml"\ndynamic_batching = {{ max_queue_delay_us = 5000 }}\n')
    with serving(tmp, config) as running:
        yield running


@pytest.mark.parametrize("model", ["plain", "plain_batched"])
def test_plain_contract_over_oip_matches_onnxruntime(plain_server, models_dir, model):
    c = triton.InferenceServerClient(plain_server.grpc_url)
    before = stats_of(c, model)
    for n, column_shape in ((5, True), (1, False), (300, True)):
        _, feeds = tabular_batch(n, seed=n)
        cat = feeds["category"].reshape(n, 1) if column_shape else feeds["category"]
        inputs = []
        for name, data, dtype in (("features", feeds["numeric"], "FP32"), ("category", cat, "INT64")):
            t = triton.InferInput(name, list(data.shape), dtype)
            t.set_data_from_numpy(data)
            inputs.append(t)
        result = c.infer(model, inputs, request_id=f"p{n}")
        ref = reference(models_dir / "tabular.onnx", feeds)["probability"]
        np.testing.assert_array_equal(result.as_numpy("score"), ref)  # [N, 1], Triton's shape
        assert result.get_response().id == f"p{n}" and result.get_response().model_version == "1"
    bad = triton.InferInput("features", [2, 5], "FP32")
    bad.set_data_from_numpy(np.ones((2, 5), np.float32))
    cat = triton.InferInput("category", [2, 1], "INT64")
    cat.set_data_from_numpy(np.ones((2, 1), np.int64))
    with pytest.raises(InferenceServerException) as info:
        c.infer(model, [bad, cat])
    assert info.value.message() == (
        f"unexpected shape for input 'features' for model '{model}'. Expected [-1,4], got [2,5]")
    after = stats_of(c, model)
    assert count(after, "success") - count(before, "success") == 3
    assert count(after, "fail") - count(before, "fail") == 1
    assert int(after["inference_count"]) - int(before.get("inference_count", 0)) == 306
    c.close()
