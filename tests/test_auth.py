"""Bearer-token authentication on both frontends (issue 6): tokens from the config, a file and the
environment; health checks open for probes; everything else UNAUTHENTICATED without a token."""

from __future__ import annotations

import os

import grpc
import numpy as np
import pyarrow.flight as flight
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.utils import InferenceServerException

from data import tabular_batch
from iskander.launch import spawn_server


@pytest.fixture(scope="module")
def secured(models_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("auth")
    (tmp / "tokens.txt").write_text("# one token per line\nfile-token\n")
    config = tmp / "config.toml"
    config.write_text('[server]\nauth_tokens = ["config-token"]\nauth_token_file = "tokens.txt"\n\n'
                      f'[[models]]\nname = "tabular"\npath = "{models_dir}/tabular.onnx"\n')
    os.environ["ISKANDER_AUTH_TOKENS"] = "env-token"
    try:
        server = spawn_server(config, tmp / "server.log")
    finally:
        del os.environ["ISKANDER_AUTH_TOKENS"]
    yield server
    server.stop()


def oip_inputs():
    inputs = []
    for name, data, dtype in (("entity_id", np.array([[b"a"]], dtype=np.object_), "BYTES"),
                              ("features", np.ones((1, 4), np.float32), "FP32"),
                              ("category", np.ones((1, 1), np.int64), "INT64")):
        t = triton.InferInput(name, list(data.shape), dtype)
        t.set_data_from_numpy(data)
        inputs.append(t)
    return inputs


@pytest.mark.parametrize("token", ["config-token", "file-token", "env-token"])
def test_oip_with_a_valid_token(secured, token):
    c = triton.InferenceServerClient(secured.grpc_url)
    headers = {"authorization": f"Bearer {token}"}
    assert c.is_server_ready(headers=headers)
    assert c.infer("tabular", oip_inputs(), headers=headers).as_numpy("score").shape == (1, 1)
    c.close()


@pytest.mark.parametrize("headers", [None, {"authorization": "Bearer wrong"}, {"authorization": "config-token"}])
def test_oip_without_a_valid_token_is_unauthenticated(secured, headers):
    c = triton.InferenceServerClient(secured.grpc_url)
    for call in (lambda: c.infer("tabular", oip_inputs(), headers=headers),
                 lambda: c.get_model_metadata("tabular", headers=headers)):
        with pytest.raises(InferenceServerException) as info:
            call()
        assert str(info.value.status()) == "StatusCode.UNAUTHENTICATED"
        assert "bearer token" in info.value.message()
    c.close()


def test_streaming_without_a_token_is_unauthenticated(secured):
    import queue

    errors: queue.Queue = queue.Queue()
    c = triton.InferenceServerClient(secured.grpc_url)
    c.start_stream(callback=lambda result, error: errors.put(error))
    try:
        c.async_stream_infer("tabular", oip_inputs())
    except InferenceServerException:
        pass  # the server may refuse the stream before this request is sent: the callback has the reason
    try:
        error = errors.get(timeout=10)  # wait for the stream's answer before closing it
    finally:
        c.stop_stream()
        c.close()
    assert error is not None and "UNAUTHENTICATED" in str(error.status())


def test_health_checks_stay_open(secured):
    with grpc.insecure_channel(secured.grpc_url) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert status.status == health_pb2.HealthCheckResponse.SERVING


def test_flight_needs_a_token(secured):
    batch, _ = tabular_batch(2)
    c = flight.connect(secured.flight_uri)
    with pytest.raises(flight.FlightUnauthenticatedError) as info:
        list(c.list_flights())
    assert "bearer token" in str(info.value)
    options = flight.FlightCallOptions(headers=[(b"authorization", b"Bearer env-token")])
    assert [i.descriptor.path[0] for i in c.list_flights(options=options)] == [b"tabular"]
    writer, reader = c.do_exchange(flight.FlightDescriptor.for_path("tabular"), options=options)
    with writer:
        writer.begin(batch.schema)
        writer.write_batch(batch)
        assert reader.read_chunk().data.num_rows == 2
        writer.done_writing()
    c.close()


@pytest.mark.parametrize("values", [
    [b"Bearer env-token", b"Bearer wrong"],
    [b"Bearer wrong", b"Bearer env-token"],
    [b"Bearer env-token", b"Bearer env-token"],
])
def test_flight_refuses_two_authorization_headers(secured, values):
    """One rule on both frontends (auth.TokenAuth.check_headers): exactly one authorization header.
    Which of two would win differs between proxies and clients, so neither is trusted."""
    c = flight.connect(secured.flight_uri)
    options = flight.FlightCallOptions(headers=[(b"authorization", v) for v in values])
    with pytest.raises(flight.FlightUnauthenticatedError, match="exactly one"):
        list(c.list_flights(options=options))
    c.close()
