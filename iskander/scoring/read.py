"""Reading a scoring run's input: every file's batches in order, as jobs for the pipeline."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future

import attrs
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from iskander.scoring.options import ScoreError, ScoreOptions
from iskander.scoring.plan import Plan


@attrs.frozen
class FileStart:
    """Input file ``file`` starts: its output file is written even if it has no rows."""

    file: int


@attrs.frozen(eq=False)  # a job is itself, not its values
class Batch:
    """One batch to score; its answer arrives through ``answer``."""

    file: int
    batch: int  # index within the file
    first_row: int  # within the file
    data: pa.RecordBatch
    answer: Future = attrs.field(factory=Future)


def read_jobs(plan: Plan, options: ScoreOptions) -> Iterator[FileStart | Batch]:
    """Every file's batches in order, each file announced by a FileStart."""
    parquet = isinstance(plan.dataset.format, ds.ParquetFileFormat)
    projection = {name: ds.field(source) for name, source in plan.sources.items()}
    for index, fragment in enumerate(plan.fragments):
        yield FileStart(index)
        batch_index, first = 0, 0
        try:
            scanned = _parquet_batches(plan, fragment, options.batch_rows) if parquet else fragment.to_batches(
                schema=plan.dataset.schema, columns=projection, batch_size=options.batch_rows,
                batch_readahead=1, fragment_readahead=1)
            for batch in scanned:
                if batch.num_rows == 0:
                    continue
                yield Batch(index, batch_index, first, batch)
                batch_index += 1
                first += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            name = plan.names[index]
            raise ScoreError(f"{name}: cannot read batch {batch_index} (from row {first} of the file): "
                             f"{str(exc).strip()}", file=name, batch=batch_index, cause=exc) from None


def _parquet_batches(plan: Plan, fragment: ds.Fragment, batch_rows: int) -> Iterator[pa.RecordBatch]:
    """A Parquet file in batches of ``batch_rows``, decoded page by page.

    The dataset scanner decodes a whole row group before slicing it, so a file written as one
    large row group would be held in memory entirely; ParquetFile.iter_batches without pre-buffering
    reads only what each batch needs. Partition values and columns missing from this file (schema
    evolution) are filled in as the dataset scanner would."""
    file = pq.ParquetFile(fragment.path, pre_buffer=False, buffer_size=1 << 20)
    present = set(file.schema_arrow.names)
    keys = ds.get_partition_keys(fragment.partition_expression)
    wanted = sorted({s for s in plan.sources.values() if s in present})
    for batch in file.iter_batches(batch_size=batch_rows, columns=wanted):
        arrays = []
        for source in plan.sources.values():
            want = plan.dataset.schema.field(source).type
            if source in present:
                column = batch.column(source)
                arrays.append(column if column.type == want else column.cast(want))
            elif source in keys:
                arrays.append(pa.repeat(pa.scalar(keys[source], want), batch.num_rows))
            else:
                arrays.append(pa.nulls(batch.num_rows, want))
        yield pa.RecordBatch.from_arrays(arrays, names=list(plan.sources))


def total_rows(plan: Plan) -> int | None:
    """Rows in the input, or None for CSV (counting them means parsing every file twice)."""
    if isinstance(plan.dataset.format, ds.CsvFileFormat):
        return None
    return sum(f.count_rows() for f in plan.fragments)
