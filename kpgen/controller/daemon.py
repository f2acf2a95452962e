"""``kpgen run`` as a process: its settings, the servers, the sources and the controller's
loop, until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kpgen.controller.health import Health, Timing, health_server
from kpgen.controller.healthcheck import ServiceHealthChecks
from kpgen.controller.metrics import Metrics
from kpgen.controller.sync import Controller
from kpgen.core.fields import parse_bind_address, parse_duration
from kpgen.core.node import NodeConfig
from kpgen.dataplane import conntrack
from kpgen.dataplane.apply import RuleLoader
from kpgen.inputs.api import Store

log = logging.getLogger("kpgen.controller")  # the log name users filter on, kept


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
