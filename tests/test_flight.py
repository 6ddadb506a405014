"""Arrow Flight frontend against a real server process, compared with onnxruntime in process."""

from __future__ import annotations

import base64
import json

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from iskander.client.flight_status import error_details

from data import dtypes_batch, dtypes_feeds, fsl, tabular_batch, two_tower_batch
from helpers import exchange as shared_exchange
from models import reference


@pytest.fixture(scope="module")
def client(server):
    c = flight.connect(server.flight_uri)
    c.wait_for_available(timeout=10)
    yield c
    c.close()


def exchange(client: flight.FlightClient, descriptor: flight.FlightDescriptor, batches: list[pa.RecordBatch]):
    path = [p.decode() for p in descriptor.path] if descriptor.descriptor_type == flight.DescriptorType.PATH else None
    if path is None:  # a CMD descriptor: only to check that the server refuses it
        writer, reader = client.do_exchange(descriptor)
        with writer:
            writer.begin(batches[0].schema)
            writer.write_batch(batches[0])
            return [reader.read_chunk().data]
    return shared_exchange(client, path[0], batches, version=path[1] if len(path) > 1 else None)


def error_info(exc: pa.ArrowException) -> dict:
    return error_details(exc)


def test_two_tower_matches_onnxruntime_and_keeps_passthrough(client, models_dir):
    batch, feeds = two_tower_batch(64)
    (out,) = exchange(client, flight.FlightDescriptor.for_path("two_tower"), [batch])
    ref = reference(models_dir / "two_tower.onnx", feeds)
    assert out.schema.names == ["user_id", "item_id", "score", "user_embedding"]
    assert out.column("user_id").equals(batch.column("user_id"))
    assert out.column("item_id").equals(batch.column("item_id"))
    np.testing.assert_array_equal(out.column("score").to_numpy(), ref["score"])
    emb = out.column("user_embedding").flatten().to_numpy().reshape(64, 32)
    np.testing.assert_array_equal(emb, ref["user_embedding"])
    assert out.schema.field("user_embedding").type == pa.list_(pa.float32(), 32)


def test_many_batches_on_one_stream_come_back_in_order(client, models_dir):
    sizes = [1, 7, 128, 3, 1000, 2]
    batches = [tabular_batch(n, seed=i) for i, n in enumerate(sizes)]
    outs = exchange(client, flight.FlightDescriptor.for_path("tabular"), [b for b, _ in batches])
    assert [o.num_rows for o in outs] == sizes
    for out, (batch, feeds) in zip(outs, batches):
        ref = reference(models_dir / "tabular.onnx", feeds)["probability"].reshape(-1)
        assert out.column("entity_id").equals(batch.column("entity_id"))
        np.testing.assert_array_equal(out.column("score").to_numpy(), ref)


def test_column_order_does_not_matter(client):
    batch, _ = tabular_batch(5)
    reordered = batch.select(["category", "features", "entity_id"])
    (a,) = exchange(client, flight.FlightDescriptor.for_path("tabular"), [batch])
    (b,) = exchange(client, flight.FlightDescriptor.for_path("tabular"), [reordered])
    assert a.equals(b)


def test_derived_contract_dtypes(client, models_dir):
    feeds = dtypes_feeds(33)
    (out,) = exchange(client, flight.FlightDescriptor.for_path("dtypes"), [dtypes_batch(feeds)])
    ref = reference(models_dir / "dtypes.onnx", feeds)
    assert out.schema.field("x64_sq").type == pa.float64()
    assert out.schema.field("i32_twice").type == pa.int32()
    assert out.schema.field("f32_neg").type == pa.list_(pa.list_(pa.float32(), 3), 2)
    np.testing.assert_array_equal(out.column("x64_sq").to_numpy(), ref["x64_sq"])
    np.testing.assert_array_equal(out.column("i32_twice").to_numpy(), ref["i32_twice"])
    np.testing.assert_array_equal(out.column("i64_sum").to_numpy(), ref["i64_sum"])
    np.testing.assert_array_equal(
        out.column("f32_neg").flatten().flatten().to_numpy().reshape(33, 2, 3), ref["f32_neg"]
    )
    np.testing.assert_array_equal(out.column("flag_not").to_numpy(zero_copy_only=False), ref["flag_not"])


