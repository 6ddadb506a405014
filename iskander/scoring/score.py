"""Score a dataset through an Iskander server: Parquet, Arrow IPC or CSV in; the same rows with
prediction columns appended out (docs/etl.md). ``python -m iskander score`` is the command line.

How it keeps its promises:
- bounded memory: files are scanned in batches of at most ``batch_rows`` rows, and at most
  ``2 x concurrency`` batches are read but not yet written at any time;
- order and layout: every input file becomes one output file at the same relative path (so hive
  partition folders are preserved), its rows in the input order, whatever the concurrency;
- atomicity: everything is written under a hidden temporary name beside the target and renamed into
  place only when every batch has been scored; on any failure the temporary output is removed.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from queue import SimpleQueue
from typing import IO, Any, Protocol

import attrs
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from iskander.client.flight_client import Exchange, IskanderClient, IskanderClientError, ModelInfo, ResourceExhausted, attach_outputs

# format name -> (pyarrow.dataset format, file extensions it is recognised by; the first is written)
FORMATS: dict[str, tuple[str, tuple[str, ...]]] = {
    "parquet": ("parquet", (".parquet", ".pq")),
    "ipc": ("ipc", (".arrow", ".ipc", ".feather")),
    "feather": ("ipc", (".feather", ".arrow", ".ipc")),
    "csv": ("csv", (".csv", ".csv.gz", ".csv.bz2", ".tsv")),
}
OUTPUT_FORMATS = ("parquet", "ipc", "feather", "csv")


class ScoreError(Exception):
    """Scoring failed; nothing was written. ``file``, ``batch`` (0-based, within the file) and
    ``rows`` (first, last row of that batch within the file) say where, when known."""

    def __init__(self, message: str, *, file: str | None = None, batch: int | None = None,
                 rows: tuple[int, int] | None = None, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.file, self.batch, self.rows, self.cause = file, batch, rows, cause


@attrs.frozen
class ScoreOptions:
    model: str
    input: Path
    output: Path
    version: str | None = None
    input_format: str | None = None  # parquet | ipc | feather | csv; default: from the file extensions
    output_format: str | None = None  # default: from the output's extension, else parquet
    columns: list[str] | None = None  # input columns kept in the output (default: all)
    rename: dict[str, str] = attrs.field(factory=dict)  # input column -> new name, applied as read
    outputs: list[str] | None = None  # model outputs to add (default: all)
    prefix: str = ""  # prepended to the added output column names
    batch_rows: int = 8192
    concurrency: int = 1
    overwrite: bool = False


@attrs.frozen
class ScoreResult:
    output: Path
    model: str
    version: str
    files: int
    batches: int
    rows: int
    seconds: float

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else math.inf


class Progress(Protocol):
    def start(self, total_rows: int | None, total_bytes: int) -> None: ...
    def advance(self, rows: int, file_done_bytes: int = 0) -> None: ...
    def finish(self) -> None: ...


class NoProgress:
    def start(self, total_rows: int | None, total_bytes: int) -> None:
        pass

    def advance(self, rows: int, file_done_bytes: int = 0) -> None:
        pass

    def finish(self) -> None:
        pass


class ProgressBar:
    """One self-rewriting stderr line: rows, percent, rows/s and ETA. With no row count (CSV),
    the fraction of input bytes in finished files estimates the total."""

    def __init__(self, stream: IO[str] | None = None, interval: float = 0.2) -> None:
        self.stream = stream or sys.stderr
        self.interval = interval
        self.rows = 0
        self.total_rows: int | None = None
        self.total_bytes = 0
        self.done_bytes = 0
        self.rows_in_done_files = 0
        self.rows_this_file = 0
        self.started = self.last = 0.0

    def start(self, total_rows: int | None, total_bytes: int) -> None:
        self.total_rows, self.total_bytes = total_rows, total_bytes
        self.started = time.monotonic()
        self._draw(force=True)

    def advance(self, rows: int, file_done_bytes: int = 0) -> None:
        self.rows += rows
        self.rows_this_file += rows
        if file_done_bytes:
            self.done_bytes += file_done_bytes
            self.rows_in_done_files += self.rows_this_file
            self.rows_this_file = 0
        self._draw()

    def _estimated_total(self) -> float | None:
        if self.total_rows is not None:
            return float(self.total_rows)
        if self.done_bytes and self.total_bytes:
            return self.rows_in_done_files * self.total_bytes / self.done_bytes
        return None

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        rate = self.rows / elapsed
        total = self._estimated_total()
        line = f"{self.rows:,} rows"
        if total:
            exact = "" if self.total_rows is not None else "~"
            line = f"{self.rows:,}/{exact}{int(total):,} rows {min(self.rows / total, 1.0):6.1%}"
        line += f"  {rate:,.0f} rows/s"
        if total and rate > 0:
            line += f"  ETA {_clock(max(total - self.rows, 0) / rate)}"
        self.stream.write(f"\r{line:<70}")
        self.stream.flush()

    def finish(self) -> None:
        self._draw(force=True)
        self.stream.write("\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


# --- planning -------------------------------------------------------------------------------------


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".".join([""] + name.split(".")[-2:]) if name.endswith((".gz", ".bz2")) else path.suffix.lower()


def _detect_format(files: list[Path], given: str | None, where: Path) -> str:
    if given:
        if given not in FORMATS:
            raise ScoreError(f"unknown input format '{given}'; use one of {', '.join(FORMATS)}")
        return given
    for f in files:
        for name, (_, extensions) in FORMATS.items():
            if _suffix(f) in extensions:
                return name
    raise ScoreError(f"cannot tell the format of {where} from its file names; pass --format "
                     f"({', '.join(FORMATS)})")


def _list_files(root: Path) -> list[Path]:
    """Files under root, skipping hidden and underscore names (_SUCCESS, .crc, our own temporaries)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith((".", "_"))]
    return out


