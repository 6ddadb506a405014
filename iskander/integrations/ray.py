"""Score a Ray Dataset with an Iskander model (docs/scale-out.md#ray).

    import ray
    from iskander.integrations.ray import predict

    ds = ray.data.read_parquet("events/")                      # hive partitions become columns
    scored = predict(ds, "tabular", server="127.0.0.1:50051")  # or server=[...replicas], or config="config.toml"
    scored.write_parquet("events_scored/")

The answer is a ``ray.data.Dataset`` of every input column (partition columns included) followed by
the model's outputs. It runs ``map_batches`` with an actor class: each actor opens its connections
(``server=``) or loads the model (``config=``) in its ``__init__``, so nothing unpicklable is ever
captured, and receives ``pyarrow`` batches (no pandas round trip; columns pass through unchanged).

Default resources never starve a small cluster of the CPUs its read tasks need:

- ``server=``: the server does the work, so an actor asks for ``REMOTE_NUM_CPUS`` (0.25) CPU and
  there are two actors per location, at most half the cluster's CPUs' worth.
- ``config=``: an actor runs the model and asks for 1 CPU; there are ``cluster CPUs - 1`` of them
  (at least 1), so one CPU is always left for reading and writing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from iskander.integrations._engine import Engine, Plan, resolve

if TYPE_CHECKING:
    import ray.data

__all__ = ["predict", "DEFAULT_BATCH_SIZE", "REMOTE_NUM_CPUS", "default_resources"]

log = logging.getLogger("iskander.integrations.ray")

DEFAULT_BATCH_SIZE = 8192  # rows per map_batches call: a few ms of model time, per-batch overhead amortised
REMOTE_NUM_CPUS = 0.25  # an actor that only moves Arrow data to a server and back
REMOTE_ACTORS_PER_LOCATION = 2  # one batch in flight at the server while the actor handles the other's answer


def _cluster_cpus() -> float:
    import ray

    if not ray.is_initialized():
        ray.init()  # what Ray Data would do at execution; the plan needs the cluster's size now
    return float(ray.cluster_resources().get("CPU", 1.0))


def default_resources(embedded: bool, locations: int, cluster_cpus: float,
                      num_cpus: float | None = None, concurrency: int | None = None) -> tuple[float, int]:
    """(num_cpus per actor, number of actors) for a cluster of ``cluster_cpus`` CPUs, filling in
    what the caller left unset so that actors can never hold every CPU."""
    if embedded:
        cpus = 1.0 if num_cpus is None else float(num_cpus)
        if concurrency is None:
            concurrency = max(1, math.floor((cluster_cpus - 1) / cpus)) if cpus > 0 else 1
    else:
        cpus = REMOTE_NUM_CPUS if num_cpus is None else float(num_cpus)
        if concurrency is None:
            cap = math.floor(cluster_cpus / 2 / cpus) if cpus > 0 else REMOTE_ACTORS_PER_LOCATION * locations
            concurrency = max(1, min(REMOTE_ACTORS_PER_LOCATION * locations, cap))
    return cpus, int(concurrency)


class _Predictor:
    """The map_batches actor: the engine is created here, in the actor's process."""

    def __init__(self, plan: Plan) -> None:
        self.engine = Engine(plan)
        self._request = set(plan.request_schema.names)

    def __call__(self, table: pa.Table) -> pa.Table:
        batch = _one_batch(table, self._request)
        return pa.Table.from_batches([self.engine.score(batch)])


def _one_batch(table: pa.Table, request: set[str]) -> pa.RecordBatch:
    """The table as one record batch: zero-copy when every column is one chunk (the usual case for
    a Ray block), else one copy to make the columns contiguous (the model needs that anyway).
    Ray's tensor extension columns that the model reads are handed over as their storage (a list
    per row), which the client's layout cast turns into the contract's fixed_size_list."""
    columns = []
    fields = []
    for field, column in zip(table.schema, table.columns):
        if isinstance(field.type, pa.BaseExtensionType) and field.name in request \
                and type(field.type).__module__.startswith("ray."):
            column = pa.chunked_array([c.storage for c in column.chunks], type=field.type.storage_type)
            field = field.with_type(field.type.storage_type)
        columns.append(column)
        fields.append(field)
    table = pa.Table.from_arrays(columns, schema=pa.schema(fields, metadata=table.schema.metadata))
    if table.num_rows == 0:
        return pa.RecordBatch.from_arrays([pa.array([], type=f.type) for f in table.schema], schema=table.schema)
    if any(c.num_chunks != 1 for c in table.columns):
        table = table.combine_chunks()
    return table.to_batches()[0]


def predict(dataset: ray.data.Dataset, model: str, *, server: str | Sequence[str] | None = None,
            config: str | Path | None = None, version: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
            concurrency: int | None = None, num_cpus: float | None = None, outputs: Sequence[str] | None = None,
            **client_options: Any) -> ray.data.Dataset:
    """``dataset`` with the model's outputs appended to every row.

    Exactly one of ``server`` (a Flight location, or a list of replicas: requests are spread over
    them and retried on another when one is unavailable) or ``config`` (a server config file: each
    actor loads the model). ``version`` pins a version (default: the newest ready one, resolved
    now and used by every actor). ``outputs`` picks output columns (default: all). ``batch_size``
    rows per call; ``concurrency`` actors of ``num_cpus`` CPUs each (defaults: module docstring).
    ``client_options`` go to ``IskanderClient`` (``token``, ``tls_root_certs``, ...).

    Raises at once (before any data is read) if the model is unknown, an output is unknown, a
    request column is missing from the dataset's schema, or an output would duplicate a column."""
    import ray.data

    plan = resolve(model, server=server, config=config, version=version, outputs=outputs,
                   client_options=client_options)
    schema = _schema_if_known(dataset)
    if schema is not None:
        schema = plan.output_schema(schema)  # raises on a missing request column or a clashing output
    embedded = plan.target.embedded
    cluster_cpus = _cluster_cpus()
    cpus, actors = default_resources(embedded, len(plan.target.server or ()), cluster_cpus, num_cpus, concurrency)
    if cpus * actors >= cluster_cpus:
        log.warning("iskander predict: %d actors x %.2f CPU hold all %.0f CPUs of the cluster: read tasks may "
                    "wait for ever; lower concurrency or num_cpus", actors, cpus, cluster_cpus)
    scored = dataset.map_batches(
        _Predictor, fn_constructor_kwargs={"plan": plan}, batch_format="pyarrow", batch_size=batch_size,
        zero_copy_batch=True, num_cpus=cpus, compute=ray.data.ActorPoolStrategy(size=actors),
        udf_modifying_row_count=False,
    )
    if schema is None:
        return scored
    # Ray derives a dataset's schema from its blocks, and map_batches is never called without rows:
    # an empty result would have no schema at all. One empty block of the contract's schema keeps
    # the columns (and their types) whatever the data.
    return scored.union(ray.data.from_arrow(schema.empty_table()))


def _schema_if_known(dataset: ray.data.Dataset) -> pa.Schema | None:
    """The dataset's Arrow schema when Ray knows it without running anything (file metadata)."""
    try:
        schema = dataset.schema(fetch_if_missing=False)
    except Exception:  # noqa: BLE001 - schema discovery is a convenience; the actors check again
        return None
    if schema is None:
        return None
    base = getattr(schema, "base_schema", None)
    return base if isinstance(base, pa.Schema) else None
