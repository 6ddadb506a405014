"""Data and references shared by the Ray and Spark tests: hive-partitioned Parquet, two configs,
a server killed while it is being used."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from data import fsl
from iskander.client import IskanderClient
from iskander.launch import ServerProcess
from models import reference

CONFIG = """\
[[models]]
name = "tabular"
path = "{root}/tabular.onnx"

[[models]]
name = "two_tower"
path = "{root}/two_tower.onnx"

[[models]]
name = "dtypes"
path = "{root}/dtypes.onnx"

[[models]]
name = "ints"
path = "{root}/ints.onnx"
"""

DAYS = ("2024-05-01", "2024-05-02")
REGIONS = ("eu", "us")


def write_config(folder: Path, models_dir: Path) -> Path:
    path = folder / "config.toml"
    path.write_text(CONFIG.format(root=models_dir))
    return path


def tabular_table(n: int, seed: int, prefix: str) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        "entity_id": pa.array([f"{prefix}-{i}" for i in range(n)]),
        "features": fsl(rng.standard_normal((n, 4)).astype(np.float32)),
        "category": pa.array(rng.integers(0, 10, n), pa.int64()),
        "amount": pa.array(rng.gamma(2.0, 30.0, n)),  # not the model's: passes through
    })


def write_events(root: Path, rows: int, row_group: int = 2_000) -> pa.Table:
    """events/day=D/region=R/part-0.parquet for 2 days x 2 regions; returns every row with its
    partition values as columns (what a reader of the folder sees)."""
    tables = []
    for d, day in enumerate(DAYS):
        for r, region in enumerate(REGIONS):
            table = tabular_table(rows, seed=10 * d + r, prefix=f"{day}/{region}")
            folder = root / f"day={day}" / f"region={region}"
            folder.mkdir(parents=True, exist_ok=True)
            pq.write_table(table, folder / "part-0.parquet", row_group_size=row_group)
            tables.append(table.append_column("day", pa.array([day] * rows))
                          .append_column("region", pa.array([region] * rows)))
    return pa.concat_tables(tables)


def tabular_scores(models_dir: Path, table: pa.Table) -> np.ndarray:
    """onnxruntime in process on the same file."""
    features = table.column("features").combine_chunks().flatten().to_numpy().reshape(-1, 4)
    category = table.column("category").to_numpy()
    return reference(models_dir / "tabular.onnx", {"numeric": features, "category": category})["probability"].reshape(-1)


def two_tower_table(n: int, seed: int) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        "user_id": pa.array([f"u{i}" for i in range(n)]),
        "item_id": pa.array([f"i{i}" for i in range(n)]),
        "user_features": fsl(rng.standard_normal((n, 16)).astype(np.float32)),
        "item_features": fsl(rng.standard_normal((n, 16)).astype(np.float32)),
        "shard": pa.array(rng.integers(0, 4, n), pa.int32()),
    })


def two_tower_reference(models_dir: Path, table: pa.Table) -> dict[str, np.ndarray]:
    feeds = {name: table.column(name).combine_chunks().flatten().to_numpy().reshape(-1, 16)
             for name in ("user_features", "item_features")}
    return reference(models_dir / "two_tower.onnx", feeds)


def sort_by(table: pa.Table, key: str) -> pa.Table:
    return table.sort_by(key)


class KillAfter:
    """Kill (SIGKILL) ``victim`` once it has answered ``batches`` requests for ``model``: a replica
    dying in the middle of a run. ``killed_at_count`` is what it had answered by then."""

    def __init__(self, victim: ServerProcess, model: str, batches: int, timeout: float = 120.0) -> None:
        self.victim = victim
        self.model = model
        self.batches = batches
        self.timeout = timeout
        self.killed = threading.Event()
        self.killed_at_count = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _count(self, client: IskanderClient) -> int:
        stats = client.statistics(self.model)
        return sum(s["inference_stats"]["success"]["count"] for s in stats)

    def _run(self) -> None:
        deadline = time.monotonic() + self.timeout
        with IskanderClient(self.victim.flight_uri, timeout=5) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                count = self._count(client)
                if count >= self.batches:
                    self.victim.process.kill()
                    self.victim.process.wait(timeout=10)
                    self.killed_at_count = count
                    self.killed.set()
                    return
                time.sleep(0.02)

    def __enter__(self) -> KillAfter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
