"""Request senders used inside load-generator worker processes: connect(), send_one(), close().

One instance serves one in-flight slot (one thread), so a kept-open Flight stream is never shared.
Each client builds its request once in connect() (the benchmark measures serving, not the client's
encoding of fresh data) and checks the answer's row count, so a short or empty answer is an error.
Heavy imports happen in connect(): tritonclient and iskander._proto define the same protobuf
symbols and must never meet in one process, and the ORT floor needs neither.
"""

from __future__ import annotations

from workloads import Workload, ort_session

TIMEOUT_S = 10.0  # per request; a hung server shows up as an error, not as a stuck benchmark


class BadResponse(Exception):
    """The server answered, but not with batch rows of every output."""


class FlightNewStream:
    """Iskander/minimal Flight: a new DoExchange stream for every request (one RPC per request)."""

    def __init__(self, endpoint: dict, workload: Workload) -> None:
        self.uri, self.workload = endpoint["flight_uri"], workload

    def connect(self) -> None:
        import pyarrow.flight as flight

        self.client = flight.connect(self.uri)
        self.descriptor = flight.FlightDescriptor.for_path(self.workload.model_name)
        self.batch = self.workload.arrow_batch()
        self.options = flight.FlightCallOptions(timeout=TIMEOUT_S)

    def send_one(self) -> None:
        writer, reader = self.client.do_exchange(self.descriptor, self.options)
        try:
            writer.begin(self.batch.schema)
            writer.write_batch(self.batch)
            writer.done_writing()
            out = reader.read_chunk().data
        finally:
            writer.close()
        if out is None or out.num_rows != self.workload.batch:
            raise BadResponse(f"rows {None if out is None else out.num_rows} != {self.workload.batch}")

    def close(self) -> None:
        self.client.close()


class FlightKeptOpen:
    """Iskander/minimal Flight: one DoExchange stream kept open, one batch in, one batch out per request.

    No per-call deadline is possible on a long-lived stream; the load generator bounds the run instead.
    """

    def __init__(self, endpoint: dict, workload: Workload) -> None:
        self.uri, self.workload = endpoint["flight_uri"], workload

    def connect(self) -> None:
        import pyarrow.flight as flight

        self.client = flight.connect(self.uri)
        self.batch = self.workload.arrow_batch()
        self.descriptor = flight.FlightDescriptor.for_path(self.workload.model_name)
        self._open()

    def _open(self) -> None:
        self.writer, self.reader = self.client.do_exchange(self.descriptor)
        self.writer.begin(self.batch.schema)

    def send_one(self) -> None:
        try:
            self.writer.write_batch(self.batch)
            out = self.reader.read_chunk().data
        except Exception:
            # A failed exchange ends the stream: open a new one so one error is one error, not all the rest.
            try:
                self.writer.close()
            except Exception:  # noqa: BLE001
                pass
            self._open()
            raise
        if out is None or out.num_rows != self.workload.batch:
            raise BadResponse(f"rows {None if out is None else out.num_rows} != {self.workload.batch}")

    def close(self) -> None:
        try:
            self.writer.done_writing()
            self.writer.close()
        finally:
            self.client.close()


class OipTritonClient:
    """OIP v2 ModelInfer through tritonclient.grpc with raw binary tensors (Iskander, MLServer, minimal grpcio)."""

    def __init__(self, endpoint: dict, workload: Workload) -> None:
        self.url, self.workload = endpoint["grpc_url"], workload

    def connect(self) -> None:
        import tritonclient.grpc as triton

        self.client = triton.InferenceServerClient(self.url)
        self.inputs = []
        for t, arr in zip(self.workload.model.inputs, self.workload.wire_arrays().values()):
            tensor = triton.InferInput(t.name, list(arr.shape), t.oip_datatype)
            tensor.set_data_from_numpy(arr)  # raw_input_contents
            self.inputs.append(tensor)
        self.outputs = [triton.InferRequestedOutput(t.name) for t in self.workload.model.outputs]

    def send_one(self) -> None:
        result = self.client.infer(self.workload.model_name, self.inputs, outputs=self.outputs, client_timeout=TIMEOUT_S)
        response = result.get_response()
        # Shapes, not as_numpy: MLServer may answer in typed contents, which as_numpy does not decode.
        if len(response.outputs) != len(self.outputs) or any(o.shape[0] != self.workload.batch for o in response.outputs):
            raise BadResponse(f"outputs {[(o.name, list(o.shape)) for o in response.outputs]}")

    def close(self) -> None:
        self.client.close()


class OrtInProcess:
    """The floor: session.run in the worker itself, same settings, no transport at all."""

    def __init__(self, endpoint: dict, workload: Workload) -> None:
        self.workload = workload

    def connect(self) -> None:
        self.session = ort_session(self.workload.model.onnx_file)
        self.feeds = self.workload.ort_feeds()
        self.output_names = [t.name for t in self.workload.model.outputs]

    def send_one(self) -> None:
        out = self.session.run(self.output_names, self.feeds)
        if out[0].shape[0] != self.workload.batch:
            raise BadResponse(f"rows {out[0].shape[0]}")

    def close(self) -> None:
        self.session = None


CLIENTS = {
    "flight_new": FlightNewStream,
    "flight_kept": FlightKeptOpen,
    "oip": OipTritonClient,
    "ort": OrtInProcess,
}


def make_client(kind: str, endpoint: dict, workload: Workload):
    return CLIENTS[kind](endpoint, workload)


def error_kind(exc: BaseException) -> str:
    """A short, stable label: the gRPC status where there is one, else the exception class."""
    status = getattr(exc, "status", None)
    if callable(status):  # tritonclient InferenceServerException
        try:
            return f"{type(exc).__name__}:{status()}"
        except Exception:  # noqa: BLE001 - a label must never raise
            pass
    return type(exc).__name__
