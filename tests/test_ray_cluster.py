"""Ray Data over Iskander on a simulated multi-node cluster (ray.cluster_utils.Cluster: three
raylets of 1 CPU each on this machine; ~25 s here). Its own module: one Ray per process."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'iskander[ray]'")
import ray.data  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from helpers import serving  # noqa: E402
from iskander.integrations.ray import default_resources, predict  # noqa: E402
from scale_data import CONFIG, tabular_scores, tabular_table, write_config  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def cluster():
    nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        nodes.add_node(num_cpus=1)
        nodes.add_node(num_cpus=1)
        ray.init(address=nodes.address, log_to_driver=False, configure_logging=False)
        nodes.wait_for_nodes()
        ray.data.DataContext.get_current().enable_progress_bars = False
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()


def test_three_one_cpu_nodes_embedded_and_remote(cluster, models_dir, tmp_path):
    """Every node has one CPU: embedded actors (1 CPU each) fill two nodes and the reads run on the
    third; the actors load the model from the config path on their own node."""
    assert len([n for n in ray.nodes() if n["Alive"]]) == 3
    assert default_resources(embedded=True, locations=0, cluster_cpus=3) == (1.0, 2)
    table = tabular_table(12_000, seed=9, prefix="nodes")
    expected = tabular_scores(models_dir, table.sort_by("entity_id"))
    config = write_config(tmp_path, models_dir)
    ds = ray.data.from_arrow(table).repartition(6)
    result = ray.get(predict(ds, "tabular", config=config, batch_size=2_000).to_arrow_refs())
    scored = pa.concat_tables(result).sort_by("entity_id")
    np.testing.assert_array_equal(scored.column("score").to_numpy(), expected)
    (tmp_path / "server").mkdir()
    with serving(tmp_path / "server", CONFIG.format(root=models_dir)) as server:
        result = ray.get(predict(ds, "tabular", server=server.flight_uri, batch_size=2_000).to_arrow_refs())
    scored = pa.concat_tables(result).sort_by("entity_id")
    assert scored.column("amount").to_pylist() == table.sort_by("entity_id").column("amount").to_pylist()
    np.testing.assert_array_equal(scored.column("score").to_numpy(), expected)
