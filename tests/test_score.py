"""`python -m iskander score` against a real server (issue 8): partitioned Parquet, CSV and IPC in,
every prediction compared with onnxruntime in process; failures leave no output; memory stays bounded."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

import iskander.demo
from data import fsl
from helpers import serving
from iskander.client import IskanderClient
from iskander.scoring.progress import ProgressBar
from iskander.scoring.score import ScoreOptions, score
from models import reference

MOVIELENS = Path(iskander.demo.__file__).parent / "movielens_two_tower.onnx"

# max_stream_rows makes long scoring streams hit the limit: the scorer must open new streams
CONFIG = """\
[server]
max_stream_rows = 10000

[[models]]
name = "tabular"
path = "{root}/tabular.onnx"

[[models]]
name = "two_tower"
path = "{root}/two_tower.onnx"

[[models]]
name = "movielens"
path = "{movielens}"
"""


@pytest.fixture(scope="module")
def scoring_server(models_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("score-server")
    with serving(folder, CONFIG.format(root=models_dir, movielens=MOVIELENS)) as running:
        yield running


def run_score(server, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "iskander", "score", "--server", server.flight_uri, *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
    )


def tabular_table(n: int, seed: int, null_category_at: int | None = None) -> pa.Table:
    rng = np.random.default_rng(seed)
    category = pa.array(rng.integers(0, 10, n), pa.int64())
    if null_category_at is not None:
        mask = np.zeros(n, bool)
        mask[null_category_at] = True
        category = pa.array(category.to_numpy(), pa.int64(), mask=mask)
    return pa.table({
        "entity_id": pa.array([f"s{seed}-{i}" for i in range(n)]),
        "features": fsl(rng.standard_normal((n, 4)).astype(np.float32)),
        "category": category,
        "note": pa.array(rng.integers(0, 1000, n)).cast(pa.string()),  # not the model's: kept as is
    })


def write_parquet(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=1500)


def write_partitioned(root: Path, files: dict[str, int], seed: int = 0) -> dict[str, pa.Table]:
    """One Parquet file per relative path; returns what each holds."""
    written = {}
    for k, (rel, n) in enumerate(files.items()):
        written[rel] = tabular_table(n, seed + k)
        write_parquet(root / rel, written[rel])
    return written


def tabular_scores(models_dir: Path, table: pa.Table) -> np.ndarray:
    features = table.column("features").combine_chunks().flatten().to_numpy().reshape(-1, 4)
    category = table.column("category").to_numpy()
    return reference(models_dir / "tabular.onnx", {"numeric": features, "category": category})["probability"].reshape(-1)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".iskander-" in p.name)


def test_partitioned_parquet_dataset_every_prediction_matches_onnxruntime(scoring_server, models_dir, tmp_path):
    src = tmp_path / "events"
    layout = {f"day=2024-01-0{d}/region={r}/part-{p}.parquet": 2600 + 700 * d + 111 * p
              for d in (1, 2, 3) for r in ("eu", "us") for p in (0, 1)}
    written = write_partitioned(src, layout)
    total = sum(t.num_rows for t in written.values())
    assert total > 40_000
    out = tmp_path / "scored"
    result = run_score(scoring_server, "--model", "tabular", "--input", str(src), "--output", str(out),
                       "--batch-rows", "2000", "--concurrency", "3")
    assert result.returncode == 0, result.stderr
    assert f"scored {total:,} rows (12 files, " in result.stdout and "with tabular v1" in result.stdout
    assert result.stderr == ""  # no progress bar in a pipe

    produced = sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet"))
    assert produced == sorted(layout)  # the same files at the same partition paths
    for rel, table in written.items():
        scored = pq.read_table(out / rel)
        # input columns unchanged and in order (partition keys stay in the folder names), score appended
        assert scored.column_names == ["entity_id", "features", "category", "note", "score"]
        assert scored.drop_columns(["score"]).equals(table)
        np.testing.assert_array_equal(scored.column("score").to_numpy(), tabular_scores(models_dir, table))
    assert ds.dataset(out, partitioning="hive").to_table().num_rows == total
    assert leftovers(tmp_path) == []


def test_csv_input_with_rename_prefix_and_selected_outputs(scoring_server, tmp_path):
    rng = np.random.default_rng(5)
    n = 6000
    users, items = rng.integers(0, 943, n), rng.integers(0, 1682, n)
    src = tmp_path / "ratings.csv"
    pacsv.write_csv(pa.table({"user": users, "movie": items, "rating": rng.integers(1, 6, n)}), src)
    out = tmp_path / "ratings_scored.parquet"
    result = run_score(scoring_server, "--model", "movielens", "--input", str(src), "--output", str(out),
                       "--rename", "user=user_id", "--rename", "movie=item_id", "--outputs", "score",
                       "--prefix", "pred_", "--batch-rows", "1024", "--progress")
    assert result.returncode == 0, result.stderr
    # CSV has no row count up front: the total is estimated from the bytes of finished files
    assert "6,000/~6,000 rows 100.0%" in result.stderr and "rows/s  ETA 0:00:00" in result.stderr
    scored = pq.read_table(out)
    assert scored.column_names == ["user_id", "item_id", "rating", "pred_score"]
    assert scored.column("user_id").to_numpy().tolist() == users.tolist()
    ref = reference(MOVIELENS, {"user_id": users.astype(np.int64), "item_id": items.astype(np.int64)}, ["score"])
    np.testing.assert_array_equal(scored.column("pred_score").to_numpy(), ref["score"].reshape(-1))


def test_ipc_input_to_ipc_output_in_process(scoring_server, models_dir, tmp_path):
    table = tabular_table(7000, seed=9)
    src = tmp_path / "batch.feather"
    feather.write_feather(table, src, chunksize=1000)
    out = tmp_path / "batch_scored.arrow"
    bar = io.StringIO()
    with IskanderClient(scoring_server.flight_uri) as client:
        result = score(ScoreOptions(model="tabular", input=src, output=out, columns=["entity_id"],
                                    batch_rows=500, concurrency=2), client, ProgressBar(bar, interval=0))
    assert (result.rows, result.files, result.model) == (7000, 1, "tabular")
    last = bar.getvalue().split("\r")[-1]
    assert last.startswith("7,000/7,000 rows 100.0%") and "rows/s  ETA 0:00:00" in last
    scored = pa.ipc.open_file(out).read_all()
    assert scored.column_names == ["entity_id", "score"]
    assert scored.column("entity_id").equals(table.column("entity_id"))
    np.testing.assert_array_equal(scored.column("score").to_numpy(), tabular_scores(models_dir, table))


def test_a_failure_midway_leaves_no_output_and_names_the_batch(scoring_server, tmp_path):
    src = tmp_path / "in"
    write_partitioned(src, {"day=1/a.parquet": 5000, "day=2/b.parquet": 5000})
    bad = tabular_table(5000, seed=77, null_category_at=3456)  # a later file with one null input
    write_parquet(src / "day=3" / "c.parquet", bad)
    out = tmp_path / "out"
    result = run_score(scoring_server, "--model", "tabular", "--input", str(src), "--output", str(out),
                       "--batch-rows", "1000", "--concurrency", "2")
    assert result.returncode == 1
    # batch 3 of the file holds its rows 3000-3999 (row groups of 1500 are read across in batches of 1000)
    assert ("error: day=3/c.parquet, batch 3 (rows 3000-3999 of the file), row 3456 of the file: "
            "[INVALID_ARGUMENT] column 'category' of model 'tabular' has a null at row 456; "
            "the model expects non-null values") in result.stderr
    assert not out.exists()
    assert leftovers(tmp_path) == []

    # with --overwrite, an existing output survives a failed run untouched
    out.mkdir()
    (out / "keep.txt").write_text("previous results")
    result = run_score(scoring_server, "--model", "tabular", "--input", str(src), "--output", str(out),
                       "--overwrite")
    assert result.returncode == 1 and "has a null at row" in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and leftovers(tmp_path) == []


def test_a_bad_csv_value_in_a_later_file_is_a_read_error_and_nothing_is_written(scoring_server, tmp_path):
    src = tmp_path / "csv"
    src.mkdir()
    (src / "1.csv").write_text("user_id,item_id\n" + "".join(f"{i % 900},{i % 1600}\n" for i in range(3000)))
    (src / "2.csv").write_text("user_id,item_id\n1,2\n3,four\n")
    out = tmp_path / "out"
    result = run_score(scoring_server, "--model", "movielens", "--input", str(src), "--output", str(out))
    assert result.returncode == 1
    assert "error: 2.csv: cannot read batch 0 (from row 0 of the file): " in result.stderr
    assert "four" in result.stderr and not out.exists() and leftovers(tmp_path) == []


def test_plan_errors_are_reported_before_any_work(scoring_server, tmp_path):
    src = tmp_path / "t.parquet"
    pq.write_table(tabular_table(10, 1).rename_columns(["entity_id", "feats", "category", "note"]), src)
    out = tmp_path / "o.parquet"
    result = run_score(scoring_server, "--model", "tabular", "--input", str(src), "--output", str(out))
    assert result.returncode == 1
    assert "model 'tabular' needs column(s) features, which the input does not have" in result.stderr
    result = run_score(scoring_server, "--model", "nope", "--input", str(src), "--output", str(out))
    assert result.returncode == 1 and "error: [NOT_FOUND] unknown model 'nope'; served models: movielens, tabular, two_tower" in result.stderr
    out.write_text("old")
    result = run_score(scoring_server, "--model", "tabular", "--input", str(src), "--output", str(out),
                       "--rename", "feats=features")
    assert result.returncode == 1 and "exists; pass --overwrite" in result.stderr and out.read_text() == "old"


MEASURE = """
import json, sys
from pathlib import Path
import pyarrow as pa
from iskander.client import IskanderClient
from iskander.scoring.score import ScoreOptions, score

