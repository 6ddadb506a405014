"""A small typed client for Iskander's Arrow Flight frontend (docs/client.md).

    from iskander.client import IskanderClient

    with IskanderClient("127.0.0.1:50051") as client:
        scores = client.infer("tabular", table)          # a pyarrow.Table: passthrough + outputs

Data goes in as Arrow (a Table, RecordBatch, RecordBatchReader or iterable of batches) or as a pandas
or polars DataFrame, converted through Arrow. Server errors become ``IskanderClientError``
subclasses carrying the server's code, message and details (model, column, row, ...).

This module imports only pyarrow: pandas and polars are touched only when the data is one of theirs.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
import pyarrow as pa
import pyarrow.flight as flight

from iskander.client.flight_status import error_details

__all__ = [
    "IskanderClient", "ModelInfo", "Exchange", "connect", "attach_outputs", "conform",
    "IskanderClientError", "InvalidArgument", "NotFound", "Unavailable", "ResourceExhausted",
    "Unauthenticated", "DeadlineExceeded", "Unimplemented", "InternalError", "Cancelled",
]


# --- errors ---------------------------------------------------------------------------------------


class IskanderClientError(Exception):
    """An Iskander call failed. ``code`` is the server's code (``INVALID_ARGUMENT``, ``NOT_FOUND``, ...),
    ``message`` its message without gRPC decoration, ``details`` the rest of its JSON ``extra_info``."""

    code = "UNKNOWN"

    def __init__(self, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = dict(details or {})

    @property
    def model(self) -> str | None:
        return self.details.get("model")

    @property
    def column(self) -> str | None:
        return self.details.get("column")

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


class InvalidArgument(IskanderClientError):
    code = "INVALID_ARGUMENT"


class NotFound(IskanderClientError):
    code = "NOT_FOUND"


class Unavailable(IskanderClientError):
    code = "UNAVAILABLE"


class ResourceExhausted(IskanderClientError):
    code = "RESOURCE_EXHAUSTED"


class Unauthenticated(IskanderClientError):
    code = "UNAUTHENTICATED"


class DeadlineExceeded(IskanderClientError):
    code = "DEADLINE_EXCEEDED"


class Unimplemented(IskanderClientError):
    code = "UNIMPLEMENTED"


class InternalError(IskanderClientError):
    code = "INTERNAL"


class Cancelled(IskanderClientError):
    code = "CANCELLED"


_BY_CODE: dict[str, type[IskanderClientError]] = {
    cls.code: cls
    for cls in (InvalidArgument, NotFound, Unavailable, ResourceExhausted, Unauthenticated, DeadlineExceeded,
                Unimplemented, InternalError, Cancelled)
}
# Errors that never reached Iskander's handlers (transport, auth middleware) carry no code: use the class.
_BY_FLIGHT_CLASS: list[tuple[type[flight.FlightError], type[IskanderClientError]]] = [
    (flight.FlightUnauthenticatedError, Unauthenticated),
    (flight.FlightUnauthorizedError, Unauthenticated),
    (flight.FlightUnavailableError, Unavailable),
    (flight.FlightTimedOutError, DeadlineExceeded),
    (flight.FlightCancelledError, Cancelled),
    (flight.FlightInternalError, InternalError),
]
# pyarrow appends this to every status it gets from finishing a call: the text of a server's answer
_FINISHED = ". gRPC client debug context:"
_PREFIX = re.compile(r"^\[(?P<code>[A-Z_]+)\] (?P<message>.*)$", re.S)
# Errors raised by their Arrow status (INVALID_ARGUMENT, NOT_FOUND, UNIMPLEMENTED on the wire)
# carry no extra_info: their JSON details ride in the status detail, after ". Detail: ".
_BY_ARROW_CLASS: list[tuple[type[Exception], type[IskanderClientError]]] = [
    (pa.ArrowKeyError, NotFound),
    (pa.ArrowNotImplementedError, Unimplemented),
    (pa.ArrowInvalid, InvalidArgument),
    (pa.ArrowTypeError, InvalidArgument),
]


def _clean(text: str) -> str:
    """pyarrow appends '. Detail: ...' and gRPC debug context to the server's message."""
    text = text.split(". Detail:")[0].split(". gRPC client debug context:")[0].strip()
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] == "'" else text  # KeyError quotes


