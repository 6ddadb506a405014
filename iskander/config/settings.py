"""Typed, immutable settings: each config key is declared once, as a field here (see fields.py).

The Rust project's flat ``[[models]]`` keys are accepted unchanged; the loader (loader.py) routes a
model's backend-specific keys to that backend's options class (``BACKEND_OPTIONS``), so an ONNX
model carries ``OnnxOptions`` and a python or sklearn model ``WorkerOptions``, never both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from iskander.config.fields import NUMBER, BadValue, above, at_least, none_if_empty, one_of, port, setting, then, within
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


def _providers(names: list[Any]) -> tuple[str, ...]:
    for ep in names:
        if not isinstance(ep, str) or ep.lower() not in EXECUTION_PROVIDERS:
            raise BadValue(f"unknown provider {ep!r}; known: {', '.join(EXECUTION_PROVIDERS)}")
    if not names:
        raise BadValue("must name at least one provider")
    return tuple(ep.lower() for ep in names)


def _optimization_level(level: str) -> str:
    if level.lower() not in OPTIMIZATION_LEVELS:
        raise BadValue(f"unknown level {level!r}; known: {', '.join(OPTIMIZATION_LEVELS)}")
    return OPTIMIZATION_LEVELS[level.lower()]


@attrs.frozen
class DynamicBatching:
    """Requests for one model, from both frontends, queue together and run as one backend call."""

    max_batch_rows: int = setting(1024, toml=int, check=at_least(1), doc="rows in one merged execution")
    max_queue_delay_us: int = setting(500, toml=int, check=at_least(0), doc="longest a request waits for others")
    # the loader checks the values against max_batch_rows and sorts them
    preferred_batch_rows: tuple[int, ...] = setting((), toml=list, doc="run at once when the queued rows reach one")


@attrs.frozen
class OnnxOptions:
    """``backend = "onnx"``: ONNX Runtime session options and the number of sessions."""

    execution_providers: tuple[str, ...] = setting(("cpu",), toml=list, check=_providers, doc="in order of preference")
    intra_threads: int = setting(1, toml=int, check=at_least(0), doc="intra_op_num_threads; 0 = ORT chooses")
    inter_threads: int = setting(1, toml=int, check=at_least(0), doc="inter_op_num_threads")
    optimization_level: str = setting("all", toml=str, check=_optimization_level, doc="stored as ORT's name")
    parallel_execution: bool = setting(False, toml=bool, doc="ORT_PARALLEL execution mode")
    memory_pattern: bool = setting(True, toml=bool, doc="enable_mem_pattern")
    instances: int = setting(1, toml=int, check=at_least(1), doc="sessions, used round-robin")


@attrs.frozen
class WorkerOptions:
    """``backend = "python"`` or ``"sklearn"``: the worker processes (docs/python_models.md)."""

    workers: int = setting(1, toml=int, check=at_least(1), doc="worker processes running the model")
    worker_timeout_s: float = setting(60.0, toml=NUMBER, check=above(0), doc="a request running longer kills its worker")


@attrs.frozen
class PythonOptions(WorkerOptions):
    """``backend = "python"``: an operator's model also gets ``parameters`` (sklearn's built-in one does not)."""

    parameters: dict[str, Any] = setting(factory=dict, toml=dict, hash=False, doc="handed to Model.load(context)")


BackendOptions = OnnxOptions | WorkerOptions
# The values of a model's ``backend`` key and the options each takes. A key of another backend's
# options is refused rather than ignored (loader.py).
BACKEND_OPTIONS: dict[str, type[OnnxOptions] | type[WorkerOptions]] = {
    "onnx": OnnxOptions,
    "python": PythonOptions,
    "sklearn": WorkerOptions,
}
BACKEND_NAMES = tuple(BACKEND_OPTIONS)


def _backend(name: str) -> str:
    if name not in BACKEND_OPTIONS:
        raise BadValue(f"unsupported backend {name!r}; supported: {', '.join(repr(b) for b in BACKEND_NAMES)}")
    return name


def _default_options(model: ModelSettings) -> BackendOptions:
    if model.backend not in BACKEND_OPTIONS:
        raise ConfigError(f"model '{model.name}': unsupported backend {model.backend!r}")
    return BACKEND_OPTIONS[model.backend]()


def _options_fit_backend(model: ModelSettings, _: attrs.Attribute, options: BackendOptions) -> None:
    expected = BACKEND_OPTIONS.get(model.backend)
    if type(options) is not expected:
        raise ConfigError(f"model '{model.name}': backend {model.backend!r} takes "
                          f"{getattr(expected, '__name__', 'no options')}, got {type(options).__name__}")


NAME_REQUIRED = "is required and must be a non-empty string"
PATH_REQUIRED = "is required (the .onnx file, the .py file of a python model, or an sklearn model's joblib file)"


def _model_name(name: str) -> str:
    if not name:
        raise BadValue(NAME_REQUIRED)
    if "/" in name or name.strip() != name:
        raise BadValue(f"must not contain '/' or surrounding spaces, got {name!r}")
    return name


def _required_path(path: str) -> str:
    if not path:
        raise BadValue(PATH_REQUIRED)
    return path


def _version(version: int | str) -> int:
    try:
        number = int(version)
    except ValueError:
        raise BadValue(f"must be a positive integer, got {version!r}") from None
    if number < 1:
        raise BadValue(f"must be a positive integer, got {number}")
    return number


_NOT_SET = then(at_least(0), none_if_empty)  # a per-model override; 0 = the server's value


@attrs.frozen
class ModelSettings:
    """One ``[[models]]`` table: one model version. ``options`` holds its backend's own keys."""

    name: str = setting(toml=str, check=_model_name, required=NAME_REQUIRED, doc="clients' model name")
    path: Path = setting(path=True, check=_required_path, required=PATH_REQUIRED, doc="the model file")
    backend: str = setting("onnx", toml=str, check=_backend, doc="a key of BACKEND_OPTIONS")
    version: int = setting(1, toml=(int, str), check=_version, doc="each (name, version) once")
    manifest: Path | None = setting(None, path=True, doc="default: <model stem>.manifest.toml beside the model")
    max_batch_size: int = setting(0, toml=int, check=at_least(0), doc="rows per request; 0 = no limit")
    dynamic_batching: DynamicBatching | None = setting(None, table=DynamicBatching, doc="off unless configured")
    max_inflight: int | None = setting(None, toml=int, check=_NOT_SET, doc="requests running or queued at once")
    max_message_bytes: int | None = setting(None, toml=int, check=_NOT_SET, doc="request size limit")
    max_stream_rows: int | None = setting(None, toml=int, check=_NOT_SET, doc="rows-per-stream limit")
    options: BackendOptions = attrs.field(
        default=attrs.Factory(_default_options, takes_self=True), validator=_options_fit_backend
    )

    @property
    def manifest_path(self) -> Path:
        """The manifest given in config, else ``<model stem>.manifest.toml`` next to the model."""
        if self.manifest is not None:
            return self.manifest
        return self.path.with_name(self.path.stem + MANIFEST_SUFFIX)

    @property
    def key(self) -> str:
        return f"{self.name}:{self.version}"