@attrs.frozen
class _Plan:
    dataset: ds.Dataset
    fragments: list[ds.Fragment]
    names: list[str]  # each fragment's path as reported in messages (relative to the input folder)
    relative: list[Path]  # each fragment's output path relative to the output root
    sources: dict[str, str]  # read columns: name after --rename -> column in the input
    keep: list[str]  # names of the read columns that are written
    request: list[str]  # names of the read columns the model takes
    outputs: list[str]  # model output columns added
    output_names: list[str]  # their names in the output
    out_schema: pa.Schema
    output_format: str
    single_file: bool


def _open(options: ScoreOptions, info: ModelInfo) -> ds.FileSystemDataset:
    """The input as a dataset: one file, or the files of a folder (hive partitions recognised)."""
    src = options.input
    if not src.exists():
        raise ScoreError(f"input {src} does not exist")
    single = src.is_file()
    listed = [src] if single else _list_files(src)
    fmt = _detect_format(listed, options.input_format, src)
    ds_format, extensions = FORMATS[fmt]
    files = listed if single or options.input_format else [f for f in listed if _suffix(f) in extensions]
    if not files:
        raise ScoreError(f"no {fmt} files under {src}")
    if not single and options.output.resolve().is_relative_to(src.resolve()):
        raise ScoreError(f"the output {options.output} is inside the input {src}; choose another place")

    source_of = {new: old for old, new in options.rename.items()}
    file_format: ds.FileFormat | str = ds_format
    if ds_format == "csv":
        # CSV is text: parse the model's scalar columns as the types the model expects, instead of
        # letting Arrow guess (an int-looking id for a utf8 passthrough, float64 for float32)
        types = {source_of.get(f.name, f.name): f.type for f in info.input_schema if _is_scalar(f.type)}
        file_format = ds.CsvFileFormat(convert_options=pacsv.ConvertOptions(column_types=types))
    try:
        dataset = ds.dataset([str(f) for f in files], format=file_format,
                             partitioning=None if single else "hive", partition_base_dir=None if single else str(src))
    except (pa.ArrowException, OSError) as exc:
        raise ScoreError(f"cannot open {src} as {fmt}: {exc}", cause=exc) from None
    return dataset


