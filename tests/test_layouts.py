"""Lossless layout equivalents over raw pyarrow Flight (issue 15): what DuckDB, Polars, Spark, Java and
Go producers send for a contract's utf8 and fixed_size_list columns is accepted, converted once, and
answered exactly as the canonical layout; a row that breaks the fixed size is INVALID_ARGUMENT
naming the column and the row."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.flight as flight
import pytest

from data import tabular_batch, two_tower_batch
from helpers import exchange
from iskander.client.flight_status import error_details
from models import reference


def _relayout(batch: pa.RecordBatch, strings: str, lists: str) -> pa.RecordBatch:
    """The same values in another physical layout."""
    columns, fields = [], []
    for field, column in zip(batch.schema, batch.columns):
        if pa.types.is_string(field.type):
            column = {
                "string": column,
                "large_string": column.cast(pa.large_string()),
                "string_view": column.cast(pa.string_view()),
                "dictionary": column.dictionary_encode(),
                "dictionary_large": column.cast(pa.large_string()).dictionary_encode(),
            }[strings]
        elif pa.types.is_fixed_size_list(field.type):
            values, k = column.flatten(), field.type.list_size
            offsets = pa.array(np.arange(0, len(column) * k + 1, k, dtype=np.int64))
            column = {
                "fixed": column,
                "list": pa.ListArray.from_arrays(offsets.cast(pa.int32()), values),
                "large_list": pa.LargeListArray.from_arrays(offsets, values),
                "list_view": pa.ListViewArray.from_arrays(offsets[:-1].cast(pa.int32()),
                                                          pa.array(np.full(len(column), k, np.int32)), values),
            }[lists]
        columns.append(column)
        fields.append(pa.field(field.name, column.type))
    return pa.RecordBatch.from_arrays(columns, schema=pa.schema(fields))


@pytest.mark.parametrize("strings", ["large_string", "string_view", "dictionary", "dictionary_large"])
@pytest.mark.parametrize("lists", ["list", "large_list", "list_view"])
def test_equivalent_layouts_answer_as_the_canonical_one(server, models_dir, strings, lists):
    batch, feeds = two_tower_batch(50)
    (canonical,) = exchange(server.flight_uri, "two_tower", [batch])
    (out,) = exchange(server.flight_uri, "two_tower", [_relayout(batch, strings, lists)])
    assert out.equals(canonical)  # passthrough columns come back in the contract's layout too
    ref = reference(models_dir / "two_tower.onnx", feeds)
    np.testing.assert_array_equal(out.column("score").to_numpy(), ref["score"])


def test_a_list_row_of_the_wrong_size_names_column_and_row(server):
    batch, _ = tabular_batch(5)
    rows = [list(r) for r in batch.column("features").to_pylist()]
    rows[3] = rows[3][:3]  # 3 values where the model takes 4
    bad = batch.set_column(1, "features", pa.array(rows, pa.list_(pa.float32())))
    with pytest.raises(pa.ArrowException) as info:
        exchange(server.flight_uri, "tabular", [bad])
    details = error_details(info.value)
    assert details["code"] == "INVALID_ARGUMENT"
    assert details["column"] == "features" and details["row"] == 3 and details["got"] == 3
    assert "row 3 holds 3" in details["message"] and "tabular" in details["message"]


def test_a_list_of_another_value_type_is_still_refused(server):
    batch, _ = tabular_batch(4)
    values = batch.column("features").flatten().cast(pa.float64())
    offsets = pa.array(np.arange(0, 17, 4, dtype=np.int32))
    bad = batch.set_column(1, "features", pa.ListArray.from_arrays(offsets, values))
    with pytest.raises(pa.ArrowException) as info:
        exchange(server.flight_uri, "tabular", [bad])
    details = error_details(info.value)
    assert details["code"] == "INVALID_ARGUMENT" and details["column"] == "features"
    assert "has type list<float64>, model expects fixed_size_list<float32>[4]" in details["message"]
