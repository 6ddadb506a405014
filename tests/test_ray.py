"""Ray Data over Iskander (issue 14): iskander.integrations.ray.predict against real server
processes and embedded, on a local 2-CPU Ray cluster, every prediction compared with onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'iskander[ray]'")
import ray.data  # noqa: E402
from ray.data.expressions import col  # noqa: E402

from helpers import serving  # noqa: E402
from iskander.integrations.ray import REMOTE_NUM_CPUS, default_resources, predict  # noqa: E402
from scale_data import (  # noqa: E402
    CONFIG, KillAfter, tabular_scores, tabular_table, two_tower_reference, two_tower_table, write_config, write_events,
)

pytestmark = pytest.mark.timeout(300)  # a run that deadlocks fails here instead of hanging the suite

ROWS = 6_000  # per partition file; 4 files


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster of 2 CPUs (the case where actors holding every CPU starve the reads)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def config(models_dir, tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("ray-config"), models_dir)


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    with serving(tmp_path_factory.mktemp("ray-server"), CONFIG.format(root=models_dir)) as running:
        yield running


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> tuple[Path, pa.Table]:
    root = tmp_path_factory.mktemp("ray-events") / "events"
    return root, write_events(root, ROWS)


def check_tabular(result: pa.Table, expected_inputs: pa.Table, models_dir: Path) -> None:
    """Every input column passes through unchanged, score is onnxruntime's, row for row."""
    assert result.column_names == expected_inputs.column_names + ["score"]
    assert result.num_rows == expected_inputs.num_rows
    result = result.sort_by("entity_id")
    expected_inputs = expected_inputs.sort_by("entity_id")
    for name in expected_inputs.column_names:
        got = result.column(name).combine_chunks()
        want = expected_inputs.column(name).combine_chunks()
        assert got.to_pylist() == want.to_pylist(), name
    np.testing.assert_array_equal(result.column("score").to_numpy(), tabular_scores(models_dir, expected_inputs))


def arrow(ds: ray.data.Dataset) -> pa.Table:
    """Run the dataset and return its rows (with its schema even when it has none)."""
    tables = ray.get(ds.to_arrow_refs())
    return pa.concat_tables(tables) if tables else None


def read_events(root: Path) -> ray.data.Dataset:
    return ray.data.read_parquet(str(root))


def test_a_missing_column_is_refused_before_anything_runs(cluster, server, events):
    root, _ = events
    ds = ray.data.read_parquet(str(root)).select_columns(["entity_id", "features"])
    with pytest.raises(Exception, match="column 'category' of model 'tabular' is missing"):
        predict(ds, "tabular", server=server.flight_uri)


def test_exactly_one_of_server_or_config(cluster, server, config):
    ds = ray.data.from_arrow(tabular_table(3, seed=0, prefix="x"))
    with pytest.raises(ValueError, match="exactly one of server="):
        predict(ds, "tabular")
    with pytest.raises(ValueError, match="exactly one of server="):
        predict(ds, "tabular", server=server.flight_uri, config=config)


def test_remote_partitioned_parquet_every_prediction_matches_onnxruntime(cluster, server, events, models_dir):
    root, expected = events
    scored = predict(read_events(root), "tabular", server=server.flight_uri, batch_size=2_000)
    assert scored.schema().names[-1] == "score"
    check_tabular(arrow(scored), expected, models_dir)


def test_embedded_with_default_resources_finishes_on_two_cpus(cluster, config, events, models_dir):
    """Defaults only: one actor of 1 CPU on a 2-CPU cluster, so the read tasks get the other CPU
    (Ray's own default would give the actors every CPU and wait for ever)."""
    assert default_resources(embedded=True, locations=0, cluster_cpus=2) == (1.0, 1)
    assert default_resources(embedded=False, locations=1, cluster_cpus=2) == (REMOTE_NUM_CPUS, 2)
    assert default_resources(embedded=False, locations=8, cluster_cpus=2) == (REMOTE_NUM_CPUS, 4)
    root, expected = events
    check_tabular(arrow(predict(read_events(root), "tabular", config=config)), expected, models_dir)


