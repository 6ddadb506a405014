"""Spark over Iskander (issue 14): iskander.integrations.spark.predict (mapInArrow) against real
server processes and embedded, in local[2] mode, every prediction compared with onnxruntime."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
    pytest.skip("Spark needs a Java 17+ runtime and no `java` is on PATH (nor JAVA_HOME set)",
                allow_module_level=True)
pytest.importorskip("pyspark", reason="PySpark is not installed: pip install 'iskander[spark]'")

from pyspark.errors import PySparkException  # noqa: E402
from pyspark.sql import SparkSession  # noqa: E402
from pyspark.sql import functions as F  # noqa: E402
from pyspark.sql import types as T  # noqa: E402

from helpers import serving  # noqa: E402
from iskander.client import InvalidArgument  # noqa: E402
from iskander.integrations.spark import predict, spark_arrow_type, spark_type  # noqa: E402
from models import reference  # noqa: E402
from scale_data import (  # noqa: E402
    CONFIG, DAYS, KillAfter, tabular_scores, tabular_table, two_tower_reference, two_tower_table, write_config,
    write_events,
)

pytestmark = pytest.mark.timeout(300)

ROWS = 5_000  # per partition file; 4 files


@pytest.fixture(scope="module")
def spark():
    # PySpark starts its Python workers with $PYSPARK_PYTHON (else `python3`): this venv's, which has
    # pyarrow and iskander. Set for the module only.
    previous = os.environ.get("PYSPARK_PYTHON")
    os.environ["PYSPARK_PYTHON"] = sys.executable
    session = (
        SparkSession.builder.master("local[2]").appName("iskander-tests")
        .config("spark.ui.enabled", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.default.parallelism", "2")
        .config("spark.sql.session.timeZone", "UTC")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    try:
        yield session
    finally:
        session.stop()
        if previous is None:
            os.environ.pop("PYSPARK_PYTHON", None)
        else:
            os.environ["PYSPARK_PYTHON"] = previous


@pytest.fixture(scope="module")
def config(models_dir, tmp_path_factory) -> Path:
    return write_config(tmp_path_factory.mktemp("spark-config"), models_dir)


@pytest.fixture(scope="module")
def server(models_dir, tmp_path_factory):
    with serving(tmp_path_factory.mktemp("spark-server"), CONFIG.format(root=models_dir)) as running:
        yield running


@pytest.fixture(scope="module")
def events(tmp_path_factory) -> tuple[Path, pa.Table]:
    root = tmp_path_factory.mktemp("spark-events") / "events"
    return root, write_events(root, ROWS)


def check_tabular(result: pa.Table, expected: pa.Table, models_dir: Path) -> None:
    assert result.num_rows == expected.num_rows
    result = result.sort_by("entity_id")
    expected = expected.sort_by("entity_id")
    for name in ("entity_id", "category", "amount", "region"):
        assert result.column(name).to_pylist() == expected.column(name).to_pylist(), name
    # Spark reads fixed_size_list as array<float> and infers day=2024-05-01 as a date: same values
    features = result.column("features").combine_chunks().flatten().to_numpy().reshape(-1, 4)
    np.testing.assert_array_equal(features, expected.column("features").combine_chunks().flatten()
                                  .to_numpy().reshape(-1, 4))
    assert [str(d) for d in result.column("day").to_pylist()] == expected.column("day").to_pylist()
    np.testing.assert_array_equal(result.column("score").to_numpy(), tabular_scores(models_dir, expected))


def test_remote_partitioned_parquet_every_prediction_matches_onnxruntime(spark, server, events, models_dir):
    root, expected = events
    df = spark.read.parquet(str(root))
    scored = predict(df, "tabular", server=server.flight_uri, batch_rows=1_500)
    assert scored.columns == df.columns + ["score"]
    assert scored.schema["score"].dataType == T.FloatType() and not scored.schema["score"].nullable
    assert set(df.columns) >= {"day", "region"}  # partition columns, kept
    check_tabular(scored.toArrow(), expected, models_dir)


def test_embedded_partitioned_parquet_written_back_partitioned(spark, config, events, models_dir, tmp_path):
    root, expected = events
    scored = predict(spark.read.parquet(str(root)), "tabular", config=config)
    out = tmp_path / "scored"
    scored.write.partitionBy("day", "region").parquet(str(out))
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == [f"day={d}" for d in DAYS]
    check_tabular(spark.read.parquet(str(out)).toArrow(), expected, models_dir)


def test_embedded_two_tower_fixed_size_list_outputs(spark, config, models_dir):
    table = two_tower_table(3_000, seed=3)
    df = spark.createDataFrame(table.to_pandas()).repartition(3)
    scored = predict(df, "two_tower", config=config, batch_rows=700)
    assert scored.schema["user_embedding"].dataType == T.ArrayType(T.FloatType(), True)
    result = scored.toArrow().sort_by("user_id")
    expected = table.sort_by("user_id")
    assert result.column("shard").to_pylist() == expected.column("shard").to_pylist()
    ref = two_tower_reference(models_dir, expected)
    np.testing.assert_array_equal(result.column("score").to_numpy(), ref["score"].reshape(-1))
    embedding = np.array(result.column("user_embedding").to_pylist(), dtype=np.float32)
    np.testing.assert_array_equal(embedding, ref["user_embedding"])


def test_output_types_map_to_spark_types_end_to_end(spark, server, models_dir):
    """The 'dtypes' model (no manifest): float64, int32, int64, bool and a nested
    fixed_size_list<fixed_size_list<float32>[3]>[2] output, through Spark's own Arrow layouts."""
    rng = np.random.default_rng(2)
    n = 500
    feeds = {
        "x64": rng.standard_normal(n), "i32": rng.integers(-1000, 1000, n).astype(np.int32),
        "i64x3": rng.integers(-10**6, 10**6, (n, 3)), "f32x2x3": rng.standard_normal((n, 2, 3)).astype(np.float32),
        "flag": rng.integers(0, 2, n).astype(bool),
    }
    df = spark.createDataFrame(
        [(i, float(feeds["x64"][i]), int(feeds["i32"][i]), feeds["i64x3"][i].tolist(),
          feeds["f32x2x3"][i].tolist(), bool(feeds["flag"][i])) for i in range(n)],
        "row long, x64 double, i32 int, i64x3 array<long>, f32x2x3 array<array<float>>, flag boolean")
    scored = predict(df, "dtypes", server=server.flight_uri)
    types = {f.name: f.dataType for f in scored.schema.fields[6:]}
    assert types == {"x64_sq": T.DoubleType(), "i32_twice": T.IntegerType(), "i64_sum": T.LongType(),
                     "f32_neg": T.ArrayType(T.ArrayType(T.FloatType(), True), True), "flag_not": T.BooleanType()}
    result = scored.toArrow().sort_by("row")
    ref = reference(models_dir / "dtypes.onnx", feeds)
    np.testing.assert_array_equal(result.column("x64_sq").to_numpy(), ref["x64_sq"])
    np.testing.assert_array_equal(result.column("i32_twice").to_numpy(), ref["i32_twice"])
    np.testing.assert_array_equal(result.column("i64_sum").to_numpy(), ref["i64_sum"])
    np.testing.assert_array_equal(np.array(result.column("f32_neg").to_pylist(), np.float32), ref["f32_neg"])
    assert result.column("flag_not").to_pylist() == ref["flag_not"].tolist()


