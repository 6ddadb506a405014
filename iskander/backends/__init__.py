"""Backends: the model runtimes behind one interface (``base.Backend``).

Each implementation lives in its own module and is imported only when a model asks for it, so the
rest of the server (and a server with no such models) never imports its runtime.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from iskander.errors import ModelLoadError
from iskander.backends.base import Backend, TensorSpec
from iskander.config.settings import BACKEND_NAMES  # the values of a model's ``backend`` key, owned by config

if TYPE_CHECKING:
    from iskander.config.settings import ModelSettings

__all__ = ["BACKEND_NAMES", "Backend", "TensorSpec", "backend_type", "create_backend", "signature_from_manifest"]


def backend_type(name: str) -> type[Backend]:
    """The implementation class for a ``backend`` setting (validated by settings already)."""
    if name == "onnx":
        from iskander.backends.onnx import OnnxBackend

        return OnnxBackend
    if name == "python":
        from iskander.backends.python_worker import PythonBackend

        return PythonBackend
    if name == "sklearn":
        from iskander.backends.python_worker import SklearnBackend

        return SklearnBackend
    raise ValueError(f"unsupported backend {name!r}; supported: {', '.join(map(repr, BACKEND_NAMES))}")


def signature_from_manifest(name: str) -> bool:
    """Whether the backend has no signature of its own (a Python model has no graph), so a manifest
    is required and ``create_backend`` is given the tensors the manifest declares."""
    return bool(getattr(backend_type(name), "signature_from_manifest", False))


def create_backend(
    settings: ModelSettings, declared: tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]] | None = None
) -> Backend:
    """Load ``settings``' model with its backend; raises ModelLoadError with a client-safe reason.
    ``declared`` (inputs, outputs) is given to backends whose signature comes from the manifest."""
    cls = backend_type(settings.backend)
    if getattr(cls, "signature_from_manifest", False):
        if declared is None:
            raise ModelLoadError(f"backend '{settings.backend}' needs a manifest")
        return cls(settings, *declared)  # type: ignore[call-arg]
    return cls(settings)
