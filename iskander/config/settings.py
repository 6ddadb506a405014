"""Typed, immutable settings and the TOML config loader.

The Rust project's ``[[models]]`` keys are accepted unchanged. Every mistake is reported with the
config file, the model and the key, because a server that starts with a silently ignored typo is
worse than one that refuses to start.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import attrs

from iskander.backends import BACKEND_NAMES
from iskander.errors import ConfigError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_FLIGHT_PORT = 50051  # as the Rust project
DEFAULT_GRPC_PORT = 8001  # Triton's gRPC port
DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024 * 1024
DEFAULT_METRICS_PORT = 8002  # Triton's metrics port; used only when metrics are asked for
LOG_FORMATS = ("text", "json")
MANIFEST_SUFFIX = ".manifest.toml"

# Rust/ort names and ONNX Runtime's own names for the same four levels.
OPTIMIZATION_LEVELS = {
    "disable": "disable",
    "level1": "basic",
    "basic": "basic",
    "level2": "extended",
    "extended": "extended",
    "level3": "all",
    "all": "all",
}

EXECUTION_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dnnl": "DnnlExecutionProvider",
}


@attrs.frozen
class DynamicBatching:
    """Requests for one model, from both frontends, queue together and run as one onnxruntime call."""

    max_batch_rows: int = 1024  # rows in one merged execution
    max_queue_delay_us: int = 500  # longest a request waits for others to join it
    preferred_batch_rows: tuple[int, ...] = ()  # run at once when the queued rows reach one of these


@attrs.frozen
class ModelSettings:
    name: str
    path: Path
    backend: str = "onnx"
    version: int = 1
    manifest: Path | None = None
    execution_providers: tuple[str, ...] = ("cpu",)
    intra_threads: int = 1
    inter_threads: int = 1
    optimization_level: str = "all"
    parallel_execution: bool = False
    memory_pattern: bool = True
    instances: int = 1
    max_batch_size: int = 0  # rows per request; 0 = no limit (advertised to Triton clients as 2^31-1)
    dynamic_batching: DynamicBatching | None = None  # off unless configured
    max_inflight: int | None = None  # requests running or queued at once; None = the server's default
    max_message_bytes: int | None = None  # per-model override of the server's request size limit
    max_stream_rows: int | None = None  # per-model override of the server's rows-per-stream limit
    # backend = "python" / "sklearn" only (docs/python_models.md); parameters: "python" only
    workers: int = 1  # worker processes running the model
    parameters: dict[str, Any] = attrs.field(factory=dict, hash=False)  # handed to Model.load(context)
    worker_timeout_s: float = 60.0  # a request running longer kills and replaces its worker

    @property
    def manifest_path(self) -> Path:
        """The manifest given in config, else ``<model stem>.manifest.toml`` next to the model."""
        if self.manifest is not None:
            return self.manifest
        return self.path.with_name(self.path.stem + MANIFEST_SUFFIX)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"


@attrs.frozen
class ServerSettings:
    host: str = DEFAULT_HOST
    flight_port: int = DEFAULT_FLIGHT_PORT
    grpc_port: int = DEFAULT_GRPC_PORT
    grpc_workers: int = 16
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_seconds: float = 5.0
    request_timeout_s: float = 0.0  # server-side deadline for every request; 0 = none (clients' own deadlines still apply)
    auth_tokens: tuple[str, ...] = ()  # bearer tokens; with ISKANDER_AUTH_TOKENS and auth_token_file: auth is on
    auth_token_file: Path | None = None
    auth_health_open: bool = True  # grpc.health.v1 answers without a token (Kubernetes probes)
    tls_cert: Path | None = None  # PEM certificate chain; with tls_key, both frontends speak TLS
    tls_key: Path | None = None
    tls_client_ca: Path | None = None  # PEM CA bundle: when set, clients must present a certificate it signed (mTLS)
    max_inflight: int = 0  # default per-model bound on requests running or queued at once; 0 = unbounded
    max_stream_rows: int = 0  # rows one DoExchange / ModelStreamInfer stream may carry in total; 0 = unbounded
    max_batch_size: int = 0  # default rows per request for models that do not set their own; 0 = unbounded
    # Transport admission, per frontend (docs/security.md): inference calls (OIP ModelInfer and
    # ModelStreamInfer, Flight DoExchange) beyond these are refused before their payload is read.
    # Health, liveness, readiness, metadata and actions are never counted, so probes always answer.
    max_concurrent_rpcs: int = 128  # inference calls (unary and streams) open at once; 0 = unbounded
    max_concurrent_streams: int = 32  # of those, streams; kept below max_concurrent_rpcs so unary calls always get in


@attrs.frozen
class ObservabilitySettings:
    """``[observability]``: everything here is off unless set (docs/observability.md)."""

    metrics_port: int | None = None  # Prometheus /metrics on this port (0 = any free port); None = off
    metrics_host: str | None = None  # address for /metrics; default: the server's host
    otlp_endpoint: str | None = None  # OTLP/gRPC collector, e.g. "http://127.0.0.1:4317": traces and metrics
    otlp_insecure: bool = True  # plaintext gRPC to the collector (a local agent); false = TLS
    otlp_metrics_interval_s: float = 60.0  # how often metrics are pushed over OTLP
    trace_sample_ratio: float = 1.0  # share of traces started here that are sampled (clients' own flag wins)
    service_name: str = "iskander"  # OpenTelemetry resource service.name
    log_format: str = "text"  # "text" or "json" (one JSON object per line)
    metrics_auth_token: str | None = None  # when set, /metrics needs 'authorization: Bearer <token>'


@attrs.frozen
class Settings:
    server: ServerSettings
    models: tuple[ModelSettings, ...]
    observability: ObservabilitySettings = ObservabilitySettings()
    source: Path | None = None  # the config file, for messages


# --- loading -------------------------------------------------------------------------------------

_MODEL_KEYS = {
    "name", "backend", "path", "version", "manifest", "execution_providers", "intra_threads",
    "inter_threads", "optimization_level", "parallel_execution", "memory_pattern", "instances",
    "max_batch_size", "dynamic_batching", "max_inflight", "max_message_bytes", "max_stream_rows",
    "workers", "parameters", "worker_timeout_s",
}
# Keys that only some backends read: given to another, they would be silently ignored, so they are refused.
_BACKEND_ONLY_KEYS = {
    **dict.fromkeys(("execution_providers", "intra_threads", "inter_threads", "optimization_level",
                     "parallel_execution", "memory_pattern", "instances"), ("onnx",)),
    **dict.fromkeys(("workers", "worker_timeout_s"), ("python", "sklearn")),
    "parameters": ("python",),
}
_BATCHING_KEYS = {"max_batch_rows", "max_queue_delay_us", "preferred_batch_rows"}
_SERVER_KEYS = {
    "host", "flight_port", "grpc_port", "grpc_workers", "max_message_bytes", "grace_seconds", "request_timeout_s",
    "auth_tokens", "auth_token_file", "auth_health_open", "tls_cert", "tls_key", "tls_client_ca", "max_inflight",
    "max_stream_rows", "max_batch_size", "max_concurrent_rpcs", "max_concurrent_streams",
}


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


def _typed(where: _Where, table: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any) -> Any:
    if key not in table:
        return default
    value = table[key]
    # bool is an int subclass in Python; a TOML `true` is never a valid thread count.
    if isinstance(value, bool) and kind is not bool and not (isinstance(kind, tuple) and bool in kind):
        raise where.error(key, f"expected {_kind_name(kind)}, got boolean {value!r}")
    if not isinstance(value, kind):
        raise where.error(key, f"expected {_kind_name(kind)}, got {type(value).__name__} {value!r}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", bool: "a boolean", float: "a number", list: "a list", dict: "a table"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def _nonneg(where: _Where, key: str, value: int) -> int:
    if value < 0:
        raise where.error(key, f"must be >= 0, got {value}")
    return value


def _parse_model(table: Any, index: int, base: Path, source: Path | str) -> ModelSettings:
    where = _Where(source, f"#{index + 1}")
    if not isinstance(table, dict):
        raise where.error(None, "each [[models]] entry must be a table")
    name = _typed(where, table, "name", str, None)
    if not name:
        raise where.error("name", "is required and must be a non-empty string")
    if "/" in name or name.strip() != name:
        raise where.error("name", f"must not contain '/' or surrounding spaces, got {name!r}")
    where = _Where(source, name)
    unknown = sorted(set(table) - _MODEL_KEYS)
    if unknown:
        raise where.error(unknown[0], f"unknown key (known keys: {', '.join(sorted(_MODEL_KEYS))})")

    backend = _typed(where, table, "backend", str, "onnx")
    if backend not in BACKEND_NAMES:
        supported = ", ".join(repr(b) for b in BACKEND_NAMES)
        raise where.error("backend", f"unsupported backend {backend!r}; supported: {supported}")
    foreign = sorted(k for k, owners in _BACKEND_ONLY_KEYS.items() if k in table and backend not in owners)
    if foreign:
        owners = " or ".join(f"'{o}'" for o in _BACKEND_ONLY_KEYS[foreign[0]])
        raise where.error(foreign[0], f"applies to backend {owners} only; this model has backend '{backend}'")
    raw_path = _typed(where, table, "path", str, None)
    if not raw_path:
        raise where.error("path", "is required (the .onnx file, the .py file of a python model, or an sklearn model's joblib file)")
    path = (base / raw_path).resolve()
    raw_manifest = _typed(where, table, "manifest", str, None)
    manifest = (base / raw_manifest).resolve() if raw_manifest else None

    version = _typed(where, table, "version", (int, str), 1)
    try:
        version = int(version)
    except ValueError:
        raise where.error("version", f"must be a positive integer, got {version!r}") from None
    if version < 1:
        raise where.error("version", f"must be a positive integer, got {version}")

    eps = _typed(where, table, "execution_providers", list, ["cpu"])
    providers = []
    for ep in eps:
        if not isinstance(ep, str) or ep.lower() not in EXECUTION_PROVIDERS:
            raise where.error(
                "execution_providers",
                f"unknown provider {ep!r}; known: {', '.join(EXECUTION_PROVIDERS)}",
            )
        providers.append(ep.lower())
    if not providers:
        raise where.error("execution_providers", "must name at least one provider")

    level = _typed(where, table, "optimization_level", str, "level3")
    if level.lower() not in OPTIMIZATION_LEVELS:
        raise where.error(
            "optimization_level", f"unknown level {level!r}; known: {', '.join(OPTIMIZATION_LEVELS)}"
        )
    instances = _typed(where, table, "instances", int, 1)
    if instances < 1:
        raise where.error("instances", f"must be >= 1, got {instances}")
    workers = _typed(where, table, "workers", int, 1)
    if workers < 1:
        raise where.error("workers", f"must be >= 1, got {workers}")
    parameters = _typed(where, table, "parameters", dict, {})
    worker_timeout = _typed(where, table, "worker_timeout_s", (int, float), 60.0)
    if worker_timeout <= 0:
        raise where.error("worker_timeout_s", f"must be > 0, got {worker_timeout}")

    return ModelSettings(
        name=name,
        path=path,
        backend=backend,
        version=version,
        manifest=manifest,
        execution_providers=tuple(providers),
        intra_threads=_nonneg(where, "intra_threads", _typed(where, table, "intra_threads", int, 1)),
        inter_threads=_nonneg(where, "inter_threads", _typed(where, table, "inter_threads", int, 1)),
        optimization_level=OPTIMIZATION_LEVELS[level.lower()],
        parallel_execution=_typed(where, table, "parallel_execution", bool, False),
        memory_pattern=_typed(where, table, "memory_pattern", bool, True),
        instances=instances,
        max_batch_size=_nonneg(where, "max_batch_size", _typed(where, table, "max_batch_size", int, 0)),
        dynamic_batching=_parse_batching(where, table.get("dynamic_batching")),
        max_inflight=_nonneg(where, "max_inflight", _typed(where, table, "max_inflight", int, 0)) or None,
        max_message_bytes=_nonneg(where, "max_message_bytes", _typed(where, table, "max_message_bytes", int, 0)) or None,
        max_stream_rows=_nonneg(where, "max_stream_rows", _typed(where, table, "max_stream_rows", int, 0)) or None,
        workers=workers,
        parameters=parameters,
        worker_timeout_s=float(worker_timeout),
    )


def _parse_batching(where: _Where, table: Any) -> DynamicBatching | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise where.error("dynamic_batching", "must be a table, e.g. dynamic_batching = { max_queue_delay_us = 500 }")
    unknown = sorted(set(table) - _BATCHING_KEYS)
    if unknown:
        raise where.error(
            f"dynamic_batching.{unknown[0]}", f"unknown key (known keys: {', '.join(sorted(_BATCHING_KEYS))})"
        )
    d = DynamicBatching()
    rows = _typed(where, table, "max_batch_rows", int, d.max_batch_rows)
    if rows < 1:
        raise where.error("dynamic_batching.max_batch_rows", f"must be >= 1, got {rows}")
    delay = _typed(where, table, "max_queue_delay_us", int, d.max_queue_delay_us)
    if delay < 0:
        raise where.error("dynamic_batching.max_queue_delay_us", f"must be >= 0, got {delay}")
    preferred = _typed(where, table, "preferred_batch_rows", list, [])
    if not all(isinstance(p, int) and not isinstance(p, bool) and 1 <= p <= rows for p in preferred):
        raise where.error(
            "dynamic_batching.preferred_batch_rows", f"must be integers in 1..max_batch_rows ({rows}), got {preferred}"
        )
    return DynamicBatching(max_batch_rows=rows, max_queue_delay_us=delay, preferred_batch_rows=tuple(sorted(preferred)))


def _parse_server(table: Any, source: Path | str, base: Path | None = None) -> ServerSettings:
    where = _Where(source)
    if not isinstance(table, dict):
        raise where.error("server", "must be a table")
    unknown = sorted(set(table) - _SERVER_KEYS)
    if unknown:
        raise where.error(f"server.{unknown[0]}", f"unknown key (known keys: {', '.join(sorted(_SERVER_KEYS))})")
    d = ServerSettings()
    ports = {}
    for key in ("flight_port", "grpc_port"):
        port = _typed(where, table, key, int, getattr(d, key))
        if not 0 <= port <= 65535:
            raise where.error(f"server.{key}", f"must be a port number 0..65535, got {port}")
        ports[key] = port
    workers = _typed(where, table, "grpc_workers", int, d.grpc_workers)
    if workers < 1:
        raise where.error("server.grpc_workers", f"must be >= 1, got {workers}")
    max_bytes = _typed(where, table, "max_message_bytes", int, d.max_message_bytes)
    if not 1024 <= max_bytes <= 2**31 - 1:
        raise where.error("server.max_message_bytes", f"must be in 1024..2147483647, got {max_bytes}")
    grace = _typed(where, table, "grace_seconds", (int, float), d.grace_seconds)
    if grace < 0:
        raise where.error("server.grace_seconds", f"must be >= 0, got {grace}")
    timeout = _typed(where, table, "request_timeout_s", (int, float), d.request_timeout_s)
    if timeout < 0:
        raise where.error("server.request_timeout_s", f"must be >= 0, got {timeout}")
    tokens = _typed(where, table, "auth_tokens", list, [])
    if not all(isinstance(t, str) and t.strip() for t in tokens):
        raise where.error("server.auth_tokens", "must be a list of non-empty strings")
    token_file = _typed(where, table, "auth_token_file", str, None)
    tls = {}
    for key in ("tls_cert", "tls_key", "tls_client_ca"):
        value = _typed(where, table, key, str, None)
        tls[key] = ((base or Path(".")) / value).resolve() if value else None
    if bool(tls["tls_cert"]) != bool(tls["tls_key"]):
        raise where.error("server.tls_cert", "tls_cert and tls_key go together")
    if tls["tls_client_ca"] and not tls["tls_cert"]:
        raise where.error("server.tls_client_ca", "mutual TLS needs tls_cert and tls_key too")
    limits = {}
    for key in ("max_inflight", "max_stream_rows", "max_batch_size", "max_concurrent_rpcs", "max_concurrent_streams"):
        value = _typed(where, table, key, int, getattr(d, key))
        if value < 0:
            raise where.error(f"server.{key}", f"must be >= 0, got {value}")
        limits[key] = value
    rpcs, streams = limits["max_concurrent_rpcs"], limits["max_concurrent_streams"]
    if rpcs and (not streams or streams >= rpcs):
        raise where.error("server.max_concurrent_streams",
                          f"must be >= 1 and below max_concurrent_rpcs ({rpcs}) so that streams cannot hold every "
                          f"slot, got {streams}")
    return ServerSettings(
        **tls,
        **limits,
        host=_typed(where, table, "host", str, d.host),
        auth_tokens=tuple(t.strip() for t in tokens),
        auth_token_file=((base or Path(".")) / token_file).resolve() if token_file else None,
        auth_health_open=_typed(where, table, "auth_health_open", bool, d.auth_health_open),
        grpc_workers=workers,
        max_message_bytes=max_bytes,
        grace_seconds=float(grace),
        request_timeout_s=float(timeout),
        **ports,
    )


_OBSERVABILITY_KEYS = {
    "metrics_port", "metrics_host", "otlp_endpoint", "otlp_insecure", "otlp_metrics_interval_s",
    "trace_sample_ratio", "service_name", "log_format", "metrics_auth_token",
}


def _parse_observability(table: Any, source: Path | str) -> ObservabilitySettings:
    where = _Where(source)
    if not isinstance(table, dict):
        raise where.error("observability", "must be a table")
    unknown = sorted(set(table) - _OBSERVABILITY_KEYS)
    if unknown:
        raise where.error(f"observability.{unknown[0]}",
                          f"unknown key (known keys: {', '.join(sorted(_OBSERVABILITY_KEYS))})")
    d = ObservabilitySettings()
    port = _typed(where, table, "metrics_port", int, d.metrics_port)
    if port is not None and not 0 <= port <= 65535:
        raise where.error("observability.metrics_port", f"must be a port number 0..65535, got {port}")
    endpoint = _typed(where, table, "otlp_endpoint", str, d.otlp_endpoint) or None
    interval = _typed(where, table, "otlp_metrics_interval_s", (int, float), d.otlp_metrics_interval_s)
    if interval <= 0:
        raise where.error("observability.otlp_metrics_interval_s", f"must be > 0, got {interval}")
    ratio = _typed(where, table, "trace_sample_ratio", (int, float), d.trace_sample_ratio)
    if not 0 <= ratio <= 1:
        raise where.error("observability.trace_sample_ratio", f"must be in 0..1, got {ratio}")
    log_format = _typed(where, table, "log_format", str, d.log_format)
    if log_format not in LOG_FORMATS:
        raise where.error("observability.log_format", f"must be one of {', '.join(LOG_FORMATS)}, got '{log_format}'")
    return ObservabilitySettings(
        metrics_port=port,
        metrics_host=_typed(where, table, "metrics_host", str, d.metrics_host),
        otlp_endpoint=endpoint,
        otlp_insecure=_typed(where, table, "otlp_insecure", bool, d.otlp_insecure),
        otlp_metrics_interval_s=float(interval),
        trace_sample_ratio=float(ratio),
        service_name=_typed(where, table, "service_name", str, d.service_name),
        log_format=log_format,
        metrics_auth_token=_typed(where, table, "metrics_auth_token", str, d.metrics_auth_token) or None,
    )


def parse_config(data: dict[str, Any], source: Path | str, base: Path) -> Settings:
    where = _Where(source)
    unknown = sorted(set(data) - {"server", "models", "observability"})
    if unknown:
        raise where.error(unknown[0], "unknown top-level key (expected [server], [observability] and [[models]])")
    server = _parse_server(data.get("server", {}), source, base)
    observability = _parse_observability(data.get("observability", {}), source)
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
