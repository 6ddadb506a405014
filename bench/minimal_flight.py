"""The Flight limit: the least a pyarrow.flight server can do per request (no contract, no checks).

DoExchange: read batch -> numpy views -> session.run -> write batch. Iskander over Flight cannot
be faster than this on the same machine; the gap is the price of its core (contract validation,
statistics, error mapping). Run as its own process:

    python bench/minimal_flight.py --port 0 two_tower tabular

prints `minimal-flight ready port=P` once listening on 127.0.0.1.
"""

from __future__ import annotations

import argparse

import pyarrow as pa
import pyarrow.flight as flight

from workloads import MODELS, ort_session


class MinimalFlight(flight.FlightServerBase):
    def __init__(self, location: str, models: list[str]) -> None:
        super().__init__(location)
        self.models = {name: (MODELS[name], ort_session(MODELS[name].onnx_file)) for name in models}

    def do_exchange(self, context, descriptor, reader, writer):
        model, session = self.models[descriptor.path[0].decode()]
        output_names = [t.name for t in model.outputs]
        started = False
        for chunk in reader:
            batch = chunk.data
            if batch is None:
                continue
            feeds = {}
            for t in model.inputs:
                col = batch.column(t.name)
                values = col if t.scalar else col.flatten()
                arr = values.to_numpy(zero_copy_only=True)
                feeds[t.name] = arr if t.scalar else arr.reshape(-1, t.width)
            outs = session.run(output_names, feeds)
            out = pa.record_batch({n: pa.array(o.reshape(-1)) for n, o in zip(output_names, outs)})
            if not started:
                writer.begin(out.schema)
                started = True
            writer.write_batch(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("models", nargs="+", choices=sorted(MODELS))
    args = parser.parse_args()
    server = MinimalFlight(f"grpc://127.0.0.1:{args.port}", args.models)
    print(f"minimal-flight ready port={server.port}", flush=True)
    server.serve()  # SIGTERM's default action ends the process


if __name__ == "__main__":
    main()
