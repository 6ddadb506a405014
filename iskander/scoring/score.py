"""Score a dataset through an Iskander server: Parquet, Arrow IPC or CSV in; the same rows with
prediction columns appended out (docs/etl.md). ``python -m iskander score`` is the command line.

How it keeps its promises:
- bounded memory: files are scanned in batches of at most ``batch_rows`` rows, and at most
  ``2 x concurrency`` batches are read but not yet written at any time;
- order and layout: every input file becomes one output file at the same relative path (so hive
  partition folders are preserved), its rows in the input order, whatever the concurrency;
- atomicity: everything is written under a hidden temporary name beside the target and renamed into
  place only when every batch has been scored; on any failure the temporary output is removed.

This module is the pipeline; ``plan`` checks the options against the input and the model, ``read``
scans the input, ``output`` writes it, ``progress`` reports, ``options`` holds the types.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from queue import SimpleQueue

import pyarrow as pa

from iskander.client import Exchange, IskanderClient, IskanderClientError, ModelInfo, ResourceExhausted, attach_outputs
from iskander.scoring.options import ScoreError, ScoreOptions, ScoreResult
from iskander.scoring.output import AtomicOutput, Sink
from iskander.scoring.plan import Plan, make_plan
from iskander.scoring.progress import NoProgress, Progress
from iskander.scoring.read import Batch, FileStart, read_jobs, total_rows

# The library API (docs/etl.md): score(ScoreOptions(...), client) -> ScoreResult
__all__ = ["score", "ScoreOptions", "ScoreResult", "ScoreError"]


class _Streams:
    """``concurrency`` worker threads, each with its own DoExchange stream, taking batches from one
    queue. Answers come back through each job's future; the caller consumes them in order."""

    def __init__(self, client: IskanderClient, info: ModelInfo, count: int) -> None:
        self.client, self.info = client, info
        self.jobs: SimpleQueue[Batch | None] = SimpleQueue()
        self.threads = [threading.Thread(target=self._run, name=f"iskander-score-{i}", daemon=True)
                        for i in range(count)]
        for t in self.threads:
            t.start()

    def submit(self, job: Batch) -> None:
        self.jobs.put(job)

    def _run(self) -> None:
        exchange: Exchange | None = None
        while (job := self.jobs.get()) is not None:
            if not job.answer.set_running_or_notify_cancel():
                continue
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
    plan = make_plan(options, info)
    output = AtomicOutput(options.output, is_dir=not plan.single_file, overwrite=options.overwrite)
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


def _run(plan: Plan, options: ScoreOptions, streams: _Streams, output: AtomicOutput,
         progress: Progress) -> tuple[int, int]:
    sizes = [os.path.getsize(f.path) for f in plan.fragments]
    progress.start(total_rows(plan), sum(sizes))
    window = 2 * options.concurrency  # batches read but not yet written: the memory bound
    pending: deque[FileStart | Batch] = deque()
    state = _WriteState(plan, output, progress, sizes)
    for job in read_jobs(plan, options):
        if isinstance(job, Batch):
            streams.submit(job)
        pending.append(job)
        while len(pending) >= window:
            state.write(pending.popleft())
    while pending:
        state.write(pending.popleft())
    state.close_file()
    return state.rows, state.batches


class _WriteState:
    """Consumes jobs in order: one output file open at a time, the first from the start (a plan
    has at least one file), each next one when its FileStart comes."""

    def __init__(self, plan: Plan, output: AtomicOutput, progress: Progress, sizes: list[int]) -> None:
        self.plan, self.output, self.progress, self.sizes = plan, output, progress, sizes
        self.file = 0
        self.sink = self._open(0)
        self.rows = self.batches = 0

    def _open(self, file: int) -> Sink:
        return Sink(self.output.path(self.plan.relative[file]), self.plan.out_schema, self.plan.output_format)

    def close_file(self) -> None:
        self.sink.close()
        self.progress.advance(0, file_done_bytes=self.sizes[self.file] or 1)

    def write(self, job: FileStart | Batch) -> None:
        if isinstance(job, FileStart):
            if job.file != self.file:
                self.close_file()
                self.file = job.file
                self.sink = self._open(job.file)
            return
        try:
            answer = job.answer.result()
        except IskanderClientError as exc:
            raise self._failed(job, exc) from None
        kept = job.data.select(self.plan.keep)
        combined = attach_outputs(kept, answer, self.plan.outputs, self.plan.output_names)
        self.sink.write(pa.RecordBatch.from_arrays(combined.columns, schema=self.plan.out_schema))
        self.rows += job.data.num_rows
        self.batches += 1
        self.progress.advance(job.data.num_rows)

    def _failed(self, job: Batch, exc: IskanderClientError) -> ScoreError:
        name = self.plan.names[job.file]
        last = job.first_row + job.data.num_rows - 1
        where = f"{name}, batch {job.batch} (rows {job.first_row}-{last} of the file)"
        row = exc.details.get("row")
        if isinstance(row, int):
            where += f", row {job.first_row + row} of the file"
        return ScoreError(f"{where}: {exc}", file=name, batch=job.batch, rows=(job.first_row, last), cause=exc)