def _plan(options: ScoreOptions, info: ModelInfo) -> _Plan:
    """Which columns are read, sent, kept and added, and where each output file goes. Every mistake
    in the options is found here, before any batch is sent."""
    src, single = options.input, options.input.is_file()
    dataset = _open(options, info)
    source_of = {new: old for old, new in options.rename.items()}
    names = dataset.schema.names
    for old in options.rename:
        if old not in names:
            raise ScoreError(f"--rename names column '{old}', which the input does not have (columns: {', '.join(names)})")
    renamed = [options.rename.get(n, n) for n in names]
    partition_cols = set() if single else {options.rename.get(n, n) for n in _partition_names(dataset)}

    request = info.input_schema.names
    missing = [c for c in request if c not in renamed]
    if missing:
        raise ScoreError(f"model '{info.name}' needs column(s) {', '.join(missing)}, which the input does not have "
                         f"(columns: {', '.join(renamed)}); map a column with --rename OLD=NEW")
    if options.columns is not None:
        unknown = [c for c in options.columns if c not in renamed]
        if unknown:
            raise ScoreError(f"--columns names {', '.join(unknown)}, not in the input (columns: {', '.join(renamed)})")
        keep = [c for c in renamed if c in options.columns]
    else:
        keep = [c for c in renamed if c not in partition_cols]  # partition values live in the folder names

    outputs = options.outputs if options.outputs is not None else info.outputs
    unknown = [o for o in outputs if o not in info.output_schema.names]
    if unknown:
        raise ScoreError(f"model '{info.name}' has no output {', '.join(unknown)} "
                         f"(outputs: {', '.join(info.outputs)})")
    output_names = [options.prefix + o for o in outputs]
    clash = [n for n in output_names if n in keep]
    if clash:
        raise ScoreError(f"output column(s) {', '.join(clash)} would replace input columns of the same name; "
                         "use --prefix, --rename or --columns")

    read = [n for n in renamed if n in keep or n in request]
    sources = {n: source_of.get(n, n) for n in read}
    by_name = {options.rename.get(f.name, f.name): f for f in dataset.schema}
    out_fields = [by_name[n].with_name(n) for n in keep]
    out_fields += [info.output_schema.field(o).with_name(n) for o, n in zip(outputs, output_names)]
    out_schema = pa.schema(out_fields)

    out_fmt = options.output_format or _format_of_output(options.output, single)
    if out_fmt not in OUTPUT_FORMATS:
        raise ScoreError(f"unknown output format '{out_fmt}'; use one of {', '.join(OUTPUT_FORMATS)}")
    if out_fmt == "csv":
        nested = [f.name for f in out_schema if not _is_scalar(f.type)]
        if nested:
            raise ScoreError(f"CSV cannot hold the nested column(s) {', '.join(nested)}; write parquet or ipc")

    fragments = sorted(dataset.get_fragments(), key=lambda f: f.path)
    names_in = [Path(f.path).name if single else Path(f.path).relative_to(src) for f in fragments]
    extension = FORMATS[out_fmt][1][0]
    relative = [Path(".") if single else _with_extension(Path(n), extension) for n in names_in]
    return _Plan(dataset, fragments, [str(n) for n in names_in], relative, sources, keep, request, list(outputs),
                 output_names, out_schema, out_fmt, single)


def _is_scalar(t: pa.DataType) -> bool:
    return not pa.types.is_nested(t) and not isinstance(t, pa.ExtensionType)


def _partition_names(dataset: ds.FileSystemDataset) -> set[str]:
    # from the fragments: with no key=value folders, dataset.partitioning.schema is the whole
    # dataset schema (pyarrow 26), not an empty one
    return {key for f in dataset.get_fragments() for key in ds.get_partition_keys(f.partition_expression)}


def _format_of_output(path: Path, single: bool) -> str:
    if single:
        for name, (_, extensions) in FORMATS.items():
            if _suffix(path) in extensions and name in OUTPUT_FORMATS:
                return "ipc" if name == "feather" else name
    return "parquet"


def _with_extension(rel: Path, extension: str) -> Path:
    suffix = _suffix(rel)
    stem = rel.name[: -len(suffix)] if suffix else rel.name
    return rel.with_name(stem + extension)


# --- output ---------------------------------------------------------------------------------------


