"""Hand-built Arrow Flight wire messages for the hostile-edge tests: a raw gRPC client that sends
FlightData whose IPC headers we edit, so the server sees exactly what a hostile producer could send
(pyarrow's own client would refuse to write most of these)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import grpc
import pyarrow as pa

SERVICE = "/arrow.flight.protocol.FlightService/"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def descriptor(*path: str | bytes) -> bytes:
    """FlightDescriptor{type = PATH (1), path = [...]}."""
    return b"\x08\x01" + b"".join(field(3, p.encode() if isinstance(p, str) else p) for p in path)


def flight_data(header: bytes = b"", body: bytes = b"", desc: bytes | None = None) -> bytes:
    """FlightData{flight_descriptor = 1, data_header = 2, data_body = 1000}."""
    out = b""
    if desc is not None:
        out += field(1, desc)
    if header:
        out += field(2, header)
    if body:
        out += field(1000, body)
    return out


def ipc_parts(message: pa.Buffer) -> tuple[bytes, bytes]:
    """(flatbuffer header, body) of one encapsulated IPC message (continuation, length, header, body)."""
    raw = message.to_pybytes()
    assert raw[:4] == b"\xff\xff\xff\xff"
    length = int.from_bytes(raw[4:8], "little")
    return raw[8:8 + length], raw[8 + length:]


def schema_message(schema: pa.Schema) -> bytes:
    return ipc_parts(schema.serialize())[0]


def batch_message(batch: pa.RecordBatch) -> tuple[bytes, bytes]:
    return ipc_parts(batch.serialize())


def claim_rows(header: bytes, real: int, claimed: int) -> bytes:
    """The header with every 8-byte little-endian occurrence of ``real`` (the batch length and the
    field nodes' lengths) replaced by ``claimed``: the buffers still hold ``real`` rows. Pick a
    ``real`` that cannot be mistaken for a buffer size (an odd number such as 1237)."""
    old, new = real.to_bytes(8, "little"), claimed.to_bytes(8, "little", signed=claimed < 0)
    assert header.count(old) >= 2, "row count not found in the IPC header"
    return header.replace(old, new)


def do_exchange(channel: grpc.Channel, messages: Iterable[bytes], timeout: float = 10.0,
                metadata: tuple = ()) -> list[bytes]:
    """Send raw FlightData messages on one DoExchange call; the raw answers, or grpc.RpcError."""
    call = channel.stream_stream(SERVICE + "DoExchange", request_serializer=None, response_deserializer=None)
    return list(call(iter(list(messages)), timeout=timeout, metadata=metadata))


def unary_stream(channel: grpc.Channel, method: str, request: bytes, timeout: float = 10.0) -> list[bytes]:
    call = channel.unary_stream(SERVICE + method, request_serializer=None, response_deserializer=None)
    return list(call(request, timeout=timeout))


def unary(channel: grpc.Channel, method: str, request: bytes, timeout: float = 10.0) -> bytes:
    call = channel.unary_unary(SERVICE + method, request_serializer=None, response_deserializer=None)
    return call(request, timeout=timeout)


def action(kind: str, body: bytes = b"") -> bytes:
    """Action{type = 1, body = 2}."""
    return field(1, kind.encode()) + (field(2, body) if body else b"")


def idle_exchange(channel: grpc.Channel, first: bytes, timeout: float = 30.0) -> tuple[grpc.Future, "Gate"]:
    """Open a DoExchange that sends ``first`` and then stays silent until the gate opens."""
    gate = Gate()
    call = channel.stream_stream(SERVICE + "DoExchange", request_serializer=None, response_deserializer=None)
    responses = call(gate.messages(first), timeout=timeout)
    return responses, gate


class Gate:
    def __init__(self) -> None:
        import threading

        self._open = threading.Event()

    def messages(self, first: bytes) -> Iterator[bytes]:
        yield first
        self._open.wait(60)

    def open(self) -> None:
        self._open.set()