def translate(exc: BaseException) -> IskanderClientError:
    """The client exception for a pyarrow Flight (or Arrow) error: the JSON details from
    ``extra_info`` or from the last line of an Arrow-status error's detail (flight_status)."""
    details = dict(error_details(exc))
    text = _clean(str(exc))
    code = details.pop("code", None)
    message = details.pop("message", None)
    match = _PREFIX.match(text)
    if match:
        code = code or match.group("code")
        message = message or match.group("message")
    cls = _BY_CODE.get(code or "")
    if cls is None:
        cls = next((c for f, c in _BY_FLIGHT_CLASS if isinstance(exc, f)), None)
    if cls is None:  # e.g. ArrowInvalid raised locally while writing a batch
        cls = next((c for a, c in _BY_ARROW_CLASS if isinstance(exc, a)), IskanderClientError)
    return cls(message or text, details)


# --- models ---------------------------------------------------------------------------------------


@attrs.frozen
class ModelInfo:
    """One model version as GetFlightInfo describes it (docs/flight.md)."""

    name: str
    version: str
    versions: list[str]
    input_schema: pa.Schema  # what a request carries: passthrough columns, then inputs
    output_schema: pa.Schema  # what an answer carries: passthrough columns, then outputs
    passthrough: list[str]
    metadata: dict[str, Any]  # the full app_metadata JSON

    @property
    def outputs(self) -> list[str]:
        """The model's output columns (the answer minus the echoed passthrough columns)."""
        return [n for n in self.output_schema.names if n not in self.passthrough]

    @classmethod
    def from_flight_info(cls, info: flight.FlightInfo) -> ModelInfo:
        meta = json.loads(info.app_metadata)
        output_schema = pa.ipc.read_schema(pa.py_buffer(base64.b64decode(meta["output_schema_ipc"])))
        return cls(
            name=meta["name"], version=str(meta["version"]), versions=[str(v) for v in meta.get("versions", [])],
            input_schema=info.schema, output_schema=output_schema, passthrough=list(meta.get("passthrough", [])),
            metadata=meta,
        )


# --- data in and out ------------------------------------------------------------------------------

Data = Any  # pa.Table | pa.RecordBatch | pa.RecordBatchReader | Iterable[pa.RecordBatch] | pandas/polars DataFrame


def _module(obj: object) -> str:
    return type(obj).__module__.split(".")[0]


def as_batches(data: Data) -> Iterator[pa.RecordBatch]:
    """Record batches from any supported input, without importing pandas or polars."""
    if isinstance(data, pa.RecordBatch):
        yield data
    elif isinstance(data, pa.Table):
        yield from data.to_batches()
    elif isinstance(data, pa.RecordBatchReader):
        yield from data
    elif _module(data) == "pandas":
        yield from pa.Table.from_pandas(data, preserve_index=False).to_batches()
    elif _module(data) == "polars":
        yield from data.to_arrow().to_batches()
    elif hasattr(data, "__arrow_c_stream__"):  # DuckDB relations and other Arrow PyCapsule producers
        yield from pa.RecordBatchReader.from_stream(data)
    elif isinstance(data, Iterable):
        for item in data:
            if not isinstance(item, pa.RecordBatch):
                raise TypeError(f"expected pyarrow.RecordBatch items, got {type(item).__name__}")
            yield item
    else:
        raise TypeError(f"cannot send {type(data).__name__}: give a pyarrow Table, RecordBatch, RecordBatchReader, "
                        "iterable of RecordBatch, or a pandas or polars DataFrame")


_STRINGS = (pa.types.is_large_string, pa.types.is_string_view)
_BINARIES = (pa.types.is_large_binary, pa.types.is_binary_view)


