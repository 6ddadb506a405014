"""Several Iskander servers serving the same models, used as one (docs/scale-out.md#replicas).

    from iskander.client import Replicas

    with Replicas(["10.0.0.1:50051", "10.0.0.2:50051"], token="...") as replicas:
        answer = replicas.infer_batch("tabular", batch)    # one batch, on a pooled stream
        table = replicas.infer("tabular", table)           # a whole table, on one stream

Requests go to the replica with the fewest requests outstanding from this object (ties in
round-robin order). A request that fails because its replica is unreachable or going away
(``Unavailable``: connection refused, the server stopping, the process killed, the model not
ready there) is sent again, whole, to another replica; each request tries every replica at most
once, so it is retried at most ``len(locations) - 1`` times. A replica that failed is tried last
for ``cooldown`` seconds. Every other error (``InvalidArgument``, ``NotFound``,
``ResourceExhausted``, ``DeadlineExceeded``, ...) is the request's own and is raised at once:
another replica would refuse it the same way, or it might have run.

Inference is a pure function of its input, so sending a batch again cannot change an answer;
answers are only ever returned from one complete exchange.

A ``Replicas`` pickles as its locations and client options: it can be captured by a Ray task or
a Spark function, and each process opens its own connections.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

import pyarrow as pa

# the package's public names (iskander/client/__init__.py imports this module after defining them)
from iskander.client import (
    Exchange, InvalidArgument, IskanderClient, IskanderClientError, ModelInfo, ResourceExhausted, Unavailable,
)

__all__ = ["Replicas", "RETRYABLE"]

# Errors that say "this replica, not this request": the request goes to another replica.
RETRYABLE: tuple[type[IskanderClientError], ...] = (Unavailable,)
_IDLE_STREAMS = 8  # open streams kept per replica, model, version and schema for later calls


class _Replica:
    def __init__(self, location: str, client_kwargs: dict[str, Any]) -> None:
        self.location = location
        self._kwargs = client_kwargs
        self._client: IskanderClient | None = None
        self._client_lock = threading.Lock()
        self.outstanding = 0
        self.failed_at = float("-inf")  # monotonic time of the last retryable failure
        # idle open streams by (model, version, schema): a stream carries one schema
        self.exchanges: dict[tuple[str, str | None, pa.Schema], list[Exchange]] = {}

    @property
    def client(self) -> IskanderClient:
        with self._client_lock:  # one connection per replica, however many threads ask at once
            if self._client is None:
                self._client = IskanderClient(self.location, **self._kwargs)
            return self._client

    def drop_exchanges(self) -> list[Exchange]:
        spent = [e for pool in self.exchanges.values() for e in pool]
        self.exchanges = {}
        return spent

    def close_client(self) -> None:
        with self._client_lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


class Replicas:
    """Several Flight locations serving the same models, used as one client.

    ``locations``: ``host:port`` or Flight URIs (one string is one replica). ``client_kwargs`` go
    to every ``IskanderClient`` (``token``, ``tls_root_certs``, ``timeout``, ...). ``cooldown``:
    seconds a failed replica is tried only after the others. Thread-safe: each call takes its own
    stream, so several threads may score at once.
    """

    def __init__(self, locations: str | Iterable[str], *, cooldown: float = 5.0, **client_kwargs: Any) -> None:
        found = [locations] if isinstance(locations, str) else list(locations)
        if not found or not all(isinstance(loc, str) and loc for loc in found):
            raise ValueError(f"Replicas needs one or more locations (host:port or grpc:// URIs), got {locations!r}")
        self.locations: tuple[str, ...] = tuple(dict.fromkeys(found))
        self.cooldown = cooldown
        self.client_kwargs = dict(client_kwargs)
        self._replicas = [_Replica(loc, self.client_kwargs) for loc in self.locations]
        self._lock = threading.Lock()
        self._next = 0  # round-robin start among equally loaded replicas

    def __reduce__(self) -> tuple[Any, ...]:
        # a factory: locations and options travel, connections and streams never do
        return (_rebuild, (self.locations, self.cooldown, self.client_kwargs))

    # --- choosing -------------------------------------------------------------------------------

    def _order(self) -> list[_Replica]:
        """Every replica, best first: healthy before recently failed, then fewest outstanding,
        then round-robin."""
        with self._lock:
            start = self._next
            self._next = (self._next + 1) % len(self._replicas)
            now = time.monotonic()
            ring = self._replicas[start:] + self._replicas[:start]
            return sorted(ring, key=lambda r: (now - r.failed_at < self.cooldown, r.outstanding))

    def _call(self, what: str, model: str | None, fn: Any) -> Any:
        """Run ``fn(replica)`` on the best replica; on a retryable error, on the next one."""
        tried: list[tuple[str, IskanderClientError]] = []
        for replica in self._order():
            with self._lock:
                replica.outstanding += 1
            try:
                return fn(replica)
            except RETRYABLE as exc:
                tried.append((replica.location, exc))
                with self._lock:
                    replica.failed_at = time.monotonic()
                    spent = replica.drop_exchanges()  # streams to a failing server are not reused
                for exchange in spent:
                    exchange.close()
            finally:
                with self._lock:
                    replica.outstanding -= 1
        listing = "; ".join(f"{loc}: {exc}" for loc, exc in tried)
        subject = f" for model '{model}'" if model else ""
        details: dict[str, Any] = {"model": model} if model else {}
        details.update(locations=[loc for loc, _ in tried], errors=[str(exc) for _, exc in tried])
        raise Unavailable(f"{what}{subject} failed on every replica ({len(tried)} tried): {listing}", details)

    # --- discovery ------------------------------------------------------------------------------

    def model(self, name: str, version: str | None = None) -> ModelInfo:
        return self._call("GetFlightInfo", name, lambda r: r.client.model(name, version))

    def models(self) -> list[ModelInfo]:
        return self._call("ListFlights", None, lambda r: r.client.models())

    def input_schema(self, name: str, version: str | None = None) -> pa.Schema:
        return self.model(name, version).input_schema

    def output_schema(self, name: str, version: str | None = None) -> pa.Schema:
        return self.model(name, version).output_schema

    # --- inference ------------------------------------------------------------------------------

    def infer(self, model: str, data: Any, version: str | None = None, *, with_inputs: bool = False) -> pa.Table:
        """``IskanderClient.infer`` on one replica, sent again whole to another if that one fails.
        An iterator or reader is read into memory first, so that it can be sent again."""
        data = _replayable(data)
        return self._call("infer", model,
                          lambda r: r.client.infer(model, data, version, with_inputs=with_inputs))

    def infer_batch(self, model: str, batch: pa.RecordBatch, version: str | None = None) -> pa.RecordBatch:
        """One batch's answer (passthrough columns, then outputs), on a stream kept open between
        calls (one GetFlightInfo and one DoExchange per stream, not per batch)."""
        return self._call("infer", model, lambda r: self._send(r, model, version, batch))

    def _send(self, replica: _Replica, model: str, version: str | None, batch: pa.RecordBatch) -> pa.RecordBatch:
        key = (model, version, batch.schema)
        fresh_tries = 0
        while True:
            with self._lock:
                pool = replica.exchanges.get(key)
                exchange = pool.pop() if pool else None
            pooled = exchange is not None
            if exchange is None:
                fresh_tries += 1
                exchange = replica.client.exchange(model, version)
            try:
                answer = exchange.send(batch)
            except ResourceExhausted as exc:
                exchange.close()
                if exc.details.get("limit") == "max_stream_rows" and fresh_tries < 2:
                    continue  # the stream is full, not the server: the same batch on a new stream
                raise
            except Unavailable:
                exchange.close()
                if pooled:
                    # a stream kept open since an earlier call may have been ended meanwhile (the
                    # server restarted, an idle timeout): its siblings likely too; one new stream
                    # decides whether the replica itself is down
                    with self._lock:
                        spent = replica.drop_exchanges()
                    for other in spent:
                        other.close()
                    continue
                raise
            except BaseException:
                exchange.close()  # a failed send spends the stream
                raise
            with self._lock:
                pool = replica.exchanges.setdefault(key, [])
                keep = len(pool) < _IDLE_STREAMS
                if keep:
                    pool.append(exchange)
            if not keep:
                exchange.close()
            return answer

    # --- lifetime -------------------------------------------------------------------------------

    def close(self) -> None:
        """Close every stream and connection (the object can be used again: it reconnects)."""
        with self._lock:
            spent = [e for replica in self._replicas for e in replica.drop_exchanges()]
        for exchange in spent:
            exchange.close()
        for replica in self._replicas:
            replica.close_client()

    def __enter__(self) -> Replicas:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Replicas({list(self.locations)!r})"


def _rebuild(locations: Sequence[str], cooldown: float, client_kwargs: dict[str, Any]) -> Replicas:
    return Replicas(locations, cooldown=cooldown, **client_kwargs)


def _replayable(data: Any) -> Any:
    """``data`` in a form that can be sent more than once."""
    if isinstance(data, (pa.Table, pa.RecordBatch)):
        return data
    if type(data).__module__.split(".")[0] in ("pandas", "polars"):
        return data  # converted to Arrow by the client on each attempt
    if isinstance(data, pa.RecordBatchReader):
        return data.read_all()
    if hasattr(data, "__arrow_c_stream__"):
        return pa.RecordBatchReader.from_stream(data).read_all()
    if isinstance(data, Iterable):
        return list(data)
    raise InvalidArgument(f"cannot send {type(data).__name__}: give a pyarrow Table, RecordBatch, "
                          "RecordBatchReader, iterable of RecordBatch, or a pandas or polars DataFrame")
