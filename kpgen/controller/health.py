"""kube-proxy's health reporting for ``kpgen run``: the sync timing, the /healthz state, and
the server that answers /healthz and /livez."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kpgen.controller.metrics import Metrics

log = logging.getLogger("kpgen.controller")  # the log name users filter on, kept

# Seconds a client of kpgen's HTTP servers (/healthz, /metrics, the service health checks) may
# take for each read and write: one that connects and sends nothing is dropped after this,
# instead of holding a thread forever. Probes answer in milliseconds.
REQUEST_TIMEOUT = 5.0


@dataclass(frozen=True)
class Timing:
    min_sync_period: float = 1.0
    sync_period: float = 30.0

    @property
    def health_timeout(self) -> float:
        """kube-proxy's healthz fails once a queued change is older than this."""
        return 2 * self.sync_period


class Health:
    """When the rules were last synced and a change last queued, as kube-proxy reports."""

    def __init__(self, timing: Timing, clock: Callable[[], float] = time.time) -> None:
        self.timing, self.clock = timing, clock
        self._lock = threading.Lock()
        self.started = clock()
        self.last_updated: float | None = None
        self.last_queued: float | None = self.started  # the first sync is owed from the start

    def queued(self) -> None:
        with self._lock:
            if self.last_queued is None:
                self.last_queued = self.clock()

    def updated(self, pending_since: float | None) -> None:
        """A sync succeeded; changes that came during it are ``pending_since`` then."""
        with self._lock:
            self.last_updated = self.clock()
            self.last_queued = pending_since

    def status(self) -> tuple[bool, dict[str, Any]]:
        with self._lock:
            now = self.clock()
            stale = (
                self.last_queued is not None and now - self.last_queued > self.timing.health_timeout
            )

            def stamp(value: float | None) -> str:
                return "" if value is None else datetime.fromtimestamp(value, UTC).isoformat()

            return not stale, {
                "lastUpdated": stamp(self.last_updated),
                "currentTime": stamp(now),
                "nodeEligible": True,
                "healthy": not stale,
            }


def health_server(
    address: tuple[str, int], health: Health, metrics: Metrics
) -> ThreadingHTTPServer:
    """/healthz (503 once a queued change waits too long) and /livez, as kube-proxy serves."""

    class Handler(BaseHTTPRequestHandler):
        timeout = REQUEST_TIMEOUT

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path not in ("/healthz", "/livez"):
                self.send_error(404)
                return
            healthy, body = health.status()
            code = 200 if healthy else 503
            counter = metrics.healthz if path == "/healthz" else metrics.livez
            counter.labels(code=str(code)).inc()
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("healthz: " + format, *args)

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET

    server = Server(address, Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="healthz", daemon=True).start()
    return server


def metrics_server(address: tuple[str, int], metrics: Metrics) -> ThreadingHTTPServer:
    """/metrics (any path, as prometheus_client's own server), with :data:`REQUEST_TIMEOUT`:
    prometheus_client's ``start_http_server`` has no timeout."""
    from prometheus_client.exposition import MetricsHandler

    class Handler(MetricsHandler):
        registry = metrics.registry
        timeout = REQUEST_TIMEOUT

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET

    server = Server(address, Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
