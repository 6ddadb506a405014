"""The TOML config loader: one generic walk over the settings classes' fields (fields.py).

Every mistake is reported with the config file, the model and the key, because a server that
starts with a silently ignored typo is worse than one that refuses to start. Rules that tie several
keys together are explicit functions below (``_RULES``), run after the keys are read one by one.
"""

from __future__ import annotations

import contextlib
import tomllib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import attrs

from iskander.config.fields import BadValue, keys_of, settings_of
from iskander.config.settings import (
    BACKEND_OPTIONS,
    DynamicBatching,
    ModelSettings,
    ObservabilitySettings,
    ServerSettings,
    Settings,
)
from iskander.errors import ConfigError

T = TypeVar("T")

# Every key a [[models]] table may hold, whatever its backend: a key outside this set is a typo.
MODEL_KEYS = keys_of(ModelSettings).union(*(keys_of(cls) for cls in BACKEND_OPTIONS.values()))


class _Invalid(Exception):
    """A bad key inside a table; the caller adds the file, the model and the table's prefix."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key
        self.message = message


class _Where:
    """Builds 'file, model, key' prefixes for config errors."""

    def __init__(self, source: Path | str, model: str | None = None) -> None:
        self.source = str(source)
        self.model = model

    def error(self, key: str | None, message: str) -> ConfigError:
        parts = [f"config {self.source}"]
        if self.model is not None:
            parts.append(f"model '{self.model}'")
        if key is not None:
            parts.append(f"key '{key}'")
        return ConfigError(", ".join(parts) + ": " + message)

    @contextlib.contextmanager
    def reporting(self, prefix: str = "") -> Iterator[None]:
        """Turns an _Invalid raised inside into this place's ConfigError."""
        try:
            yield
        except _Invalid as exc:
            raise self.error(prefix + exc.key, exc.message) from None


_KIND_NAMES = {str: "a string", int: "an integer", bool: "a boolean", float: "a number", list: "a list", dict: "a table"}


def _check_type(key: str, value: Any, kinds: tuple[type, ...]) -> None:
    expected = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
    # bool is an int subclass in Python; a TOML `true` is never a valid thread count.
    if isinstance(value, bool) and bool not in kinds:
        raise _Invalid(key, f"expected {expected}, got boolean {value!r}")
    if not isinstance(value, kinds):
        raise _Invalid(key, f"expected {expected}, got {type(value).__name__} {value!r}")


def _refuse_unknown(table: dict[str, Any], known: Iterable[str]) -> None:
    names = sorted(known)
    unknown = sorted(set(table) - set(names))
    if unknown:
        raise _Invalid(unknown[0], f"unknown key (known keys: {', '.join(names)})")


def _read(cls: type, table: dict[str, Any], base: Path, only: Iterable[str] | None = None) -> dict[str, Any]:
    """The checked values of ``cls``'s keys in ``table`` (defaults for missing ones), by field name."""
    values: dict[str, Any] = {}
    for key, field, meta in settings_of(cls):
        if only is not None and key not in only:
            continue
        if key not in table:
            if meta.required is not None:
                raise _Invalid(key, meta.required)
            default = field.default
            values[field.name] = default.factory() if isinstance(default, attrs.Factory) else default
            continue
        value = table[key]
        if meta.table is not None:
            values[field.name] = _nested(key, value, meta.table, base)
            continue
        _check_type(key, value, meta.toml)
        if meta.check is not None:
            try:
                value = meta.check(value)
            except BadValue as exc:
                raise _Invalid(key, str(exc)) from None
        if float in meta.toml:
            value = float(value)
        if meta.path:
            value = (base / value).resolve() if value else None
        values[field.name] = value
    return values


def _nested(key: str, value: Any, cls: type[T], base: Path) -> T:
    if not isinstance(value, dict):
        first, field, _ = settings_of(cls)[0]
        raise _Invalid(key, f"must be a table, e.g. {key} = {{ {first} = {field.default!r} }}")
    try:
        return _build(cls, value, base)
    except _Invalid as exc:
        raise _Invalid(f"{key}.{exc.key}", exc.message) from None


def _build(cls: type[T], table: dict[str, Any], base: Path) -> T:
    _refuse_unknown(table, keys_of(cls))
    values = _read(cls, table, base)
    rule = _RULES.get(cls)
    if rule is not None:
        rule(values)
    return cls(**values)


