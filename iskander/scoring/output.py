"""Writing a scoring run's output: atomically (all or nothing), one file of the chosen format at a time."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from iskander.scoring.options import ScoreError


class AtomicOutput:
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


class Sink:
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
