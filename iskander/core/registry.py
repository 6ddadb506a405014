"""Model registry: every configured model version with its state, loaded once and shared.

One model failing to load is recorded with its reason and never stops the others. Entries are
replaced whole (never mutated), so a reader always sees a consistent entry: a ``ReadyModel`` or
a ``NotReady`` (core/model.py).
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterable

from iskander.arrow.types import type_name
from iskander.backends import create_backend, signature_from_manifest
from iskander.config.settings import ModelSettings
from iskander.contract import compile_contract
from iskander.contract.manifest import declared_signature, load_manifest
from iskander.core.batcher import Batcher
from iskander.core.model import Limits, ModelState, ModelVersion, NotReady, ReadyModel
from iskander.errors import ConfigError, ModelLoadError, ModelNotFound, ModelNotReady
from iskander.observability.stats import ModelStats
from iskander.text import clip

log = logging.getLogger("iskander.registry")


_VERSION = re.compile(r"0|[1-9][0-9]{0,17}")  # [0-9] is ASCII only, unlike \d; 18 digits fit an int64


def is_version_string(text: str) -> bool:
    """Whether a client's version string is canonical: "0", or digits without a leading zero."""
    return _VERSION.fullmatch(text) is not None


def load_model(settings: ModelSettings, stats: ModelStats | None = None, defaults: Limits = Limits()) -> ModelVersion:
    """Load one model version; failures become an UNAVAILABLE entry with a reason. ``defaults``
    are the server's limits for what the model does not set itself."""
    stats = stats if stats is not None else ModelStats(settings.name, str(settings.version))
    try:
        manifest_path = settings.manifest_path
        has_manifest = settings.manifest is not None or manifest_path.is_file()
        if signature_from_manifest(settings.backend):
            if not has_manifest:
                raise ModelLoadError(
                    f"{settings.backend} model {settings.path.name} needs a manifest ({manifest_path.name} not found): "
                    "it has no graph to derive its input and output columns from"
                )
            manifest = load_manifest(manifest_path, settings.name)
            backend = create_backend(settings, declared_signature(manifest, settings.backend))
        else:
            backend = create_backend(settings)
            manifest = load_manifest(manifest_path, settings.name) if has_manifest else None
        try:
            contract = compile_contract(settings.name, manifest, backend.inputs, backend.outputs, backend.kind)
        except ModelLoadError:
            backend.close()  # a python model's worker processes are already running
            raise
    except (ModelLoadError, ConfigError) as exc:
        return NotReady(settings, ModelState.UNAVAILABLE, stats, reason=str(exc))
    batcher = None
    if settings.dynamic_batching is not None:
        batcher = Batcher(
            backend, contract.run_tensors(contract.outputs), settings.dynamic_batching, settings.name,
            workers=backend.instance_count,
        )
    return ReadyModel(settings, contract, backend, stats, defaults.for_model(settings), batcher)


