"""The ONNX backend: a small pool of ONNX Runtime InferenceSessions per model version.

``InferenceSession.run`` is thread-safe and releases the GIL, so requests from both frontends run
concurrently on one session; ``instances > 1`` adds sessions (each with its own thread pools) for
models whose single session saturates. Sessions are picked round-robin.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort
import pyarrow as pa
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from iskander.arrow.types import BFLOAT16
from iskander.errors import InternalError, InvalidInput, ModelLoadError
from iskander.config.settings import EXECUTION_PROVIDERS, ModelSettings, OnnxOptions
from iskander.backends.base import TensorSpec

_GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16

# ONNX Runtime's NodeArg.type strings -> the Arrow element type that carries them.
ONNX_TO_ARROW: dict[str, pa.DataType] = {
    "tensor(float)": pa.float32(),
    "tensor(double)": pa.float64(),
    "tensor(float16)": pa.float16(),
    "tensor(bfloat16)": BFLOAT16,
    "tensor(int8)": pa.int8(),
    "tensor(int16)": pa.int16(),
    "tensor(int32)": pa.int32(),
    "tensor(int64)": pa.int64(),
    "tensor(uint8)": pa.uint8(),
    "tensor(uint16)": pa.uint16(),
    "tensor(uint32)": pa.uint32(),
    "tensor(uint64)": pa.uint64(),
    "tensor(bool)": pa.bool_(),
    "tensor(string)": pa.utf8(),
}


def session_options(options: OnnxOptions) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = options.intra_threads
    opts.inter_op_num_threads = options.inter_threads
    opts.graph_optimization_level = _GRAPH_LEVELS[options.optimization_level]
    opts.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if options.parallel_execution else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    opts.enable_mem_pattern = options.memory_pattern
    opts.log_severity_level = 3  # errors only; ORT's warnings go to stderr otherwise
    return opts


def _tensor_spec(arg: ort.NodeArg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or ()))
    # numpy has no bfloat16, so session.run cannot hand such an output back
    no_return = "onnxruntime's Python API cannot return; cast it to float32 in the model" \
        if arg.type == "tensor(bfloat16)" else None
    return TensorSpec(arg.name, ONNX_TO_ARROW.get(arg.type), shape, arg.type, no_return)


class OnnxBackend:
    kind = "ONNX"
    restarts = None  # runs in the server process: nothing to restart
    platform = "onnxruntime_onnx"
    backend_name = "onnxruntime"

    def __init__(self, settings: ModelSettings) -> None:
        options = settings.options
        if not isinstance(options, OnnxOptions):
            raise ModelLoadError(f"backend 'onnx' needs OnnxOptions, got {type(options).__name__}")
        self.settings = settings
        self.instance_count = options.instances
        self.instance_kind = "gpu" if options.execution_providers[0] in ("cuda", "tensorrt") else "cpu"
        available = ort.get_available_providers()
        providers = [EXECUTION_PROVIDERS[p] for p in options.execution_providers]
        missing = [p for p in providers if p not in available]
        if missing:
            raise ModelLoadError(
                f"execution provider {missing[0]} is not available in this onnxruntime build "
                f"(available: {', '.join(available)})"
            )
        if not settings.path.is_file():
            raise ModelLoadError(f"model file {settings.path.name} not found")
        opts = session_options(options)
        try:
            self._sessions = [
                ort.InferenceSession(str(settings.path), sess_options=opts, providers=providers)
                for _ in range(options.instances)
            ]
        except Exception as exc:  # ORT raises several pybind types for unreadable/invalid models
            # Clients see this reason; keep the server's directory layout out of it.
            reason = _short(exc).replace(str(settings.path), settings.path.name)
            raise ModelLoadError(f"onnxruntime could not load {settings.path.name}: {reason}") from None
        first = self._sessions[0]
        self.inputs = tuple(_tensor_spec(a) for a in first.get_inputs())
        self.outputs = tuple(_tensor_spec(a) for a in first.get_outputs())
        self._next = itertools.cycle(self._sessions).__next__  # atomic under the GIL
        # numpy has no bfloat16: those inputs arrive as uint16 bit patterns and travel as OrtValues
        self._bf16_inputs = frozenset(t.name for t in self.inputs if t.type_label == "tensor(bfloat16)")
        self._run_options = ort.RunOptions()

    def run(
        self, output_names: Sequence[str], feeds: Mapping[str, np.ndarray], model: str, deadline: float | None = None
    ) -> list[np.ndarray]:
        # ``deadline`` is not used: a session run cannot be abandoned part way (see base.Backend.run).
        session = self._next()
        if self._bf16_inputs:
            feeds = {
                k: ort.OrtValue.ortvalue_from_numpy_with_onnx_type(v, _BFLOAT16) if k in self._bf16_inputs else v
                for k, v in feeds.items()
            }
        try:
            return session.run(list(output_names), feeds, self._run_options)
        except (ort_state.InvalidArgument, ort_state.InvalidGraph) as exc:
            # Shapes the contract could not know (static dims inside the graph) surface here.
            raise InvalidInput(f"model '{model}' rejected the input: {_short(exc)}", model=model) from None
        except Exception as exc:
            raise InternalError(f"model '{model}' failed while running: {_short(exc)}", model=model) from None

    def close(self) -> None:
        self._sessions.clear()


def _short(exc: Exception) -> str:
    text = str(exc).strip()
    # ORT prefixes messages with "[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : "; keep the sentence.
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]
    return text[:500]
