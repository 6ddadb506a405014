"""Strict version strings (issue 12): a client's version is "0" or ASCII digits without a sign,
spaces or a leading zero. Anything else (which Python's int() would still read as 1) names no
version, on both protocols, with the model and the (clipped) version string in the message.

Never import iskander._proto here (tritonclient defines the same protobuf symbols)."""

from __future__ import annotations

import numpy as np
import pyarrow.flight as flight
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from data import tabular_batch
from helpers import exchange
from iskander.client import IskanderClient, NotFound, translate

LOOKALIKES = [" 1", "+1", "01", "1 ", "\uff11", "-1", "1\n", "00", "0x1", "1_0", "1.0", "\u0661", "\t2", "+2", "002"]
LONG = "1" * 5000  # digits, but no configured version: must not be echoed whole


def _oip_inputs(n: int) -> list[triton.InferInput]:
    inputs = []
    for name, data, dtype in (("entity_id", np.array([[b"x"]] * n, dtype=np.object_), "BYTES"),
                              ("features", np.ones((n, 4), np.float32), "FP32"),
                              ("category", np.ones((n, 1), np.int64), "INT64")):
        tensor = triton.InferInput(name, list(data.shape), dtype)
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    return inputs


@pytest.fixture(scope="module")
def oip(server):
    client = triton.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def test_canonical_versions_still_resolve(server, oip):
    assert oip.infer("tabular", _oip_inputs(2), model_version="2").get_response().model_version == "2"
    assert oip.infer("tabular", _oip_inputs(2), model_version="1").get_response().model_version == "1"
    assert oip.infer("tabular", _oip_inputs(2)).get_response().model_version == "2"  # unset: the newest
    with IskanderClient(server.flight_uri.removeprefix("grpc://"), timeout=30) as client:
        assert client.model("tabular", "1").version == "1"
    batch, _ = tabular_batch(3)
    assert exchange(server.flight_uri, "tabular", [batch], version="2")[0].num_rows == 3


@pytest.mark.parametrize("version", LOOKALIKES)
def test_oip_lookalike_versions_are_not_found(oip, version):
    with pytest.raises(InferenceServerException) as info:
        oip.infer("tabular", _oip_inputs(2), model_version=version)
    assert str(info.value.status()) == "StatusCode.NOT_FOUND"
    assert f"model 'tabular' has no version '{version}'" in info.value.message()
    assert not oip.is_model_ready("tabular", model_version=version)
    with pytest.raises(InferenceServerException) as meta:
        oip.get_model_metadata("tabular", model_version=version)
    assert str(meta.value.status()) == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize("version", LOOKALIKES)
def test_flight_lookalike_versions_are_not_found(server, version):
    with IskanderClient(server.flight_uri.removeprefix("grpc://"), timeout=30) as client:
        with pytest.raises(NotFound) as info:
            client.model("tabular", version)  # GetFlightInfo on the path [model, version]
    assert f"model 'tabular' has no version '{version}'" in info.value.message
    batch, _ = tabular_batch(3)
    with pytest.raises((flight.FlightError, KeyError, ValueError)) as raw:  # DoExchange on [model, version]
        exchange(server.flight_uri, "tabular", [batch], version=version)
    assert isinstance(translate(raw.value), NotFound)


def test_long_version_strings_are_clipped_on_both_protocols(server, oip):
    with pytest.raises(InferenceServerException) as info:
        oip.infer("tabular", _oip_inputs(2), model_version=LONG)
    message = info.value.message()
    assert str(info.value.status()) == "StatusCode.NOT_FOUND"
    assert "(5000 chars)" in message and LONG not in message and len(message) < 600
    with IskanderClient(server.flight_uri.removeprefix("grpc://"), timeout=30) as client:
        with pytest.raises(NotFound) as ferr:
            client.model("tabular", LONG)
    assert "(5000 chars)" in ferr.value.message and LONG not in str(ferr.value)
    assert LONG not in server.log()  # nor in the server's log lines
