"""``kpgen run``: keep the node's rules in sync with the objects in a :class:`Store`.

The loop writes nothing until every kind has been listed once (an empty view would
black-hole the node), then syncs when something changed, no more often than
``min_sync_period``, with a full sync at least every ``sync_period``. A sync is partial when it
can be (only the service ports that changed are rewritten, kpgen.render.delta) and writes
nothing when the rules are the same. A failed sync leaves the previous rules, is counted, and
makes the next sync a full one, after a backoff.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kpgen.controller.healthcheck import ServiceHealthChecks
from kpgen.controller.metrics import Metrics
from kpgen.core.fields import parse_bind_address, parse_duration
from kpgen.core.node import NodeConfig
from kpgen.core.parse import ParseCache
from kpgen.core.plan import FamilyPlan, build_plans
from kpgen.dataplane import conntrack
from kpgen.dataplane.apply import ApplyError, RuleLoader
from kpgen.inputs.api import Backoff, Snapshot, Store

log = logging.getLogger("kpgen.controller")  # the log name users filter on, kept


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


class Controller:
    def __init__(
        self,
        node: NodeConfig,
        store: Store,
        loader: RuleLoader,
        metrics: Metrics,
        health: Health,
        timing: Timing,
        service_checks: ServiceHealthChecks | None = None,
        delete_flows: Callable[[Sequence[conntrack.Flow]], int] | None = None,
    ) -> None:
        self.node, self.store, self.loader = node, store, loader
        self.service_checks = service_checks
        # after each sync, stale UDP conntrack entries are deleted with this (None: not at all)
        self.delete_flows = delete_flows
        self.synced_plans: Sequence[FamilyPlan] | None = None
        self.parser = ParseCache()
        self.metrics, self.health, self.timing = metrics, health, timing
        self.need_full = True
        self.last_full = 0.0
        self.last_sync = 0.0
        # never a busy loop, even with --min-sync-period 0
        self.backoff = Backoff(initial=max(timing.min_sync_period, 0.1), cap=timing.sync_period)
        self.syncs = 0

    def sync(self, snapshot: Snapshot) -> None:
        """One sync of the rules to ``snapshot``; raises ApplyError when the kernel refused."""
        started = time.monotonic()
        result = self.parser.parse(snapshot.documents)
        for problem in result.problems:
            log.warning("%s", problem)
        plans = build_plans(result.state, self.node)
        full = self.need_full or started - self.last_full >= self.timing.sync_period
        kind = "full" if full else "partial"
        try:
            written = None if full else self.loader.partial(plans)
            if written is None:
                kind = "full"
                self.loader.full(plans)
        except ApplyError:
            self.metrics.sync_failures.inc()
            if kind == "partial":
                self.metrics.partial_failures.inc()
            raise
        self._delete_stale_udp_entries(plans)
        elapsed = time.monotonic() - started
        now = time.time()
        self.need_full = False
        self.syncs += 1
        if kind == "full":
            self.last_full = started
            # Everything alive now lives long (the store, the parsed objects): keep the cyclic
            # collector from walking it again and again (it was half of a 10,000-service sync).
            gc.freeze()
            self.metrics.sync_full_duration.observe(elapsed)
        else:
            self.metrics.sync_partial_duration.observe(elapsed)
        self.metrics.sync_duration.observe(elapsed)
        self.metrics.last_sync.set(now)
        for trigger in snapshot.triggers:
            self.metrics.programming_duration.observe(max(0.0, now - trigger))
        self.health.updated(self.store.pending_since())
        if self.service_checks is not None:
            self.service_checks.update(plans)
        services = sum(len(p.ports) for p in plans)
        what = "nothing" if written == 0 else f"{written} lines" if written else "all rules"
        log.info(
            "sync: %s, %d service and %d endpoint changes, %d service ports, wrote %s, %.1f ms",
            kind,
            snapshot.service_changes,
            snapshot.endpoint_changes,
            services,
            what,
            elapsed * 1000,
            extra={
                "sync": kind,
                "service_changes": snapshot.service_changes,
                "endpoint_changes": snapshot.endpoint_changes,
                "service_ports": services,
                "written": written,
                "duration_ms": round(elapsed * 1000, 1),
            },
        )

    def _delete_stale_udp_entries(self, plans: Sequence[FamilyPlan]) -> None:
        """After a successful sync: the UDP conntrack entries it made stale
        (kpgen.dataplane.conntrack). A failure is logged; the sync stays a success."""
        previous, self.synced_plans = self.synced_plans, plans
        if self.delete_flows is None:
            return
        try:
            flows = conntrack.stale_udp_flows(previous, plans)
            deleted = self.delete_flows(flows) if flows else 0
        except Exception as error:  # best effort: never fails the sync
            log.warning("conntrack: stale UDP entries not deleted: %s", error)
            return
        if deleted:
            log.info("conntrack: deleted %d stale UDP entries (%d filters)", deleted, len(flows))

    def on_change(self) -> None:
        """Called by the store after every change."""
        self.health.queued()
        self.metrics.last_queued.set(time.time())
        services, endpoints = self.store.pending_counts()
        self.metrics.service_changes_pending.set(services)
        self.metrics.endpoint_changes_pending.set(endpoints)

    def run(self, stop: threading.Event) -> None:
        log.info("waiting for the first complete list of every kind before writing rules")
        while not stop.is_set() and not self.store.wait(1.0, lambda: self.store.synced):
            pass
        if stop.is_set():
            return
        log.info("initial lists complete")
        while not stop.is_set():
            if not self.need_full:  # wait for a change, or the periodic full sync
                deadline = self.last_full + self.timing.sync_period
                while not stop.is_set() and time.monotonic() < deadline:
                    # in short slices, so that a stop is noticed even without a wake()
                    remaining = min(0.5, deadline - time.monotonic())
                    if self.store.wait(max(0.0, remaining), self.store.pending):
                        break
            since = time.monotonic() - self.last_sync
            if since < self.timing.min_sync_period:  # debounce: let changes gather
                stop.wait(self.timing.min_sync_period - since)
            if stop.is_set():
                return
            snapshot = self.store.take()
            self.metrics.service_changes_pending.set(0)
            self.metrics.endpoint_changes_pending.set(0)
            self.metrics.service_changes_total.inc(snapshot.service_changes)
            self.metrics.endpoint_changes_total.inc(snapshot.endpoint_changes)
            self.last_sync = time.monotonic()
            try:
                self.sync(snapshot)
                self.backoff.reset()
            except ApplyError as error:
                self.need_full = True
                delay = self.backoff.next()
                log.error(
                    "sync failed, the previous rules stay; full sync in %.1fs: %s", delay, error
                )
                stop.wait(delay)


@dataclass(frozen=True)
class RunSettings:
    """``kpgen run``'s own settings, validated."""

    manifests: str | None
    kubeconfig: str | None
    master: str | None
    timing: Timing
    healthz: tuple[str, int] | None
    metrics: tuple[str, int] | None
    iptables_backend: str

    # the flags of kpgen run that parse() takes (the others are the node's)
    FLAGS = (
        "source",
        "kubeconfig",
        "master",
        "min_sync_period",
        "sync_period",
        "healthz_bind_address",
        "metrics_bind_address",
        "iptables_backend",
    )

    @classmethod
    def parse(
        cls,
        *,
        source: str,
        kubeconfig: str | None,
        master: str | None,
        min_sync_period: str,
        sync_period: str,
        healthz_bind_address: str,
        metrics_bind_address: str,
        iptables_backend: str,
    ) -> RunSettings:
        """Raises ValueError naming the flag."""

        def flag(name: str, parser: Callable[[str], Any], value: str) -> Any:
            try:
                return parser(value)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None

        if source != "api" and not source.startswith("manifests:"):
            raise ValueError(f"--source: {source!r} is not api or manifests:DIR")
        manifests = source.removeprefix("manifests:") if source != "api" else None
        if manifests is not None and not os.path.isdir(manifests):
            raise ValueError(f"--source: {manifests!r} is not a directory")
        timing = Timing(
            min_sync_period=flag("--min-sync-period", parse_duration, min_sync_period),
            sync_period=flag("--sync-period", parse_duration, sync_period),
        )
        if timing.sync_period <= 0:
            raise ValueError("--sync-period: must be more than 0")
        return cls(
            manifests=manifests,
            kubeconfig=kubeconfig,
            master=master,
            timing=timing,
            healthz=flag("--healthz-bind-address", parse_bind_address, healthz_bind_address),
            metrics=flag("--metrics-bind-address", parse_bind_address, metrics_bind_address),
            iptables_backend=iptables_backend,
        )