def _tokens(tokens: list[Any]) -> tuple[str, ...]:
    if not all(isinstance(t, str) and t.strip() for t in tokens):
        raise BadValue("must be a list of non-empty strings")
    return tuple(t.strip() for t in tokens)


@attrs.frozen
class ServerSettings:
    """``[server]``. The loader checks tls_cert/tls_key/tls_client_ca and the two admission bounds together."""

    host: str = setting(DEFAULT_HOST, toml=str, doc="bind address of both frontends")
    flight_port: int = setting(DEFAULT_FLIGHT_PORT, toml=int, check=port, doc="0 = any free port")
    grpc_port: int = setting(DEFAULT_GRPC_PORT, toml=int, check=port, doc="0 = any free port")
    grpc_workers: int = setting(16, toml=int, check=at_least(1), doc="threads running OIP inference")
    max_message_bytes: int = setting(DEFAULT_MAX_MESSAGE_BYTES, toml=int, check=within(1024, 2**31 - 1),
                                     doc="largest message on both frontends")
    grace_seconds: float = setting(5.0, toml=NUMBER, check=at_least(0), doc="drain time at shutdown")
    request_timeout_s: float = setting(0.0, toml=NUMBER, check=at_least(0),
                                       doc="server-side deadline for every request; 0 = none")
    auth_tokens: tuple[str, ...] = setting((), toml=list, check=_tokens,
                                           doc="bearer tokens; with ISKANDER_AUTH_TOKENS and auth_token_file")
    auth_token_file: Path | None = setting(None, path=True, doc="one token per line")
    auth_health_open: bool = setting(True, toml=bool, doc="grpc.health.v1 answers without a token (probes)")
    tls_cert: Path | None = setting(None, path=True, doc="PEM chain; with tls_key, both frontends speak TLS")
    tls_key: Path | None = setting(None, path=True, doc="PEM private key")
    tls_client_ca: Path | None = setting(None, path=True, doc="clients must present a certificate it signed")
    max_inflight: int = setting(0, toml=int, check=at_least(0), doc="default per-model bound; 0 = unbounded")
    max_stream_rows: int = setting(0, toml=int, check=at_least(0), doc="rows per stream; 0 = unbounded")
    max_batch_size: int = setting(0, toml=int, check=at_least(0), doc="default rows per request; 0 = unbounded")
    # Transport admission, per frontend (docs/security.md): inference calls beyond these are refused
    # before their payload is read; health, metadata and actions are never counted.
    max_concurrent_rpcs: int = setting(128, toml=int, check=at_least(0), doc="inference calls open at once")
    max_concurrent_streams: int = setting(32, toml=int, check=at_least(0),
                                          doc="of those, streams; below max_concurrent_rpcs so unary calls get in")


@attrs.frozen
class ObservabilitySettings:
    """``[observability]``: everything here is off unless set (docs/observability.md)."""

    metrics_port: int | None = setting(None, toml=int, check=port, doc="Prometheus /metrics; 0 = any free port")
    metrics_host: str | None = setting(None, toml=str, doc="address for /metrics; default: the server's host")
    otlp_endpoint: str | None = setting(None, toml=str, check=none_if_empty, doc="OTLP/gRPC collector")
    otlp_insecure: bool = setting(True, toml=bool, doc="plaintext gRPC to the collector; false = TLS")
    otlp_metrics_interval_s: float = setting(60.0, toml=NUMBER, check=above(0), doc="OTLP metrics push interval")
    trace_sample_ratio: float = setting(1.0, toml=NUMBER, check=within(0, 1), doc="share of root traces sampled")
    service_name: str = setting("iskander", toml=str, doc="OpenTelemetry resource service.name")
    log_format: str = setting("text", toml=str, check=one_of(LOG_FORMATS), doc="text or json (one object a line)")
    metrics_auth_token: str | None = setting(None, toml=str, check=none_if_empty, doc="/metrics needs this bearer")


@attrs.frozen
class Settings:
    server: ServerSettings
    models: tuple[ModelSettings, ...]
    observability: ObservabilitySettings = ObservabilitySettings()
    source: Path | None = None  # the config file, for messages
