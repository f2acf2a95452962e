"""kube-proxy's service health checks, for ``externalTrafficPolicy: Local`` services.

A cloud load balancer asks every node, on the service's ``healthCheckNodePort``, whether to
send it traffic: 200 with the number of this node's endpoints when there are some, 503 when
there are none (the node would drop the traffic). ``kpgen run`` keeps one small HTTP server per
such port, started, updated and stopped after each sync.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kpgen.controller.health import REQUEST_TIMEOUT
from kpgen.core.model import ObjectRef
from kpgen.core.plan import FamilyPlan

log = logging.getLogger("kpgen.healthcheck")  # the log name users filter on, kept


def wanted_checks(plans: Sequence[FamilyPlan]) -> dict[int, tuple[ObjectRef, int]]:
    """healthCheckNodePort -> (service, its endpoints on this node), for every service with
    externalTrafficPolicy Local and a health check port."""
    local: dict[int, tuple[ObjectRef, set[Any]]] = {}
    for plan in plans:
        for port in plan.ports:
            if port.external_local and port.health_check_node_port is not None:
                _, addresses = local.setdefault(port.health_check_node_port, (port.service, set()))
                addresses.update(b.address for b in port.local_endpoints)
    return {hc: (service, len(addresses)) for hc, (service, addresses) in local.items()}


class _Check:
    def __init__(self, service: ObjectRef, endpoints: int) -> None:
        self.service, self.endpoints = service, endpoints
        self.server: ThreadingHTTPServer | None = None


class ServiceHealthChecks:
    """One HTTP server per healthCheckNodePort, answering as kube-proxy does."""

    def __init__(self, host: str = "", proxy_healthy: Callable[[], bool] = lambda: True) -> None:
        self.host, self.proxy_healthy = host, proxy_healthy
        self._checks: dict[int, _Check] = {}
        self._lock = threading.Lock()

    def update(self, plans: Sequence[FamilyPlan]) -> None:
        wanted = wanted_checks(plans)
        with self._lock:
            for port in [p for p in self._checks if p not in wanted]:
                self._stop(port)
            for port, (service, endpoints) in wanted.items():
                check = self._checks.get(port)
                if check is None:
                    check = self._checks[port] = _Check(service, endpoints)
                    self._start(port, check)
                check.service, check.endpoints = service, endpoints

    def close(self) -> None:
        with self._lock:
            for port in list(self._checks):
                self._stop(port)

    def _stop(self, port: int) -> None:
        check = self._checks.pop(port)
        if check.server is not None:
            check.server.shutdown()
            check.server.server_close()

    def _start(self, port: int, check: _Check) -> None:
        checks = self

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT  # a client that sends nothing does not hold a thread

            def do_GET(self) -> None:
                healthy = checks.proxy_healthy()
                body = {
                    "service": {"namespace": check.service.namespace, "name": check.service.name},
                    "localEndpoints": check.endpoints,
                    "serviceProxyHealthy": healthy,
                }
                data = json.dumps(body).encode()
                self.send_response(200 if check.endpoints > 0 and healthy else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("X-Content-Type-Options", "nosniff")
                self.send_header("X-Load-Balancing-Endpoint-Weight", str(check.endpoints))
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("health check: " + format, *args)

        try:
            server = ThreadingHTTPServer((self.host, port), Handler)
        except OSError as error:
            log.warning(
                "%s: cannot serve its health check on port %d: %s", check.service, port, error
            )
            return
        server.daemon_threads = True
        check.server = server
        name = f"healthcheck-{port}"
        threading.Thread(target=server.serve_forever, name=name, daemon=True).start()