def test_an_unmappable_output_is_refused_at_plan_time_naming_the_column(spark, server):
    """The 'ints' model echoes uint64 columns: Spark has no type for them. Nothing runs."""
    df = spark.createDataFrame([(1,)], "row long")
    with pytest.raises(InvalidArgument, match=r"output column 'u64_out' of model 'ints' has Arrow type "
                                              r"fixed_size_list<.*uint64>\[2\], which Spark cannot hold"):
        predict(df, "ints", server=server.flight_uri)
    # its other unsigned outputs widen to the next signed type, losslessly
    assert spark_type(pa.list_(pa.uint32(), 2), "u32_out", "ints") == T.ArrayType(T.LongType(), True)
    top = pa.array([2**32 - 1, 0], pa.uint32())
    assert top.cast(spark_arrow_type(T.LongType())).to_pylist() == [2**32 - 1, 0]


@pytest.mark.parametrize(("arrow_type", "spark"), [
    (pa.int8(), T.ByteType()), (pa.int16(), T.ShortType()), (pa.int32(), T.IntegerType()), (pa.int64(), T.LongType()),
    (pa.uint16(), T.IntegerType()), (pa.float16(), T.FloatType()), (pa.float32(), T.FloatType()),
    (pa.float64(), T.DoubleType()), (pa.bool_(), T.BooleanType()), (pa.utf8(), T.StringType()),
    (pa.large_utf8(), T.StringType()), (pa.binary(), T.BinaryType()), (pa.date32(), T.DateType()),
    (pa.timestamp("ns", tz="UTC"), T.TimestampType()), (pa.timestamp("us"), T.TimestampNTZType()),
    (pa.decimal128(12, 3), T.DecimalType(12, 3)), (pa.dictionary(pa.int32(), pa.utf8()), T.StringType()),
    (pa.list_(pa.float32()), T.ArrayType(T.FloatType(), True)),
    (pa.list_(pa.field("x", pa.int64(), nullable=False), 3), T.ArrayType(T.LongType(), False)),
    (pa.struct([("a", pa.float32()), ("b", pa.list_(pa.utf8()))]),
     T.StructType([T.StructField("a", T.FloatType()), T.StructField("b", T.ArrayType(T.StringType()))])),
])
def test_arrow_to_spark_type_mapping(arrow_type, spark):
    assert spark_type(arrow_type, "c", "m") == spark
    # what goes back to Spark is a lossless cast of the model's column
    sample = pa.array([None], arrow_type)
    assert sample.cast(spark_arrow_type(spark)).type == spark_arrow_type(spark)


