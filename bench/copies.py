"""Cost of every copy boundary on both request paths, measured in process (no network).

    python bench/copies.py [--batches 1,128,8192] [--repeat 2000]

For the demo two_tower model (two fixed_size_list<float32>[16] inputs, utf8 passthrough ids), times
each step a request goes through, at several batch sizes: Flight IPC decode and encode, the
contract's column -> tensor step (zero-copy, and the copying variants: nulls filled, a declared
cast, columns concatenated), onnxruntime itself, output materialisation, and the OIP codec (raw
bytes -> Arrow, Arrow -> raw bytes, protobuf parse and serialise). Medians in microseconds; written
to bench/results/<date>/copies.json and printed as a markdown table for docs/memory_model.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from iskander._proto import grpc_service_pb2 as pb
from iskander.arrow.tensor import compile_reader, read_filled
from iskander.frontends.oip_codec import TensorDecoder, encode_column
from iskander.core.registry import load_model
from iskander.config.loader import default_config_path, load_config


def median_us(fn: Callable[[], object], repeat: int) -> float:
    for _ in range(min(200, repeat)):
        fn()
    times = np.empty(repeat)
    for i in range(repeat):
        t0 = time.perf_counter_ns()
        fn()
        times[i] = time.perf_counter_ns() - t0
    return float(np.median(times) / 1000)


def ipc_bytes(batch: pa.RecordBatch) -> pa.Buffer:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue()


def measure(n: int, repeat: int, entry) -> dict[str, float]:
    contract, backend = entry.contract, entry.backend
    rng = np.random.default_rng(0)
    user = rng.standard_normal((n, 16)).astype(np.float32)
    item = rng.standard_normal((n, 16)).astype(np.float32)
    ids = pa.array([f"u{i}" for i in range(n)])
    batch = pa.record_batch({
        "user_id": ids, "item_id": ids,
        "user_features": pa.FixedSizeListArray.from_arrays(pa.array(user.ravel()), 16),
        "item_features": pa.FixedSizeListArray.from_arrays(pa.array(item.ravel()), 16),
    })
    wire = ipc_bytes(batch)
    prepared = contract.prepare(batch)
    tensors = contract.run_tensors(contract.outputs)
    results = dict(zip(tensors, backend.run(tensors, prepared.feeds, "two_tower")))
    out = contract.assemble(prepared, contract.outputs, results)

    reader = compile_reader(pa.list_(pa.float32(), 16))
    with_nulls = pa.FixedSizeListArray.from_arrays(
        pa.array(np.where(np.arange(n * 16) % 97 == 0, np.nan, user.ravel()), pa.float32(),
                 from_pandas=True), 16)
    as_f64 = pa.FixedSizeListArray.from_arrays(pa.array(user.ravel().astype(np.float64)), 16)
    target = pa.list_(pa.float32(), 16)
    parts = [np.ascontiguousarray(user[:, :8]), np.ascontiguousarray(user[:, 8:])]

    # OIP request and response as they travel
    raw_user, raw_item = user.tobytes(), item.tobytes()
    id_bytes = b"".join(len(s).to_bytes(4, "little") + s for s in (f"u{i}".encode() for i in range(n)))
    req = pb.ModelInferRequest(model_name="two_tower")
    for name, dt_, shape, data in (("user_id", "BYTES", [n, 1], id_bytes), ("item_id", "BYTES", [n, 1], id_bytes),
                                   ("user_features", "FP32", [n, 16], raw_user),
                                   ("item_features", "FP32", [n, 16], raw_item)):
        req.inputs.add(name=name, datatype=dt_, shape=shape)
        req.raw_input_contents.append(data)
    req_wire = req.SerializeToString()
    fp32 = TensorDecoder("two_tower", "user_features", target)
    utf8 = TensorDecoder("two_tower", "user_id", pa.utf8())
    resp = pb.ModelInferResponse(model_name="two_tower")
    for name in out.schema.names:
        datatype, shape, data = encode_column(out.column(name))
        resp.outputs.add(name=name, datatype=datatype, shape=shape)
        resp.raw_output_contents.append(data)

    return {
        "flight_decode_ipc": median_us(lambda: pa.ipc.open_stream(wire).read_next_batch(), repeat),
        "contract_prepare_zero_copy": median_us(lambda: contract.prepare(batch), repeat),
        "column_read_zero_copy": median_us(lambda: reader(batch.column("user_features")), repeat),
        "column_read_nulls_filled": median_us(lambda: read_filled(with_nulls, 0.0), repeat),
        "column_cast_float64_to_float32": median_us(lambda: reader(pc.cast(as_f64, target)), repeat),
        "columns_concatenated": median_us(lambda: np.concatenate(parts, axis=1), repeat),
        "onnxruntime_run": median_us(lambda: backend.run(tensors, prepared.feeds, "two_tower"), repeat),
        "output_materialise": median_us(lambda: contract.assemble(prepared, contract.outputs, results), repeat),
        "flight_encode_ipc": median_us(lambda: ipc_bytes(out), repeat),
        "oip_parse_request": median_us(lambda: pb.ModelInferRequest.FromString(req_wire), repeat),
        "oip_decode_fp32_raw": median_us(lambda: fp32.from_raw(raw_user, n), repeat),
        "oip_decode_bytes_raw": median_us(lambda: utf8.from_raw(id_bytes, n), repeat),
        "oip_encode_outputs": median_us(lambda: [encode_column(out.column(c)) for c in out.schema.names], repeat),
        "oip_serialize_response": median_us(lambda: resp.SerializeToString(), repeat),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,128,8192")
    parser.add_argument("--repeat", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    settings = next(m for m in load_config(default_config_path()).models if m.name == "two_tower")
    entry = load_model(settings)
    sizes = [int(b) for b in args.batches.split(",")]
    table = {n: measure(n, args.repeat if n < 4096 else max(200, args.repeat // 10), entry) for n in sizes}
    steps = list(next(iter(table.values())))
    print("| step | " + " | ".join(f"batch {n} (us)" for n in sizes) + " |")
    print("|---|" + "---|" * len(sizes))
    for step in steps:
        print(f"| {step} | " + " | ".join(f"{table[n][step]:.1f}" for n in sizes) + " |")
    out = args.out or Path("bench/results") / dt.date.today().isoformat() / "copies.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpus": __import__("os").cpu_count(), "python": platform.python_version(),
                    "pyarrow": pa.__version__},
        "model": "two_tower", "median_us": {str(n): v for n, v in table.items()},
    }, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
