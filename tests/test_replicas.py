"""iskander.client.Replicas against real server processes: spreading, failover on UNAVAILABLE only,
the error naming every location, pickling as a factory."""

from __future__ import annotations

import pickle
import socket

import numpy as np
import pyarrow as pa
import pytest

from data import tabular_batch
from helpers import serving
from iskander.client import InvalidArgument, IskanderClient, Replicas, Unavailable
from models import reference

CONFIG = """\
[server]
max_stream_rows = 2500

[[models]]
name = "tabular"
path = "{root}/tabular.onnx"
"""


@pytest.fixture(scope="module")
def pair(models_dir, tmp_path_factory):
    text = CONFIG.format(root=models_dir)
    with serving(tmp_path_factory.mktemp("replica-a"), text) as a, \
            serving(tmp_path_factory.mktemp("replica-b"), text) as b:
        yield a, b


def refused_location() -> str:
    """A loopback port nothing listens on (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def counts(server, kind: str = "success") -> int:
    with IskanderClient(server.flight_uri, timeout=10) as client:
        return sum(s["inference_stats"][kind]["count"] for s in client.statistics("tabular"))


def expected_scores(models_dir, feeds) -> np.ndarray:
    return reference(models_dir / "tabular.onnx", feeds)["probability"].reshape(-1)


def test_batches_are_spread_over_every_replica(pair, models_dir):
    a, b = pair
    before = counts(a), counts(b)
    with Replicas([a.flight_uri, b.flight_uri]) as replicas:
        for seed in range(6):
            batch, feeds = tabular_batch(500, seed)
            answer = replicas.infer_batch("tabular", batch)
            np.testing.assert_array_equal(answer.column("score").to_numpy(), expected_scores(models_dir, feeds))
    assert counts(a) - before[0] == 3 and counts(b) - before[1] == 3


def test_stream_row_limit_opens_a_new_stream_on_the_same_replica(pair, models_dir):
    """max_stream_rows = 2500: the pooled stream fills up; the batch goes again on a new one."""
    a, _ = pair
    with Replicas(a.flight_uri) as replicas:
        for seed in range(8):
            batch, feeds = tabular_batch(900, seed)
            answer = replicas.infer_batch("tabular", batch)
            np.testing.assert_array_equal(answer.column("score").to_numpy(), expected_scores(models_dir, feeds))


def test_an_unreachable_replica_is_skipped(pair, models_dir):
    _, b = pair
    batch, feeds = tabular_batch(300, 1)
    with Replicas([refused_location(), b.flight_uri]) as replicas:
        for _ in range(3):  # the refused one is tried first once, then last during its cooldown
            answer = replicas.infer_batch("tabular", batch)
            np.testing.assert_array_equal(answer.column("score").to_numpy(), expected_scores(models_dir, feeds))
        table = replicas.infer("tabular", iter([batch, batch]))  # an iterator: replayable after a failure
        assert table.num_rows == 600
        assert replicas.model("tabular").outputs == ["score"]


def test_every_replica_down_names_every_location():
    dead = [refused_location(), refused_location()]
    batch, _ = tabular_batch(10, 0)
    with Replicas(dead, timeout=5) as replicas:
        with pytest.raises(Unavailable) as info:
            replicas.infer_batch("tabular", batch)
    message = str(info.value)
    assert "infer for model 'tabular' failed on every replica (2 tried)" in message
    for location in dead:
        assert f"{location}: [UNAVAILABLE]" in message
    assert message.count("Connection refused") == 2
    assert sorted(info.value.details["locations"]) == sorted(dead)
    assert info.value.model == "tabular"


def test_invalid_argument_is_never_retried(pair):
    a, b = pair
    batch, _ = tabular_batch(20, 0)
    bad = batch.set_column(2, "category", pa.array(np.arange(20, dtype=np.float64)))
    failures = counts(a, "fail") + counts(b, "fail")
    with Replicas([a.flight_uri, b.flight_uri]) as replicas:
        with pytest.raises(InvalidArgument, match="column 'category' of model 'tabular' has type float64"):
            replicas.infer_batch("tabular", bad)
    assert counts(a, "fail") + counts(b, "fail") == failures + 1  # one replica saw it, once


def test_pickles_as_its_locations_not_its_streams(pair, models_dir):
    a, b = pair
    batch, feeds = tabular_batch(100, 3)
    with Replicas([a.flight_uri, b.flight_uri], timeout=10) as replicas:
        replicas.infer_batch("tabular", batch)  # holds an open stream now
        data = pickle.dumps(replicas)
    assert len(data) < 1000
    with pickle.loads(data) as copy:
        assert copy.locations == (a.flight_uri, b.flight_uri) and copy.client_kwargs == {"timeout": 10}
        answer = copy.infer_batch("tabular", batch)
    np.testing.assert_array_equal(answer.column("score").to_numpy(), expected_scores(models_dir, feeds))


def test_needs_a_location():
    with pytest.raises(ValueError, match="one or more locations"):
        Replicas([])
