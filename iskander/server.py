"""Process wiring: load the registry, start both frontends side by side, stop them cleanly."""

from __future__ import annotations

import logging
import signal
import threading
import time

from iskander.auth import TlsFiles, load_tokens
from iskander.config.settings import ObservabilitySettings, Settings
from iskander.core.control import ControlPlane
from iskander.core.dataplane import Dataplane, Inflight, server_version
from iskander.core.model import Limits, ModelState
from iskander.core.registry import ModelRegistry
from iskander.frontends.flight import make_flight_server
from iskander.frontends.flight_errors import hide_tracebacks
from iskander.frontends.oip_server import make_grpc_server, set_health
from iskander.observability.observer import Observer

log = logging.getLogger("iskander.server")


class IskanderServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        s = settings.server
        defaults = Limits(max_batch_size=s.max_batch_size, max_inflight=s.max_inflight,
                          max_message_bytes=s.max_message_bytes, max_stream_rows=s.max_stream_rows)
        self.registry = ModelRegistry(settings.models, defaults)
        inflight = Inflight()
        self.observer = _observer(settings.observability, self.registry, inflight)
        self.dataplane = Dataplane(self.registry, self.observer, inflight, s.request_timeout_s)
        self.control = ControlPlane(self.registry)
        self._stop = threading.Event()

    def start(self) -> tuple[int, int]:
        """Load models, bind both ports; returns the bound (flight_port, grpc_port)."""
        self.registry.load_all()
        s = self.settings.server
        auth = load_tokens(s.auth_tokens, s.auth_token_file)
        tls = TlsFiles(s.tls_cert, s.tls_key, s.tls_client_ca) if s.tls_cert and s.tls_key else None
        if tls is not None:
            log.info("TLS on for both frontends%s", " with client certificates (mTLS)" if tls.client_ca else "")
        if auth.enabled:
            log.info("bearer-token authentication on for both frontends%s",
                     " (grpc.health.v1 open)" if s.auth_health_open else "")
        self.grpc_server, self.grpc_port, self.health = make_grpc_server(
            self.dataplane, self.control, s.host, s.grpc_port, s.grpc_workers, s.max_message_bytes,
            auth=auth, health_open=s.auth_health_open, tls=tls,
            max_concurrent_rpcs=s.max_concurrent_rpcs, max_concurrent_streams=s.max_concurrent_streams,
        )
        # pyarrow's server is listening once constructed. Its serve() only blocks, and it installs
        # its own SIGINT/SIGTERM handlers (ServeWithSignals), racing ours: it is never called.
        self.flight_server = make_flight_server(
            self.dataplane, self.control, s.host, s.flight_port, auth=auth, tls=tls,
            max_concurrent_rpcs=s.max_concurrent_rpcs, max_concurrent_streams=s.max_concurrent_streams,
        )
        self.flight_scheme = "grpc+tls" if tls is not None else "grpc"
        self.flight_port = self.flight_server.port
        self.grpc_server.start()
        if self.observer.metrics is not None:
            self.observer.metrics.start(s.host)
        set_health(self.health, self.control, serving=True)
        # load/unload from either frontend updates per-model health
        self.control.on_change(lambda: set_health(self.health, self.control, serving=self.control.live))
        return self.flight_port, self.grpc_port

    def request_stop(self, *_: object) -> None:
        self._stop.set()

    def wait(self) -> None:
        while not self._stop.wait(0.5):
            pass

    def stop(self) -> bool:
        """Stop accepting, let in-flight calls finish within grace_seconds. Streams end after the
        batch they are answering. Returns False when a call was still open at the deadline (an idle
        client holding a stream open blocks pyarrow's shutdown for ever, and pyarrow offers no
        deadline), so the caller must end the process itself; no batch is being answered then."""
        grace = self.settings.server.grace_seconds
        deadline = time.monotonic() + grace
        self.control.live = False
        set_health(self.health, self.control, serving=False)  # probes see NOT_SERVING first
        self.flight_server.draining.set()
        done = self.grpc_server.stop(grace)
        # pyarrow's shutdown() blocks until every Flight call returns, with no deadline of its own
        flight_down = threading.Thread(target=self.flight_server.shutdown, name="flight-shutdown", daemon=True)
        flight_down.start()
        flight_down.join(timeout=max(0.0, deadline - time.monotonic()))
        grpc_done = done.wait(max(0.0, deadline - time.monotonic()) + 0.5)
        clean = grpc_done and not flight_down.is_alive()
        if not clean:
            # a batch that arrived on an idle stream just now is answered before the process ends
            self.flight_server.wait_idle(0.5)
        self.registry.close()
        if self.observer.metrics is not None:
            self.observer.metrics.stop()
        if self.observer.tracing is not None:
            self.observer.tracing.shutdown()
        if clean:
            log.info("stopped")
        else:
            log.warning("stopped after the %.1f s grace period with calls still open (idle streams); closing them", grace)
        return clean

    def run(self) -> bool:
        """Start, print the ready line, serve until SIGINT/SIGTERM, then stop. Returns whether every
        call finished within the grace period."""
        hide_tracebacks()  # this is the server process: no traceback may reach a Flight client
        flight_port, grpc_port = self.start()
        host = self.settings.server.host
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        self._log_start(flight_port, grpc_port)
        metrics = self.observer.metrics
        extra = f" metrics={metrics.settings.metrics_host or host}:{metrics.port}" if metrics and metrics.port else ""
        # Tests and scripts wait for this exact line; it carries the bound ports (port 0 = any free port).
        print(f"iskander ready flight={self.flight_scheme}://{host}:{flight_port} grpc={host}:{grpc_port}{extra}",
              flush=True)
        try:
            self.wait()
        finally:
            clean = self.stop()
        return clean

    def _log_start(self, flight_port: int, grpc_port: int) -> None:
        """The ports and what is switched on (each model's contract is logged as it loads)."""
        models = self.registry.all()
        ok = [f"{e.name}:{e.version}" for e in models if e.state is ModelState.READY]
        failed = [f"{e.name}:{e.version}" for e in models if e.state is not ModelState.READY]
        log.info("models ready: %s%s", ", ".join(ok) or "(none)", f"; failed: {', '.join(failed)}" if failed else "")
        host = self.settings.server.host
        obs = self.observer
        log.info(
            "serving Arrow Flight on %s://%s:%d and OIP v2 gRPC on %s:%d; metrics %s; tracing %s",
            self.flight_scheme, host, flight_port, host, grpc_port,
            f"on :{obs.metrics.port}/metrics" if obs.metrics is not None and obs.metrics.port else "off",
            f"to {self.settings.observability.otlp_endpoint}" if obs.tracing is not None else "off",
        )


def _observer(obs: ObservabilitySettings, registry: ModelRegistry, inflight: Inflight) -> Observer:
    """Metrics and tracing, built before the observer that holds them (nothing is wired later)."""
    if obs.metrics_port is None and not obs.otlp_endpoint:
        return Observer()
    # imported only when asked for: no OpenTelemetry SDK objects otherwise
    from opentelemetry.sdk.resources import Resource

    from iskander.observability.metrics import Metrics
    from iskander.observability.tracing import Tracing

    resource = Resource.create({"service.name": obs.service_name, "service.version": server_version()})
    return Observer(Metrics(registry, inflight.snapshot, obs, resource), Tracing(obs, resource))
