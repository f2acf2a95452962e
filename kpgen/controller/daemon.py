"""``kpgen run`` as a process: its settings, the servers, the sources and the controller's
loop, until SIGTERM or SIGINT."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kpgen.controller.health import Health, Timing, health_server, metrics_server
from kpgen.controller.healthcheck import ServiceHealthChecks
from kpgen.controller.metrics import Metrics
from kpgen.controller.sync import Controller
from kpgen.core.fields import parse_bind_address, parse_duration
from kpgen.core.kubeproxy import (
    MIN_SYNC_PERIOD,
    SYNC_PERIOD,
    Conntrack,
    KubeProxyConfig,
    default_bind_addresses,
)
from kpgen.core.node import NodeConfig, NodeFlags
from kpgen.dataplane import conntrack, sysctl
from kpgen.dataplane.apply import RuleLoader
from kpgen.dataplane.run import which
from kpgen.inputs.api import Store

log = logging.getLogger("kpgen.controller")  # the log name users filter on, kept
NO_API_HINT = (
    "no Kubernetes API to watch: give --kubeconfig FILE (a cluster's kubeconfig), run kpgen "
    "in a pod (in-cluster: its service account and KUBERNETES_SERVICE_HOST), or watch a "
    "directory of manifests instead: --source manifests:DIR"
)


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
    conntrack: Conntrack = field(default_factory=Conntrack)  # kube-proxy's conntrack sysctls
    notes: tuple[str, ...] = ()  # the configuration's fields and flags kpgen ignores, and why

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
        min_sync_period: str | None,
        sync_period: str | None,
        healthz_bind_address: str | None,
        metrics_bind_address: str | None,
        iptables_backend: str,
        config: KubeProxyConfig | None = None,
        mode: str = "nftables",
    ) -> RunSettings:
        """Raises ValueError naming the flag. A flag that is None was not given: the
        KubeProxyConfiguration's value (``config``, for proxy ``mode``), else kube-proxy's
        default."""
        config = config or KubeProxyConfig(node=NodeFlags())
        file_sync, file_min_sync = config.periods(mode)
        healthz_default, metrics_default = default_bind_addresses(None)
        if healthz_bind_address is None:
            healthz_bind_address = config.healthz_bind_address or healthz_default
        if metrics_bind_address is None:
            metrics_bind_address = config.metrics_bind_address or metrics_default
        min_sync_period = min_sync_period or file_min_sync or MIN_SYNC_PERIOD
        sync_period = sync_period or file_sync or SYNC_PERIOD

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
            kubeconfig=kubeconfig or config.kubeconfig,
            master=master,
            timing=timing,
            healthz=flag("--healthz-bind-address", parse_bind_address, healthz_bind_address),
            metrics=flag("--metrics-bind-address", parse_bind_address, metrics_bind_address),
            iptables_backend=iptables_backend,
            conntrack=config.conntrack,
            notes=config.notes,
        )


def set_conntrack(settings: Conntrack, stop: threading.Event, wait: float = 60.0) -> None:
    """Write kube-proxy's conntrack sysctls (those set) and log what became of each. If
    nf_conntrack is not loaded yet, try again each second for ``wait`` seconds: the first
    rules load it."""
    wanted = settings.sysctls(os.cpu_count() or 1)
    if not wanted:
        return
    outcomes = sysctl.set_conntrack(wanted)
    deadline = time.monotonic() + wait
    while sysctl.missing_module(outcomes) and time.monotonic() < deadline:
        if stop.wait(1.0):
            return
        outcomes = sysctl.set_conntrack(wanted)
    for outcome in outcomes:
        if outcome.done:
            log.info("conntrack: %s", outcome)
        else:
            log.warning("conntrack: %s", outcome)


def warn_missing_tools() -> None:
    """At start, what a later sync would only find out when it needs it."""
    if which("conntrack") is None:
        log.warning(
            "conntrack is not installed: after a UDP service's endpoints change, its stale"
            " conntrack entries will not be deleted and clients may keep sending to removed"
            " endpoints (install Debian's conntrack package)"
        )


def run(node: NodeConfig, settings: RunSettings) -> int:
    """Run the controller until SIGTERM or SIGINT; the rules stay in place. Returns the exit
    status."""
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
    for note in settings.notes:
        log.info("note: %s", note)
    if settings.conntrack.sysctls(1):
        threading.Thread(
            target=set_conntrack, args=(settings.conntrack, stop), name="conntrack", daemon=True
        ).start()
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
            metrics_server(settings.metrics, metrics)
    except OSError as error:
        log.error("cannot listen: %s", error)
        return 1
    warn_missing_tools()
    if settings.manifests is not None:
        log.info("reading manifests from %s", settings.manifests)
        ManifestWatcher(store, settings.manifests, stop).start()
    else:
        try:
            api = api_client(settings.kubeconfig, settings.master)
        except Exception as error:  # the client's config errors come in many types
            log.error("cannot configure the Kubernetes client: %s", error)
            log.error("%s", NO_API_HINT if not settings.kubeconfig else "check --kubeconfig")
            return 1
        log.info("watching %s as node %s", api.configuration.host, node.hostname)
        for informer in api_informers(store, api, node.hostname, stop):
            informer.start()
    controller.run(stop)
    log.info("exiting; the rules stay in place (kpgen cleanup removes them)")
    return 0
