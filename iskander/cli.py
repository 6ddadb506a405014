"""Command line: ``python -m iskander [--config FILE] [--host H] [--flight-port P] [--grpc-port Q] [...]``."""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
from pathlib import Path

import attrs
import click

from iskander.errors import ConfigError
from iskander.observability.logs import setup_logging
from iskander.config.loader import default_config_path, load_config
from iskander.config.settings import DEFAULT_METRICS_PORT, LOG_FORMATS, Settings


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None,
              help="TOML config with [[models]] tables. Default: the demo model set shipped in the package.")
@click.option("--host", default=None, help="Address both frontends bind to. [default: 127.0.0.1]")
@click.option("--flight-port", type=click.IntRange(0, 65535), default=None,
              help="Arrow Flight port (0 = any free port). [default: 50051]")
@click.option("--grpc-port", type=click.IntRange(0, 65535), default=None,
              help="OIP v2 / Triton gRPC port (0 = any free port). [default: 8001]")
@click.option("--tls-cert", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="PEM certificate chain: serve both frontends over TLS (with --tls-key).")
@click.option("--tls-key", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="PEM private key for --tls-cert.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help=f"Serve Prometheus metrics at http://HOST:PORT/metrics (0 = any free port; Triton uses "
                   f"{DEFAULT_METRICS_PORT}). [default: off]")
@click.option("--otlp-endpoint", default=None,
              help="Send traces and metrics over OTLP/gRPC to this collector, e.g. http://127.0.0.1:4317. "
                   "[default: off]")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, help="debug logs one line per request; warning and up, one per failed request.")
@click.option("--log-format", type=click.Choice(LOG_FORMATS), default=None,
              help="text, or json (one object per line). [default: text, or [observability] log_format]")
@click.option("--check", is_flag=True, default=False,
              help="Load the config and every model, print each model's state, and exit (0 if all loaded, "
                   "1 otherwise) without binding a port: for CI and container builds.")
def main(config_path: Path | None, host: str | None, flight_port: int | None, grpc_port: int | None,
         tls_cert: Path | None, tls_key: Path | None, metrics_port: int | None, otlp_endpoint: str | None,
         log_level: str, log_format: str | None, check: bool) -> None:
    """Serve ONNX models over Arrow Flight and KServe OIP v2 gRPC from one process."""
    # `kill -USR1 <pid>` writes every thread's stack to stderr: for diagnosing a stuck server
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    setup_logging(log_level, log_format or "text")
    try:
        settings = load_config(config_path or default_config_path())
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if log_format is None and settings.observability.log_format != "text":
        setup_logging(log_level, settings.observability.log_format)
    observability = {k: v for k, v in (("metrics_port", metrics_port), ("otlp_endpoint", otlp_endpoint))
                     if v is not None}
    settings = attrs.evolve(settings, observability=attrs.evolve(settings.observability, **observability))
    if bool(tls_cert) != bool(tls_key):
        raise click.UsageError("--tls-cert and --tls-key go together")
    overrides = {k: v for k, v in (("host", host), ("flight_port", flight_port), ("grpc_port", grpc_port),
                                   ("tls_cert", tls_cert and tls_cert.resolve()),
                                   ("tls_key", tls_key and tls_key.resolve())) if v is not None}
    settings = attrs.evolve(settings, server=attrs.evolve(settings.server, **overrides))

    if check:
        sys.exit(check_models(settings))

    from iskander.server import IskanderServer  # heavy imports only once the config is known good

    try:
        clean = IskanderServer(settings).run()
    except OSError as exc:
        raise click.ClickException(f"cannot start: {exc}") from None
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    if not clean:
        # Threads still blocked on open client streams would keep the interpreter alive; the grace
        # period is over, so end the process now (exit 0: this is the requested shutdown).
        logging.shutdown()
        sys.stdout.flush()
        os._exit(0)


def check_models(settings: Settings) -> int:
    """Load every configured model as the server would, print one line per version; 0 if all loaded."""
    from iskander.core.model import ModelState
    from iskander.core.registry import ModelRegistry

    registry = ModelRegistry(settings.models)
    registry.load_all()
    try:
        entries = registry.all()
        for e in entries:
            reason = f": {e.reason}" if e.reason else ""
            click.echo(f"{e.name} version {e.version}: {e.state.value}{reason}")
        return 0 if all(e.state is ModelState.READY for e in entries) else 1
    finally:
        registry.close()