def run(node: NodeConfig, settings: RunSettings) -> int:
    """Run the controller until SIGTERM or SIGINT; the rules stay in place. Returns the exit
    status."""
    from prometheus_client import start_http_server

    from kpgen.inputs.api import NODE, SERVICE, SLICE, ManifestWatcher, api_client, api_informers

    stop = threading.Event()
    metrics = Metrics(node.mode.value)
    health = Health(settings.timing)
    holder: list[Controller] = []
    store = Store((SERVICE, SLICE, NODE), on_change=lambda: holder[0].on_change())

    def shut_down(*_: Any) -> None:
        stop.set()
        store.wake()  # the loop may be waiting on the store, not on the stop event

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, shut_down)
    loader = RuleLoader(node.mode, settings.iptables_backend)
    service_checks = ServiceHealthChecks(proxy_healthy=lambda: health.status()[0])
    controller = Controller(
        node, store, loader, metrics, health, settings.timing, service_checks, conntrack.delete
    )
    holder.append(controller)
    try:
        if settings.healthz:
            health_server(settings.healthz, health, metrics)
        if settings.metrics:
            start_http_server(settings.metrics[1], settings.metrics[0], registry=metrics.registry)
    except OSError as error:
        log.error("cannot listen: %s", error)
        return 1
    if settings.manifests is not None:
        log.info("reading manifests from %s", settings.manifests)
        ManifestWatcher(store, settings.manifests, stop).start()
    else:
        try:
            api = api_client(settings.kubeconfig, settings.master)
        except Exception as error:  # the client's config errors come in many types
            log.error("cannot configure the Kubernetes client: %s", error)
            return 1
        log.info("watching %s as node %s", api.configuration.host, node.hostname)
        for informer in api_informers(store, api, node.hostname, stop):
            informer.start()
    controller.run(stop)
    log.info("exiting; the rules stay in place (kpgen cleanup removes them)")
    return 0
