"""One server process, two protocols: the same rows give identical predictions, equal to onnxruntime."""

from __future__ import annotations

import numpy as np
import pyarrow.flight as flight
import tritonclient.grpc as triton

from data import tabular_batch, two_tower_batch
from models import reference


def test_flight_and_oip_agree_with_each_other_and_onnxruntime(server, models_dir):
    fc = flight.connect(server.flight_uri)
    tc = triton.InferenceServerClient(server.grpc_url)
    try:
        for n, seed in ((1, 1), (17, 2), (512, 3)):
            batch, feeds = tabular_batch(n, seed)
            writer, reader = fc.do_exchange(flight.FlightDescriptor.for_path("tabular"))
            with writer:
                writer.begin(batch.schema)
                writer.write_batch(batch)
                via_flight = reader.read_chunk().data
                writer.done_writing()

            inputs = []
            ids = np.array([s.encode() for s in batch.column("entity_id").to_pylist()], dtype=np.object_)
            for name, data, dtype in (
                ("entity_id", ids.reshape(n, 1), "BYTES"),
                ("features", feeds["numeric"], "FP32"),
                ("category", feeds["category"].reshape(n, 1), "INT64"),
            ):
                t = triton.InferInput(name, list(data.shape), dtype)
                t.set_data_from_numpy(data)
                inputs.append(t)
            via_oip = tc.infer("tabular", inputs)

            ref = reference(models_dir / "tabular.onnx", feeds)["probability"].reshape(-1)
            np.testing.assert_array_equal(via_flight.column("score").to_numpy(), ref)
            np.testing.assert_array_equal(via_oip.as_numpy("score").reshape(-1), ref)
            assert [s.decode() for s in via_oip.as_numpy("entity_id").reshape(-1)] == \
                via_flight.column("entity_id").to_pylist()

        batch, feeds = two_tower_batch(64, seed=9)
        writer, reader = fc.do_exchange(flight.FlightDescriptor.for_path("two_tower"))
        with writer:
            writer.begin(batch.schema)
            writer.write_batch(batch)
            via_flight = reader.read_chunk().data
            writer.done_writing()
        ref = reference(models_dir / "two_tower.onnx", feeds)
        np.testing.assert_array_equal(
            via_flight.column("user_embedding").flatten().to_numpy().reshape(64, 32), ref["user_embedding"]
        )
    finally:
        fc.close()
        tc.close()


def test_concurrent_clients_on_both_protocols(server, models_dir):
    """Both frontends at once from several threads: every answer is right, none is lost."""
    from concurrent.futures import ThreadPoolExecutor

    batch, feeds = tabular_batch(64, seed=4)
    ref = reference(models_dir / "tabular.onnx", feeds)["probability"].reshape(-1)

    def via_flight(_: int) -> np.ndarray:
        c = flight.connect(server.flight_uri)
        try:
            writer, reader = c.do_exchange(flight.FlightDescriptor.for_path("tabular"))
            outs = []
            with writer:
                writer.begin(batch.schema)
                for _ in range(20):
                    writer.write_batch(batch)
                    outs.append(reader.read_chunk().data.column("score").to_numpy())
                writer.done_writing()
            return np.stack(outs)
        finally:
            c.close()

    def via_oip(_: int) -> np.ndarray:
        c = triton.InferenceServerClient(server.grpc_url)
        try:
            outs = []
            ids = np.array([s.encode() for s in batch.column("entity_id").to_pylist()], dtype=np.object_)
            for _ in range(20):
                inputs = []
                for name, data, dtype in (
                    ("entity_id", ids.reshape(-1, 1), "BYTES"),
                    ("features", feeds["numeric"], "FP32"),
                    ("category", feeds["category"], "INT64"),
                ):
                    t = triton.InferInput(name, list(data.shape), dtype)
                    t.set_data_from_numpy(data)
                    inputs.append(t)
                outs.append(c.infer("tabular", inputs).as_numpy("score").reshape(-1))
            return np.stack(outs)
        finally:
            c.close()

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = [pool.submit(via_flight, i) for i in range(3)] + [pool.submit(via_oip, i) for i in range(3)]
        for f in results:
            got = f.result(timeout=120)
            assert got.shape == (20, 64)
            np.testing.assert_array_equal(got, np.broadcast_to(ref, got.shape))
