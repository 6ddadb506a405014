"""What every backend offers the core: a neutral signature, run and close.

Nothing here knows a model format. The contract is compiled against ``TensorSpec``s; the core and
the batcher call ``run`` with numpy tensors named after them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, Protocol

import attrs
import numpy as np
import pyarrow as pa


@attrs.frozen
class TensorSpec:
    """A model input or output as its backend reports it.

    ``element`` is the Arrow element type that carries the tensor's values, None when no Arrow type
    can (a sequence, a map, a type Iskander does not know). ``shape`` uses None for symbolic dims.
    ``type_label`` is the backend's own spelling of the type, quoted in load errors so an operator
    can match them against the model's tools (``tensor(float)`` for ONNX).
    """

    name: str
    element: pa.DataType | None
    shape: tuple[int | None, ...]
    type_label: str
    # Why the backend cannot return this output (completes "<label> output 'x' is <type>, which ...");
    # None when it can. Such outputs may exist in the model but never be asked for.
    not_returnable: str | None = None


class Backend(Protocol):
    """One loaded model version. ``run`` is called concurrently from many threads."""

    kind: str  # how load errors name the model's tensors: "ONNX input 'x'"
    platform: str  # Triton ModelConfig/ModelMetadata platform, e.g. "onnxruntime_onnx"
    backend_name: str  # Triton ModelConfig backend, e.g. "onnxruntime"
    instance_count: int  # parallel executors; also the dynamic batcher's worker threads
    instance_kind: Literal["cpu", "gpu"]  # Triton ModelInstanceGroup kind
    restarts: int | None  # worker processes restarted since load; None: the backend runs no workers
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def run(
        self, output_names: Sequence[str], feeds: Mapping[str, np.ndarray], model: str, deadline: float | None = None
    ) -> list[np.ndarray]:
        """The named outputs, in order, for ``feeds`` (one array per input, batch dimension first).
        Raises InvalidInput for input only the model could reject, InternalError for anything else.
        ``deadline`` (time.monotonic()) is the request's, when it has one: a backend that can stop
        waiting for its runtime raises DeadlineExceeded past it (python workers); one that cannot
        ignores it (onnxruntime runs to the end; the core checks the deadline before the run)."""
        ...

    def close(self) -> None:
        """Release the model; requests already running may still finish."""
        ...
