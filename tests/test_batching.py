"""Dynamic batching: concurrent requests from both frontends merge into fewer executions, answers
are split back correctly, and a request the model rejects fails alone."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pytest

from iskander.client.flight_status import error_details
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from data import tabular_batch
from helpers import exchange, serving
from models import reference

CONFIG = """\
[[models]]
name = "batched"
path = "{root}/tabular.onnx"
dynamic_batching = {{ max_batch_rows = 64, max_queue_delay_us = 20000, preferred_batch_rows = [64] }}
"""


@pytest.fixture(scope="module")
def batched_server(models_dir, tmp_path_factory):
    with serving(tmp_path_factory.mktemp("batched"), CONFIG.format(root=models_dir)) as server:
        yield server


def flight_one(uri: str, batch: pa.RecordBatch) -> pa.RecordBatch:
    return exchange(uri, "batched", [batch])[0]


def oip_one(url: str, batch: pa.RecordBatch) -> np.ndarray:
    c = triton.InferenceServerClient(url)
    try:
        inputs = []
        n = batch.num_rows
        ids = np.array([s.encode() for s in batch.column("entity_id").to_pylist()], dtype=np.object_)
        feats = batch.column("features").flatten().to_numpy().reshape(n, 4)
        for name, data, dtype in (("entity_id", ids.reshape(n, 1), "BYTES"), ("features", feats, "FP32"),
                                  ("category", batch.column("category").to_numpy().reshape(n, 1), "INT64")):
            t = triton.InferInput(name, list(data.shape), dtype)
            t.set_data_from_numpy(data)
            inputs.append(t)
        return c.infer("batched", inputs).as_numpy("score").reshape(-1)
    finally:
        c.close()


def stats_of(url: str, model: str) -> dict:
    c = triton.InferenceServerClient(url)
    try:
        return c.get_inference_statistics(model, "1", as_json=True)["model_stats"][0]
    finally:
        c.close()


def stats(url: str) -> dict:
    return stats_of(url, "batched")


def test_model_config_advertises_dynamic_batching(batched_server):
    c = triton.InferenceServerClient(batched_server.grpc_url)
    config = c.get_model_config("batched", as_json=True)["config"]
    c.close()
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == "20000"
    assert config["dynamic_batching"]["preferred_batch_size"] == [64]
    assert int(config["max_batch_size"]) == 64


def test_concurrent_requests_from_both_protocols_merge_and_split_back(batched_server, models_dir):
    before = stats(batched_server.grpc_url)
    requests = [tabular_batch(1 + i % 3, seed=100 + i) for i in range(24)]

    def send(i: int):
        batch, feeds = requests[i]
        if i % 2:
            got = flight_one(batched_server.flight_uri, batch)
            assert got.column("entity_id").equals(batch.column("entity_id"))
            return got.column("score").to_numpy()
        return oip_one(batched_server.grpc_url, batch)

    with ThreadPoolExecutor(max_workers=12) as pool:
        results = list(pool.map(send, range(len(requests))))
    for (batch, feeds), got in zip(requests, results):
        ref = reference(models_dir / "tabular.onnx", feeds)["probability"].reshape(-1)
        np.testing.assert_allclose(got, ref, rtol=1e-6)  # batched GEMM may sum in another order
    after = stats(batched_server.grpc_url)
    requests_run = int(after["inference_stats"]["success"]["count"]) - int(
        before["inference_stats"].get("success", {}).get("count", 0))
    executions = int(after["execution_count"]) - int(before.get("execution_count", 0))
    rows = int(after["inference_count"]) - int(before.get("inference_count", 0))
    assert requests_run == 24
    assert rows == sum(b.num_rows for b, _ in requests)
    assert executions < 24  # requests were merged
    assert int(after["inference_stats"]["queue"]["count"]) - int(
        before["inference_stats"].get("queue", {}).get("count", 0)) == 24


def test_a_request_the_model_rejects_fails_alone(batched_server):
    good = [tabular_batch(2, seed=200 + i)[0] for i in range(6)]
    bad, _ = tabular_batch(2, seed=300)
    bad = bad.set_column(2, "category", pa.array([1, 99], pa.int64()))  # Gather index out of range
    outcomes: dict[int, object] = {}
    barrier = threading.Barrier(7)

    def send(i: int) -> None:
        batch = bad if i == 6 else good[i]
        barrier.wait(timeout=10)
        try:
            outcomes[i] = flight_one(batched_server.flight_uri, batch).num_rows
        except pa.ArrowException as exc:
            outcomes[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert [outcomes[i] for i in range(6)] == [2] * 6
    assert isinstance(outcomes[6], pa.ArrowException)
    assert "model 'batched' rejected the input" in str(outcomes[6])


def test_single_large_request_runs_without_waiting(batched_server, models_dir):
    batch, feeds = tabular_batch(500, seed=7)  # above max_batch_rows: runs alone
    got = flight_one(batched_server.flight_uri, batch)
    ref = reference(models_dir / "tabular.onnx", feeds)["probability"].reshape(-1)
    np.testing.assert_array_equal(got.column("score").to_numpy(), ref)


def test_requests_racing_a_closed_batcher_still_get_answers(models_dir):
    """A request queued just as its model is unloaded or reloaded (batcher closed) is answered,
    never left waiting."""
    from iskander.core.batcher import Batcher
    from iskander.backends.onnx import OnnxBackend
    from iskander.config.settings import DynamicBatching, ModelSettings

    backend = OnnxBackend(ModelSettings(name="t", path=models_dir / "tabular.onnx"))
    batcher = Batcher(backend, ["probability"], DynamicBatching(max_batch_rows=64, max_queue_delay_us=0), "t")
    _, feeds = tabular_batch(3, seed=1)
    feeds = {"numeric": feeds["numeric"], "category": feeds["category"]}
    assert batcher.run(feeds, 3).results["probability"].shape == (3, 1)
    batcher.close()
    for t in batcher._threads:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in batcher._threads)
    # closed: runs unbatched at once
    assert batcher.run(feeds, 3).results["probability"].shape == (3, 1)
    # an item that reached the queue after the workers left is claimed back by its requester
    batcher._closed = False  # simulate the race: the check passed before close() ...
    done = []
    thread = threading.Thread(target=lambda: done.append(batcher.run(feeds, 3)))
    thread.start()
    batcher._closed = True  # ... and close() happened right after the put
    thread.join(timeout=5)
    assert done and done[0].results["probability"].shape == (3, 1)


SLOW_QUEUE = """\
[server]
request_timeout_s = {timeout}