class _AtomicOutput:
    """The output is built under a hidden temporary name beside the target and renamed into place
    by commit(); abort() removes it. The rename is atomic for a single file; a directory replacing
    an old one (--overwrite) moves the old one aside first, so a reader sees old or new, never half."""

    def __init__(self, target: Path, is_dir: bool, overwrite: bool) -> None:
        if target.exists() and not overwrite:
            raise ScoreError(f"output {target} exists; pass --overwrite to replace it")
        self.target, self.is_dir = target, is_dir
        target.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = target.parent / f".{target.name}.iskander-{uuid.uuid4().hex[:8]}.tmp"
        if is_dir:
            self.tmp.mkdir()

    def path(self, relative: Path) -> Path:
        if not self.is_dir:
            return self.tmp
        out = self.tmp / relative
        out.parent.mkdir(parents=True, exist_ok=True)
        return out

    def commit(self) -> None:
        if self.target.exists() and (self.is_dir or self.target.is_dir()):
            old = self.target.parent / f".{self.target.name}.iskander-{uuid.uuid4().hex[:8]}.old"
            os.rename(self.target, old)
            os.rename(self.tmp, self.target)
            _remove(old)
        else:
            os.replace(self.tmp, self.target)

    def abort(self) -> None:
        _remove(self.tmp)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class _Sink:
    """One output file of the chosen format."""

    def __init__(self, path: Path, schema: pa.Schema, fmt: str) -> None:
        self.schema = schema
        if fmt == "parquet":
            self._writer: Any = pq.ParquetWriter(str(path), schema)
        elif fmt in ("ipc", "feather"):
            self._writer = pa.ipc.new_file(str(path), schema)
        else:
            self._writer = pacsv.CSVWriter(str(path), schema)

    def write(self, batch: pa.RecordBatch) -> None:
        self._writer.write_batch(batch)

    def close(self) -> None:
        self._writer.close()


# --- the pipeline ---------------------------------------------------------------------------------


@attrs.define
class _Job:
    file: int
    batch: int  # index within the file
    first_row: int  # within the file
    data: pa.RecordBatch | None  # None marks the start of a file
    answer: Future = attrs.field(factory=Future)


class _Streams:
    """``concurrency`` worker threads, each with its own DoExchange stream, taking batches from one
    queue. Answers come back through each job's future; the caller consumes them in order."""

    def __init__(self, client: IskanderClient, info: ModelInfo, count: int) -> None:
        self.client, self.info = client, info
        self.jobs: SimpleQueue[_Job | None] = SimpleQueue()
        self.threads = [threading.Thread(target=self._run, name=f"iskander-score-{i}", daemon=True)
                        for i in range(count)]
        for t in self.threads:
            t.start()

    def submit(self, job: _Job) -> None:
        self.jobs.put(job)

    def _run(self) -> None:
        exchange: Exchange | None = None
        while (job := self.jobs.get()) is not None:
            if not job.answer.set_running_or_notify_cancel():
                continue
            assert job.data is not None  # file markers are never queued
            try:
                if exchange is None:  # the version is pinned so that every stream runs the same model
                    exchange = Exchange(self.client, self.info, self.info.version)
                try:
                    answer = exchange.send(job.data)
                except ResourceExhausted as exc:
                    if exc.details.get("limit") != "max_stream_rows":
                        raise
                    # the server caps rows per stream and refused this batch unscored: new stream
                    exchange.close()
                    exchange = Exchange(self.client, self.info, self.info.version)
                    answer = exchange.send(job.data)
                job.answer.set_result(answer)
            except BaseException as exc:
                job.answer.set_exception(exc)
                if exchange is not None:
                    exchange.close()  # a failed stream is finished; the next job opens a new one
                exchange = None
        if exchange is not None:
            exchange.close()

    def shutdown(self) -> None:
        for _ in self.threads:
            self.jobs.put(None)
        for t in self.threads:
            t.join()


def score(options: ScoreOptions, client: IskanderClient, progress: Progress | None = None) -> ScoreResult:
    """Score ``options.input`` into ``options.output`` through ``client``; see the module docstring."""
    if options.batch_rows < 1 or options.concurrency < 1:
        raise ScoreError("batch_rows and concurrency must be at least 1")
    progress = progress or NoProgress()
    started = time.monotonic()
    info = client.model(options.model, options.version)  # IskanderClientError (NOT_FOUND, ...) as it is
    plan = _plan(options, info)
    output = _AtomicOutput(options.output, is_dir=not plan.single_file, overwrite=options.overwrite)
    streams: _Streams | None = None
    try:
        streams = _Streams(client, info, options.concurrency)
        rows, batches = _run(plan, options, streams, output, progress)
        streams.shutdown()
        streams = None
        output.commit()
    except BaseException:
        if streams is not None:
            _cancel(streams)
        output.abort()
        raise
    finally:
        progress.finish()
    return ScoreResult(options.output, info.name, info.version, len(plan.fragments), batches, rows,
                       time.monotonic() - started)


def _cancel(streams: _Streams) -> None:
    """Drop queued jobs, then stop the workers (each finishes at most the batch it is sending)."""
    while not streams.jobs.empty():
        job = streams.jobs.get_nowait()
        if job is not None:
            job.answer.cancel()
    streams.shutdown()


