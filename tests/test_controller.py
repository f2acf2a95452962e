"""The controller of ``kpgen run``: when it syncs, what it reports, and how it fails.

The timing tests drive :class:`Controller.run` in a thread with a fake loader (see
:class:`RecordingLoader`); what a sync writes into the kernel is tested with the real
RuleLoader inside throwaway network namespaces (the ``kernel`` tests at the end, and
tests/test_delta.py).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import re
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import kernel
import pytest
import yaml
from builders import endpoint, endpoint_slice, service
from polling import wait_until
from prometheus_client import generate_latest

from kpgen.controller.daemon import RunSettings
from kpgen.controller.health import Health, Timing, health_server
from kpgen.controller.logs import JsonFormatter
from kpgen.controller.metrics import Metrics
from kpgen.controller.sync import Controller
from kpgen.core.fields import parse_bind_address, parse_duration
from kpgen.core.node import NodeConfig
from kpgen.core.plan import FamilyPlan
from kpgen.dataplane.apply import ApplyError
from kpgen.dataplane.kernel import Generation
from kpgen.inputs.api import NODE, SERVICE, SLICE, TRIGGER_TIME, Backoff, Store

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "examples" / "seed-cluster.yaml"
FAST = Timing(min_sync_period=0.05, sync_period=30.0)
WAIT = 5.0  # seconds any expected sync may take to show up


# --- a controller in a thread, with a fake loader -----------------------------------------


class RecordingLoader:
    """Stands in for RuleLoader in the timing tests ONLY: it records when the controller
    asks for a full or a partial load (and of what), writes nothing, and can be told to
    fail like a kernel that refuses the rules. Its partial returns 0 when the plans are
    those it loaded last, as RuleLoader's does."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self.fail: Callable[[str], bool] = lambda kind: False
        self.loaded: tuple[FamilyPlan, ...] | None = None
        self._cond = threading.Condition()

    def _record(self, kind: str, plans: Any) -> None:
        with self._cond:
            self.calls.append((kind, time.monotonic()))
            self._cond.notify_all()
        if self.fail(kind):
            self.loaded = None
            raise ApplyError(f"the kernel refused the {kind} load\nline 2 of the message")

    def full(self, plans: Any) -> str:
        self._record("full", plans)
        self.loaded = tuple(plans)
        return "loaded"

    def partial(self, plans: Any) -> int | None:
        self._record("partial", plans)
        written = 0 if tuple(plans) == self.loaded else 7
        self.loaded = tuple(plans)
        return written

    # nftables: whole tables, or one transaction of what changed
    def load_nft(self, plans: Any, tables: Any) -> None:
        self.full(plans)

    def change_nft(self, script: str, *, cached: bool = False) -> None:
        self._record("partial", script)

    moved: Any = None  # what changed_since_written answers: None, nobody else wrote

    def changed_since_written(self) -> Any:
        return self.moved

    def kinds(self) -> list[str]:
        with self._cond:
            return [kind for kind, _ in self.calls]

    def wait_calls(self, count: int, timeout: float = WAIT) -> list[str]:
        """The kinds of the calls once there are ``count`` (fails after ``timeout``)."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.calls) >= count, timeout)
            assert len(self.calls) >= count, f"expected {count} syncs, got {self.calls}"
            return [kind for kind, _ in self.calls]


class SyncLog(logging.Handler):
    """The controller's log records, and a wait for its sync lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.records: list[logging.LogRecord] = []
        self._cond = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self._cond:
            self.records.append(record)
            self._cond.notify_all()

    def attempts(self) -> int:
        starts = ("sync: ", "sync failed")
        return sum(r.getMessage().startswith(starts) for r in self.records)

    def syncs(self) -> list[str]:
        with self._cond:
            return [r.getMessage() for r in self.records if r.getMessage().startswith("sync: ")]

    def wait(self, attempts: int) -> None:
        with self._cond:
            if not self._cond.wait_for(lambda: self.attempts() >= attempts, WAIT):
                raise AssertionError(f"fewer than {attempts} syncs finished in {WAIT} s")

    @property
    def text(self) -> str:
        with self._cond:
            return "\n".join(r.getMessage() for r in self.records)


