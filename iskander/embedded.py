"""The server's models in this process: no server, no ports (docs/scale-out.md).

    from iskander.embedded import Embedded

    with Embedded("config.toml") as engine:              # the server's config file
        answer = engine.infer("tabular", batch)           # a pa.RecordBatch: passthrough + outputs

``Embedded`` builds what ``iskander/server.py`` builds below its frontends: the registry with the
server's default limits, the dataplane and the control plane. ``infer`` is a Flight ``DoExchange``
batch without the network: the same structural checks of the batch (``arrow/checks.py``), the same
limits, contract, casts and errors (``iskander.errors``: ``InvalidInput`` with the model and column
in its message and details, ...), and the same answer.

An ``Embedded`` pickles as a *factory*: what is pickled is the config path and the model names,
and unpickling loads the models again in the receiving process. No ONNX Runtime session, worker
process or lock ever travels, so one can be handed to Ray actors and Spark executors.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import attrs
import pyarrow as pa

from iskander.arrow.checks import check_batch, needs_full
from iskander.config.loader import load_config
from iskander.config.settings import Settings
from iskander.core.control import ControlPlane
from iskander.core.dataplane import ArrowRequest, Dataplane, Inflight, RequestContext
from iskander.core.model import Limits, ReadyModel
from iskander.core.registry import ModelRegistry
from iskander.errors import ConfigError, InvalidInput, IskanderError
from iskander.observability.observer import Observer

__all__ = ["Embedded", "IskanderError", "server_limits"]  # IskanderError: what infer raises


def server_limits(settings: Settings) -> Limits:
    """The server's default per-request limits, exactly as ``IskanderServer`` builds them."""
    s = settings.server
    return Limits(max_batch_size=s.max_batch_size, max_inflight=s.max_inflight,
                  max_message_bytes=s.max_message_bytes, max_stream_rows=s.max_stream_rows)


class Embedded:
    """The models of a server config, loaded in this process.

    ``config`` is the server's TOML config (relative model paths resolve against its folder, as
    for the server). ``models`` restricts loading to those model names (every version of each);
    by default every configured model loads. A model that fails to load is recorded with its
    reason, as in the server: asking it for inference raises ``ModelNotReady`` with that reason.
    """

    def __init__(self, config: str | Path, models: Iterable[str] | None = None) -> None:
        self.config_path = Path(config).expanduser().resolve()  # executors may run in another cwd
        settings = load_config(self.config_path)
        self.model_names: tuple[str, ...] | None = tuple(dict.fromkeys(models)) if models is not None else None
        chosen = settings.models
        if self.model_names is not None:
            configured = {m.name for m in settings.models}
            unknown = [n for n in self.model_names if n not in configured]
            if unknown:
                raise ConfigError(
                    f"config {self.config_path}: no model named {', '.join(repr(n) for n in unknown)}; "
                    f"configured: {', '.join(sorted(configured))}")
            chosen = tuple(m for m in settings.models if m.name in self.model_names)
        self.settings = attrs.evolve(settings, models=chosen)
        self.registry = ModelRegistry(chosen, server_limits(settings))
        self.registry.load_all()
        self.dataplane = Dataplane(self.registry, Observer(), Inflight(), settings.server.request_timeout_s)
        self.control = ControlPlane(self.registry)
        self._closed = False

    # --- pickling: a factory, never the live sessions ------------------------------------------

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (Embedded, (str(self.config_path), self.model_names))

    # --- models --------------------------------------------------------------------------------

    def models(self) -> list[str]:
        """Names of the models with a ready version."""
        return [m.name for m in self.control.ready_models()]

    def model(self, name: str, version: str | None = None) -> ReadyModel:
        """A ready model version (``ModelNotFound`` / ``ModelNotReady`` otherwise, as the server)."""
        return self.dataplane.model(name, version)

    def input_schema(self, name: str, version: str | None = None) -> pa.Schema:
        """What a request carries: passthrough columns, then inputs (Flight's GetFlightInfo schema)."""
        return self.model(name, version).contract.input_schema

    def output_schema(self, name: str, version: str | None = None) -> pa.Schema:
        """What an answer carries: passthrough columns, then outputs."""
        return self.model(name, version).contract.output_schema

    def passthrough(self, name: str, version: str | None = None) -> list[str]:
        return [f.name for f in self.model(name, version).contract.passthrough]

    def outputs(self, name: str, version: str | None = None) -> list[str]:
        """The output columns (the answer without the echoed passthrough columns)."""
        return list(self.model(name, version).contract.output_names)

    # --- inference -----------------------------------------------------------------------------

    def infer(self, model: str, batch: pa.RecordBatch, version: str | None = None,
              outputs: Sequence[str] | None = None) -> pa.RecordBatch:
        """Score one batch: the answer's passthrough columns, then the model's outputs (only
        ``outputs`` when named: the others are not computed), row-aligned with ``batch``.

        Columns the model does not take are ignored, as the Python client never sends them; the
        model's columns must have the contract's types (or a manifest ``cast_from`` type), as on
        the wire. Errors are ``iskander.errors.IskanderError`` subclasses with the server's
        messages and details."""
        if self._closed:
            raise RuntimeError("this Embedded engine is closed")
        if isinstance(batch, pa.Table):
            batch = batch.combine_chunks().to_batches()[0] if batch.num_rows else \
                pa.RecordBatch.from_pylist([], schema=batch.schema)
        if not isinstance(batch, pa.RecordBatch):
            raise InvalidInput(f"model '{model}' expects an Arrow RecordBatch, got {type(batch).__name__}",
                               model=model)
        ctx = RequestContext("internal", "infer", time.perf_counter_ns())
        entry = self.dataplane.model(model, version)
        request = _request_columns(batch, entry.contract.input_schema)
        full: list[bool] = []

        def decode() -> pa.RecordBatch:
            # the checks a Flight batch gets (arrow/checks.py): a batch built in process by other
            # code (a Ray block, a Spark Arrow batch) is trusted no more than one off the network
            full.append(needs_full(request.schema))
            check_batch(request, model, full[0])
            return request

        # nbytes counts the bytes the batch's (possibly sliced) arrays reference: what IPC would send
        return self.dataplane.infer(entry, ArrowRequest(request.nbytes, decode, outputs), ctx)

    # --- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Release every loaded model (python models' worker processes end)."""
        if not self._closed:
            self._closed = True
            self.registry.close()

    def __enter__(self) -> Embedded:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Embedded({str(self.config_path)!r}, models={self.model_names!r})"


def _request_columns(batch: pa.RecordBatch, schema: pa.Schema) -> pa.RecordBatch:
    """The model's columns of ``batch`` (zero-copy), in the batch's order. A missing column is left
    missing so the contract reports it in its own words; other columns are dropped."""
    wanted = set(schema.names)
    names = batch.schema.names
    if all(n in wanted for n in names):
        return batch
    keep = [i for i, n in enumerate(names) if n in wanted]
    return pa.RecordBatch.from_arrays([batch.column(i) for i in keep],
                                      schema=pa.schema([batch.schema.field(i) for i in keep]))
