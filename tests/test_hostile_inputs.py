"""Hostile inputs over both protocols: malformed tensors and batches must get a client-error status
(never INTERNAL), never crash or hang the server, and a correct request must work right after.

Property-based (hypothesis) with a bounded number of examples, against one real server process.
This is the start of issue 6's hostile-input suite; the count of cases tried is printed."""

from __future__ import annotations


import grpc
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from iskander.client.flight_status import error_details
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tritonclient.grpc import service_pb2, service_pb2_grpc

from data import fsl, tabular_batch

CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE,
                 grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNIMPLEMENTED}
DATATYPES = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32",
             "FP64", "BF16", "BYTES", "NOPE", ""]
NAMES = ["entity_id", "features", "category", "bogus", ""]
TRIED = {"oip": 0, "flight": 0}


@pytest.fixture(scope="module")
def stub(server):
    channel = grpc.insecure_channel(server.grpc_url)
    yield service_pb2_grpc.GRPCInferenceServiceStub(channel)
    channel.close()
    print(f"\nhostile cases tried: {TRIED}")


def valid_request(n: int = 2) -> service_pb2.ModelInferRequest:
    _, feeds = tabular_batch(n)
    req = service_pb2.ModelInferRequest(model_name="tabular")
    ids = b"".join(len(s).to_bytes(4, "little") + s for s in (f"e{i}".encode() for i in range(n)))
    for name, dtype, shape, data in (("entity_id", "BYTES", [n, 1], ids),
                                     ("features", "FP32", [n, 4], feeds["numeric"].tobytes()),
                                     ("category", "INT64", [n, 1], feeds["category"].tobytes())):
        req.inputs.add(name=name, datatype=dtype, shape=shape)
        req.raw_input_contents.append(data)
    return req


def assert_still_serving(stub) -> None:
    response = stub.ModelInfer(valid_request(), timeout=10)
    assert [o.name for o in response.outputs] == ["entity_id", "score"]


tensor = st.fixed_dictionaries({
    "name": st.sampled_from(NAMES),
    "datatype": st.sampled_from(DATATYPES),
    "shape": st.lists(st.integers(min_value=-3, max_value=2**40), min_size=0, max_size=4),
    "raw": st.binary(max_size=256),
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tensors=st.lists(tensor, max_size=4), model=st.sampled_from(["tabular", "two_tower", "nope", ""]),
       version=st.sampled_from(["", "1", "2", "x", "-1"]), drop_raw=st.booleans())
def test_malformed_oip_requests_get_client_errors(stub, tensors, model, version, drop_raw):
    req = service_pb2.ModelInferRequest(model_name=model, model_version=version)
    for t in tensors:
        req.inputs.add(name=t["name"], datatype=t["datatype"], shape=t["shape"])
        if not drop_raw:
            req.raw_input_contents.append(t["raw"])
    TRIED["oip"] += 1
    try:
        stub.ModelInfer(req, timeout=10)
    except grpc.RpcError as exc:
        assert exc.code() in CLIENT_ERRORS, (exc.code(), exc.details())
        assert "Traceback" not in exc.details()
    assert_still_serving(stub)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=st.sampled_from(["drop", "retype", "nulls", "nan", "extra", "dictionary", "empty", "zero_cols",
                                 "wrong_width", "huge_category"]),
       rows=st.integers(min_value=0, max_value=40))
def test_malformed_flight_batches_get_client_errors(server, stub, mutation, rows):
    batch, _ = tabular_batch(max(rows, 1))
    batch = batch.slice(0, rows)
    if mutation == "drop":
        batch = batch.drop_columns(["features"])
    elif mutation == "retype":
        batch = batch.set_column(2, "category", pa.array(np.arange(rows, dtype=np.float64)))
    elif mutation == "nulls":
        batch = batch.set_column(2, "category", pa.array([None] * rows, pa.int64()))
    elif mutation == "nan":
        batch = batch.set_column(1, "features", fsl(np.full((rows, 4), np.nan, np.float32)))
    elif mutation == "extra":
        batch = batch.append_column("extra", pa.array(np.zeros(rows)))
    elif mutation == "dictionary":
        batch = batch.set_column(0, "entity_id", pa.array([f"e{i % 3}" for i in range(rows)]).dictionary_encode())
    elif mutation == "empty":
        batch = batch.slice(0, 0)
    elif mutation == "zero_cols":
        batch = pa.record_batch([], schema=pa.schema([]))
    elif mutation == "wrong_width":
        batch = batch.set_column(1, "features", fsl(np.ones((rows, 5), np.float32)))
    elif mutation == "huge_category":  # out of range for the model's embedding table: only the model knows
        batch = batch.set_column(2, "category", pa.array(np.full(rows, 10**6, np.int64)))
    TRIED["flight"] += 1
    client = flight.connect(server.flight_uri)
    try:
        writer, reader = client.do_exchange(flight.FlightDescriptor.for_path("tabular"))
        with writer:
            writer.begin(batch.schema)
            writer.write_batch(batch)
            out = reader.read_chunk().data
            writer.done_writing()
        # accepted: only inputs the contract allows (NaN is a value; zero rows answer zero rows; a
        # dictionary-encoded utf8 column is a lossless layout of utf8, decoded by the server)
        assert mutation in ("nan", "empty", "dictionary") or rows == 0 and mutation not in (
            "drop", "retype", "extra", "zero_cols", "wrong_width")
        assert out.num_rows == batch.num_rows
    except pa.ArrowException as exc:
        info = error_details(exc)
        assert info.get("code") in {"INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"}, (mutation, str(exc))
    finally:
        client.close()
    assert_still_serving(stub)


