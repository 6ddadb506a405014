"""Request data shared by the protocol tests."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


def fsl(values: np.ndarray) -> pa.FixedSizeListArray:
    """[N, k] numpy -> fixed_size_list<T>[k] column (nested for more dims)."""
    arr: pa.Array = pa.array(values.reshape(-1))
    for d in reversed(values.shape[1:]):
        arr = pa.FixedSizeListArray.from_arrays(arr, d)
    return arr


def two_tower_batch(n: int, seed: int = 0) -> tuple[pa.RecordBatch, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    user = rng.standard_normal((n, 16)).astype(np.float32)
    item = rng.standard_normal((n, 16)).astype(np.float32)
    batch = pa.record_batch({
        "user_id": pa.array([f"u{seed}-{i}" for i in range(n)]),
        "item_id": pa.array([f"i{seed}-{i}" for i in range(n)]),
        "user_features": fsl(user),
        "item_features": fsl(item),
    })
    return batch, {"user_features": user, "item_features": item}


def tabular_batch(n: int, seed: int = 0) -> tuple[pa.RecordBatch, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    numeric = rng.standard_normal((n, 4)).astype(np.float32)
    category = rng.integers(0, 10, n).astype(np.int64)
    batch = pa.record_batch({
        "entity_id": pa.array([f"e{i}" for i in range(n)]),
        "features": fsl(numeric),
        "category": pa.array(category),
    })
    return batch, {"numeric": numeric, "category": category}


def dtypes_feeds(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x64": rng.standard_normal(n),
        "i32": rng.integers(-1000, 1000, n).astype(np.int32),
        "i64x3": rng.integers(-(2**40), 2**40, (n, 3)).astype(np.int64),
        "f32x2x3": rng.standard_normal((n, 2, 3)).astype(np.float32),
        "flag": rng.integers(0, 2, n).astype(bool),
    }


def dtypes_batch(feeds: dict[str, np.ndarray]) -> pa.RecordBatch:
    return pa.record_batch({
        name: (fsl(v) if v.ndim > 1 else pa.array(v)) for name, v in feeds.items()
    })
