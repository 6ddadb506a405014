"""Triton ``ModelConfig`` and ``ModelStatistics`` messages built from the core's contract and stats.

Follows Triton's ONNX conventions so perf_analyzer and Triton clients read them as they read
Triton's: dims exclude the batch dimension; a one-value-per-row column is dims [1] with
``reshape { shape: [] }``; a ``dynamic_batching`` block exactly when the model's config turns
dynamic batching on.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from iskander._proto import grpc_service_pb2 as pb
from iskander._proto import model_config_pb2 as mc
from iskander.arrow.types import row_shape
from iskander.core.model import ReadyModel
from iskander.frontends.oip_codec import oip_datatype, oip_view, passthrough_lists

UNLIMITED_BATCH = 2**31 - 1  # max_batch_size advertised when the server sets no limit


def data_type(arrow_type: pa.DataType) -> int:
    name = oip_datatype(arrow_type)
    return mc.DataType.Value("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}")


def _tensor_dims(arrow_type: pa.DataType) -> tuple[list[int], bool]:
    """(dims without the batch dimension, needs reshape to [])."""
    if pa.types.is_list(arrow_type):
        return [-1], False
    dims = list(row_shape(arrow_type))
    return (dims, False) if dims else ([1], True)


def max_batch_size(entry: ReadyModel) -> int:
    """The rows-per-request bound in force (the model's or the server's default), else what the
    batcher or a fixed batch dimension allows."""
    if entry.limits.max_batch_size:
        return entry.limits.max_batch_size
    if entry.settings.dynamic_batching is not None:
        return entry.settings.dynamic_batching.max_batch_rows
    fixed = [b.fixed_rows for b in entry.contract.inputs if b.fixed_rows is not None]
    return min(fixed) if fixed else UNLIMITED_BATCH


def model_config(entry: ReadyModel, versions: list[int]) -> mc.ModelConfig:
    """``versions``: every configured version of the model (its version_policy)."""
    contract, backend = entry.contract, entry.backend
    config = mc.ModelConfig(
        name=entry.name,
        platform=backend.platform,
        backend=backend.backend_name,
        max_batch_size=max_batch_size(entry),
        default_model_filename=entry.settings.path.name,
        version_policy=mc.ModelVersionPolicy(
            specific=mc.ModelVersionPolicy.Specific(versions=versions)
        ),
        instance_group=[
            mc.ModelInstanceGroup(
                name=f"{entry.name}_0",
                kind=mc.ModelInstanceGroup.KIND_GPU if backend.instance_kind == "gpu" else mc.ModelInstanceGroup.KIND_CPU,
                count=backend.instance_count,
            )
        ],
    )
    batching = entry.settings.dynamic_batching
    if batching is not None:  # present exactly when requests are batched together
        config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(batching.preferred_batch_rows)
        config.dynamic_batching.SetInParent()
    for name, arrow_type in oip_view(contract.input_schema, requests=True):
        dims, reshape = _tensor_dims(arrow_type)
        tensor = config.input.add(name=name, data_type=data_type(arrow_type), dims=dims)
        if reshape:
            tensor.reshape.SetInParent()  # reshape { shape: [] }: [N, 1] on the wire, [N] in the model
    for name, arrow_type in oip_view(contract.output_schema, skip=passthrough_lists(contract.passthrough)):
        dims, reshape = _tensor_dims(arrow_type)
        tensor = config.output.add(name=name, data_type=data_type(arrow_type), dims=dims)
        if reshape:
            tensor.reshape.SetInParent()
    return config


def _duration(d: dict[str, int]) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=d["count"], ns=d["ns"])


def model_statistics(snapshot: dict[str, Any]) -> pb.ModelStatistics:
    s = snapshot["inference_stats"]
    return pb.ModelStatistics(
        name=snapshot["name"],
        version=snapshot["version"],
        last_inference=snapshot["last_inference"],
        inference_count=snapshot["inference_count"],
        execution_count=snapshot["execution_count"],
        inference_stats=pb.InferStatistics(
            success=_duration(s["success"]),
            fail=_duration(s["fail"]),
            queue=_duration(s["queue"]),
            compute_input=_duration(s["compute_input"]),
            compute_infer=_duration(s["compute_infer"]),
            compute_output=_duration(s["compute_output"]),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=b["batch_size"],
                compute_input=_duration(b["compute_input"]),
                compute_infer=_duration(b["compute_infer"]),
                compute_output=_duration(b["compute_output"]),
            )
            for b in snapshot["batch_stats"]
        ],
    )
