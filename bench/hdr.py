"""A small HDR-style latency histogram: log-spaced buckets, fixed relative precision, mergeable.

Why not keep raw samples: a 60 s point at 5000 req/s is 300k floats per worker; buckets are a few
kB whatever the count, merge across processes by adding arrays, and still give p99.9 within ~1%.
Bucket i covers [LOWEST_US * G**i, LOWEST_US * G**(i+1)) with G = 1 + PRECISION. A percentile is
reported as its bucket's upper edge (HdrHistogram's "highest equivalent value"), clipped to the
exact min/max seen, so it never understates a latency.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

LOWEST_US = 1.0
HIGHEST_US = 60e6  # 60 s; anything slower lands in the last bucket (and max stays exact)
PRECISION = 0.01
_LOG_G = math.log1p(PRECISION)
N_BUCKETS = int(math.ceil(math.log(HIGHEST_US / LOWEST_US) / _LOG_G)) + 1


class Histogram:
    __slots__ = ("counts", "count", "total_us", "min_us", "max_us")

    def __init__(self) -> None:
        self.counts = np.zeros(N_BUCKETS, dtype=np.int64)
        self.count = 0
        self.total_us = 0.0
        self.min_us = math.inf
        self.max_us = 0.0

    # --- recording ---------------------------------------------------------------------------
    def record_many(self, values_us: np.ndarray | list[float]) -> None:
        v = np.asarray(values_us, dtype=np.float64)
        if v.size == 0:
            return
        idx = np.floor(np.log(np.clip(v, LOWEST_US, HIGHEST_US) / LOWEST_US) / _LOG_G).astype(np.int64)
        np.clip(idx, 0, N_BUCKETS - 1, out=idx)
        self.counts += np.bincount(idx, minlength=N_BUCKETS)
        self.count += int(v.size)
        self.total_us += float(v.sum())
        self.min_us = min(self.min_us, float(v.min()))
        self.max_us = max(self.max_us, float(v.max()))

    def merge(self, other: Histogram) -> None:
        self.counts += other.counts
        self.count += other.count
        self.total_us += other.total_us
        self.min_us = min(self.min_us, other.min_us)
        self.max_us = max(self.max_us, other.max_us)

    # --- reading -----------------------------------------------------------------------------
    @staticmethod
    def upper_edge(i: np.ndarray | int) -> np.ndarray | float:
        return LOWEST_US * np.exp((np.asarray(i) + 1) * _LOG_G)

    def percentile(self, p: float) -> float:
        if self.count == 0:
            return math.nan
        rank = max(1, math.ceil(p / 100.0 * self.count))
        i = int(np.searchsorted(np.cumsum(self.counts), rank))
        return float(min(max(self.upper_edge(i), self.min_us), self.max_us))

    def mean(self) -> float:
        return self.total_us / self.count if self.count else math.nan

    def summary(self) -> dict[str, float]:
        return {
            "p50_us": self.percentile(50), "p95_us": self.percentile(95), "p99_us": self.percentile(99),
            "p999_us": self.percentile(99.9), "max_us": self.max_us if self.count else math.nan,
            "min_us": self.min_us if self.count else math.nan, "mean_us": self.mean(), "count": self.count,
        }

    def cdf(self) -> tuple[np.ndarray, np.ndarray]:
        """(latency_us, fraction <= latency) at each non-empty bucket's upper edge."""
        nz = np.nonzero(self.counts)[0]
        frac = np.cumsum(self.counts[nz]) / max(self.count, 1)
        edges = np.minimum(self.upper_edge(nz), self.max_us)
        return edges, frac

    # --- serialisation (sparse: only non-empty buckets) ----------------------------------------
    def to_dict(self) -> dict[str, Any]:
        nz = np.nonzero(self.counts)[0]
        return {
            "lowest_us": LOWEST_US, "precision": PRECISION, "count": self.count, "total_us": self.total_us,
            "min_us": self.min_us if self.count else None, "max_us": self.max_us,
            "buckets": nz.tolist(), "counts": self.counts[nz].tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Histogram:
        if d.get("lowest_us") != LOWEST_US or d.get("precision") != PRECISION:
            raise ValueError("histogram was written with a different bucket layout")
        h = cls()
        h.counts[np.asarray(d["buckets"], dtype=np.int64)] = np.asarray(d["counts"], dtype=np.int64)
        h.count = int(d["count"])
        h.total_us = float(d["total_us"])
        h.min_us = math.inf if d["min_us"] is None else float(d["min_us"])
        h.max_us = float(d["max_us"])
        return h