def test_embedded_two_tower_outputs_and_passthrough(cluster, config, models_dir):
    """Embedded, from an in-memory dataset of several blocks: fixed-size-list outputs, passthrough
    ids and a column the model never sees, all compared with onnxruntime."""
    table = two_tower_table(5_000, seed=4)
    ds = ray.data.from_arrow(table).repartition(5)
    result = arrow(predict(ds, "two_tower", config=config, batch_size=1_500)).sort_by("user_id")
    expected = table.sort_by("user_id")
    assert result.column_names == table.column_names + ["score", "user_embedding"]
    assert result.schema.field("user_embedding").type == pa.list_(pa.float32(), 32)
    for name in table.column_names:
        assert result.column(name).to_pylist() == expected.column(name).to_pylist()
    ref = two_tower_reference(models_dir, expected)
    np.testing.assert_array_equal(result.column("score").to_numpy(), ref["score"].reshape(-1))
    embedding = result.column("user_embedding").combine_chunks().flatten().to_numpy().reshape(-1, 32)
    np.testing.assert_array_equal(embedding, ref["user_embedding"])


def test_outputs_selects_columns_remote(cluster, server, models_dir):
    table = two_tower_table(600, seed=5)
    result = arrow(predict(ray.data.from_arrow(table), "two_tower", server=server.flight_uri,
                           outputs=["user_embedding"])).sort_by("user_id")
    assert result.column_names == table.column_names + ["user_embedding"]
    ref = two_tower_reference(models_dir, table.sort_by("user_id"))
    embedding = result.column("user_embedding").combine_chunks().flatten().to_numpy().reshape(-1, 32)
    np.testing.assert_array_equal(embedding, ref["user_embedding"])


def test_empty_result_keeps_the_contract_columns(cluster, server, events):
    """No row survives the filter: the result still has every column, typed by the contract."""
    root, _ = events
    ds = ray.data.read_parquet(str(root)).filter(expr=col("category") > 100)
    scored = predict(ds, "tabular", server=server.flight_uri)
    assert scored.schema() is not None
    table = arrow(scored)
    assert table.num_rows == 0
    assert table.schema.names == ["entity_id", "features", "category", "amount", "day", "region", "score"]
    assert table.schema.field("score").type == pa.float32()


@pytest.mark.parametrize("where", ["remote", "embedded"])
def test_bad_column_type_names_model_and_column(cluster, server, config, where):
    table = tabular_table(300, seed=1, prefix="bad")
    bad = table.set_column(1, "features", table.column("features").cast(pa.list_(pa.float64(), 4)))
    target = {"server": server.flight_uri} if where == "remote" else {"config": config}
    with pytest.raises(Exception) as info:
        predict(ray.data.from_arrow(bad), "tabular", **target).materialize()
    text = str(info.value)
    assert "[INVALID_ARGUMENT] column 'features' of model 'tabular' has type fixed_size_list<float64>[4], " \
           "model expects fixed_size_list<float32>[4]" in text, text


def test_replicas_one_killed_mid_run_results_complete_and_correct(cluster, models_dir, tmp_path):
    """Two server processes; the first is SIGKILLed after answering a few batches. Every batch it
    did not answer goes to the other; every row comes back once, with onnxruntime's score."""
    table = tabular_table(48_000, seed=7, prefix="kill")
    ds = ray.data.from_arrow(table).repartition(12)
    text = CONFIG.format(root=models_dir)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with serving(tmp_path / "a", text) as a, serving(tmp_path / "b", text) as b:
        with KillAfter(a, "tabular", batches=3) as killer:
            result = arrow(predict(ds, "tabular", server=[a.flight_uri, b.flight_uri], batch_size=1_000))
        assert killer.killed.is_set(), "the run ended before the replica was killed"
        assert killer.killed_at_count >= 3
        served_by_b = sum(s["inference_stats"]["success"]["count"] for s in _stats(b, "tabular"))
    assert killer.killed_at_count + served_by_b >= 48  # every batch answered by one of them
    result = result.sort_by("entity_id")
    expected = table.sort_by("entity_id")
    assert result.column("entity_id").to_pylist() == expected.column("entity_id").to_pylist()
    np.testing.assert_array_equal(result.column("score").to_numpy(), tabular_scores(models_dir, expected))


def _stats(server, model):
    from iskander.client import IskanderClient

    with IskanderClient(server.flight_uri, timeout=10) as client:
        return client.statistics(model)
