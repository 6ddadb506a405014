"""Metrics, traces, statistics and logs, read the way operators read them: a Prometheus scrape of a
real server process, spans exported over OTLP/gRPC to a receiver in the test, JSON log lines.

Never import iskander._proto here (tritonclient defines the same protobuf symbols)."""

from __future__ import annotations

import json
import secrets
import shutil
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest
import tritonclient.grpc as triton
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from data import tabular_batch
from helpers import exchange, serving
from otlp_receiver import otlp_receiver

CONFIG = """\
[observability]
metrics_port = 0
{extra}

[[models]]
name = "tabular"
path = "{root}/tabular.onnx"

[[models]]
name = "plain"
path = "{plain}"

[[models]]
name = "batched"
path = "{plain}"
instances = 1
dynamic_batching = {{ max_batch_rows = 64, max_queue_delay_us = 30000 }}
"""


def _plain_model(models_dir: Path, folder: Path) -> Path:
    """tabular.onnx without its manifest: a derived, plain tensor contract (OIP's tensor fast path)."""
    path = folder / "plain_tabular.onnx"
    shutil.copy(models_dir / "tabular.onnx", path)
    return path


@pytest.fixture(scope="module")
def metrics_server(models_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("metrics")
    config = CONFIG.format(root=models_dir, plain=_plain_model(models_dir, folder), extra="")
    with serving(folder, config) as server:
        yield server


def scrape(server) -> dict[tuple[str, frozenset], float]:
    """Every sample of the /metrics page keyed by (sample name, labels)."""
    assert server.metrics_url is not None
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def tabular_oip_inputs(n: int, seed: int = 0, category_dtype: str = "INT64"):
    batch, feeds = tabular_batch(n, seed)
    ids = np.array([s.encode() for s in batch.column("entity_id").to_pylist()], dtype=np.object_).reshape(n, 1)
    cat = feeds["category"].reshape(n, 1)
    if category_dtype == "FP32":
        cat = cat.astype(np.float32)
    inputs = []
    for name, data, dtype in (("entity_id", ids, "BYTES"), ("features", feeds["numeric"], "FP32"),
                              ("category", cat, category_dtype)):
        t = triton.InferInput(name, list(data.shape), dtype)
        t.set_data_from_numpy(data)
        inputs.append(t)
    return inputs


def plain_oip_inputs(n: int, seed: int = 0):
    _, feeds = tabular_batch(n, seed)
    inputs = []
    for name, data, dtype in (("numeric", feeds["numeric"], "FP32"), ("category", feeds["category"], "INT64")):
        t = triton.InferInput(name, list(data.shape), dtype)
        t.set_data_from_numpy(data)
        inputs.append(t)
    return inputs


def flight_statistics(server, name: str) -> dict:
    with flight.connect(server.flight_uri) as client:
        body = json.dumps({"name": name, "version": "1"}).encode()
        (snap,) = json.loads(next(iter(client.do_action(flight.Action("statistics", body)))).body.to_pybytes())
    return snap


def test_scrape_counts_exactly_what_both_protocols_did(metrics_server):
    """Known traffic over Flight and OIP, good and bad; the scrape shows exactly it, per protocol."""
    server = metrics_server
    batch, _ = tabular_batch(10)
    exchange(server.flight_uri, "tabular", [batch, batch, batch])  # 3 requests, 30 rows
    bad = pa.record_batch({"entity_id": pa.array(["a"]), "features": batch.column("features").slice(0, 1),
                           "category": pa.array([1.5])})
    with pytest.raises(pa.ArrowException, match="INVALID_ARGUMENT"):
        exchange(server.flight_uri, "tabular", [bad])
    with pytest.raises(pa.ArrowException, match="NOT_FOUND"):
        exchange(server.flight_uri, "no_such_model", [batch])

    client = triton.InferenceServerClient(server.grpc_url)
    for seed in range(4):  # 4 requests, 28 rows, through the Arrow contract path
        client.infer("tabular", tabular_oip_inputs(7, seed))
    for seed in range(2):  # 2 requests, 10 rows, through the plain tensor path
        client.infer("plain", plain_oip_inputs(5, seed))
    with pytest.raises(InferenceServerException, match="category"):
        client.infer("tabular", tabular_oip_inputs(3, category_dtype="FP32"))
    with pytest.raises(InferenceServerException, match="unknown model"):
        client.infer("no_such_model", plain_oip_inputs(1))

    m = scrape(server)
    tab_flight = {"model": "tabular", "version": "1", "protocol": "flight"}
    tab_grpc = {"model": "tabular", "version": "1", "protocol": "grpc"}
    plain_grpc = {"model": "plain", "version": "1", "protocol": "grpc"}
    assert value(m, "iskander_inference_request_success_total", **tab_flight) == 3
    assert value(m, "iskander_inference_request_success_total", **tab_grpc) == 4
    assert value(m, "iskander_inference_request_success_total", **plain_grpc) == 2
    assert value(m, "iskander_inference_count_total", **tab_flight) == 30
    assert value(m, "iskander_inference_count_total", **tab_grpc) == 28
    assert value(m, "iskander_inference_count_total", **plain_grpc) == 10
    assert value(m, "iskander_inference_exec_count_total", **tab_flight) == 3
    assert value(m, "iskander_inference_exec_count_total", **tab_grpc) == 4
    assert value(m, "iskander_inference_request_failure_total", code="INVALID_ARGUMENT", **tab_flight) == 1
    assert value(m, "iskander_inference_request_failure_total", code="INVALID_ARGUMENT", **tab_grpc) == 1
    assert value(m, "iskander_rpc_failure_total", protocol="flight", method="DoExchange", code="NOT_FOUND") == 1
    assert value(m, "iskander_rpc_failure_total", protocol="grpc", method="ModelInfer", code="NOT_FOUND") == 1
    # every successful request is in every duration histogram once; batch sizes add up to the rows
    for labels, n, rows in ((tab_flight, 3, 30), (tab_grpc, 4, 28), (plain_grpc, 2, 10)):
        for hist in ("request", "queue", "compute_input", "compute_infer", "compute_output"):
            assert value(m, f"iskander_inference_{hist}_duration_seconds_count", **labels) == n, (hist, labels)
            assert value(m, f"iskander_inference_{hist}_duration_seconds_bucket", le="+Inf", **labels) == n
        assert value(m, "iskander_inference_request_duration_seconds_sum", **labels) > 0
        assert value(m, "iskander_inference_batch_size_count", **labels) == n
        assert value(m, "iskander_inference_batch_size_sum", **labels) == rows
    assert value(m, "iskander_model_ready", model="tabular", version="1") == 1
    assert value(m, "iskander_inference_inflight", model="tabular", version="1") == 0
    assert value(m, "iskander_inference_queued", model="batched", version="1") == 0
    assert value(m, "process_resident_memory_bytes") > 0  # the process collector rides along

    # the statistics both protocols serve are the same counters
    oip = client.get_inference_statistics("tabular", "1", as_json=True)["model_stats"][0]
    snap = flight_statistics(server, "tabular")
    success = 3 + 4
    assert int(oip["inference_stats"]["success"]["count"]) == snap["inference_stats"]["success"]["count"] == success
    assert int(oip["inference_stats"]["fail"]["count"]) == snap["inference_stats"]["fail"]["count"] == 2
    assert int(oip["inference_count"]) == snap["inference_count"] == 58
    assert int(oip["execution_count"]) == snap["execution_count"] == 7
    assert snap["protocols"]["flight"] == {"success": 3, "failures": {"INVALID_ARGUMENT": 1},
                                           "inference_count": 30, "execution_count": 3}
    assert snap["protocols"]["grpc"] == {"success": 4, "failures": {"INVALID_ARGUMENT": 1},
                                         "inference_count": 28, "execution_count": 4}
    client.close()


def test_stream_requests_are_counted_one_by_one(metrics_server):
    """ModelStreamInfer: each message is a request; a bad one and an unknown model are counted too."""
    import queue

    server = metrics_server
    before = scrape(server)
    results: queue.Queue = queue.Queue()
    client = triton.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: results.put((result, error)))
    try:
        client.async_stream_infer("plain", plain_oip_inputs(4))
        client.async_stream_infer("plain", plain_oip_inputs(6))
        client.async_stream_infer("tabular", tabular_oip_inputs(2, category_dtype="FP32"))
        client.async_stream_infer("no_such_model", plain_oip_inputs(1))
        got = [results.get(timeout=20) for _ in range(4)]
    finally:
        client.stop_stream()
        client.close()
    assert [error is None for _, error in got] == [True, True, False, False]
    after = scrape(server)

    def grew(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    plain = {"model": "plain", "version": "1", "protocol": "grpc"}
    assert grew("iskander_inference_request_success_total", **plain) == 2
    assert grew("iskander_inference_count_total", **plain) == 10
    assert grew("iskander_inference_request_failure_total", model="tabular", version="1", protocol="grpc",
                code="INVALID_ARGUMENT") == 1
    assert grew("iskander_rpc_failure_total", protocol="grpc", method="ModelStreamInfer", code="NOT_FOUND") == 1


def test_dynamic_batching_metrics_agree_with_statistics(metrics_server):
    """Under dynamic batching executions are fewer than requests; metrics and statistics agree."""
    server = metrics_server
    errors: list[BaseException] = []
    barrier = threading.Barrier(8)

    def worker(seed: int) -> None:
        client = triton.InferenceServerClient(server.grpc_url)
        try:
            barrier.wait(timeout=30)
            for i in range(5):
                client.infer("batched", plain_oip_inputs(2, seed * 10 + i))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            client.close()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors

    m = scrape(server)
    labels = {"model": "batched", "version": "1", "protocol": "grpc"}
    stats = flight_statistics(server, "batched")
    executions = value(m, "iskander_inference_exec_count_total", **labels)
    assert value(m, "iskander_inference_request_success_total", **labels) == 40
    assert value(m, "iskander_inference_count_total", **labels) == 80
    assert executions == stats["execution_count"]
    assert executions < 40  # concurrent requests were merged
    assert value(m, "iskander_inference_batch_size_count", **labels) == executions
    assert value(m, "iskander_inference_batch_size_sum", **labels) == 80
    assert value(m, "iskander_inference_queue_duration_seconds_count", **labels) == 40
    assert stats["inference_stats"]["queue"]["count"] == 40


def _traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def test_client_traceparent_is_the_parent_of_the_server_spans(models_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # export spans every 0.1 s, not 5 s
    with otlp_receiver() as receiver:
        extra = f'otlp_endpoint = "{receiver.endpoint}"\notlp_metrics_interval_s = 0.5'
        config = CONFIG.format(root=models_dir, plain=_plain_model(models_dir, tmp_path), extra=extra)
        with serving(tmp_path, config) as server:
            grpc_parent, grpc_trace, grpc_span = _traceparent()
            client = triton.InferenceServerClient(server.grpc_url)
            client.infer("plain", plain_oip_inputs(3), headers={"traceparent": grpc_parent})
            with pytest.raises(InferenceServerException):
                client.infer("tabular", tabular_oip_inputs(3, category_dtype="FP32"),
                             headers={"traceparent": _traceparent()[0]})
            client.close()

            flight_parent, flight_trace, flight_span = _traceparent()
            batch, _ = tabular_batch(4)
            options = flight.FlightCallOptions(headers=[(b"traceparent", flight_parent.encode())])
            with flight.connect(server.flight_uri) as fc:
                writer, reader = fc.do_exchange(flight.FlightDescriptor.for_path("tabular"), options=options)
                with writer:
                    writer.begin(batch.schema)
                    for _ in range(2):  # one span per batch, both children of the stream's traceparent
                        writer.write_batch(batch)
                        reader.read_chunk()
                    writer.done_writing()

            def complete(spans) -> bool:
                names = [s.name for s in spans]
                return names.count("DoExchange tabular") == 2 and names.count("onnxruntime.run") >= 3 \
                    and "ModelInfer tabular" in names
            spans = receiver.wait_for(complete)
            assert complete(spans), [s.name for s in spans]

            (oip,) = [s for s in spans if s.name == "ModelInfer plain"]
            assert (oip.trace_id, oip.parent_span_id) == (grpc_trace, grpc_span)
            assert oip.kind == 2  # SERVER
            assert oip.attributes["iskander.model"] == "plain" and oip.attributes["iskander.protocol"] == "grpc"
            assert oip.attributes["iskander.rows"] == 3
            (core,) = [s for s in spans if s.name == "iskander.infer" and s.parent_span_id == oip.span_id]
            (run,) = [s for s in spans if s.name == "onnxruntime.run" and s.parent_span_id == core.span_id]
            assert oip.start_ns <= core.start_ns <= run.start_ns <= run.end_ns <= core.end_ns <= oip.end_ns
            assert run.trace_id == grpc_trace

            (failed,) = [s for s in spans if s.name == "ModelInfer tabular"]
            assert failed.status_code == 2 and failed.attributes["iskander.status_code"] == "INVALID_ARGUMENT"

            exchanges = [s for s in spans if s.name == "DoExchange tabular"]
            assert {(s.trace_id, s.parent_span_id) for s in exchanges} == {(flight_trace, flight_span)}
            assert len({s.span_id for s in exchanges}) == 2
            assert all(any(c.name == "iskander.infer" and c.parent_span_id == s.span_id for c in spans)
                       for s in exchanges)
            assert {"service.name": "iskander"}.items() <= receiver.resources()[0].items()
        # metrics went over OTLP too (the last export is flushed at shutdown)
        names = receiver.metric_names()
        assert {"iskander.inference.request.success", "iskander.inference.request.duration"} <= names, names


def test_json_logs_one_line_per_request_and_per_error(models_dir, tmp_path):
    from iskander.launch import spawn_server

    config = tmp_path / "config.toml"
    config.write_text(CONFIG.format(root=models_dir, plain=_plain_model(models_dir, tmp_path), extra=""))
    server = spawn_server(config, tmp_path / "server.log", "--log-level", "debug", "--log-format", "json")
    try:
        batch, _ = tabular_batch(6)
        exchange(server.flight_uri, "tabular", [batch])
        client = triton.InferenceServerClient(server.grpc_url)
        with pytest.raises(InferenceServerException):
            client.infer("tabular", tabular_oip_inputs(2, category_dtype="FP32"))
        client.close()
    finally:
        server.stop()
    lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert lines and all({"ts", "level", "logger", "message"} <= line.keys() for line in lines)
    ok = [line for line in lines if line.get("status") == "OK"]
    assert len(ok) == 1
    (request,) = ok
    assert request["level"] == "debug" and request["protocol"] == "flight" and request["method"] == "DoExchange"
    assert request["model"] == "tabular" and request["version"] == "1" and request["rows"] == 6
    assert request["duration_ms"] > 0 and request["request_id"]
    (error,) = [line for line in lines if line.get("status") == "INVALID_ARGUMENT"]
    assert error["level"] == "warning" and error["protocol"] == "grpc" and error["model"] == "tabular"
    assert "category" in error["message"] and error["request_id"] != request["request_id"]
    messages = " ".join(line["message"] for line in lines)
    assert "model tabular version 1 ready" in messages and "serving Arrow Flight on" in messages
    assert "metrics on :" in messages


def test_observability_is_off_unless_configured(models_dir, tmp_path):
    """Without [observability] keys: no metrics port, no tracing, and no per-request log lines at info."""
    with serving(tmp_path, f'[[models]]\nname = "tabular"\npath = "{models_dir}/tabular.onnx"\n') as server:
        batch, _ = tabular_batch(3)
        exchange(server.flight_uri, "tabular", [batch])
        assert server.metrics_url is None
    log = server.log()
    assert "metrics off; tracing off" in log
    assert "status=OK" not in log


@pytest.mark.parametrize(("body", "expected"), [
    ("[observability]\nmetrics_port = 70000", "key 'observability.metrics_port': must be a port number"),
    ("[observability]\nlog_format = 'xml'", "key 'observability.log_format': must be one of text, json"),
    ("[observability]\ntrace_sample_ratio = 2", "key 'observability.trace_sample_ratio': must be in 0..1"),
    ("[observability]\nmetric_port = 1", "key 'observability.metric_port': unknown key"),
])
def test_bad_observability_config_is_refused_with_the_key(tmp_path, models_dir, body, expected):
    from iskander.errors import ConfigError
    from iskander.config.loader import load_config

    path = tmp_path / "c.toml"
    path.write_text(f'{body}\n\n[[models]]\nname = "m"\npath = "{models_dir}/tabular.onnx"\n')
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        load_config(path)


def test_metrics_flag_overrides_the_config(models_dir, tmp_path):
    from iskander.launch import spawn_server

    config = tmp_path / "config.toml"
    config.write_text(f'[[models]]\nname = "tabular"\npath = "{models_dir}/tabular.onnx"\n')
    server = spawn_server(config, tmp_path / "server.log", "--metrics-port", "0")
    try:
        assert server.metrics_url is not None
        assert value(scrape(server), "iskander_model_ready", model="tabular", version="1") == 1
    finally:
        server.stop()



def test_grafana_dashboard_queries_only_metrics_the_server_exports(metrics_server):
    """docs/grafana/iskander-dashboard.json must not drift from the metric names."""
    import re

    dashboard = json.loads((Path(__file__).parent.parent / "docs/grafana/iskander-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b((?:iskander|process)_[a-z_]+)", e)}
    batch, _ = tabular_batch(2)
    exchange(metrics_server.flight_uri, "tabular", [batch])
    for model, sent in (("no_such_model", batch), ("tabular", batch.drop_columns(["category"]))):
        with pytest.raises(pa.ArrowException):  # so that both failure counters exist
            exchange(metrics_server.flight_uri, model, [sent])
    exported = {name for name, _ in scrape(metrics_server)}
    assert used and used <= exported, used - exported