@pytest.mark.parametrize(("arrow_type", "why"), [
    (pa.uint64(), "no unsigned 64-bit type"), (pa.decimal256(50, 2), "38 digits"),
    (pa.map_(pa.utf8(), pa.int32()), "has no Spark SQL type"), (pa.fixed_shape_tensor(pa.float32(), [2, 2]),
                                                                "extension type"),
])
def test_unmappable_types_are_clear_errors_naming_the_column(arrow_type, why):
    with pytest.raises(InvalidArgument, match=f"output column 'emb' of model 'rank'.*{why}"):
        spark_type(arrow_type, "emb", "rank")


@pytest.mark.parametrize("where", ["remote", "embedded"])
def test_bad_column_type_names_model_and_column(spark, server, config, where):
    table = tabular_table(200, seed=1, prefix="bad")
    df = spark.createDataFrame(table.to_pandas()).withColumn("features", F.col("features").cast("array<double>"))
    target = {"server": server.flight_uri} if where == "remote" else {"config": config}
    scored = predict(df, "tabular", **target)  # the plan is fine: the types are the server's business
    with pytest.raises(PySparkException) as info:
        scored.collect()
    text = str(info.value)
    assert "[INVALID_ARGUMENT] column 'features' of model 'tabular' has type list<float64>, " \
           "model expects fixed_size_list<float32>[4]" in text, text


def test_missing_column_and_clashing_output_refused_on_the_driver(spark, server):
    df = spark.createDataFrame(tabular_table(10, seed=0, prefix="m").to_pandas())
    with pytest.raises(InvalidArgument, match="column 'category' of model 'tabular' is missing"):
        predict(df.drop("category"), "tabular", server=server.flight_uri)
    with pytest.raises(InvalidArgument, match="output column.s. score of model 'tabular' would duplicate"):
        predict(df.withColumn("score", F.lit(1.0)), "tabular", server=server.flight_uri)


def test_replicas_one_killed_mid_run_results_complete_and_correct(spark, models_dir, tmp_path):
    table = tabular_table(40_000, seed=8, prefix="kill")
    df = spark.createDataFrame(table.to_pandas()).repartition(8)
    text = CONFIG.format(root=models_dir)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with serving(tmp_path / "a", text) as a, serving(tmp_path / "b", text) as b:
        scored = predict(df, "tabular", server=[a.flight_uri, b.flight_uri], batch_rows=1_000)
        with KillAfter(a, "tabular", batches=3) as killer:
            result = scored.toArrow()
        assert killer.killed.is_set(), "the run ended before the replica was killed"
    result = result.sort_by("entity_id")
    expected = table.sort_by("entity_id")
    assert result.column("entity_id").to_pylist() == expected.column("entity_id").to_pylist()
    np.testing.assert_array_equal(result.column("score").to_numpy(), tabular_scores(models_dir, expected))
