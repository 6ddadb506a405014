"""Score a Spark DataFrame with an Iskander model (docs/scale-out.md#spark).

    from iskander.integrations.spark import predict

    df = spark.read.parquet("events/")                         # hive partitions become columns
    scored = predict(df, "tabular", server="10.0.0.5:50051")   # or server=[...replicas], or config="config.toml"
    scored.write.partitionBy("day", "region").parquet("events_scored/")

The answer is ``dataframe.mapInArrow(fn, schema)``: every input column, unchanged, followed by
the model's outputs. ``schema`` is built on the driver from the model's contract (the server's
GetFlightInfo, or the config's model), its Arrow output types mapped to Spark SQL types by
``spark_type``; a type with no Spark equivalent is an error now, naming the column, not a failed
task later. ``fn`` holds only picklable values (the locations or the config path, the pinned
version, the output names): each Python worker opens its own connections or loads the model once
and keeps it for the tasks it runs, in local mode and on a cluster alike.

Spark hands Python its own Arrow layouts (``list<float>`` for an ``array<float>``, ``large_string``
with ``spark.sql.execution.arrow.useLargeVarTypes``); the client's layout casts
(``iskander.client.conform``) turn them into the contract's (``fixed_size_list<float32>[4]``,
``utf8``) and value conversions stay the server's (a manifest's ``cast_from``, or a refusal naming
the column). Outputs go back in the exact Arrow types Spark reads (``spark_arrow_type``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc

from iskander.client import InvalidArgument
from iskander.integrations._engine import Plan, resolve, shared_engine

if TYPE_CHECKING:
    from pyspark.sql import DataFrame
    from pyspark.sql.types import DataType, StructType

__all__ = ["predict", "spark_type", "spark_arrow_type", "output_schema", "DEFAULT_BATCH_ROWS"]

# Rows per request: Spark's own Arrow batch size (spark.sql.execution.arrow.maxRecordsPerBatch,
# 10,000 by default), so that batches go to the model as Spark made them, without re-chunking copies.
DEFAULT_BATCH_ROWS = 10_000


class UnmappableType(InvalidArgument):
    """An output column whose Arrow type has no Spark SQL type."""


def spark_type(t: pa.DataType, column: str, model: str) -> DataType:
    """The Spark SQL type for the Arrow type ``t`` of output ``column`` (raises naming the column)."""
    from pyspark.sql import types as T

    def fail(why: str) -> UnmappableType:
        return UnmappableType(
            f"output column '{column}' of model '{model}' has Arrow type {t}, which {why}; choose other "
            "outputs with outputs=[...] or declare a Spark-compatible type in the model's manifest",
            {"model": model, "column": column, "got": str(t)})

    def walk(t: pa.DataType) -> DataType:
        if isinstance(t, pa.BaseExtensionType):
            raise fail(f"is an extension type ({t.extension_name}) with no Spark SQL type")
        if pa.types.is_dictionary(t):
            return walk(t.value_type)
        simple = [
            (pa.types.is_boolean, T.BooleanType), (pa.types.is_int8, T.ByteType), (pa.types.is_int16, T.ShortType),
            (pa.types.is_int32, T.IntegerType), (pa.types.is_int64, T.LongType),
            # Spark has no unsigned types: each widens to the next signed type that holds every value
            (pa.types.is_uint8, T.ShortType), (pa.types.is_uint16, T.IntegerType), (pa.types.is_uint32, T.LongType),
            (pa.types.is_float16, T.FloatType), (pa.types.is_float32, T.FloatType), (pa.types.is_float64, T.DoubleType),
            (pa.types.is_string, T.StringType), (pa.types.is_large_string, T.StringType),
            (pa.types.is_string_view, T.StringType),
            (pa.types.is_binary, T.BinaryType), (pa.types.is_large_binary, T.BinaryType),
            (pa.types.is_binary_view, T.BinaryType), (pa.types.is_fixed_size_binary, T.BinaryType),
            (pa.types.is_date32, T.DateType), (pa.types.is_date64, T.DateType),
        ]
        for test, spark in simple:
            if test(t):
                return spark()
        if pa.types.is_uint64(t):
            raise fail("Spark cannot hold: it has no unsigned 64-bit type and a long would overflow")
        if pa.types.is_timestamp(t):
            return T.TimestampType() if t.tz is not None else T.TimestampNTZType()
        if pa.types.is_decimal(t):
            if t.precision > 38:
                raise fail("has more than Spark's 38 digits of decimal precision")
            return T.DecimalType(t.precision, t.scale)
        if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t) \
                or pa.types.is_list_view(t) or pa.types.is_large_list_view(t):
            return T.ArrayType(walk(t.value_type), containsNull=t.value_field.nullable)
        if pa.types.is_struct(t):
            return T.StructType([T.StructField(f.name, walk(f.type), f.nullable) for f in t])
        raise fail("has no Spark SQL type")

    return walk(t)


def spark_arrow_type(t: DataType) -> pa.DataType:
    """The Arrow type Spark reads back for the Spark type ``t`` (mapInArrow checks the layout:
    ``fixed_size_list`` or ``float64`` where it expects ``list`` or ``float32`` fails the task)."""
    from pyspark.sql import types as T

    simple = {
        T.BooleanType: pa.bool_(), T.ByteType: pa.int8(), T.ShortType: pa.int16(), T.IntegerType: pa.int32(),
        T.LongType: pa.int64(), T.FloatType: pa.float32(), T.DoubleType: pa.float64(), T.StringType: pa.utf8(),
        T.BinaryType: pa.binary(), T.DateType: pa.date32(),
        T.TimestampType: pa.timestamp("us", tz="UTC"), T.TimestampNTZType: pa.timestamp("us"),
    }
    for spark, arrow in simple.items():
        if isinstance(t, spark):
            return arrow
    if isinstance(t, T.DecimalType):
        return pa.decimal128(t.precision, t.scale)
    if isinstance(t, T.ArrayType):
        return pa.list_(pa.field("element", spark_arrow_type(t.elementType), nullable=t.containsNull))
    if isinstance(t, T.StructType):
        return pa.struct([pa.field(f.name, spark_arrow_type(f.dataType), nullable=f.nullable) for f in t.fields])
    raise TypeError(f"no Arrow type for Spark type {t}")  # spark_type never produces one


def output_schema(input_schema: StructType, plan: Plan) -> StructType:
    """The DataFrame's columns followed by the model's output columns as Spark types."""
    from pyspark.sql import types as T

    model = plan.target.model
    names = input_schema.fieldNames()
    # the contract alone decides these: refused whatever the DataFrame holds
    outputs = [T.StructField(f.name, spark_type(f.type, f.name, model), f.nullable) for f in plan.output_fields]
    clash = [f.name for f in plan.output_fields if f.name in names]
    if clash:
        raise InvalidArgument(
            f"output column(s) {', '.join(clash)} of model '{model}' would duplicate input columns; drop or "
            "rename them first, or choose other outputs with outputs=[...]", {"model": model, "column": clash[0]})
    missing = [f.name for f in plan.request_schema if f.name not in names]
    if missing:
        raise InvalidArgument(
            f"column '{missing[0]}' of model '{model}' is missing; the DataFrame has columns: "
            f"{', '.join(names) or '(none)'}", {"model": model, "column": missing[0]})
    return T.StructType(list(input_schema.fields) + outputs)


class _Score:
    """The function mapInArrow ships to executors: plain values only; the engine is opened (once
    per Python worker, see ``shared_engine``) where it runs."""

    def __init__(self, plan: Plan, arrow_types: tuple[pa.DataType, ...], batch_rows: int) -> None:
        self.plan = plan
        self.arrow_types = arrow_types
        self.batch_rows = batch_rows

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        engine = None
        for batch in _rechunk(batches, self.batch_rows):
            if engine is None:
                engine = shared_engine(self.plan)
            yield self._spark_layout(engine.score(batch))

    def _spark_layout(self, scored: pa.RecordBatch) -> pa.RecordBatch:
        k = scored.num_columns - len(self.arrow_types)
        arrays = list(scored.columns[:k])
        fields = list(scored.schema)[:k]
        for field, column, target in zip(list(scored.schema)[k:], scored.columns[k:], self.arrow_types):
            if column.type != target:
                # lossless for every type spark_type maps (layouts, widening), except timestamps
                # finer than Spark's microseconds, which are truncated
                column = pc.cast(column, target, safe=False)
            arrays.append(column)
            fields.append(pa.field(field.name, target, nullable=field.nullable))
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


def _rechunk(batches: Iterator[pa.RecordBatch], rows: int) -> Iterator[pa.RecordBatch]:
    """Batches of ``rows`` rows (the last may be shorter): slices (zero-copy) of larger batches,
    smaller ones joined (one copy)."""
    pending: list[pa.RecordBatch] = []
    held = 0
    for batch in batches:
        if not batch.num_rows:
            continue
        if not pending and batch.num_rows == rows:
            yield batch
            continue
        pending.append(batch)
        held += batch.num_rows
        if held < rows:
            continue
        joined = pending[0] if len(pending) == 1 else pa.Table.from_batches(pending).combine_chunks().to_batches()[0]
        start = 0
        while joined.num_rows - start >= rows:
            yield joined.slice(start, rows)
            start += rows
        rest = joined.slice(start)
        pending = [rest] if rest.num_rows else []
        held = rest.num_rows
    if held:
        yield pending[0] if len(pending) == 1 else pa.Table.from_batches(pending).combine_chunks().to_batches()[0]


def predict(dataframe: DataFrame, model: str, *, server: str | Sequence[str] | None = None,
            config: str | Path | None = None, version: str | None = None, outputs: Sequence[str] | None = None,
            batch_rows: int = DEFAULT_BATCH_ROWS, **client_options: Any) -> DataFrame:
    """``dataframe`` with the model's outputs appended to every row (``mapInArrow``).

    Exactly one of ``server`` (a Flight location, or a list of replicas: requests are spread over
    them and retried on another when one is unavailable) or ``config`` (a server config file: each
    Python worker loads the model once). ``version`` pins a version (default: the newest ready
    one, resolved now and used by every task). ``outputs`` picks output columns (default: all).
    ``batch_rows``: rows per request. ``client_options`` go to ``IskanderClient`` (``token``,
    ``tls_root_certs``, ...).

    Raises now, on the driver, if the model or an output is unknown, a request column is missing,
    an output would duplicate a column, or an output's Arrow type has no Spark type."""
    if batch_rows < 1:
        raise ValueError(f"batch_rows must be >= 1, got {batch_rows}")
    plan = resolve(model, server=server, config=config, version=version, outputs=outputs,
                   client_options=client_options)
    schema = output_schema(dataframe.schema, plan)
    outputs_spark = schema.fields[len(dataframe.schema.fields):]
    arrow_types = tuple(spark_arrow_type(f.dataType) for f in outputs_spark)
    return dataframe.mapInArrow(_Score(plan, arrow_types, batch_rows), schema)