def _same_layout_family(have: pa.DataType, want: pa.DataType) -> bool:
    """Whether ``have`` is another Arrow layout of the value type ``want`` (lossless to cast).

    Dataframe libraries produce large_string, string_view, dictionaries (categoricals) and variable
    lists (pandas has no fixed-size list) where a contract says utf8 or fixed_size_list. Numeric
    conversions are not layouts: those stay the server's business (the manifest's cast_from)."""
    if pa.types.is_dictionary(have):
        return _same_layout_family(have.value_type, want) or have.value_type == want
    if pa.types.is_string(want):
        return any(p(have) for p in _STRINGS)
    if pa.types.is_binary(want):
        return any(p(have) for p in _BINARIES)
    if pa.types.is_fixed_size_list(want):
        if pa.types.is_list(have) or pa.types.is_large_list(have) or pa.types.is_list_view(have) \
                or pa.types.is_fixed_size_list(have):
            inner = have.value_type
            return inner == want.value_type or _same_layout_family(inner, want.value_type)
    return False


def conform(batch: pa.RecordBatch, schema: pa.Schema, model: str = "") -> pa.RecordBatch:
    """The request columns of ``batch`` in the model's order, with layout-only casts (see above).

    A missing column is an InvalidArgument raised here; a column of a different value type is
    sent as it is, so that the server's contract (and its message) decides."""
    arrays = []
    for field in schema:
        index = batch.schema.get_field_index(field.name)
        if index < 0:
            raise InvalidArgument(
                f"column '{field.name}' of model '{model}' is missing; the data has columns: "
                f"{', '.join(batch.schema.names) or '(none)'}",
                {"model": model, "column": field.name},
            )
        column = batch.column(index)
        if column.type != field.type and _same_layout_family(column.type, field.type):
            try:
                column = column.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:  # e.g. a list of the wrong length
                raise InvalidArgument(
                    f"column '{field.name}' of model '{model}' has type {column.type} and cannot become "
                    f"{field.type}: {exc}",
                    {"model": model, "column": field.name, "expected": str(field.type), "got": str(column.type)},
                ) from None
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, names=schema.names)


def attach_outputs(inputs: pa.RecordBatch, answer: pa.RecordBatch, outputs: list[str],
                   names: list[str] | None = None) -> pa.RecordBatch:
    """``inputs`` with the answer's ``outputs`` columns appended (renamed to ``names``).

    DoExchange answers each batch with one batch of the same rows in the same order, so joining is
    positional: columns the model never saw come back untouched, whatever their type."""
    if answer.num_rows != inputs.num_rows:
        raise InternalError(f"the answer has {answer.num_rows} rows for a batch of {inputs.num_rows}")
    clash = [n for n in names or outputs if n in inputs.schema.names]
    if clash:
        raise InvalidArgument(f"output column(s) {', '.join(clash)} would duplicate input columns; rename or drop them")
    arrays = list(inputs.columns) + [answer.column(name) for name in outputs]
    fields = list(inputs.schema) + [answer.schema.field(name).with_name(new)
                                    for name, new in zip(outputs, names or outputs)]
    return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(fields))


# --- the client -----------------------------------------------------------------------------------


def _location(target: str, tls: bool) -> str:
    if "://" in target:
        return target
    return f"{'grpc+tls' if tls else 'grpc'}://{target}"


def _read(source: bytes | str | Path | None) -> bytes | None:
    if source is None or isinstance(source, bytes):
        return source
    return Path(source).read_bytes()


