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
import logging
import threading
import time
from collections.abc import Callable, Sequence

from kpgen.controller.health import Health, Timing
from kpgen.controller.healthcheck import ServiceHealthChecks
from kpgen.controller.metrics import Metrics
from kpgen.controller.rules import NodeRules
from kpgen.core.node import NodeConfig
from kpgen.dataplane import conntrack
from kpgen.dataplane.apply import ApplyError, RuleLoader, trim_memory
from kpgen.inputs.api import Backoff, Snapshot, Store

log = logging.getLogger("kpgen.controller")  # the log name users filter on, kept


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
        self.rules = NodeRules(node)
        self.metrics, self.health, self.timing = metrics, health, timing
        self.need_full = True
        self.last_full = 0.0
        self.last_sync = 0.0
        # never a busy loop, even with --min-sync-period 0
        self.backoff = Backoff(initial=max(timing.min_sync_period, 0.1), cap=timing.sync_period)
        self.syncs = 0
        self._collector_paused = False

    def sync(self, snapshot: Snapshot) -> None:
        """One sync of the rules to the store's objects (``snapshot``: the changes since the
        last one); raises an error (ApplyError when the kernel refused) with the previous
        rules in place."""
        started = time.monotonic()
        if self.need_full:
            self._pause_collector()
        try:
            self._sync(snapshot, started)
        finally:
            self._resume_collector()

    def _pause_collector(self) -> None:
        """Keep the cyclic garbage collector off while the node's state is built anew (the
        first lists read ahead, a full sync), until :meth:`_resume_collector`. With it on,
        the first sync at 10,000 services walks the growing heap again and again, before the
        first rule is loaded (0.4 s in process). A partial sync allocates little and runs with
        it on."""
        if gc.isenabled():
            gc.disable()
            self._collector_paused = True

    def _resume_collector(self) -> None:
        """The collector on again, after one full collection (0.2 s at 10,000 services, after
        the rules are loaded): that is what makes the next ones rare. Python collects
        everything again only once the objects that survived collections since the last full
        one reach a quarter of those it kept; collecting only the young generations would
        leave the next partial sync to pay for the full one."""
        if self._collector_paused:
            self._collector_paused = False
            gc.enable()
            gc.collect()

    def _sync(self, snapshot: Snapshot, started: float) -> None:
        changes = self.rules.take(snapshot.changed)  # the snapshot's objects go as parsed
        rebuild = self.need_full or changes.node_wide
        for problem in changes.problems:
            log.warning("%s", problem)
        kind = "partial"
        written: int | None = 0
        try:
            if rebuild:
                kind, written = "full", None
                self.rules.rebuild()
                self.rules.load(self.loader)
            else:
                written = self.rules.change(changes.services, self.loader)
            if started - self.last_full >= self.timing.sync_period and not rebuild:
                kind = "full"  # the periodic full sync: verify, and write only if needed
                verified = self._verify()
                written = None if verified is None or written is None else written + verified
        except Exception:
            self.need_full = True  # the kernel's state is unknown: everything again, next
            # the sync is owed: /healthz turns 503 once it has been for the health timeout
            # (else a node whose syncs all fail while no change is queued stays healthy)
            self.health.queued()
            self.metrics.sync_failures.inc()
            if kind == "partial":
                self.metrics.partial_failures.inc()
            raise
        self._delete_stale_udp_entries()
        elapsed = time.monotonic() - started
        now = time.time()
        self.need_full = False
        self.syncs += 1
        if kind == "full":
            self.last_full = started
            self.metrics.sync_full_duration.observe(elapsed)
        else:
            self.metrics.sync_partial_duration.observe(elapsed)
        self.metrics.sync_duration.observe(elapsed)
        self.metrics.last_sync.set(now)
        for trigger in snapshot.triggers:
            self.metrics.programming_duration.observe(max(0.0, now - trigger))
        self.health.updated(self.store.pending_since())
        if self.service_checks is not None and (rebuild or self.rules.health_checks_changed):
            self.service_checks.update(self.rules.plans())
        services = self.rules.port_count
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

    def _verify(self) -> int | None:
        """The periodic full sync: when nf_tables moved on since kpgen's last write (someone
        else committed: a table deleted, a chain flushed, or another program's own rules),
        load kpgen's rules whole again (returns None); else only the element deletions that
        waited are written (returns the lines). iptables-legacy has no generation to compare:
        its rules are loaded whole every time."""
        moved = self.loader.changed_since_written()
        if moved is None:  # as kpgen left them; only the deletions that waited are due
            written = self.rules.delete_stale(self.loader)
            trim_memory()  # what the partial syncs since the last freed, back to the system
            return written
        by = f" (last by {moved.process}[{moved.pid}])" if moved.pid else ""
        log.warning(
            "full sync: the node's rules changed since kpgen wrote them%s; loading kpgen's "
            "rules whole again",
            by,
        )
        self.metrics.rewrites.inc()
        self.rules.load(self.loader)
        return None

    def _delete_stale_udp_entries(self) -> None:
        """After a successful sync: the UDP conntrack entries it made stale
        (kpgen.dataplane.conntrack), from the service ports it changed. A failure is logged;
        the sync stays a success."""
        previous, current = self.rules.take_changed_ports()
        if self.delete_flows is None:
            return
        try:
            flows = conntrack.stale_udp_flows(previous, current)
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

    def _read_ahead(self, stop: threading.Event) -> None:
        """Until every kind is listed once: parse what the lists brought so far into the
        index (no rule is written before then: an empty view would black-hole the node), so
        that the first sync finds most of the cluster parsed. At 10,000 services parsing
        takes 0.5 s, in the time the API server takes to send the pages."""

        def ready() -> bool:
            return self.store.synced or self.store.objects_waiting()

        while not stop.is_set() and not self.store.synced:
            if self.store.wait(1.0, ready):
                try:
                    changes = self.rules.take(self.store.take_objects())
                except Exception as error:  # a bug of ours: as in a sync, the loop stays
                    log.error(
                        "reading the first lists ahead failed: %s: %s", type(error).__name__, error
                    )
                    continue
                for problem in changes.problems:
                    log.warning("%s", problem)

    def run(self, stop: threading.Event) -> None:
        log.info("waiting for the first complete list of every kind before writing rules")
        self._pause_collector()
        try:
            self._read_ahead(stop)
        except BaseException:
            self._resume_collector()
            raise
        if stop.is_set():
            self._resume_collector()
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
            except Exception as error:  # whatever failed, the loop (and the node's rules) stay
                self.need_full = True
                delay = self.backoff.next()
                if not isinstance(error, ApplyError):  # not the kernel's refusal: a bug of ours
                    log.debug("sync failed", exc_info=True)
                    error = RuntimeError(f"{type(error).__name__}: {error}")
                log.error(
                    "sync failed, the previous rules stay; full sync in %.1fs: %s", delay, error
                )
                stop.wait(delay)