def test_garbage_bytes_on_the_flight_stream(server, stub):
    """Raw junk where FlightData messages belong: an error for that stream, nothing else."""
    channel = grpc.insecure_channel(server.flight_uri.removeprefix("grpc://"))
    call = channel.stream_stream("/arrow.flight.protocol.FlightService/DoExchange",
                                 request_serializer=lambda b: b, response_deserializer=lambda b: b)
    for junk in (b"\x00\x01garbage", b"\xff" * 64, b""):
        with pytest.raises(grpc.RpcError) as info:
            list(call(iter([junk, junk]), timeout=10))
        assert "Traceback" not in (info.value.details() or "")
        TRIED["flight"] += 1
    channel.close()
    assert_still_serving(stub)


def test_max_stream_rows_on_both_streaming_rpcs(models_dir, tmp_path):
    from helpers import exchange, serving

    config = f'[server]\nmax_stream_rows = 10\n\n[[models]]\nname = "tabular"\npath = "{models_dir}/tabular.onnx"\n'
    with serving(tmp_path, config) as running:
        batch, _ = tabular_batch(4)
        assert len(exchange(running.flight_uri, "tabular", [batch, batch])) == 2  # 8 rows: fine
        with pytest.raises(pa.ArrowException) as info:
            exchange(running.flight_uri, "tabular", [batch, batch, batch])  # 12 rows
        detail = error_details(info.value)
        assert detail["code"] == "RESOURCE_EXHAUSTED" and detail["limit"] == "max_stream_rows"
        channel = grpc.insecure_channel(running.grpc_url)
        stream = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer
        with pytest.raises(grpc.RpcError) as rpc:
            list(stream(iter([valid_request(4), valid_request(4), valid_request(4)]), timeout=10))
        assert rpc.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "more than max_stream_rows (10)" in rpc.value.details()
        channel.close()


def _varint(n: int) -> bytes:
    out = b""
    while True:
        byte, n = n & 0x7F, n >> 7
        if not n:
            return out + bytes([byte])
        out += bytes([byte | 0x80])


def _field(number: int, payload: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(payload)) + payload


def _flight_data(ipc_message: pa.Buffer, descriptor: bytes | None = None) -> bytes:
    """A FlightData protobuf (descriptor=1, data_header=2, data_body=1000) written by hand, so the
    test can send what pyarrow's own writer refuses to: a second schema in the middle of a stream."""
    msg = pa.ipc.read_message(ipc_message)
    out = _field(1, descriptor) if descriptor else b""
    out += _field(2, msg.metadata.to_pybytes())
    if msg.body is not None and msg.body.size:
        out += _field(1000, msg.body.to_pybytes())
    return out


def test_schema_change_mid_stream_is_a_client_error(server, stub):
    descriptor = b"\x08\x01" + _field(3, b"tabular")  # FlightDescriptor{type: PATH, path: ["tabular"]}
    good, _ = tabular_batch(3)
    other = pa.record_batch({"x": pa.array([1.0, 2.0])})
    messages = [_flight_data(good.schema.serialize(), descriptor), _flight_data(good.serialize()),
                _flight_data(other.schema.serialize()), _flight_data(other.serialize())]
    channel = grpc.insecure_channel(server.flight_uri.removeprefix("grpc://"))
    call = channel.stream_stream("/arrow.flight.protocol.FlightService/DoExchange",
                                 request_serializer=lambda b: b, response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as info:
        list(call(iter(messages), timeout=10))
    assert "the DoExchange stream for model 'tabular' could not be read" in info.value.details()
    assert "[INVALID_ARGUMENT]" in info.value.details()
    assert len(list(call(iter(messages[:2]), timeout=10))) == 2  # the same stream without the change works
    TRIED["flight"] += 1
    channel.close()
    assert_still_serving(stub)