def _total_rows(plan: _Plan) -> int | None:
    if isinstance(plan.dataset.format, ds.CsvFileFormat):
        return None  # counting CSV rows means parsing every file twice
    return sum(f.count_rows() for f in plan.fragments)


def _run(plan: _Plan, options: ScoreOptions, streams: _Streams, output: _AtomicOutput,
         progress: Progress) -> tuple[int, int]:
    sizes = [os.path.getsize(f.path) for f in plan.fragments]
    progress.start(_total_rows(plan), sum(sizes))
    window = 2 * options.concurrency  # batches read but not yet written: the memory bound
    pending: deque[_Job] = deque()
    state = _WriteState(plan, output, progress, sizes)
    for job in _read(plan, options):
        if job.data is None:
            job.answer.set_result(None)  # a file starts: it is written even if it has no rows
        else:
            streams.submit(job)
        pending.append(job)
        while len(pending) >= window:
            state.write(pending.popleft())
    while pending:
        state.write(pending.popleft())
    state.close_file()
    return state.rows, state.batches


def _read(plan: _Plan, options: ScoreOptions) -> Iterator[_Job]:
    """Every file's batches in order; each file starts with a zero-row job so empty files are written too."""
    parquet = isinstance(plan.dataset.format, ds.ParquetFileFormat)
    projection = {name: ds.field(source) for name, source in plan.sources.items()}
    for index, fragment in enumerate(plan.fragments):
        yield _Job(index, -1, 0, None)
        batch_index, first = 0, 0
        try:
            scanned = _parquet_batches(plan, fragment, options.batch_rows) if parquet else fragment.to_batches(
                schema=plan.dataset.schema, columns=projection, batch_size=options.batch_rows,
                batch_readahead=1, fragment_readahead=1)
            for batch in scanned:
                if batch.num_rows == 0:
                    continue
                yield _Job(index, batch_index, first, batch)
                batch_index += 1
                first += batch.num_rows
        except (pa.ArrowException, OSError) as exc:
            name = plan.names[index]
            raise ScoreError(f"{name}: cannot read batch {batch_index} (from row {first} of the file): "
                             f"{str(exc).strip()}", file=name, batch=batch_index, cause=exc) from None


def _parquet_batches(plan: _Plan, fragment: ds.Fragment, batch_rows: int) -> Iterator[pa.RecordBatch]:
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


class _WriteState:
    """Consumes answered jobs in order: one output file open at a time."""

    def __init__(self, plan: _Plan, output: _AtomicOutput, progress: Progress, sizes: list[int]) -> None:
        self.plan, self.output, self.progress, self.sizes = plan, output, progress, sizes
        self.sink: _Sink | None = None
        self.file = -1
        self.rows = self.batches = 0

    def close_file(self) -> None:
        if self.sink is not None:
            self.sink.close()
            self.sink = None
            self.progress.advance(0, file_done_bytes=self.sizes[self.file] or 1)

    def write(self, job: _Job) -> None:
        if job.file != self.file:
            self.close_file()
            self.file = job.file
            self.sink = _Sink(self.output.path(self.plan.relative[job.file]), self.plan.out_schema,
                              self.plan.output_format)
        try:
            answer = job.answer.result()
        except IskanderClientError as exc:
            raise self._failed(job, exc) from None
        if answer is None or job.data is None:
            return
        kept = job.data.select(self.plan.keep)
        combined = attach_outputs(kept, answer, self.plan.outputs, self.plan.output_names)
        assert self.sink is not None
        self.sink.write(pa.RecordBatch.from_arrays(combined.columns, schema=self.plan.out_schema))
        self.rows += job.data.num_rows
        self.batches += 1
        self.progress.advance(job.data.num_rows)

    def _failed(self, job: _Job, exc: IskanderClientError) -> ScoreError:
        name = self.plan.names[job.file]
        last = job.first_row + (job.data.num_rows if job.data is not None else 0) - 1
        where = f"{name}, batch {job.batch} (rows {job.first_row}-{last} of the file)"
        row = exc.details.get("row")
        if isinstance(row, int):
            where += f", row {job.first_row + row} of the file"
        return ScoreError(f"{where}: {exc}", file=name, batch=job.batch, rows=(job.first_row, last), cause=exc)
