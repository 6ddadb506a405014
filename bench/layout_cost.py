"""Cost of converting a lossless layout equivalent into the contract's layout (arrow/layouts.py).

In process, no server: median time of each conversion at several batch sizes, next to the cost
the canonical layout pays (nothing: the converter is not called). Columns: a utf8 id column
(8-byte values) and a 16-float feature column, as in the two_tower model.

    PYTHONPATH=. python bench/layout_cost.py [--rows 128,8192] [--repeat 2000]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import pyarrow as pa

from iskander.arrow.layouts import converter


def cases(n: int) -> dict[str, tuple[pa.Array, pa.DataType]]:
    ids = pa.array([f"id{i:06d}" for i in range(n)])
    values = pa.array(np.random.default_rng(0).standard_normal(n * 16).astype(np.float32))
    offsets = np.arange(0, n * 16 + 1, 16)
    fsl = pa.list_(pa.float32(), 16)
    return {
        "large_string -> utf8": (ids.cast(pa.large_string()), pa.string()),
        "string_view -> utf8": (ids.cast(pa.string_view()), pa.string()),
        "dictionary<utf8> -> utf8": (ids.dictionary_encode(), pa.string()),
        "list<float> -> fixed_size_list[16]": (pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values), fsl),
        "large_list<float> -> fixed_size_list[16]": (pa.LargeListArray.from_arrays(pa.array(offsets), values), fsl),
        "list_view<float> -> fixed_size_list[16]": (
            pa.ListViewArray.from_arrays(pa.array(offsets[:-1], pa.int32()), pa.array(np.full(n, 16, np.int32)),
                                         values), fsl),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="128,8192")
    parser.add_argument("--repeat", type=int, default=2000)
    args = parser.parse_args()
    sizes = [int(r) for r in args.rows.split(",")]
    table: dict[str, dict[int, float]] = {}
    for n in sizes:
        for name, (column, target) in cases(n).items():
            convert = converter(column.type, target)
            assert convert is not None, name
            for _ in range(50):
                convert(column, "m", "c")
            samples = []
            for _ in range(args.repeat if n < 4096 else max(200, args.repeat // 10)):
                t0 = time.perf_counter_ns()
                convert(column, "m", "c")
                samples.append(time.perf_counter_ns() - t0)
            table.setdefault(name, {})[n] = statistics.median(samples) / 1e3
    print("| conversion | " + " | ".join(f"{n} rows (us)" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for name, by_size in table.items():
        print(f"| {name} | " + " | ".join(f"{by_size[n]:.1f}" for n in sizes) + " |")


if __name__ == "__main__":
    main()