@dataclass
class Running:
    store: Store
    controller: Controller
    loader: RecordingLoader
    metrics: Metrics
    stop: threading.Event
    thread: threading.Thread
    log: SyncLog
    errors: list[BaseException] = field(default_factory=list)

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        value = self.metrics.registry.get_sample_value(name, labels or {})
        return 0.0 if value is None else value

    def settle(self, attempts: int) -> list[str]:
        """Wait until ``attempts`` syncs have finished, failed or not (their log line is the
        last thing a sync does); returns the messages of the sync lines so far."""
        self.log.wait(attempts)
        return self.log.syncs()

    def list_all(self, documents: list[dict[str, Any]]) -> None:
        """What the informers' first lists do."""
        for kind in (SERVICE, SLICE, NODE):
            self.store.replace(kind, [d for d in documents if d["kind"] == kind])

    def halt(self) -> None:
        self.stop.set()
        self.store.wake()
        self.thread.join(WAIT)


@pytest.fixture
def start() -> Iterator[Callable[..., Running]]:
    running: list[Running] = []
    logger = logging.getLogger("kpgen.controller")
    level = logger.level
    logger.setLevel(logging.INFO)
    log = SyncLog()
    logger.addHandler(log)

    def make(timing: Timing = FAST, loader: RecordingLoader | None = None) -> Running:
        loader = loader or RecordingLoader()
        metrics = Metrics("nftables")
        holder: list[Controller] = []
        store = Store((SERVICE, SLICE, NODE), on_change=lambda: holder[0].on_change())
        controller = Controller(
            NodeConfig(hostname="node-a"), store, loader, metrics, Health(timing), timing
        )
        holder.append(controller)
        stop = threading.Event()
        run = Running(store, controller, loader, metrics, stop, threading.Thread(), log)

        def target() -> None:
            try:
                controller.run(stop)
            except BaseException as error:  # reported by the test, not lost in the thread
                run.errors.append(error)

        run.thread = threading.Thread(target=target, daemon=True)
        run.thread.start()
        running.append(run)
        return run

    yield make
    for run in running:
        run.halt()
    logger.removeHandler(log)
    logger.setLevel(level)