def rss(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

with IskanderClient(sys.argv[1]) as client:
    client.models()
    before = rss("VmRSS:")
    result = score(ScoreOptions(model="two_tower", input=Path(sys.argv[2]), output=Path(sys.argv[3]),
                                batch_rows=int(sys.argv[4]), concurrency=2), client)
print(json.dumps({"rows": result.rows, "seconds": result.seconds, "arrow_peak": pa.default_memory_pool().max_memory(),
                  "rss_growth": rss("VmHWM:") - before}))
"""


def _measure(server, src: Path, out: Path, batch_rows: int) -> dict[str, float]:
    run = subprocess.run([sys.executable, "-c", MEASURE, server.flight_uri, str(src), str(out), str(batch_rows)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout)


def test_memory_stays_bounded_on_a_dataset_many_times_the_batch(scoring_server, tmp_path):
    """Score one file, then twelve: the peaks must not grow with the data (600 batches in the large run)."""
    rows_per_file, batch_rows = 50_000, 1000
    rng = np.random.default_rng(1)
    small, large = tmp_path / "small", tmp_path / "large"
    small.mkdir()
    large.mkdir()
    ids = np.arange(rows_per_file).astype(str)
    for f in range(12):
        table = pa.table({"user_id": pa.array(np.char.add("u", ids)), "item_id": pa.array(np.char.add("i", ids)),
                          "user_features": fsl(rng.standard_normal((rows_per_file, 16)).astype(np.float32)),
                          "item_features": fsl(rng.standard_normal((rows_per_file, 16)).astype(np.float32))})
        # one row group per file: the reader must go batch by batch, not row group by row group
        pq.write_table(table, large / f"part-{f}.parquet", row_group_size=rows_per_file)
        if f == 0:
            pq.write_table(table, small / "part-0.parquet", row_group_size=rows_per_file)
            row_bytes = table.nbytes / rows_per_file + 4 + 32 * 4  # inputs + score + user_embedding
    one = _measure(scoring_server, small, tmp_path / "small_out", batch_rows)
    many = _measure(scoring_server, large, tmp_path / "large_out", batch_rows)
    assert (one["rows"], many["rows"]) == (50_000, 600_000)
    assert pq.read_schema(tmp_path / "large_out" / "part-3.parquet").names == [
        "user_id", "item_id", "user_features", "item_features", "score", "user_embedding"]  # a flat folder: all kept
    output_mb = 600_000 * row_bytes / 1e6
    print(f"\n600,000 rows, {output_mb:.0f} MB of output in Arrow, batches of {batch_rows} rows "
          f"({batch_rows * row_bytes / 1e3:.0f} kB), concurrency 2: Arrow pool peak {many['arrow_peak'] / 1e6:.1f} MB "
          f"(one file: {one['arrow_peak'] / 1e6:.1f} MB), RSS growth {many['rss_growth'] / 1e6:.1f} MB "
          f"(one file: {one['rss_growth'] / 1e6:.1f} MB), {many['rows'] / many['seconds']:,.0f} rows/s")
    # Arrow memory: the batch window plus one row group's Parquet column buffers, whatever the data size
    assert many["arrow_peak"] < 1.2 * one["arrow_peak"] + 2e6
    assert many["arrow_peak"] < output_mb * 1e6 / 8
    # process memory (gRPC buffers, allocator arenas, thread pools) levels off at ~60-95 MB here;
    # anything that held the output (170 MB) or the input would break these
    assert many["rss_growth"] < one["rss_growth"] + 60e6
    assert many["rss_growth"] < 0.75 * output_mb * 1e6
