"""Model registry: every configured model version with its state, loaded once and shared.

One model failing to load is recorded with its reason and never stops the others. Entries are
replaced whole (never mutated), so a reader always sees a consistent (state, contract, backend).
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Iterable

import attrs

from .arrow_types import type_name
from .contract import Contract, compile_contract
from .errors import ConfigError, ModelLoadError, ModelNotFound, ModelNotReady
from .manifest import load_manifest
from .onnx_backend import OnnxBackend
from .settings import ModelSettings

log = logging.getLogger("iskander.registry")


class ModelState(enum.Enum):
    LOADING = "LOADING"
    READY = "READY"
    UNAVAILABLE = "UNAVAILABLE"  # failed to load; ``reason`` says why


@attrs.frozen
class ModelVersion:
    settings: ModelSettings
    state: ModelState
    reason: str = ""
    contract: Contract | None = None
    backend: OnnxBackend | None = None

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def version(self) -> str:
        return str(self.settings.version)


def load_model(settings: ModelSettings) -> ModelVersion:
    """Load one model version; failures become an UNAVAILABLE entry with a reason."""
    try:
        backend = OnnxBackend(settings)
        manifest_path = settings.manifest_path
        if settings.manifest is not None or manifest_path.is_file():
            manifest = load_manifest(manifest_path, settings.name)
        else:
            manifest = None
        contract = compile_contract(settings.name, manifest, backend.inputs, backend.outputs)
    except (ModelLoadError, ConfigError) as exc:
        return ModelVersion(settings, ModelState.UNAVAILABLE, reason=str(exc))
    return ModelVersion(settings, ModelState.READY, contract=contract, backend=backend)


class ModelRegistry:
    def __init__(self, models: Iterable[ModelSettings]) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, dict[int, ModelVersion]] = {}
        for m in models:
            self._entries.setdefault(m.name, {})[m.version] = ModelVersion(m, ModelState.LOADING)

    def load_all(self) -> None:
        for versions in list(self._entries.values()):
            for entry in list(versions.values()):
                self._store(load_model(entry.settings))

    def _store(self, entry: ModelVersion) -> None:
        with self._lock:
            self._entries[entry.name][entry.settings.version] = entry
        if entry.state is ModelState.READY:
            assert entry.contract is not None
            cols = lambda schema: ", ".join(f"{f.name}: {type_name(f.type)}" for f in schema)  # noqa: E731
            log.info(
                "model %s version %s ready (%s) inputs [%s] -> outputs [%s]",
                entry.name, entry.version,
                "manifest" if entry.contract.from_manifest else "derived from ONNX signature",
                cols(entry.contract.input_schema), cols(entry.contract.output_schema),
            )
        else:
            log.error(
                "model %s version %s (%s) failed to load: %s",
                entry.name, entry.version, entry.settings.path, entry.reason,
            )

    # --- lookups ----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._entries)

    def versions(self, name: str) -> list[ModelVersion]:
        return [v for _, v in sorted(self._entries.get(name, {}).items())]

    def all(self) -> list[ModelVersion]:
        return [v for name in self.names() for v in self.versions(name)]

    def find(self, name: str, version: str | None = None) -> ModelVersion:
        """The entry for ``name``/``version`` whatever its state; the newest version when unset."""
        versions = self._entries.get(name)
        if not versions:
            raise ModelNotFound(
                f"unknown model '{name}'; served models: {', '.join(self.names()) or '(none)'}",
                model=name,
            )
        if not version:
            ready = [v for k, v in sorted(versions.items()) if v.state is ModelState.READY]
            return ready[-1] if ready else versions[max(versions)]
        try:
            entry = versions.get(int(version))
        except ValueError:
            entry = None
        if entry is None:
            raise ModelNotFound(
                f"model '{name}' has no version '{version}'; versions: "
                f"{', '.join(str(k) for k in sorted(versions))}",
                model=name, version=version,
            )
        return entry

    def get_ready(self, name: str, version: str | None = None) -> ModelVersion:
        entry = self.find(name, version)
        if entry.state is not ModelState.READY:
            what = f"model '{name}' version {entry.version}"
            reason = f": {entry.reason}" if entry.reason else ""
            raise ModelNotReady(
                f"{what} is not ready ({entry.state.value.lower()}){reason}",
                model=name, version=entry.version, state=entry.state.value,
            )
        return entry

    def all_ready(self) -> bool:
        return all(v.state is ModelState.READY for v in self.all())