def test_sklearn_model(client, models_dir):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((50, 4)).astype(np.float32)
    batch = pa.record_batch({"entity_id": pa.array([str(i) for i in range(50)]), "features": fsl(x)})
    (out,) = exchange(client, flight.FlightDescriptor.for_path("sklearn"), [batch])
    ref = reference(models_dir / "sklearn.onnx", {"X": x})
    np.testing.assert_array_equal(out.column("label").to_numpy(), ref["label"])
    np.testing.assert_array_equal(out.column("probabilities").flatten().to_numpy().reshape(50, 2), ref["probabilities"])


def test_sliced_batch_is_read_from_its_offset(client, models_dir):
    batch, feeds = tabular_batch(20)
    (out,) = exchange(client, flight.FlightDescriptor.for_path("tabular"), [batch.slice(5, 10)])
    ref = reference(models_dir / "tabular.onnx", {k: v[5:15] for k, v in feeds.items()})["probability"]
    np.testing.assert_array_equal(out.column("score").to_numpy(), ref.reshape(-1))


def test_empty_batch_gets_empty_answer(client):
    batch, _ = tabular_batch(3)
    (out,) = exchange(client, flight.FlightDescriptor.for_path("tabular"), [batch.slice(0, 0)])
    assert out.num_rows == 0
    assert out.schema.names == ["entity_id", "score"]


def test_version_in_descriptor(client):
    batch, _ = tabular_batch(4)
    (v1,) = exchange(client, flight.FlightDescriptor.for_path("tabular", "1"), [batch])
    (v2,) = exchange(client, flight.FlightDescriptor.for_path("tabular", "2"), [batch])
    assert v1.equals(v2)


# --- discovery -------------------------------------------------------------------------------------


def test_list_flights_names_every_model(client):
    infos = list(client.list_flights())
    names = sorted(i.descriptor.path[0].decode() for i in infos)
    assert names == ["alltypes", "dtypes", "ints", "sklearn", "small_batch", "strings", "tabular", "two_tower"]


def test_get_schema_is_what_exchange_accepts(client):
    schema = client.get_schema(flight.FlightDescriptor.for_path("tabular")).schema
    assert schema.names == ["entity_id", "features", "category"]
    assert schema.field("features").type == pa.list_(pa.float32(), 4)
    # A batch built straight from the advertised schema is accepted.
    batch = pa.record_batch(
        [pa.array(["a"]), fsl(np.ones((1, 4), np.float32)), pa.array([3], pa.int64())], schema=schema
    )
    (out,) = exchange(client, flight.FlightDescriptor.for_path("tabular"), [batch])
    assert out.num_rows == 1


def test_flight_info_carries_output_schema(client):
    info = client.get_flight_info(flight.FlightDescriptor.for_path("two_tower"))
    assert info.schema.names == ["user_id", "item_id", "user_features", "item_features"]
    meta = json.loads(info.app_metadata)
    assert meta["name"] == "two_tower" and meta["version"] == "1" and meta["state"] == "READY"
    out_schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(meta["output_schema_ipc"])))
    assert out_schema.names == ["user_id", "item_id", "score", "user_embedding"]
    assert [f["name"] for f in meta["output_schema"]] == out_schema.names


def test_actions(client):
    actions = {a.type for a in client.list_actions()}
    assert {"health", "ready", "list_models", "model_metadata"} <= actions
    health = json.loads(next(iter(client.do_action(flight.Action("health", b"")))).body.to_pybytes())
    assert health["live"] and health["ready"]
    meta = json.loads(next(iter(client.do_action(flight.Action("model_metadata", b"tabular")))).body.to_pybytes())
    assert meta["versions"] == ["1", "2"]
    assert [f["name"] for f in meta["output_schema"]] == ["entity_id", "score"]
    listed = json.loads(next(iter(client.do_action(flight.Action("list_models", b"")))).body.to_pybytes())
    assert {(m["name"], m["version"]) for m in listed} >= {("tabular", "1"), ("tabular", "2"), ("two_tower", "1")}
    ready = json.loads(
        next(iter(client.do_action(flight.Action("ready", b'{"name": "tabular", "version": "2"}')))).body.to_pybytes()
    )
    assert ready == {"name": "tabular", "version": "2", "ready": True}


