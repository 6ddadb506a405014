"""What a scoring run is given (ScoreOptions), what it returns (ScoreResult) and how it fails (ScoreError)."""

from __future__ import annotations

import math
from pathlib import Path

import attrs


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
