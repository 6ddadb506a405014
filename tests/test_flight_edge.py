"""The Flight edge under hostile input: hand-built wire messages over raw gRPC (FlightData with
edited IPC headers), checked for the status code on the wire, no server internals in any message,
the server's liveness and memory, and a correct answer to the next valid request on both protocols."""

from __future__ import annotations

import json
import signal
import threading
import time

import grpc
import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
from tritonclient.grpc import service_pb2, service_pb2_grpc

from iskander.client.flight_status import error_details
from iskander.launch import spawn_server

from data import dtypes_batch, dtypes_feeds, tabular_batch
from flight_wire import (
    action, batch_message, claim_rows, descriptor, do_exchange, flight_data, idle_exchange, schema_message,
    unary, unary_stream,
)
from helpers import exchange, serving
from models import reference

ROWS = 1237  # odd, so the edited row count cannot be mistaken for a buffer size in the IPC header
INTERNALS = ("Traceback", 'File "', ".py", "/iskander/", "line ")


@pytest.fixture(scope="module")
def channel(server):
    with grpc.insecure_channel(server.flight_uri.removeprefix("grpc://")) as ch:
        yield ch


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def assert_clean(err: grpc.RpcError, code: grpc.StatusCode, *fragments: str) -> dict:
    """The wire code is ``code``, the message names what it must, and carries no server internals."""
    assert err.code() == code, (err.code(), err.details())
    text = err.details() + " ".join(str(v) for _, v in err.trailing_metadata() or ())
    for bad in INTERNALS:
        assert bad not in text, f"{bad!r} leaked: {text[:500]}"
    for fragment in fragments:
        assert fragment in err.details(), err.details()
    return error_details(Exception(err.details()))


def assert_serving(server, models_dir) -> None:
    """The next valid request on both protocols is answered correctly."""
    feeds = dtypes_feeds(8)
    out = exchange(server.flight_uri, "dtypes", [dtypes_batch(feeds)])[0]
    ref = reference(models_dir / "dtypes.onnx", feeds)
    compared = 0
    for name in ref:
        if name in out.schema.names:
            values = out.column(name)
            while pa.types.is_fixed_size_list(values.type):
                values = values.flatten()
            np.testing.assert_allclose(values.to_numpy(zero_copy_only=False).reshape(ref[name].shape), ref[name], rtol=1e-6)
            compared += 1
    assert compared
    with grpc.insecure_channel(server.grpc_url) as ch:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(ch)
        assert stub.ServerLive(service_pb2.ServerLiveRequest(), timeout=5).live


def exchange_raw(channel, model: str, batch: pa.RecordBatch, header: bytes | None = None,
                 body: bytes | None = None, schema: bytes | None = None) -> grpc.RpcError:
    real_header, real_body = batch_message(batch)
    messages = [flight_data(schema or schema_message(batch.schema), desc=descriptor(model)),
                flight_data(header if header is not None else real_header, body if body is not None else real_body)]
    with pytest.raises(grpc.RpcError) as info:
        do_exchange(channel, messages)
    return info.value


@pytest.mark.parametrize("claimed", [ROWS + 63, ROWS * 40, 10**9, 2**62])
def test_a_batch_claiming_more_rows_than_its_buffers_hold_is_refused(server, channel, models_dir, claimed):
    batch = dtypes_batch(dtypes_feeds(ROWS))
    header, body = batch_message(batch)
    before = rss_kib(server.process.pid)
    err = exchange_raw(channel, "dtypes", batch, header=claim_rows(header, ROWS, claimed), body=body)
    info = assert_clean(err, grpc.StatusCode.INVALID_ARGUMENT, "model 'dtypes'", "column '")
    assert info["code"] == "INVALID_ARGUMENT" and info["column"] in batch.schema.names
    assert rss_kib(server.process.pid) - before < 50_000
    assert_serving(server, models_dir)


def test_a_string_batch_claiming_more_rows_is_refused_naming_the_column(server, channel, models_dir):
    batch, _ = tabular_batch(ROWS)
    header, body = batch_message(batch)
    err = exchange_raw(channel, "tabular", batch, header=claim_rows(header, ROWS, ROWS + 1), body=body)
    info = assert_clean(err, grpc.StatusCode.INVALID_ARGUMENT, "column 'entity_id'", "model 'tabular'")
    assert info["column"] == "entity_id"
    assert_serving(server, models_dir)


def test_a_negative_row_count_is_refused(server, channel, models_dir):
    batch = dtypes_batch(dtypes_feeds(ROWS))
    header, body = batch_message(batch)
    err = exchange_raw(channel, "dtypes", batch, header=claim_rows(header, ROWS, -5), body=body)
    assert_clean(err, grpc.StatusCode.INVALID_ARGUMENT)
    assert_serving(server, models_dir)