# --- errors ---------------------------------------------------------------------------------------


def expect_error(client, descriptor, batch) -> tuple[str, dict]:
    with pytest.raises(pa.ArrowException) as info:
        exchange(client, descriptor, [batch])
    return str(info.value), error_info(info.value)


def test_unknown_model(client):
    batch, _ = tabular_batch(2)
    msg, info = expect_error(client, flight.FlightDescriptor.for_path("nope"), batch)
    assert info["code"] == "NOT_FOUND" and info["model"] == "nope"
    assert "unknown model 'nope'" in msg and "tabular" in msg


def test_unknown_version(client):
    batch, _ = tabular_batch(2)
    msg, info = expect_error(client, flight.FlightDescriptor.for_path("tabular", "9"), batch)
    assert info["code"] == "NOT_FOUND"
    assert "model 'tabular' has no version '9'" in msg and "versions: 1, 2" in msg


def test_missing_column(client):
    batch, _ = tabular_batch(2)
    msg, info = expect_error(client, flight.FlightDescriptor.for_path("tabular"), batch.drop_columns(["category"]))
    assert info["code"] == "INVALID_ARGUMENT" and info["column"] == "category"
    assert "missing column 'category' for model 'tabular'" in msg and "int64" in msg


def test_extra_column(client):
    batch, _ = tabular_batch(2)
    msg, info = expect_error(
        client, flight.FlightDescriptor.for_path("tabular"), batch.append_column("extra", pa.array([1, 2]))
    )
    assert info["code"] == "INVALID_ARGUMENT" and info["column"] == "extra"
    assert "unexpected column 'extra'" in msg


def test_wrong_type(client):
    batch, _ = tabular_batch(2)
    bad = batch.set_column(2, "category", pa.array([1.0, 2.0]))
    msg, info = expect_error(client, flight.FlightDescriptor.for_path("tabular"), bad)
    assert info == {
        "code": "INVALID_ARGUMENT",
        "message": info["message"],
        "model": "tabular",
        "column": "category",
        "expected": "int64",
        "got": "float64",
    }
    assert "column 'category' of model 'tabular' has type float64, model expects int64" in msg


def test_wrong_shape(client):
    batch, _ = tabular_batch(2)
    bad = batch.set_column(1, "features", fsl(np.ones((2, 5), np.float32)))
    msg, info = expect_error(client, flight.FlightDescriptor.for_path("tabular"), bad)
    assert info["code"] == "INVALID_ARGUMENT" and info["column"] == "features"
    assert "fixed_size_list<float32>[5]" in msg and "fixed_size_list<float32>[4]" in msg


def test_nulls_in_non_null_input(client):
    batch, _ = tabular_batch(4)
    bad = batch.set_column(2, "category", pa.array([1, 2, None, 4], pa.int64()))
    msg, info = expect_error(client, flight.FlightDescriptor.for_path("tabular"), bad)
    assert info["code"] == "INVALID_ARGUMENT" and info["column"] == "category" and info["row"] == 2
    assert "has a null at row 2" in msg


def test_null_inside_list_column(client):
    batch, _ = tabular_batch(3)
    values = pa.array([1.0] * 4 + [None] + [1.0] * 7, pa.float32())
    bad = batch.set_column(1, "features", pa.FixedSizeListArray.from_arrays(values, 4))
    msg, info = expect_error(client, flight.FlightDescriptor.for_path("tabular"), bad)
    assert info["column"] == "features" and info["row"] == 1


def test_cmd_descriptor_is_rejected(client):
    batch, _ = tabular_batch(2)
    msg, info = expect_error(client, flight.FlightDescriptor.for_command(b"tabular"), batch)
    assert info["code"] == "INVALID_ARGUMENT" and "PATH descriptor" in msg


