"""Progress reports of a scoring run: none, or a self-rewriting line on stderr."""

from __future__ import annotations

import sys
import time
from typing import IO, Protocol


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