def test_a_body_shorter_than_its_header_says_is_refused(server, channel, models_dir):
    batch = dtypes_batch(dtypes_feeds(ROWS))
    header, body = batch_message(batch)
    err = exchange_raw(channel, "dtypes", batch, header=header, body=body[: len(body) // 3])
    assert_clean(err, grpc.StatusCode.INVALID_ARGUMENT, "model 'dtypes'")
    assert_serving(server, models_dir)


def test_garbage_ipc_header_is_refused(server, channel, models_dir):
    batch = dtypes_batch(dtypes_feeds(4))
    for header in (b"\x00" * 7, b"\xff" * 64, bytes(range(256)) * 4):
        err = exchange_raw(channel, "dtypes", batch, header=header, body=b"\x01" * 64)
        assert_clean(err, grpc.StatusCode.INVALID_ARGUMENT)
    assert_serving(server, models_dir)


def test_string_offsets_past_the_data_are_refused(server, channel, models_dir):
    """Offsets pointing 100 KB past the string data (pyarrow's own writer refuses to send this, a
    hostile producer does not): only the full validation sees it."""
    batch, _ = tabular_batch(3)
    header, body = batch_message(batch)
    offsets = np.array([0, 2, 4, 6], np.int32).tobytes()  # "e0", "e1", "e2"
    assert body.count(offsets) == 1
    body = body.replace(offsets, np.array([0, 2, 4, 100_000], np.int32).tobytes())
    err = exchange_raw(channel, "tabular", batch, header=header, body=body)
    info = assert_clean(err, grpc.StatusCode.INVALID_ARGUMENT, "column 'entity_id'", "model 'tabular'")
    assert info["column"] == "entity_id"
    assert_serving(server, models_dir)


@pytest.mark.parametrize("storage", [pa.int8(), pa.float64(), pa.utf8()])
def test_bfloat16_metadata_over_other_storage_is_refused(server, channel, models_dir, storage):
    """A field whose metadata names iskander.bfloat16 over storage other than uint16."""
    meta = {b"ARROW:extension:name": b"iskander.bfloat16", b"ARROW:extension:metadata": b""}
    values = pa.array([1, 2, 3], pa.int8()).cast(storage)
    schema = pa.schema([pa.field("x", storage, metadata=meta)])
    batch = pa.record_batch([values], schema=schema)
    err = exchange_raw(channel, "alltypes", batch)
    # read by pyarrow before the handler runs, so the message cannot name the model
    assert_clean(err, grpc.StatusCode.INVALID_ARGUMENT, "iskander.bfloat16 must be stored as uint16")
    assert_serving(server, models_dir)


def test_undecodable_flight_data_does_not_hurt_the_server(server, channel, models_dir):
    """A FlightData message that is not protobuf fails in pyarrow's C++ transport before Iskander
    sees the call; pyarrow answers it UNKNOWN ("Stream finished before first message sent"), which
    Iskander cannot change (docs/security.md). What Iskander owes: no crash, no internals, service."""
    for garbage in (b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05abc"):
        with pytest.raises(grpc.RpcError) as info:
            do_exchange(channel, [garbage])
        assert info.value.code() != grpc.StatusCode.OK
        for bad in INTERNALS:
            assert bad not in info.value.details()
    assert_serving(server, models_dir)


@pytest.mark.parametrize("method,request_bytes,code,fragment", [
    ("GetSchema", descriptor("nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    ("GetFlightInfo", descriptor("nope"), grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    ("GetSchema", descriptor("a", "b", "c"), grpc.StatusCode.INVALID_ARGUMENT, "[model] or [model, version]"),
    ("GetSchema", b"\x08\x02\x12\x03abc", grpc.StatusCode.INVALID_ARGUMENT, "PATH descriptor"),
    ("GetSchema", descriptor("x" * 1_000_000), grpc.StatusCode.NOT_FOUND, "chars)"),
])
def test_discovery_errors_carry_their_code_and_no_traceback(channel, method, request_bytes, code, fragment):
    with pytest.raises(grpc.RpcError) as info:
        unary(channel, method, request_bytes)
    assert_clean(info.value, code, fragment)
    assert len(info.value.details()) < 4000  # a 1 MB name is not echoed back


@pytest.mark.parametrize("kind,body,code,fragment", [
    ("model_metadata", b"{" + b'"a":[' * 12_000, grpc.StatusCode.INVALID_ARGUMENT, "deeper than"),
    ("model_metadata", b"[" * 60_000, grpc.StatusCode.NOT_FOUND, "chars)"),  # not JSON: a (long) model name
    ("model_metadata", b'{"name": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["}', grpc.StatusCode.NOT_FOUND, "unknown model"),
    ("model_metadata", b'{"name": {"x": 1}}', grpc.StatusCode.INVALID_ARGUMENT, "must be a string"),
    ("statistics", b"x" * 100_000, grpc.StatusCode.INVALID_ARGUMENT, "larger than"),
    ("model_metadata", b'{"name": "nope"}', grpc.StatusCode.NOT_FOUND, "unknown model 'nope'"),
    ("no_such_action", b"", grpc.StatusCode.UNIMPLEMENTED, "unknown action 'no_such_action'"),
])
def test_action_errors_carry_their_code_and_no_traceback(server, channel, models_dir, kind, body, code, fragment):
    with pytest.raises(grpc.RpcError) as info:
        unary_stream(channel, "DoAction", action(kind, body))
    assert_clean(info.value, code, fragment)
    assert_serving(server, models_dir)


def test_pyarrow_clients_get_typed_exceptions_with_json_details(server):
    client = flight.connect(server.flight_uri)
    try:
        with pytest.raises(pa.ArrowKeyError) as nf:
            client.get_schema(flight.FlightDescriptor.for_path("nope"))
        assert error_details(nf.value) == {"code": "NOT_FOUND", "message": error_details(nf.value)["message"],
                                           "model": "nope"}
        with pytest.raises(pa.ArrowNotImplementedError):
            list(client.do_action(flight.Action("no_such_action", b"")))
        bad, _ = tabular_batch(3)
        with pytest.raises(pa.ArrowInvalid) as inv:
            exchange(client, "two_tower", [bad])
        assert error_details(inv.value)["code"] == "INVALID_ARGUMENT"
    finally:
        client.close()


def test_stream_cap_refuses_extra_streams_while_health_and_new_streams_after_close_work(models_dir, tmp_path):
    config = (f'[server]\nmax_concurrent_rpcs = 8\nmax_concurrent_streams = 3\n\n'
              f'[[models]]\nname = "dtypes"\npath = "{models_dir}/dtypes.onnx"\n')
    with serving(tmp_path, config) as running:
        batch = dtypes_batch(dtypes_feeds(2))
        first = flight_data(schema_message(batch.schema), desc=descriptor("dtypes"))
        with grpc.insecure_channel(running.flight_uri.removeprefix("grpc://")) as ch:
            opened = [idle_exchange(ch, first) for _ in range(3)]
            time.sleep(0.5)  # let the three calls start on the server
            try:
                with pytest.raises(grpc.RpcError) as info:
                    do_exchange(ch, [first, flight_data(*batch_message(batch))])
                # RESOURCE_EXHAUSTED cannot travel from pyarrow's server: a limit to wait out is UNAVAILABLE
                assert_clean(info.value, grpc.StatusCode.UNAVAILABLE, "max_concurrent_streams = 3")
                extra = json.loads(dict(info.value.trailing_metadata())["grpc-status-details-bin"])
                assert extra["code"] == "RESOURCE_EXHAUSTED" and extra["limit"] == "max_concurrent_streams"
                # health and discovery are never counted
                started = time.monotonic()
                health = json.loads(unary_stream(ch, "DoAction", action("health"))[0][2:])
                assert health["live"] is True and time.monotonic() - started < 1.0
                unary(ch, "GetSchema", descriptor("dtypes"))
            finally:
                for responses, gate in opened:
                    gate.open()
                    responses.cancel()
            deadline = time.monotonic() + 10
            while True:  # the slots come back once the idle calls end
                try:
                    out = exchange(running.flight_uri, "dtypes", [batch])
                    break
                except pa.ArrowException:
                    assert time.monotonic() < deadline
                    time.sleep(0.2)
            assert out[0].num_rows == 2


def sigterm_with_idle_stream(models_dir, folder, grace: float) -> tuple[int, float, str]:
    config = folder / "config.toml"
    config.write_text(f'[server]\ngrace_seconds = {grace}\n\n'
                      f'[[models]]\nname = "tabular"\npath = "{models_dir}/tabular.onnx"\n')
    running = spawn_server(config, folder / "server.log")
    c = flight.connect(running.flight_uri)
    try:
        batch, _ = tabular_batch(2)
        writer, reader = c.do_exchange(flight.FlightDescriptor.for_path("tabular"))
        writer.begin(batch.schema)
        writer.write_batch(batch)
        assert reader.read_chunk().data.num_rows == 2
        time.sleep(0.2)  # let the server's stream thread get back to reading: the stream is idle
        started = time.monotonic()
        running.process.send_signal(signal.SIGTERM)
        code = running.process.wait(timeout=grace + 15)
        return code, time.monotonic() - started, running.log()
    finally:
        running.stop()
        c.close()


def test_sigterm_with_an_idle_stream_exits_0_within_grace_every_time(models_dir, tmp_path):
    """pyarrow's serve() used to take the signal handlers over in 1 run of 3: 8 runs in a row."""
    grace = 0.5
    for run in range(8):
        folder = tmp_path / f"run{run}"
        folder.mkdir()
        code, took, log = sigterm_with_idle_stream(models_dir, folder, grace)
        assert code == 0, log
        assert took < grace + 1.0 + 0.5, (run, took)  # grace + 1 s, plus process teardown
        # Normally the stream is idle and outlives the grace period. On a loaded machine the signal can
        # land before the stream thread is back in its read: the stream then ends after the batch it
        # answered and the stop is clean. Both are right; what matters is exit 0 within the grace.
        assert "grace period with calls still open" in log or "stopped" in log, log


def test_sigterm_answers_the_batch_in_flight_then_ends_the_stream_cleanly(models_dir, tmp_path):
    """A client streaming batches back to back through SIGTERM gets an answer for every batch it
    sent before the stream ends, and the end is a clean UNAVAILABLE naming the shutdown."""
    config = (f'[server]\ngrace_seconds = 5\n\n'
              f'[[models]]\nname = "tabular"\npath = "{models_dir}/tabular.onnx"\n')
    with serving(tmp_path, config) as running:
        c = flight.connect(running.flight_uri)
        batch, feeds = tabular_batch(64)
        expected = reference(models_dir / "tabular.onnx", feeds)["probability"]
        writer, reader = c.do_exchange(flight.FlightDescriptor.for_path("tabular"))
        writer.begin(batch.schema)
        sent = answered = 0
        outcome: list[BaseException] = []
        signalled = threading.Timer(0.5, lambda: running.process.send_signal(signal.SIGTERM))
        signalled.start()
        try:
            while sent < 100_000:
                try:
                    writer.write_batch(batch)
                    sent += 1
                    out = reader.read_chunk().data
                except (pa.ArrowException, OSError) as exc:
                    outcome.append(exc)
                    break
                answered += 1
                np.testing.assert_allclose(out.column("score").to_numpy().reshape(-1), expected.reshape(-1),
                                           rtol=1e-6)
        finally:
            signalled.cancel()
            c.close()
        assert outcome and isinstance(outcome[0], flight.FlightUnavailableError), outcome
        assert "shutting down" in str(outcome[0])
        assert answered >= 1 and sent - answered <= 1  # the one sent after the server closed the stream
        assert running.process.wait(timeout=10) == 0


def test_random_byte_flips_in_ipc_header_and_body_never_hurt_the_server(server, channel, models_dir):
    """300 valid messages with random bytes changed in the IPC header or body (seeded): each is
    answered or refused with a client-error code, never UNKNOWN or INTERNAL, and the server lives."""
    rng = np.random.default_rng(12)
    batch, _ = tabular_batch(ROWS)
    header, body = batch_message(batch)
    schema = flight_data(schema_message(batch.schema), desc=descriptor("tabular"))
    codes: dict[str, int] = {}
    for _ in range(300):
        in_header = rng.random() < 0.6
        target = bytearray(header if in_header else body)
        for pos in rng.integers(0, len(target), rng.integers(1, 4)):
            target[pos] = int(rng.integers(0, 256))
        mutated = (bytes(target), body) if in_header else (header, bytes(target))
        try:
            do_exchange(channel, [schema, flight_data(*mutated)])
            codes["OK"] = codes.get("OK", 0) + 1
        except grpc.RpcError as err:
            codes[err.code().name] = codes.get(err.code().name, 0) + 1
            assert err.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), err.details()
            for bad in INTERNALS:
                assert bad not in err.details()
    assert server.process.poll() is None
    assert sum(codes.values()) == 300 and codes.get("INVALID_ARGUMENT", 0) > 0, codes
    assert_serving(server, models_dir)


def test_a_huge_model_name_costs_one_short_log_line(server, channel):
    """A 1 MB model name on GetSchema and DoExchange: NOT_FOUND with the name cut, and no log line
    of the server's longer than a few KB (it used to write the whole name per request)."""
    name = "m" * 1_000_000
    with pytest.raises(grpc.RpcError) as info:
        unary(channel, "GetSchema", descriptor(name))
    assert_clean(info.value, grpc.StatusCode.NOT_FOUND, "chars)")
    batch = dtypes_batch(dtypes_feeds(2))
    with pytest.raises(grpc.RpcError) as info:
        do_exchange(channel, [flight_data(schema_message(batch.schema), desc=descriptor(name)),
                              flight_data(*batch_message(batch))])
    assert_clean(info.value, grpc.StatusCode.NOT_FOUND, "chars)")
    time.sleep(0.2)  # the log line is written as the call ends
    longest = max(len(line) for line in server.log().splitlines())
    assert longest < 8192, longest
