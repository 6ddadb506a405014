"""Per-request limits: server-wide defaults and per-model overrides, on both frontends (issue 6)."""

from __future__ import annotations


import numpy as np
import pyarrow as pa
import pytest

from iskander.client.flight_status import error_details
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from data import tabular_batch
from helpers import exchange, serving

CONFIG = """\
[server]
max_batch_size = 5
max_stream_rows = 100

[[models]]
name = "defaults"
path = "{root}/tabular.onnx"

[[models]]
name = "own"
path = "{root}/tabular.onnx"
max_batch_size = 50
max_message_bytes = 2048
max_stream_rows = 60
"""


def oip_inputs(n: int):
    inputs = []
    for name, data, dtype in (("entity_id", np.array([[b"x"]] * n, dtype=np.object_), "BYTES"),
                              ("features", np.ones((n, 4), np.float32), "FP32"),
                              ("category", np.ones((n, 1), np.int64), "INT64")):
        t = triton.InferInput(name, list(data.shape), dtype)
        t.set_data_from_numpy(data)
        inputs.append(t)
    return inputs


@pytest.fixture(scope="module")
def limited(models_dir, tmp_path_factory):
    with serving(tmp_path_factory.mktemp("limits"), CONFIG.format(root=models_dir)) as server:
        yield server


def test_server_default_and_model_override_of_max_batch_size(limited):
    c = triton.InferenceServerClient(limited.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        c.infer("defaults", oip_inputs(6))
    assert info.value.message() == "inference request batch-size must be <= 5 for 'defaults', got 6"
    assert c.infer("own", oip_inputs(6)).as_numpy("score").shape == (6, 1)
    assert int(c.get_model_config("defaults", as_json=True)["config"]["max_batch_size"]) == 5
    assert int(c.get_model_config("own", as_json=True)["config"]["max_batch_size"]) == 50
    c.close()


def test_model_max_message_bytes_on_both_frontends(limited):
    c = triton.InferenceServerClient(limited.grpc_url)
    with pytest.raises(InferenceServerException) as info:
        c.infer("own", oip_inputs(80))  # 80 x (16 + 8 + 5) bytes of tensors > 2048
    assert str(info.value.status()) == "StatusCode.RESOURCE_EXHAUSTED"
    assert "request of 2320 bytes for model 'own' exceeds max_message_bytes (2048)" in info.value.message()
    c.close()
    batch, _ = tabular_batch(80)
    with pytest.raises(pa.ArrowException) as ferr:
        exchange(limited.flight_uri, "own", [batch])
    detail = error_details(ferr.value)
    assert detail["limit"] == "max_message_bytes" and detail["expected"] == 2048


def test_model_max_stream_rows_overrides_the_server(limited):
    batch, _ = tabular_batch(5)
    assert len(exchange(limited.flight_uri, "defaults", [batch] * 13)) == 13  # 65 rows < 100
    with pytest.raises(pa.ArrowException) as ferr:
        exchange(limited.flight_uri, "own", [batch] * 13)  # 65 rows > 60
    assert error_details(ferr.value)["limit"] == "max_stream_rows"
