"""The OIP limit: a bare grpcio ModelInfer server on Iskander's generated stubs (no contract, no checks).

raw_input_contents -> np.frombuffer -> session.run -> raw_output_contents. Same thread pool size
(16) and message limits as Iskander's OIP frontend. Imports iskander._proto, so it must never run
inside a process that imports tritonclient: the harness starts it as its own process:

    python bench/minimal_oip.py --port 0 two_tower tabular

prints `minimal-oip ready port=P` once listening on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import signal
import threading
from concurrent import futures

import grpc
import numpy as np

from iskander._proto import grpc_service_pb2 as pb
from iskander._proto import grpc_service_pb2_grpc as pb_grpc
from workloads import MODELS, ort_session

DTYPES = {"FP32": np.float32, "INT64": np.int64}
MAX_MESSAGE = 256 * 1024 * 1024  # Iskander's default max_message_bytes


class MinimalOip(pb_grpc.GRPCInferenceServiceServicer):
    def __init__(self, models: list[str]) -> None:
        self.models = {name: (MODELS[name], ort_session(MODELS[name].onnx_file)) for name in models}

    def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return pb.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return pb.ModelReadyResponse(ready=request.name in self.models)

    def ModelInfer(self, request, context):
        entry = self.models.get(request.model_name)
        if entry is None:
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown model {request.model_name}")
        model, session = entry
        feeds = {}
        for tensor, raw in zip(request.inputs, request.raw_input_contents):
            arr = np.frombuffer(raw, dtype=DTYPES[tensor.datatype])
            feeds[tensor.name] = arr if len(session_input_shape(session, tensor.name)) == 1 else arr.reshape(tuple(tensor.shape))
        names = [o.name for o in request.outputs] or [t.name for t in model.outputs]
        outs = session.run(names, feeds)
        response = pb.ModelInferResponse(model_name=request.model_name, id=request.id)
        for name, out in zip(names, outs):
            response.outputs.add(name=name, datatype="FP32", shape=list(out.shape))
            response.raw_output_contents.append(out.tobytes())
        return response


_shapes: dict[tuple[int, str], list] = {}


def session_input_shape(session, name: str) -> list:
    key = (id(session), name)
    if key not in _shapes:
        _shapes[key] = next(i.shape for i in session.get_inputs() if i.name == name)
    return _shapes[key]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--workers", type=int, default=16)  # Iskander's grpc_workers default
    parser.add_argument("models", nargs="+", choices=sorted(MODELS))
    args = parser.parse_args()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.workers),
        options=[("grpc.max_receive_message_length", MAX_MESSAGE), ("grpc.max_send_message_length", MAX_MESSAGE)],
    )
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(MinimalOip(args.models), server)
    port = server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"minimal-oip ready port={port}", flush=True)
    stop.wait()
    server.stop(grace=1).wait(5)


if __name__ == "__main__":
    main()
