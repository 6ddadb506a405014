"""Backends: the model runtimes behind one interface (``base.Backend``).

Each implementation lives in its own module and is imported only when a model asks for it, so the
rest of the server (and a server with no such models) never imports its runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import Backend, TensorSpec

if TYPE_CHECKING:
    from ..settings import ModelSettings

__all__ = ["BACKEND_NAMES", "Backend", "TensorSpec", "backend_type", "create_backend"]

BACKEND_NAMES = ("onnx",)  # the values of a model's ``backend`` key


def backend_type(name: str) -> type[Backend]:
    """The implementation class for a ``backend`` setting (validated by settings already)."""
    if name == "onnx":
        from .onnx import OnnxBackend

        return OnnxBackend
    raise ValueError(f"unsupported backend {name!r}; supported: {', '.join(map(repr, BACKEND_NAMES))}")


def create_backend(settings: ModelSettings) -> Backend:
    """Load ``settings``' model with its backend; raises ModelLoadError with a client-safe reason."""
    return backend_type(settings.backend)(settings)