class Exchange:
    """One open DoExchange stream: ``send(batch)`` returns that batch's answer. Not thread-safe; use
    one per thread. The stream (and its pinned model version) lives until ``close()`` or until a
    ``send()`` fails: the server ends the call on a refused batch, so later sends raise that error."""

    def __init__(self, client: IskanderClient, info: ModelInfo, version: str | None) -> None:
        path = (info.name,) if version is None else (info.name, version)
        self.info = info
        try:
            self._writer, self._reader = client._flight.do_exchange(
                flight.FlightDescriptor.for_path(*path), options=client._options(stream=True))
        except (flight.FlightError, pa.ArrowException) as exc:
            raise translate(exc) from None
        self._schema: pa.Schema | None = None
        self._error: IskanderClientError | None = None  # the error that ended the stream, if one did

    def send(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self._error is not None:
            # The call is over (the server refused a batch): touching it again would start gRPC
            # operations on a finished call. Report the error that ended it instead.
            raise type(self._error)(self._error.message, self._error.details)
        request = conform(batch, self.info.input_schema, self.info.name)
        try:
            if self._schema is None:
                self._schema = request.schema
                self._writer.begin(request.schema)
            self._writer.write_batch(request)
            chunk = self._reader.read_chunk()
        except StopIteration:
            self._error = InternalError("the server closed the stream without answering")
            raise self._error from None
        except (flight.FlightError, pa.ArrowException) as exc:
            # Once a write or read failed the call may be finished (pyarrow finishes it on a server
            # error): this Exchange is spent; open a new one.
            self._error = translate(exc)
            raise self._error from None
        return chunk.data

    def close(self) -> None:
        try:
            if self._error is None:  # a failed call already ended its write side: never end it twice
                if self._schema is None:  # nothing was sent: a stream still needs a schema
                    self._writer.begin(self.info.input_schema)
                self._writer.done_writing()
            else:
                self._reader.cancel()
            self._writer.close()
        except (flight.FlightError, pa.ArrowException, OSError):
            pass  # an error already reported by send(), or a stream the server ended

    def __enter__(self) -> Exchange:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class IskanderClient:
    """A connection to one Iskander server's Flight frontend.

    ``target`` is ``host:port`` or a Flight URI (``grpc://``, ``grpc+tls://``). ``token`` sends
    ``authorization: Bearer <token>`` on every call. ``tls_root_certs`` (PEM bytes or a path) makes
    the connection TLS and trusts that CA; ``cert_chain`` + ``private_key`` add a client certificate
    (mutual TLS). ``timeout`` (seconds) bounds metadata calls and ``infer``; streams are unbounded.
    """

    def __init__(self, target: str, *, token: str | None = None, tls_root_certs: bytes | str | Path | None = None,
                 cert_chain: bytes | str | Path | None = None, private_key: bytes | str | Path | None = None,
                 timeout: float | None = None) -> None:
        tls = tls_root_certs is not None or cert_chain is not None
        kwargs: dict[str, Any] = {}
        if tls_root_certs is not None:
            kwargs["tls_root_certs"] = _read(tls_root_certs)
        if cert_chain is not None:
            kwargs["cert_chain"] = _read(cert_chain)
            kwargs["private_key"] = _read(private_key)
        self.location = _location(target, tls)
        self._headers = [(b"authorization", f"Bearer {token}".encode())] if token else []
        self.timeout = timeout
        try:
            self._flight = flight.connect(self.location, **kwargs)
        except (flight.FlightError, pa.ArrowException) as exc:
            raise translate(exc) from None

    def _options(self, stream: bool = False) -> flight.FlightCallOptions:
        timeout = None if stream else self.timeout
        return flight.FlightCallOptions(headers=self._headers, timeout=timeout)

    # --- discovery ---

    def models(self) -> list[ModelInfo]:
        """Every model with a READY version (its newest), as ListFlights reports them."""
        try:
            return [ModelInfo.from_flight_info(i) for i in self._flight.list_flights(options=self._options())]
        except (flight.FlightError, pa.ArrowException) as exc:
            raise translate(exc) from None

    def model(self, name: str, version: str | None = None) -> ModelInfo:
        path = (name,) if version is None else (name, version)
        try:
            info = self._flight.get_flight_info(flight.FlightDescriptor.for_path(*path), options=self._options())
        except (flight.FlightError, pa.ArrowException) as exc:
            raise translate(exc) from None
        return ModelInfo.from_flight_info(info)

    def input_schema(self, name: str, version: str | None = None) -> pa.Schema:
        return self.model(name, version).input_schema

    def output_schema(self, name: str, version: str | None = None) -> pa.Schema:
        return self.model(name, version).output_schema

    # --- inference ---

    def exchange(self, model: str, version: str | None = None) -> Exchange:
        """Open one DoExchange stream for ``model`` (send batches one at a time)."""
        return Exchange(self, self.model(model, version), version)

    def infer(self, model: str, data: Data, version: str | None = None, *, with_inputs: bool = False) -> pa.Table:
        """Score ``data`` on one stream and return one table, row-aligned with ``data``: the answers
        (passthrough columns, then outputs), or with ``with_inputs`` every column of ``data``
        followed by the model's outputs. Columns the model does not take are never sent."""
        info = self.model(model, version)
        if not with_inputs:
            answers = list(self.stream(model, data, version, info=info))
            return pa.Table.from_batches(answers, schema=answers[0].schema if answers else info.output_schema)
        inputs = [b for b in as_batches(data) if b.num_rows]
        answers = list(self.stream(model, inputs, version, info=info))
        joined = [attach_outputs(b, a, info.outputs) for b, a in zip(inputs, answers)]
        if not joined:
            return pa.schema([info.output_schema.field(n) for n in info.outputs]).empty_table()
        return pa.Table.from_batches(joined)

    def stream(self, model: str, data: Data, version: str | None = None, window: int = 4,
               info: ModelInfo | None = None) -> Iterator[pa.RecordBatch]:
        """Send every batch of ``data`` on one DoExchange stream and yield each answer as it arrives.

        A background thread writes while this generator reads, keeping at most ``window`` batches
        unanswered, so the server works on the next batch while you handle the last one. ``data``
        may be a lazy iterator (it is consumed as the stream goes). Closing the generator early
        cancels the stream. A batch the server refuses raises the typed error (``ResourceExhausted``,
        ``InvalidArgument``, ...) and ends the stream."""
        info = info or self.model(model, version)
        path = (info.name,) if version is None else (info.name, version)
        window = max(1, window)
        try:
            writer, reader = self._flight.do_exchange(flight.FlightDescriptor.for_path(*path),
                                                      options=self._options(stream=True))
        except (flight.FlightError, pa.ArrowException) as exc:
            raise translate(exc) from None
        # Thread discipline (issue 12): the feeder thread only ever calls begin()/write_batch(). The
        # end of the write side (done_writing) and close() happen on this thread, once the feeder
        # has stopped and no read is pending. pyarrow's WritesDone flag is not locked: a feeder's
        # done_writing() racing the reader's own finish (which also sends WritesDone when the
        # server ends the call) makes gRPC abort the process with GRPC_CALL_ERROR_TOO_MANY_OPERATIONS.
        state = threading.Condition()
        sent = 0  # batches fully written
        answered = 0  # answers read
        fed = False  # the feeder has stopped (data exhausted, refused write, or failure)
        stop = False  # this side wants the feeder to stop
        failure: list[BaseException] = []  # bad data or a failing iterator (not a stream error)
        write_error: list[BaseException] = []  # the call failed under a write (the server ended it)

        def feed() -> None:
            nonlocal sent, fed
            try:
                begun = False
                for batch in as_batches(data):
                    request = conform(batch, info.input_schema, info.name)
                    if not begun:
                        writer.begin(request.schema)
                        begun = True
                    with state:
                        while not stop and sent - answered >= window:
                            state.wait()
                        if stop:
                            return
                    writer.write_batch(request)
                    with state:
                        sent += 1
                        state.notify_all()
                if not begun:
                    writer.begin(info.input_schema)  # an empty stream still carries its schema
            except (flight.FlightError, pa.ArrowException, OSError) as exc:
                write_error.append(exc)  # the stream failed: the reader side reports the server's status
            except BaseException as exc:  # bad data or a failing iterator: end the stream, report it
                failure.append(exc)
            finally:
                with state:
                    fed = True
                    state.notify_all()

        def halt() -> None:
            """Stop the feeder and wait for it: after this, only this thread touches the stream."""
            nonlocal stop
            with state:
                stop = True
                state.notify_all()
            if feeder.is_alive():
                reader.cancel()  # TryCancel is thread-safe; it unblocks a write stuck on flow control
            feeder.join()

        feeder = threading.Thread(target=feed, name="iskander-client-feed", daemon=True)
        feeder.start()
        completed = False
        try:
            while True:
                with state:
                    while answered >= sent and not fed:
                        state.wait()
                    if answered >= sent and fed:
                        break
                # an answer is due (a written batch is unanswered): read it
                try:
                    chunk = reader.read_chunk()
                except StopIteration:
                    halt()
                    raise InternalError(f"the server ended the stream with {sent - answered} "
                                        "batch(es) unanswered") from None
                except (flight.FlightError, pa.ArrowException) as exc:
                    halt()
                    if failure:
                        break  # our own cancel after bad data: report the data's error below
                    raise translate(exc) from None
                if chunk.data is None:
                    continue  # metadata only
                with state:
                    answered += 1
                    state.notify_all()
                yield chunk.data
            halt()
            if failure:
                exc = failure[0]
                raise (translate(exc) if isinstance(exc, pa.ArrowException) else exc) from None
            if write_error:
                exc = write_error[0]
                if _FINISHED in str(exc) or not isinstance(exc, flight.FlightError):
                    # pyarrow finished the call and this is the server's status, or a local error
                    # (e.g. a batch whose schema differs from the first) on a live call, which the
                    # finally block cancels: a read could wait forever for a server awaiting data
                    raise translate(exc) from None
                # The call died under a write but its status was not collected ("Cannot close
                # stream with pending read operation"): a read returns it, and cannot block, since
                # the call is over. The feeder has stopped: this thread is alone on the stream.
                try:
                    reader.read_chunk()
                except StopIteration:
                    pass
                except (flight.FlightError, pa.ArrowException) as read_exc:
                    raise translate(read_exc) from None
                raise translate(exc) from None
            try:
                writer.done_writing()
                while True:  # answers sent after the last batch, if any, then the final status
                    chunk = reader.read_chunk()
                    if chunk.data is not None:
                        yield chunk.data
            except StopIteration:
                pass
            except (flight.FlightError, pa.ArrowException) as exc:
                raise translate(exc) from None
            completed = True
        finally:
            halt()
            if not completed:
                reader.cancel()  # an error, bad data, or a consumer that stopped early: not a clean end
            try:
                writer.close()
            except (flight.FlightError, pa.ArrowException, OSError):
                pass  # the error already raised, or a stream the server ended

    # --- actions ---

    def action(self, kind: str, body: bytes | str | dict[str, Any] = b"") -> Any:
        """Run a Flight action (docs/flight.md#actions) and return its JSON result."""
        if isinstance(body, dict):
            body = json.dumps(body)
        if isinstance(body, str):
            body = body.encode()
        try:
            results = list(self._flight.do_action(flight.Action(kind, body), options=self._options()))
        except (flight.FlightError, pa.ArrowException) as exc:
            raise translate(exc) from None
        return json.loads(results[0].body.to_pybytes()) if results else None

    def statistics(self, model: str | None = None, version: str | None = None) -> list[dict[str, Any]]:
        """Triton-style statistics of every model, one model, or one version."""
        if model is None:
            return self.action("statistics")
        return self.action("statistics", {"name": model, "version": version} if version else model)

    def health(self) -> dict[str, Any]:
        return self.action("health")

    # --- lifetime ---

    def close(self) -> None:
        self._flight.close()

    def __enter__(self) -> IskanderClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def connect(target: str, **kwargs: Any) -> IskanderClient:
    """``IskanderClient(target, **kwargs)``: see there for TLS, token and timeout."""
    return IskanderClient(target, **kwargs)
