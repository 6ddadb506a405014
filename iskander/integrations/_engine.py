"""What the Ray and Spark integrations share: a picklable target, and the engine a worker opens.

``resolve`` runs on the driver: it checks the arguments, asks the model's contract (a server's
GetFlightInfo, or the embedded registry) for the request columns and the output fields, and pins
the model version, so that every worker scores with the version whose schema the plan was built
from. The ``Target`` it returns holds only plain values (locations or a config path, names and
client options): it is what gets pickled to workers. ``Engine(target)`` opens the connections (or
loads the model) in the worker, and ``Engine.score(batch)`` returns ``batch`` with the model's
output columns appended (``iskander.client.attach_outputs``): every input column passes through,
partition columns included, whatever its type.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import pyarrow as pa

from iskander.client import (
    Cancelled, DeadlineExceeded, InternalError, InvalidArgument, IskanderClientError, NotFound, Replicas,
    ResourceExhausted, Unauthenticated, Unavailable, Unimplemented, attach_outputs, conform,
)
from iskander.embedded import Embedded, IskanderError

# Embedded errors become the client's classes, so both engines raise the same exceptions with the
# same text ("[INVALID_ARGUMENT] column 'features' of model 'tabular' has type ...").
_CLIENT_ERRORS: dict[str, type[IskanderClientError]] = {
    cls.code: cls for cls in (InvalidArgument, NotFound, Unavailable, ResourceExhausted, Unauthenticated,
                              DeadlineExceeded, Unimplemented, InternalError, Cancelled)
}


def client_error(exc: IskanderError) -> IskanderClientError:
    return _CLIENT_ERRORS.get(exc.code.value, IskanderClientError)(exc.message, exc.details)


@attrs.frozen
class Target:
    """Where to score, in plain picklable values (no connection, no session)."""

    model: str
    version: str | None
    outputs: tuple[str, ...]  # the output columns to append, in order
    select: tuple[str, ...] | None  # outputs to compute when not all of them (embedded skips the others)
    server: tuple[str, ...] | None = None  # Flight locations (remote)
    config: str | None = None  # a server config file (embedded)
    client_options: tuple[tuple[str, Any], ...] = ()  # IskanderClient keyword arguments (token, TLS, ...)

    @property
    def embedded(self) -> bool:
        return self.config is not None

    def describe(self) -> str:
        where = f"config {self.config}" if self.embedded else ", ".join(self.server or ())
        return f"model '{self.model}' v{self.version} ({'embedded, ' if self.embedded else ''}{where})"


@attrs.frozen
class Plan:
    """What the driver learnt from the contract: the target (version pinned) and the output fields."""

    target: Target
    request_schema: pa.Schema  # the columns a request carries (passthrough, then inputs)
    output_fields: tuple[pa.Field, ...]  # the columns appended to every input row

    def output_schema(self, input_schema: pa.Schema) -> pa.Schema:
        clash = [f.name for f in self.output_fields if f.name in input_schema.names]
        if clash:
            raise InvalidArgument(
                f"output column(s) {', '.join(clash)} of model '{self.target.model}' would duplicate input "
                "columns; drop or rename them first, or choose other outputs with outputs=[...]",
                {"model": self.target.model, "column": clash[0]})
        missing = [f.name for f in self.request_schema if f.name not in input_schema.names]
        if missing:
            raise InvalidArgument(
                f"column '{missing[0]}' of model '{self.target.model}' is missing; the data has columns: "
                f"{', '.join(input_schema.names) or '(none)'}",
                {"model": self.target.model, "column": missing[0]})
        return pa.schema(list(input_schema) + list(self.output_fields))


def _locations(server: str | Sequence[str]) -> tuple[str, ...]:
    found = (server,) if isinstance(server, str) else tuple(server)
    if not found or not all(isinstance(s, str) and s for s in found):
        raise ValueError(f"server= takes a Flight location (host:port or grpc:// URI) or a list of them, got {server!r}")
    return found


def resolve(model: str, *, server: str | Sequence[str] | None, config: str | Path | None, version: str | None,
            outputs: Sequence[str] | None, client_options: dict[str, Any] | None = None) -> Plan:
    """Check the arguments and read the model's contract (on the driver)."""
    if (server is None) == (config is None):
        raise ValueError("give exactly one of server= (a Flight location or a list of them: remote scoring) "
                         "or config= (a server config file: the model runs in each worker)")
    if client_options and config is not None:
        raise ValueError(f"client options ({', '.join(sorted(client_options))}) apply to server= only")
    if isinstance(outputs, str):
        outputs = [outputs]
    version = None if version is None else str(version)
    if server is not None:
        locations = _locations(server)
        with Replicas(locations, **(client_options or {})) as replicas:
            info = replicas.model(model, version)
        request_schema, output_schema, passthrough = info.input_schema, info.output_schema, info.passthrough
        pinned = info.version
        target_kw: dict[str, Any] = {"server": locations,
                                     "client_options": tuple(sorted((client_options or {}).items()))}
    else:
        path = Path(config).expanduser().resolve()  # type: ignore[arg-type]
        try:
            with Embedded(path, models=[model]) as engine:
                entry = engine.model(model, version)
                contract = entry.contract
                request_schema, output_schema = contract.input_schema, contract.output_schema
                passthrough = [f.name for f in contract.passthrough]
                pinned = entry.version
        except IskanderError as exc:
            raise client_error(exc) from None
        target_kw = {"config": str(path)}
    names = [n for n in output_schema.names if n not in passthrough]
    chosen = list(dict.fromkeys(outputs)) if outputs else names
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise InvalidArgument(
            f"unexpected output '{unknown[0]}' for model '{model}'; outputs: {', '.join(names)}",
            {"model": model, "output": unknown[0]})
    fields = tuple(output_schema.field(n) for n in chosen)
    select = None if chosen == names else tuple(chosen)
    target = Target(model=model, version=pinned, outputs=tuple(chosen), select=select, **target_kw)
    return Plan(target, request_schema, fields)