def test_errors_leave_no_traceback_and_server_keeps_serving(client, models_dir):
    batch, feeds = tabular_batch(3)
    msg, _ = expect_error(client, flight.FlightDescriptor.for_path("tabular"), batch.drop_columns(["features"]))
    assert "Traceback" not in msg and ".py" not in msg
    (out,) = exchange(client, flight.FlightDescriptor.for_path("tabular"), [batch])
    ref = reference(models_dir / "tabular.onnx", feeds)["probability"].reshape(-1)
    np.testing.assert_array_equal(out.column("score").to_numpy(), ref)


def test_broken_model_is_unavailable_while_others_serve(faulty_server, models_dir):
    c = flight.connect(faulty_server.flight_uri)
    batch, feeds = two_tower_batch(3)
    msg, info = expect_error(c, flight.FlightDescriptor.for_path("broken"), batch)
    assert info["code"] == "UNAVAILABLE" and info["model"] == "broken"
    assert "model 'broken' version 1 is not ready" in msg and "broken.onnx" in msg
    assert str(models_dir) not in msg  # no server paths leak to clients
    (out,) = exchange(c, flight.FlightDescriptor.for_path("two_tower"), [batch])
    np.testing.assert_array_equal(
        out.column("score").to_numpy(), reference(models_dir / "two_tower.onnx", feeds)["score"]
    )
    health = json.loads(next(iter(c.do_action(flight.Action("health", b"")))).body.to_pybytes())
    assert health["ready"] is False
    assert {"name": "broken", "version": "1", "state": "UNAVAILABLE"} in health["models"]
    c.close()


def test_sigterm_stops_the_server_cleanly(models_dir, tmp_path):
    import signal

    from iskander.launch import spawn_server

    config = tmp_path / "config.toml"
    config.write_text(f'[[models]]\nname = "tabular"\npath = "{models_dir}/tabular.onnx"\n')
    running = spawn_server(config, tmp_path / "server.log")
    try:
        c = flight.connect(running.flight_uri)
        batch, _ = tabular_batch(2)
        assert exchange(c, flight.FlightDescriptor.for_path("tabular"), [batch])[0].num_rows == 2
        c.close()
        running.process.send_signal(signal.SIGTERM)
        assert running.process.wait(timeout=20) == 0
        assert "stopped" in running.log()
    finally:
        running.stop()


def test_invalid_utf8_in_a_string_column_is_a_client_error(client, models_dir):
    """Arrow C++ does not validate utf8 on IPC read, so a producer can send bytes that are not UTF-8;
    a column the model consumes as a string tensor must be refused as bad input, not INTERNAL."""
    bad = pa.Array.from_buffers(pa.utf8(), 1, [None, pa.py_buffer(np.array([0, 2], np.int32)),
                                               pa.py_buffer(b"\xff\xfe")])
    batch = pa.record_batch({"word": bad})
    msg, info = expect_error(client, flight.FlightDescriptor.for_path("strings"), batch)
    assert info["code"] == "INVALID_ARGUMENT" and info["column"] == "word"
    # refused by the edge's full validation, before the contract reads the column
    assert "column 'word' for model 'strings' is malformed" in msg and "Invalid UTF8" in msg


def test_client_disconnect_mid_stream_frees_the_stream(server):
    """Clients that drop the connection with a stream open leave no errors behind and no stuck
    handlers: the server keeps answering on new streams."""
    batch, _ = tabular_batch(2)
    for _ in range(5):
        c = flight.connect(server.flight_uri)
        writer, reader = c.do_exchange(flight.FlightDescriptor.for_path("tabular"))
        writer.begin(batch.schema)
        writer.write_batch(batch)
        assert reader.read_chunk().data.num_rows == 2
        c.close()  # no done_writing: the connection just goes away
    c = flight.connect(server.flight_uri)
    assert exchange(c, flight.FlightDescriptor.for_path("tabular"), [batch])[0].num_rows == 2
    c.close()
    assert "internal error in Flight do_exchange" not in server.log()
