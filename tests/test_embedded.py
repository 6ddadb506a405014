"""iskander.embedded.Embedded: the server's models in process give the server's answers and errors."""

from __future__ import annotations

import pickle

import numpy as np
import pyarrow as pa
import pytest

from data import tabular_batch, two_tower_batch
from helpers import serving
from iskander.client import IskanderClient
from iskander.embedded import Embedded
from iskander.errors import ConfigError, InvalidInput, ModelNotFound
from models import reference

CONFIG = """\
[server]
max_batch_size = 1000

[[models]]
name = "tabular"
path = "{root}/tabular.onnx"

[[models]]
name = "two_tower"
path = "{root}/two_tower.onnx"
"""


@pytest.fixture(scope="module")
def config(models_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("embedded") / "config.toml"
    path.write_text(CONFIG.format(root=models_dir))
    return path


@pytest.fixture(scope="module")
def engine(config):
    with Embedded(config) as running:
        yield running


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    with serving(tmp_path_factory.mktemp("embedded-server"), CONFIG.format(root=models_dir)) as running:
        yield running


def test_answers_match_the_server_and_onnxruntime(engine, server, models_dir):
    batch, feeds = two_tower_batch(700, seed=2)
    local = engine.infer("two_tower", batch)
    with IskanderClient(server.flight_uri) as client:
        remote = client.infer("two_tower", batch)
    assert local.schema == remote.schema == engine.output_schema("two_tower")
    assert pa.Table.from_batches([local]).equals(remote)
    ref = reference(models_dir / "two_tower.onnx", feeds)
    np.testing.assert_array_equal(local.column("score").to_numpy(), ref["score"].reshape(-1))


def test_selected_outputs_and_extra_columns(engine, models_dir):
    batch, feeds = two_tower_batch(50, seed=3)
    batch = batch.append_column("note", pa.array(["x"] * 50))  # not the model's: ignored
    answer = engine.infer("two_tower", batch, outputs=["user_embedding"])
    assert answer.schema.names == ["user_id", "item_id", "user_embedding"]
    assert engine.outputs("two_tower") == ["score", "user_embedding"]
    assert engine.passthrough("two_tower") == ["user_id", "item_id"]


def test_errors_are_the_servers(engine, server):
    batch, _ = tabular_batch(5)
    bad = batch.set_column(1, "features", batch.column("features").cast(pa.list_(pa.float64(), 4)))
    with pytest.raises(InvalidInput) as local:
        engine.infer("tabular", bad)
    with IskanderClient(server.flight_uri) as client, pytest.raises(Exception) as remote:
        client.infer("tabular", bad)
    assert local.value.message == remote.value.message
    assert local.value.details == remote.value.details
    big, _ = tabular_batch(1001)
    with pytest.raises(InvalidInput, match="batch-size must be <= 1000 for 'tabular', got 1001"):
        engine.infer("tabular", big)  # the server's default limits apply
    with pytest.raises(ModelNotFound, match="unknown model 'nope'"):
        engine.infer("nope", batch)


def test_the_arrow_checks_of_the_flight_frontend_run(engine):
    """A utf8 column holding bytes that are not UTF-8 (built in process, never validated)."""
    batch, _ = tabular_batch(2)
    offsets = pa.array([0, 2, 4], pa.int32()).buffers()[1]
    raw = pa.Array.from_buffers(pa.utf8(), 2, [None, offsets, pa.py_buffer(b"\xff\xfe\xfd\xfc")])
    with pytest.raises(InvalidInput, match="column 'entity_id' for model 'tabular' is malformed"):
        engine.infer("tabular", batch.set_column(0, "entity_id", raw))


def test_pickles_as_a_factory(config, models_dir):
    with Embedded(config, models=["tabular"]) as engine:
        data = pickle.dumps(engine)
        assert engine.models() == ["tabular"]
    assert len(data) < 500 and b"InferenceSession" not in data
    batch, feeds = tabular_batch(30, seed=4)
    with pickle.loads(data) as copy:
        answer = copy.infer("tabular", batch)
    ref = reference(models_dir / "tabular.onnx", feeds)["probability"].reshape(-1)
    np.testing.assert_array_equal(answer.column("score").to_numpy(), ref)


def test_unknown_model_names_are_refused(config):
    with pytest.raises(ConfigError, match="no model named 'ranker'"):
        Embedded(config, models=["ranker"])