class ModelRegistry:
    """Every configured model version. Only configured models can ever be loaded: load requests
    name a model, never a path. ``defaults`` are the server's per-request limits."""

    def __init__(self, models: Iterable[ModelSettings], defaults: Limits = Limits()) -> None:
        self.defaults = defaults
        self._lock = threading.Lock()
        self._entries: dict[str, dict[int, ModelVersion]] = {}
        self._load_locks: dict[str, threading.Lock] = {}
        self._listeners: list[Callable[[], None]] = []
        for m in models:
            stats = ModelStats(m.name, str(m.version))  # kept across reloads, as in Triton
            self._load_locks.setdefault(m.name, threading.Lock())
            self._entries.setdefault(m.name, {})[m.version] = NotReady(m, ModelState.LOADING, stats)

    def _load(self, old: ModelVersion) -> ModelVersion:
        return load_model(old.settings, old.stats, self.defaults)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call ``listener`` after any model changes state (health services subscribe)."""
        self._listeners.append(listener)

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    def load_all(self) -> None:
        for name in self.names():
            for entry in self.versions(name):
                self._store(self._load(entry))
        self._notify()

    def load(self, name: str) -> list[ModelVersion]:
        """(Re)load every configured version of ``name``. A version that was READY keeps serving
        until its replacement is ready, and stays if the replacement fails."""
        if name not in self._entries:
            raise ModelNotFound(
                f"model '{name}' is not in the server's configuration; only configured models can be loaded "
                f"(configured: {', '.join(self.names())})",
                model=name,
            )
        failed = []
        with self._load_locks[name]:
            for old in self.versions(name):
                if old.state is not ModelState.READY:
                    self._store(NotReady(old.settings, ModelState.LOADING, old.stats), quiet=True)
                    self._notify()
                new = self._load(old)
                if new.state is ModelState.READY or old.state is not ModelState.READY:
                    self._store(new)
                else:
                    log.error(
                        "model %s version %s: reload failed, the loaded version keeps serving: %s",
                        new.name, new.version, new.reason,
                    )
                if new.state is not ModelState.READY:
                    failed.append(new)
        self._notify()
        if failed:
            raise ModelNotReady(
                f"model '{name}' version {failed[0].version} failed to load: {failed[0].reason}",
                model=name, version=failed[0].version,
            )
        return self.versions(name)

    def unload(self, name: str) -> None:
        """Stop serving ``name``. Requests already running finish on the session they hold."""
        if name not in self._entries:
            raise ModelNotFound(f"unknown model '{name}'; served models: {', '.join(self.names())}", model=name)
        with self._load_locks[name]:
            for old in self.versions(name):
                self._store(NotReady(old.settings, ModelState.UNAVAILABLE, old.stats, "unloaded", unloaded=True),
                            quiet=True)
        log.info("model %s unloaded", name)
        self._notify()

    def _store(self, entry: ModelVersion, quiet: bool = False) -> None:
        with self._lock:
            # copy-on-write: readers iterate a dict that is never mutated under them
            versions = dict(self._entries[entry.name])
            old = versions.get(entry.settings.version)
            versions[entry.settings.version] = entry
            self._entries = {**self._entries, entry.name: versions}
        if isinstance(old, ReadyModel) and old is not entry:
            if old.batcher is not None:
                old.batcher.close()  # queued requests still run; later ones go to the new entry
            old.backend.close()  # requests already running finish; python workers stop after them
        if quiet:
            return
        if isinstance(entry, ReadyModel):
            cols = lambda schema: ", ".join(f"{f.name}: {type_name(f.type)}" for f in schema)  # noqa: E731
            log.info(
                "model %s version %s ready (%s) inputs [%s] -> outputs [%s]",
                entry.name, entry.version,
                "manifest" if entry.contract.from_manifest else f"derived from {entry.backend.kind} signature",
                cols(entry.contract.input_schema), cols(entry.contract.output_schema),
            )
        else:
            log.error(
                "model %s version %s (%s) failed to load: %s",
                entry.name, entry.version, entry.settings.path, entry.reason,
            )

    def close(self) -> None:
        """Release every loaded model (at server stop: python models' worker processes end)."""
        for entry in self.all():
            if isinstance(entry, ReadyModel):
                entry.backend.close()

    # --- lookups ----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self._entries)

    def versions(self, name: str) -> list[ModelVersion]:
        return [v for _, v in sorted(self._entries.get(name, {}).items())]

    def all(self) -> list[ModelVersion]:
        return [v for name in self.names() for v in self.versions(name)]

    def find(self, name: str, version: str | None = None) -> ModelVersion:
        """The entry for ``name``/``version`` whatever its state; the newest version when unset.

        A version is the canonical decimal text of a configured number: ASCII digits, no sign,
        no spaces, no leading zero (" 1", "+1", "01", "1 " and a fullwidth "１" name no version,
        although Python's int() accepts them all)."""
        versions = self._entries.get(name)
        if not versions:
            raise ModelNotFound(
                f"unknown model '{clip(name)}'; served models: {', '.join(self.names()) or '(none)'}",
                model=clip(name),
            )
        if not version:
            for key in sorted(versions, reverse=True):  # the newest READY version, else the newest
                if isinstance(versions[key], ReadyModel):
                    return versions[key]
            return versions[max(versions)]
        entry = versions.get(int(version)) if is_version_string(version) else None
        if entry is None:
            raise ModelNotFound(
                f"model '{name}' has no version '{clip(version)}'; versions: "
                f"{', '.join(str(k) for k in sorted(versions))}",
                model=name, version=clip(version),
            )
        return entry

    def get_ready(self, name: str, version: str | None = None) -> ReadyModel:
        entry = self.find(name, version)
        if not isinstance(entry, ReadyModel):
            what = f"model '{name}' version {entry.version}"
            reason = f": {entry.reason}" if entry.reason else ""
            raise ModelNotReady(
                f"{what} is not ready ({entry.state.value.lower()}){reason}",
                model=name, version=entry.version, state=entry.state.value,
            )
        return entry

    def all_ready(self) -> bool:
        """Every model that should serve does (models unloaded on request do not count)."""
        return all(v.state is ModelState.READY for v in self.all() if not v.unloaded)
