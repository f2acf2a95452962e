"""Prometheus metrics under kube-proxy's names, so that existing dashboards work.

Each :class:`Metrics` has its own registry (no global state: tests make as many as they like).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.gc_collector import GCCollector

# kube-proxy's buckets for sync durations: exponential from 1 ms, 15 buckets.
SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
# network_programming_duration_seconds: 0.25 s to 20 min, as kube-proxy's.
PROGRAMMING_BUCKETS = (
    *(0.25 * i for i in range(1, 4)),
    *(float(i) for i in range(1, 31)),
    *(float(i) for i in range(32, 61, 2)),
    *(float(i) for i in range(65, 121, 5)),
    *(float(i) for i in range(150, 1201, 30)),
)


class Metrics:
    def __init__(self, mode: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # python_gc_*: the cyclic collector's work (kpgen pauses it while it builds a state:
        # docs/design.md), as kube-proxy shows its Go runtime's
        GCCollector(registry=r)

        def histogram(name: str, doc: str, buckets: tuple[float, ...] = SYNC_BUCKETS) -> Histogram:
            return Histogram(name, doc, namespace="kubeproxy", registry=r, buckets=buckets)

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, namespace="kubeproxy", registry=r)

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()) -> Counter:
            return Counter(name, doc, labels, namespace="kubeproxy", registry=r)

        self.sync_duration = histogram(
            "sync_proxy_rules_duration_seconds", "SyncProxyRules latency in seconds"
        )
        self.sync_full_duration = histogram(
            "sync_full_proxy_rules_duration_seconds", "SyncProxyRules latency of full syncs"
        )
        self.sync_partial_duration = histogram(
            "sync_partial_proxy_rules_duration_seconds", "SyncProxyRules latency of partial syncs"
        )
        self.last_sync = gauge(
            "sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
        )
        self.last_queued = gauge(
            "sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
        )
        self.programming_duration = histogram(
            "network_programming_duration_seconds",
            "In-cluster network programming latency in seconds",
            PROGRAMMING_BUCKETS,
        )
        self.endpoint_changes_pending = gauge(
            "sync_proxy_rules_endpoint_changes_pending", "Pending proxy rules Endpoint changes"
        )
        self.endpoint_changes_total = counter(
            "sync_proxy_rules_endpoint_changes", "Cumulative proxy rules Endpoint changes"
        )
        self.service_changes_pending = gauge(
            "sync_proxy_rules_service_changes_pending", "Pending proxy rules Service changes"
        )
        self.service_changes_total = counter(
            "sync_proxy_rules_service_changes", "Cumulative proxy rules Service changes"
        )
        failures = (
            "sync_proxy_rules_nftables_sync_failures"
            if mode == "nftables"
            else "sync_proxy_rules_iptables_restore_failures"
        )
        self.sync_failures = counter(failures, "Cumulative proxy rules sync failures")
        self.partial_failures = counter(
            failures.replace("_sync_", "_partial_sync_").replace("_restore_", "_partial_restore_"),
            "Cumulative proxy rules partial sync failures",
        )
        # kpgen's own: full syncs that found the node's rules changed since kpgen wrote them
        # (by anyone: kpgen cannot tell its table from another program's commit) and loaded
        # kpgen's rules whole again
        self.rewrites = Counter(
            "kpgen_sync_rules_rewritten",
            "Cumulative full syncs that loaded kpgen's rules whole again after they changed",
            registry=self.registry,
        )
        self.healthz = counter("proxy_healthz", "Cumulative proxy healthz HTTP status", ("code",))
        self.livez = counter("proxy_livez", "Cumulative proxy livez HTTP status", ("code",))
