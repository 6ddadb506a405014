"""A small typed client for Iskander's Arrow Flight frontend (docs/client.md).

    from iskander.client import IskanderClient

    with IskanderClient("127.0.0.1:50051") as client:
        scores = client.infer("tabular", table)          # a pyarrow.Table: passthrough + outputs

Data goes in as Arrow (a Table, RecordBatch, RecordBatchReader or iterable of batches) or as a pandas
or polars DataFrame, converted through Arrow. Server errors become ``IskanderClientError``
subclasses carrying the server's code, message and details (model, column, row, ...).

The exceptions live in ``errors``, the conversions in ``convert``; ``iskander.client`` exports both.
This module imports only pyarrow: pandas and polars are touched only when the data is one of theirs.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
import pyarrow as pa
import pyarrow.flight as flight

from iskander.client.convert import Data, as_batches, attach_outputs, conform
from iskander.client.errors import FINISHED, InternalError, IskanderClientError, translate

__all__ = ["IskanderClient", "ModelInfo", "Exchange", "connect"]


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
                if FINISHED in str(exc) or not isinstance(exc, flight.FlightError):
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