# --- rules across keys ----------------------------------------------------------------------------

def _batching_rule(values: dict[str, Any]) -> None:
    rows, preferred = values["max_batch_rows"], values["preferred_batch_rows"]
    if not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= rows for p in preferred):
        raise _Invalid("preferred_batch_rows", f"must be integers in 1..max_batch_rows ({rows}), got {preferred}")
    values["preferred_batch_rows"] = tuple(sorted(preferred))


def _server_rule(values: dict[str, Any]) -> None:
    if bool(values["tls_cert"]) != bool(values["tls_key"]):
        raise _Invalid("tls_cert", "tls_cert and tls_key go together")
    if values["tls_client_ca"] and not values["tls_cert"]:
        raise _Invalid("tls_client_ca", "mutual TLS needs tls_cert and tls_key too")
    rpcs, streams = values["max_concurrent_rpcs"], values["max_concurrent_streams"]
    if rpcs and (not streams or streams >= rpcs):
        raise _Invalid("max_concurrent_streams",
                       f"must be >= 1 and below max_concurrent_rpcs ({rpcs}) so that streams cannot hold every "
                       f"slot, got {streams}")


_RULES: dict[type, Callable[[dict[str, Any]], None]] = {DynamicBatching: _batching_rule, ServerSettings: _server_rule}


# --- tables ---------------------------------------------------------------------------------------

def _parse_model(table: Any, index: int, base: Path, source: Path | str) -> ModelSettings:
    where = _Where(source, f"#{index + 1}")
    if not isinstance(table, dict):
        raise where.error(None, "each [[models]] entry must be a table")
    with where.reporting():
        name = _read(ModelSettings, table, base, only=("name",))["name"]
    where = _Where(source, name)  # later errors name the model
    with where.reporting():
        _refuse_unknown(table, MODEL_KEYS)
        backend = _read(ModelSettings, table, base, only=("backend",))["backend"]
        options_type = BACKEND_OPTIONS[backend]
        # Another backend's key would be silently ignored: refuse it, naming who reads it.
        foreign = sorted(set(table) - keys_of(ModelSettings) - keys_of(options_type))
        if foreign:
            owners = " or ".join(f"'{b}'" for b, cls in BACKEND_OPTIONS.items() if foreign[0] in keys_of(cls))
            raise _Invalid(foreign[0], f"applies to backend {owners} only; this model has backend '{backend}'")
        values = _read(ModelSettings, table, base)
        options = _build(options_type, {k: v for k, v in table.items() if k in keys_of(options_type)}, base)
    return ModelSettings(**values, options=options)


def _parse_table(cls: type[T], name: str, table: Any, source: Path | str, base: Path) -> T:
    where = _Where(source)
    if not isinstance(table, dict):
        raise where.error(name, "must be a table")
    with where.reporting(prefix=f"{name}."):
        return _build(cls, table, base)


def parse_config(data: dict[str, Any], source: Path | str, base: Path) -> Settings:
    where = _Where(source)
    unknown = sorted(set(data) - {"server", "models", "observability"})
    if unknown:
        raise where.error(unknown[0], "unknown top-level key (expected [server], [observability] and [[models]])")
    server = _parse_table(ServerSettings, "server", data.get("server", {}), source, base)
    observability = _parse_table(ObservabilitySettings, "observability", data.get("observability", {}), source, base)
    raw_models = data.get("models", [])
    if not isinstance(raw_models, list) or not raw_models:
        raise where.error("models", "at least one [[models]] table is required")
    models = tuple(_parse_model(t, i, base, source) for i, t in enumerate(raw_models))
    seen: set[str] = set()
    for m in models:
        if m.key in seen:
            raise _Where(source, m.name).error("version", f"version {m.version} is configured twice")
        seen.add(m.key)
    return Settings(server=server, models=models, source=Path(source), observability=observability)


def load_config(path: Path | str) -> Settings:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"config {path}: cannot read: {exc.strerror or exc}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config {path}: invalid TOML: {exc}") from None
    return parse_config(data, path, path.resolve().parent)


def default_config_path() -> Path:
    """The demo model set shipped inside the package (served when no --config is given)."""
    return Path(__file__).resolve().parents[1] / "demo" / "config.toml"