[[models]]
name = "slow_queue"
path = "{root}/tabular.onnx"
dynamic_batching = {{ max_batch_rows = 1000, max_queue_delay_us = 600000 }}
"""


def test_expired_requests_are_not_run(models_dir, tmp_path):
    """A request whose deadline passes while it waits in the batch queue is answered
    DEADLINE_EXCEEDED and never reaches the model: the client's gRPC deadline on OIP, the server's
    request_timeout_s on both frontends."""
    import time

    with serving(tmp_path, SLOW_QUEUE.format(root=models_dir, timeout=0.2)) as server:
        before = stats_of(server.grpc_url, "slow_queue")
        # Flight: the server's request_timeout_s (0.2 s) passes during the 0.6 s queue delay
        batch, _ = tabular_batch(2)
        with pytest.raises(pa.ArrowException) as info:
            exchange(server.flight_uri, "slow_queue", [batch])
        assert error_details(info.value)["code"] == "DEADLINE_EXCEEDED"
        assert "deadline passed while it waited in the batch queue; it was not run" in str(info.value)
        # OIP with a client deadline shorter than both
        c = triton.InferenceServerClient(server.grpc_url)
        n = 2
        inputs = []
        for name, data, dtype in (("entity_id", np.array([[b"a"], [b"b"]], dtype=np.object_), "BYTES"),
                                  ("features", np.ones((n, 4), np.float32), "FP32"),
                                  ("category", np.ones((n, 1), np.int64), "INT64")):
            t = triton.InferInput(name, list(data.shape), dtype)
            t.set_data_from_numpy(data)
            inputs.append(t)
        with pytest.raises(InferenceServerException) as oip_info:
            c.infer("slow_queue", inputs, client_timeout=0.1)
        assert "DEADLINE_EXCEEDED" in str(oip_info.value.status())
        c.close()
        time.sleep(0.8)  # let the queue run out
        after = stats_of(server.grpc_url, "slow_queue")
    fails = int(after["inference_stats"]["fail"]["count"]) - int(before["inference_stats"].get("fail", {}).get("count", 0))
    # the Flight request for sure; the OIP one too unless gRPC dropped it before it reached the handler
    assert 1 <= fails <= 2
    assert int(after.get("execution_count", 0)) == int(before.get("execution_count", 0))  # nothing ran


def test_bounded_queue_refuses_at_once_beyond_max_inflight(models_dir, tmp_path):
    """max_inflight bounds requests running or queued per model: the next one is refused with
    RESOURCE_EXHAUSTED at once (not piled up), and the admitted ones still finish."""
    import time

    config = (f'[[models]]\nname = "bounded"\npath = "{models_dir}/tabular.onnx"\nmax_inflight = 2\n'
              'dynamic_batching = { max_batch_rows = 1000, max_queue_delay_us = 3000000 }\n')
    with serving(tmp_path, config) as server:
        batch, _ = tabular_batch(1)
        results: dict[int, object] = {}

        def send(i: int) -> None:
            try:
                results[i] = exchange(server.flight_uri, "bounded", [batch])[0].num_rows
            except pa.ArrowException as exc:
                results[i] = exc

        held = [threading.Thread(target=send, args=(i,)) for i in range(2)]
        for t in held:
            t.start()
        time.sleep(1.0)  # both admitted and waiting in the 3 s batch queue
        started = time.monotonic()
        send(2)
        refused_in = time.monotonic() - started
        for t in held:
            t.join(timeout=10)
    assert isinstance(results[2], pa.ArrowException)
    detail = error_details(results[2])
    assert detail["code"] == "RESOURCE_EXHAUSTED" and detail["limit"] == "max_inflight"
    assert "already has 2 requests running or queued (max_inflight = 2)" in str(results[2])
    assert refused_in < 1.5  # refused at once, not after the 3 s queue delay
    assert results[0] == 1 and results[1] == 1