def web(
    *addresses: str,
    annotations: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """Service web and its slice with ``addresses``."""
    slice_ = endpoint_slice("web-1", service_name="web", endpoints=[endpoint(a) for a in addresses])
    if annotations:
        slice_["metadata"]["annotations"] = annotations
    slice_["metadata"]["labels"].update(labels or {})
    return [service("web", cluster_ip="10.96.0.10"), slice_]


def slice_update(run: Running, *addresses: str, **kwargs: Any) -> None:
    run.store.apply(SLICE, "MODIFIED", web(*addresses, **kwargs)[1])


def stamp(seconds_ago: float) -> str:
    """An EndpointSlice trigger-time annotation for ``seconds_ago``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - seconds_ago))


# --- when the controller syncs ------------------------------------------------------------


def test_nothing_is_written_before_every_kind_has_been_listed(
    start: Callable[..., Running],
) -> None:
    run = start()
    run.store.replace(SERVICE, web("10.244.0.1")[:1])
    run.store.replace(SLICE, web("10.244.0.1")[1:])
    time.sleep(0.3)
    assert run.loader.kinds() == []
    run.store.replace(NODE, [])
    assert run.loader.wait_calls(1) == ["full"]


def test_the_first_lists_are_parsed_as_their_pages_come_and_written_once_all_are_complete(
    start: Callable[..., Running],
) -> None:
    run = start()
    web_service, web_slice = web("10.244.0.1")
    bad = service("bad", cluster_ip="10.96.0.11")
    bad["spec"]["ports"][0]["port"] = 70000
    services: set[tuple[str, str]] = set()
    run.store.preview(SERVICE, services, [web_service, bad])
    run.store.preview(SLICE, set(), [web_slice])  # a first list that is not complete yet
    index = run.controller.rules.index
    wait_until("the pages parsed ahead", lambda: len(index.services) == 1, WAIT)
    assert ("default", "web") in {(ref.namespace, ref.name) for ref in index.services}
    wait_until("the warning", lambda: any("70000" in r.getMessage() for r in run.log.records), WAIT)
    time.sleep(0.2)
    assert run.loader.kinds() == []  # nothing written before every kind is listed
    run.store.previewed(SERVICE, services)
    run.store.replace(SLICE, [web_slice])
    run.store.replace(NODE, [])
    assert run.loader.wait_calls(1) == ["full"]
    assert run.settle(1)[0].startswith(
        "sync: full, 2 service and 1 endpoint changes, 1 service ports"
    )
    assert [str(p.cluster_ip) for p in run.loader.loaded[0].ports] == ["10.96.0.10"]


def test_the_first_sync_is_full_and_later_changes_are_partial(
    start: Callable[..., Running],
) -> None:
    run = start()
    run.list_all(web("10.244.0.1"))
    run.loader.wait_calls(1)
    slice_update(run, "10.244.0.1", "10.244.0.2")
    assert run.loader.wait_calls(2) == ["full", "partial"]
    run.store.apply(SERVICE, "DELETED", web()[0])
    assert run.loader.wait_calls(3) == ["full", "partial", "partial"]
    messages = run.settle(3)
    assert messages[0].startswith("sync: full, 1 service and 1 endpoint changes, 1 service ports")
    assert messages[1].startswith("sync: partial, 0 service and 1 endpoint changes, 1 service")
    assert re.search(r"wrote [1-9][0-9]* lines", messages[1])
    assert messages[2].startswith("sync: partial, 1 service and 0 endpoint changes, 0 service")
    assert run.sample("kubeproxy_sync_proxy_rules_duration_seconds_count") == 3
    assert run.sample("kubeproxy_sync_full_proxy_rules_duration_seconds_count") == 1
    assert run.sample("kubeproxy_sync_partial_proxy_rules_duration_seconds_count") == 2
    assert run.sample("kubeproxy_sync_proxy_rules_last_timestamp_seconds") >= time.time() - WAIT
    assert run.sample("kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds") >= (
        time.time() - WAIT
    )
    assert run.sample("kubeproxy_sync_proxy_rules_endpoint_changes_pending") == 0
    assert run.sample("kubeproxy_sync_proxy_rules_endpoint_changes_total") == 2
    assert run.sample("kubeproxy_sync_proxy_rules_service_changes_total") == 2


def test_a_change_that_leaves_the_rules_alone_is_a_sync_that_writes_nothing(
    start: Callable[..., Running],
) -> None:
    run = start()
    run.list_all(web("10.244.0.1"))
    run.loader.wait_calls(1)
    slice_update(run, "10.244.0.1", labels={"note": "not a rule"})
    assert "wrote nothing" in run.settle(2)[1]
    assert run.loader.kinds() == ["full"]  # the loader was not even asked


def test_a_change_to_what_kpgen_never_reads_is_no_change(start: Callable[..., Running]) -> None:
    run = start()
    run.list_all(web("10.244.0.1"))
    run.loader.wait_calls(1)
    run.settle(1)
    changed = web("10.244.0.1", annotations={"note": "not read"})[1]
    changed["metadata"]["managedFields"] = [{"manager": "kube-controller-manager"}]
    run.store.apply(SLICE, "MODIFIED", changed)
    assert not run.store.pending()
    assert run.store.pending_counts() == (0, 0)


def test_changes_within_min_sync_period_of_a_sync_are_gathered_into_one_sync(
    start: Callable[..., Running],
) -> None:
    run = start(Timing(min_sync_period=0.4, sync_period=30.0))
    run.list_all(web("10.244.0.1"))
    run.loader.wait_calls(1)
    for last in range(2, 7):  # five changes, right after the first sync
        slice_update(run, *(f"10.244.0.{n}" for n in range(1, last + 1)))
    run.loader.wait_calls(2)
    time.sleep(0.6)  # room for a wrongly separate sync of the later changes
    (_, first), (_, second) = run.loader.calls
    assert len(run.loader.calls) == 2
    assert second - first >= 0.4 - 0.01  # and it waited out min_sync_period
    assert run.settle(2)[1].startswith("sync: partial, 0 service and 5 endpoint changes")


def test_syncs_are_never_closer_than_min_sync_period_under_a_stream_of_changes(
    start: Callable[..., Running],
) -> None:
    run = start(Timing(min_sync_period=0.1, sync_period=30.0))
    run.list_all(web("10.244.0.1"))
    run.loader.wait_calls(1)
    deadline = time.monotonic() + 0.8
    n = 1
    while time.monotonic() < deadline:
        n += 1
        slice_update(run, "10.244.0.1", f"10.244.1.{n % 250 + 1}")  # a new change each time
        time.sleep(0.01)
    time.sleep(0.3)
    assert not run.store.pending()  # the last changes were synced too
    times = [t for _, t in run.loader.calls]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert 4 <= len(times) <= 11, times
    assert min(gaps) >= 0.1 - 0.01, gaps


def test_a_sync_period_without_changes_brings_a_full_sync_that_writes_nothing_if_nobody_wrote(
    start: Callable[..., Running],
) -> None:
    run = start(Timing(min_sync_period=0.05, sync_period=0.6))
    run.list_all(web("10.244.0.1"))
    run.loader.wait_calls(1)
    slice_update(run, "10.244.0.1", "10.244.0.2")
    messages = run.settle(3)
    assert [m.split(",")[0] for m in messages] == ["sync: full", "sync: partial", "sync: full"]
    assert "wrote nothing" in messages[2]
    assert run.loader.kinds() == ["full", "partial"]
    assert run.sample("kpgen_sync_rules_rewritten_total") == 0


def test_a_full_sync_after_someone_else_wrote_loads_everything_again(
    start: Callable[..., Running],
) -> None:
    loader = RecordingLoader()
    loader.moved = Generation(7, 4242, "nft")
    run = start(Timing(min_sync_period=0.05, sync_period=0.6), loader=loader)
    run.list_all(web("10.244.0.1"))
    loader.wait_calls(1)
    assert loader.wait_calls(2) == ["full", "full"]
    (_, first), (_, second) = loader.calls[:2]
    assert 0.6 - 0.02 <= second - first <= 0.6 + 0.5
    assert run.sample("kpgen_sync_rules_rewritten_total") == 1


def partial_refused_once(start: Callable[..., Running]) -> Running:
    """A controller whose loader refuses the first partial sync, after a full one and one
    endpoint change."""
    loader = RecordingLoader()
    failures = iter([True])
    loader.fail = lambda kind: kind == "partial" and next(failures, False)
    run = start(loader=loader)
    run.list_all(web("10.244.0.1"))
    loader.wait_calls(1)
    slice_update(run, "10.244.0.1", "10.244.0.2")
    return run


def test_a_failed_sync_is_counted_and_the_next_sync_is_full(
    start: Callable[..., Running],
) -> None:
    run = partial_refused_once(start)
    # the refused partial, then a full one without any further change
    assert run.loader.wait_calls(3) == ["full", "partial", "full"]
    run.settle(3)
    assert run.sample("kubeproxy_sync_proxy_rules_nftables_sync_failures_total") == 1
    assert run.sample("kubeproxy_sync_proxy_rules_nftables_partial_sync_failures_total") == 1
    assert run.sample("kubeproxy_sync_full_proxy_rules_duration_seconds_count") == 2
    assert run.sample("kubeproxy_sync_partial_proxy_rules_duration_seconds_count") == 0
    assert "sync failed, the previous rules stay" in run.log.text
    slice_update(run, "10.244.0.1")  # and back to partial syncs afterwards
    assert run.loader.wait_calls(4)[-1] == "partial"


def test_a_failed_full_sync_is_retried_after_a_backoff(start: Callable[..., Running]) -> None:
    loader = RecordingLoader()
    loader.fail = lambda kind: len(loader.calls) <= 3
    run = start(Timing(min_sync_period=0.1, sync_period=30.0), loader=loader)
    run.list_all(web("10.244.0.1"))
    assert loader.wait_calls(4) == ["full"] * 4
    run.settle(4)
    times = [t for _, t in loader.calls]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # 0.1, 0.2, 0.4 s, each with +-20 % jitter (and never less than min_sync_period)
    assert 0.09 <= gaps[0] <= 0.15 and 0.15 <= gaps[1] <= 0.3 and 0.3 <= gaps[2] <= 0.55, gaps
    assert run.sample("kubeproxy_sync_proxy_rules_nftables_sync_failures_total") == 3
    assert run.sample("kubeproxy_sync_proxy_rules_nftables_partial_sync_failures_total") == 0


def test_failed_syncs_are_not_retried_in_a_busy_loop_when_min_sync_period_is_zero(
    start: Callable[..., Running],
) -> None:
    loader = RecordingLoader()
    loader.fail = lambda kind: True
    run = start(Timing(min_sync_period=0.0, sync_period=30.0), loader=loader)
    run.list_all(web("10.244.0.1"))
    time.sleep(0.5)
    attempts = len(loader.calls)
    run.halt()
    assert run.errors == []
    assert attempts < 50, f"{attempts} attempts in 0.5 s"


def test_network_programming_duration_is_observed_for_endpoint_changes(
    start: Callable[..., Running],
) -> None:
    run = start()
    run.list_all(web("10.244.0.1"))
    run.loader.wait_calls(1)
    count = "kubeproxy_network_programming_duration_seconds_count"
    total = "kubeproxy_network_programming_duration_seconds_sum"
    before_count, before_sum = run.sample(count), run.sample(total)
    # a trigger time after kpgen started (earlier ones are not its latency: test below)
    slice_update(run, "10.244.0.1", "10.244.0.2", annotations={TRIGGER_TIME: stamp(0)})
    run.loader.wait_calls(2)
    run.settle(2)
    assert run.sample(count) == before_count + 1
    assert 0.0 <= run.sample(total) - before_sum <= 1.0 + WAIT
    other_port = service("web", cluster_ip="10.96.0.10", ports=[{"port": 81}])
    run.store.apply(SERVICE, "MODIFIED", other_port)
    run.loader.wait_calls(3)
    run.settle(3)
    assert run.sample(count) == before_count + 1  # service changes are not endpoint changes


def test_changes_made_before_kpgen_started_are_not_observed_as_programming_latency(
    start: Callable[..., Running],
) -> None:
    run = start()
    run.list_all(web("10.244.0.1", annotations={TRIGGER_TIME: stamp(3600)}))
    run.loader.wait_calls(1)
    run.settle(1)
    assert run.sample("kubeproxy_network_programming_duration_seconds_sum") < 60


def test_deleting_an_endpoint_slice_does_not_observe_its_old_trigger_time(
    start: Callable[..., Running],
) -> None:
    run = start()
    run.list_all(web("10.244.0.1"))
    run.loader.wait_calls(1)
    before = run.sample("kubeproxy_network_programming_duration_seconds_sum")
    gone = web("10.244.0.1", annotations={TRIGGER_TIME: stamp(3600)})[1]
    run.store.apply(SLICE, "DELETED", gone)
    run.loader.wait_calls(2)
    run.settle(2)
    assert run.sample("kubeproxy_network_programming_duration_seconds_sum") - before < 60


def test_stop_ends_the_run_promptly_even_with_a_long_sync_period(
    start: Callable[..., Running],
) -> None:
    run = start(Timing(min_sync_period=0.05, sync_period=30.0))
    run.list_all(web("10.244.0.1"))
    run.settle(1)
    time.sleep(0.05)  # into the wait for the next change
    run.stop.set()
    run.thread.join(1.5)
    try:
        assert not run.thread.is_alive()
    finally:
        run.store.wake()


def test_backoff_grows_to_its_cap_and_resets() -> None:
    backoff = Backoff(initial=0.5, cap=4.0)
    delays = [backoff.next() for _ in range(6)]
    for delay, nominal in zip(delays, [0.5, 1, 2, 4, 4, 4], strict=True):
        assert 0.8 * nominal <= delay <= 1.2 * nominal
    backoff.reset()
    assert 0.4 <= backoff.next() <= 0.6


def test_backoff_stays_at_its_cap_however_many_failures() -> None:
    backoff = Backoff(initial=0.5, cap=30.0)
    delays = [backoff.next() for _ in range(1100)]
    assert max(delays) <= 36.0


# --- Health, and the server that reports it -----------------------------------------------


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_health_is_good_while_nothing_is_queued_however_long() -> None:
    clock = Clock()
    health = Health(Timing(sync_period=10.0), clock)
    health.updated(None)
    clock.now += 10_000
    healthy, status = health.status()
    assert healthy and status["healthy"] is True


def test_health_fails_once_a_queued_change_is_older_than_twice_the_sync_period() -> None:
    clock = Clock()
    health = Health(Timing(sync_period=10.0), clock)
    health.updated(None)
    clock.now += 100
    queued_at = clock.now
    health.queued()
    clock.now += 15
    health.queued()  # a later change does not make the wait look shorter
    clock.now = queued_at + 20
    assert health.status()[0] is True  # exactly 2 x sync_period: not yet
    clock.now = queued_at + 20.01
    healthy, status = health.status()
    assert healthy is False and status["healthy"] is False
    health.updated(None)
    assert health.status()[0] is True


def test_health_after_a_sync_counts_from_the_changes_that_came_during_it() -> None:
    clock = Clock()
    health = Health(Timing(sync_period=10.0), clock)
    during = clock.now + 1
    clock.now += 2
    health.updated(during)
    clock.now = during + 20.5
    assert health.status()[0] is False


def test_health_fails_when_the_first_sync_is_overdue() -> None:
    clock = Clock()
    health = Health(Timing(sync_period=10.0), clock)
    clock.now += 19
    assert health.status()[0] is True
    clock.now += 2
    assert health.status()[0] is False


def test_health_status_reports_last_updated_and_current_time() -> None:
    clock = Clock(1_800_000_000.0)
    health = Health(Timing(sync_period=10.0), clock)
    assert health.status()[1]["lastUpdated"] == ""
    health.updated(None)
    clock.now += 1.5
    _, status = health.status()
    assert status["lastUpdated"] == "2027-01-15T08:00:00+00:00"
    assert status["currentTime"] == "2027-01-15T08:00:01.500000+00:00"
    assert status["nodeEligible"] is True
    json.dumps(status)


def fetch(url: str) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(url, timeout=WAIT) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.fixture
def served() -> Iterator[Callable[..., tuple[str, Metrics]]]:
    servers = []

    def serve(health: Health, host: str = "127.0.0.1") -> tuple[str, Metrics]:
        metrics = Metrics("nftables")
        server = health_server((host, 0), health, metrics)
        servers.append(server)
        port = server.server_address[1]
        return f"http://{host if ':' not in host else f'[{host}]'}:{port}", metrics

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


def test_health_server_answers_healthz_and_livez_with_json_and_counts_them(
    served: Callable[..., tuple[str, Metrics]],
) -> None:
    health = Health(Timing(sync_period=10.0))
    health.updated(None)
    base, metrics = served(health)
    code, headers, body = fetch(base + "/healthz")
    assert code == 200
    assert headers["Content-Type"] == "application/json"
    status = json.loads(body)
    assert status["healthy"] is True and status["lastUpdated"] and status["currentTime"]
    assert fetch(base + "/healthz?verbose=1")[0] == 200
    assert fetch(base + "/livez")[0] == 200
    assert fetch(base + "/metrics")[0] == 404
    assert fetch(base + "/")[0] == 404
    exposed = generate_latest(metrics.registry).decode()
    assert 'kubeproxy_proxy_healthz_total{code="200"} 2.0' in exposed
    assert 'kubeproxy_proxy_livez_total{code="200"} 1.0' in exposed


def test_health_server_answers_503_when_a_change_waits_too_long(
    served: Callable[..., tuple[str, Metrics]],
) -> None:
    clock = Clock()
    health = Health(Timing(sync_period=10.0), clock)
    base, metrics = served(health)
    clock.now += 21
    code, _, body = fetch(base + "/healthz")
    assert code == 503
    assert json.loads(body)["healthy"] is False
    assert metrics.registry.get_sample_value("kubeproxy_proxy_healthz_total", {"code": "503"}) == 1
    assert (
        metrics.registry.get_sample_value("kubeproxy_proxy_healthz_total", {"code": "200"}) is None
    )


def test_health_server_listens_on_an_ipv6_address(
    served: Callable[..., tuple[str, Metrics]],
) -> None:
    assert parse_bind_address("[::1]:10256") == ("::1", 10256)
    health = Health(Timing(sync_period=10.0))
    health.updated(None)
    base, _ = served(health, "::1")
    assert fetch(base + "/healthz")[0] == 200


# --- kpgen run's settings -----------------------------------------------------------------


def settings_of(tmp_path: Path, **changes: str) -> RunSettings:
    values = {
        "source": f"manifests:{tmp_path}",
        "kubeconfig": None,
        "master": None,
        "min_sync_period": "1s",
        "sync_period": "30s",
        "healthz_bind_address": "0.0.0.0:10256",
        "metrics_bind_address": "127.0.0.1:10249",
        "iptables_backend": "auto",
        **changes,
    }
    return RunSettings.parse(**values)


def test_run_settings_parse_durations_and_addresses(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, min_sync_period="500ms", sync_period="1m30s",
                           healthz_bind_address="", metrics_bind_address="[::1]:9999")  # fmt: skip
    assert settings.manifests == str(tmp_path)
    assert settings.timing == Timing(min_sync_period=0.5, sync_period=90.0)
    assert settings.healthz is None
    assert settings.metrics == ("::1", 9999)
    assert settings_of(tmp_path, source="api").manifests is None


@pytest.mark.parametrize(
    ("flag", "changes"),
    [
        ("--source", {"source": "apiserver"}),
        ("--source", {"source": "manifests:/no/such/directory"}),
        ("--min-sync-period", {"min_sync_period": "1"}),
        ("--min-sync-period", {"min_sync_period": "1 s"}),
        ("--min-sync-period", {"min_sync_period": "-1s"}),
        ("--sync-period", {"sync_period": "soon"}),
        ("--sync-period", {"sync_period": "0s"}),
        ("--healthz-bind-address", {"healthz_bind_address": "localhost:10256"}),
        ("--healthz-bind-address", {"healthz_bind_address": "0.0.0.0"}),
        ("--metrics-bind-address", {"metrics_bind_address": "127.0.0.1:70000"}),
        ("--metrics-bind-address", {"metrics_bind_address": "127.0.0.1:"}),
    ],
)
def test_run_settings_name_the_flag_of_a_bad_value(
    tmp_path: Path, flag: str, changes: dict[str, str]
) -> None:
    with pytest.raises(ValueError, match=f"^{flag}: "):
        settings_of(tmp_path, **changes)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("1m30s", 90.0), ("500ms", 0.5), ("1s", 1.0), ("1h", 3600.0), ("1.5s", 1.5), ("2m", 120.0),
     ("1h2m3s4ms", 3723.004)],
)  # fmt: skip
def test_parse_duration_reads_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "1", "s", "1 s", "1d", "ms1", "1s ", "1s1"])
def test_parse_duration_refuses_what_is_not_a_duration(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_parse_duration_takes_a_bare_zero_as_go_does() -> None:
    assert parse_duration("0") == 0.0


# --- logs ---------------------------------------------------------------------------------


def test_json_logs_are_one_object_a_line_with_the_sync_fields(
    start: Callable[..., Running],
) -> None:
    run = partial_refused_once(start)
    run.settle(3)
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # as setup_logging(..., "json") makes it
    handler.setFormatter(JsonFormatter())
    for record in run.log.records:
        handler.handle(record)
    lines = stream.getvalue().splitlines()
    entries = [json.loads(line) for line in lines]  # each line is one whole object
    syncs = [e for e in entries if e["msg"].startswith("sync:")]
    assert len(syncs) == 2
    first = syncs[0]
    assert {"ts", "level", "logger", "msg"} <= set(first)
    assert first["level"] == "info" and first["logger"] == "kpgen.controller"
    assert first["ts"].endswith("+00:00") and "T" in first["ts"]
    assert first["sync"] == "full"
    assert first["service_changes"] == 1 and first["endpoint_changes"] == 1
    assert first["service_ports"] == 1 and first["written"] is None
    assert isinstance(first["duration_ms"], float)
    failed = next(e for e in entries if e["msg"].startswith("sync failed"))
    assert failed["level"] == "error"
    assert "line 2 of the message" in failed["msg"]  # a multi-line error stays on one line
    assert len(lines) == len(entries)


# --- with the real RuleLoader, inside a namespace -----------------------------------------

# Runs a Controller with the real RuleLoader in a thread, inside a network namespace, through
# the steps given as JSON; prints what it saw.
CONTROLLER_SCRIPT = textwrap.dedent(
    """
    import json, logging, subprocess, sys, threading, time
    from kpgen.dataplane.apply import RuleLoader
    from kpgen.controller.health import Health, Timing
    from kpgen.controller.sync import Controller
    from kpgen.controller.metrics import Metrics
    from kpgen.core.node import NodeFlags, node_config
    from kpgen.inputs.api import NODE, SERVICE, SLICE, Store

    job = json.load(sys.stdin)
    logs = []

    class Keep(logging.Handler):
        def emit(self, record):
            logs.append(record.getMessage())

    logging.getLogger("kpgen").addHandler(Keep())
    logging.getLogger("kpgen").setLevel(logging.INFO)
    node = node_config(NodeFlags(**job["flags"]))
    timing = Timing(min_sync_period=0.05, sync_period=60.0)
    metrics = Metrics(node.mode.value)
    holder = []
    store = Store((SERVICE, SLICE, NODE), on_change=lambda: holder[0].on_change())
    controller = Controller(node, store, RuleLoader(node.mode), metrics, Health(timing), timing)
    holder.append(controller)
    stop = threading.Event()
    threading.Thread(target=controller.run, args=(stop,), daemon=True).start()
    failures = "kubeproxy_sync_proxy_rules_%s_failures_total" % (
        "nftables_sync" if node.mode.value == "nftables" else "iptables_restore")

    def attempts():
        return controller.syncs + (metrics.registry.get_sample_value(failures) or 0)

    seen, snapshots = 0, {}
    for step in job["steps"]:
        op = step["op"]
        if op == "replace":
            store.replace(step["kind"], step["objects"])
        elif op == "apply":
            store.apply(step["kind"], step["event"], step["object"])
        elif op == "shell":
            subprocess.run(step["argv"], check=True)
        elif op == "sleep":
            time.sleep(step["seconds"])
        elif op == "wait":  # for this many more sync attempts
            seen += step["attempts"]
            deadline = time.monotonic() + 10
            while attempts() < seen and time.monotonic() < deadline:
                time.sleep(0.01)
        elif op == "snapshot":
            snapshots[step["name"]] = subprocess.run(
                ["nft", "-a", "list", "ruleset"], capture_output=True, text=True, check=True
            ).stdout
    stop.set()
    store.wake()
    names = ["sync_full_proxy_rules_duration_seconds_count",
             "sync_partial_proxy_rules_duration_seconds_count"]
    values = {n: metrics.registry.get_sample_value("kubeproxy_" + n) for n in names}
    values["failures"] = metrics.registry.get_sample_value(failures)
    values["partial_failures"] = metrics.registry.get_sample_value(
        failures.replace("s_sync_", "s_partial_sync_").replace("_restore_", "_partial_restore_"))
    print(json.dumps({"snapshots": snapshots, "metrics": values, "logs": logs}))
    """
)


def seed() -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = yaml.safe_load(SEED.read_text())["items"]
    return items


def seed_steps() -> list[dict[str, Any]]:
    documents = seed()
    return [
        {"op": "replace", "kind": kind, "objects": [d for d in documents if d["kind"] == kind]}
        for kind in (SERVICE, SLICE)
    ]


def node_port_slice(*extra: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
    slice_ = next(d for d in seed() if d["metadata"]["name"] == "node-port-x8p2w")
    slice_["endpoints"] += [{"addresses": [a], "conditions": {"ready": True}} for a in extra]
    slice_["metadata"]["labels"].update(labels or {})
    return slice_


def run_controller(mode: str, steps: list[dict[str, Any]], tmp_path: Path) -> dict[str, Any]:
    script = tmp_path / "controller.py"
    script.write_text(CONTROLLER_SCRIPT)
    job = {
        "flags": {"hostname": "k8s-worker01", "cluster_cidrs": ["192.168.0.0/16"], "mode": mode},
        "steps": steps,
    }
    with kernel.netns() as namespace:
        result = subprocess.run(
            ["ip", "netns", "exec", namespace, sys.executable, str(script)],
            input=json.dumps(job),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    out: dict[str, Any] = json.loads(result.stdout)
    return out


@pytest.mark.kernel
@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_controller_keeps_the_kernel_rules_in_sync_writing_only_what_changed(
    mode: str, tmp_path: Path
) -> None:
    steps = [
        *seed_steps(),
        {"op": "sleep", "seconds": 0.3},
        {"op": "snapshot", "name": "unlisted"},  # Node not listed yet: nothing written
        {"op": "replace", "kind": NODE, "objects": []},
        {"op": "wait", "attempts": 1},
        {"op": "snapshot", "name": "first"},
        {"op": "apply", "kind": SLICE, "event": "MODIFIED",
         "object": node_port_slice("192.168.70.7")},
        {"op": "wait", "attempts": 1},
        {"op": "snapshot", "name": "changed"},
        {"op": "apply", "kind": SLICE, "event": "MODIFIED",
         "object": node_port_slice("192.168.70.7", labels={"unrelated": "x"})},
        {"op": "wait", "attempts": 1},
        {"op": "snapshot", "name": "same"},
    ]  # fmt: skip
    out = run_controller(mode, steps, tmp_path)
    shots = out["snapshots"]
    assert "kpgen" not in shots["unlisted"].lower()
    assert "192.168.69.246" in shots["first"]
    assert "192.168.70.7" not in shots["first"] and "192.168.70.7" in shots["changed"]
    assert shots["same"] == shots["changed"]  # with rule handles: nothing was rewritten
    syncs = [line for line in out["logs"] if line.startswith("sync:")]
    assert [s.split(",")[0] for s in syncs] == ["sync: full", "sync: partial", "sync: partial"]
    assert "wrote all rules" in syncs[0]
    assert "wrote nothing" not in syncs[1] and "wrote nothing" in syncs[2]
    assert out["metrics"]["sync_full_proxy_rules_duration_seconds_count"] == 1
    assert out["metrics"]["sync_partial_proxy_rules_duration_seconds_count"] == 2
    assert out["metrics"]["failures"] == 0


@pytest.mark.kernel
def test_a_partial_sync_the_kernel_refuses_is_counted_and_a_full_sync_restores_the_rules(
    tmp_path: Path,
) -> None:
    steps = [
        *seed_steps(),
        {"op": "replace", "kind": NODE, "objects": []},
        {"op": "wait", "attempts": 1},
        {"op": "snapshot", "name": "first"},
        {"op": "shell", "argv": ["nft", "delete", "table", "ip", "kpgen"]},  # behind its back
        {"op": "apply", "kind": SLICE, "event": "MODIFIED",
         "object": node_port_slice("192.168.70.7")},
        {"op": "wait", "attempts": 2},
        {"op": "snapshot", "name": "restored"},
    ]  # fmt: skip
    out = run_controller("nftables", steps, tmp_path)
    restored = out["snapshots"]["restored"]
    for chain in ("service-default/cluster-ip/tcp/8080", "external-default/node-port/tcp/8080"):
        assert chain in out["snapshots"]["first"] and chain in restored
    assert "dnat to 192.168.70.7:80" in restored
    assert out["metrics"]["failures"] == 1
    assert out["metrics"]["partial_failures"] == 1
    assert out["metrics"]["sync_full_proxy_rules_duration_seconds_count"] == 2
    assert out["metrics"]["sync_partial_proxy_rules_duration_seconds_count"] == 0
    assert any(line.startswith("sync failed, the previous rules stay") for line in out["logs"])