class Engine:
    """Scores batches for one ``Target`` inside a worker (Ray actor, Spark Python worker)."""

    def __init__(self, plan: Plan) -> None:
        self.plan = plan
        target = plan.target
        self.target = target
        self._outputs = list(target.outputs)
        self._embedded: Embedded | None = None
        self._replicas: Replicas | None = None
        if target.embedded:
            try:
                self._embedded = Embedded(target.config, models=[target.model])  # type: ignore[arg-type]
                self._embedded.model(target.model, target.version)  # fail here if it did not load
            except IskanderError as exc:
                raise client_error(exc) from None
        else:
            self._replicas = Replicas(target.server or (), **dict(target.client_options))

    def empty(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """``batch`` (no rows) with empty output columns of the contract's types."""
        arrays = list(batch.columns) + [pa.array([], type=f.type) for f in self.plan.output_fields]
        return pa.RecordBatch.from_arrays(arrays, schema=pa.schema(list(batch.schema) + list(self.plan.output_fields)))

    def score(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """``batch`` with the model's output columns appended, row for row."""
        if batch.num_rows == 0:
            return self.empty(batch)
        target = self.target
        request = conform(batch, self.plan.request_schema, target.model)  # zero-copy unless a layout cast
        if self._embedded is not None:
            try:
                answer = self._embedded.infer(target.model, request, target.version, target.select)
            except IskanderError as exc:
                raise client_error(exc) from None
        else:
            assert self._replicas is not None
            answer = self._replicas.infer_batch(target.model, request, target.version)
        return attach_outputs(batch, answer, self._outputs)

    def close(self) -> None:
        if self._embedded is not None:
            self._embedded.close()
        if self._replicas is not None:
            self._replicas.close()


# One engine per target per process: Spark reuses its Python workers across tasks, and loading a
# model (or opening connections) for every partition would dominate small partitions.
_ENGINES: dict[Plan, Engine] = {}
_ENGINES_LOCK = threading.Lock()


def shared_engine(plan: Plan) -> Engine:
    with _ENGINES_LOCK:
        engine = _ENGINES.get(plan)
        if engine is None:
            engine = _ENGINES[plan] = Engine(plan)
        return engine
