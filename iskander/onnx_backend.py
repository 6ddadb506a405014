"""ONNX Runtime execution: a small pool of InferenceSessions per model version.

``InferenceSession.run`` is thread-safe and releases the GIL, so requests from both frontends run
concurrently on one session; ``instances > 1`` adds sessions (each with its own thread pools) for
models whose single session saturates. Sessions are picked round-robin.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as ort_state

from .contract import TensorInfo
from .errors import InternalError, InvalidInput, ModelLoadError
from .settings import EXECUTION_PROVIDERS, ModelSettings

_GRAPH_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}


_BFLOAT16 = 16  # onnx.TensorProto.BFLOAT16


def session_options(settings: ModelSettings) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = settings.intra_threads
    opts.inter_op_num_threads = settings.inter_threads
    opts.graph_optimization_level = _GRAPH_LEVELS[settings.optimization_level]
    opts.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL if settings.parallel_execution else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    opts.enable_mem_pattern = settings.memory_pattern
    opts.log_severity_level = 3  # errors only; ORT's warnings go to stderr otherwise
    return opts


def _tensor_info(arg: ort.NodeArg) -> TensorInfo:
    shape = tuple(d if isinstance(d, int) and d >= 0 else None for d in (arg.shape or ()))
    return TensorInfo(name=arg.name, onnx_type=arg.type, shape=shape)


class OnnxBackend:
    def __init__(self, settings: ModelSettings) -> None:
        self.settings = settings
        available = ort.get_available_providers()
        providers = [EXECUTION_PROVIDERS[p] for p in settings.execution_providers]
        missing = [p for p in providers if p not in available]
        if missing:
            raise ModelLoadError(
                f"execution provider {missing[0]} is not available in this onnxruntime build "
                f"(available: {', '.join(available)})"
            )
        if not settings.path.is_file():
            raise ModelLoadError(f"model file {settings.path.name} not found")
        opts = session_options(settings)
        try:
            self._sessions = [
                ort.InferenceSession(str(settings.path), sess_options=opts, providers=providers)
                for _ in range(settings.instances)
            ]
        except Exception as exc:  # ORT raises several pybind types for unreadable/invalid models
            # Clients see this reason; keep the server's directory layout out of it.
            reason = _short(exc).replace(str(settings.path), settings.path.name)
            raise ModelLoadError(f"onnxruntime could not load {settings.path.name}: {reason}") from None
        first = self._sessions[0]
        self.inputs = tuple(_tensor_info(a) for a in first.get_inputs())
        self.outputs = tuple(_tensor_info(a) for a in first.get_outputs())
        self._next = itertools.cycle(self._sessions).__next__  # atomic under the GIL
        # numpy has no bfloat16: those inputs arrive as uint16 bit patterns and travel as OrtValues
        self._bf16_inputs = frozenset(t.name for t in self.inputs if t.onnx_type == "tensor(bfloat16)")
        self._run_options = ort.RunOptions()

    def run(self, output_names: Sequence[str], feeds: Mapping[str, np.ndarray], model: str) -> list[np.ndarray]:
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
