"""kpgen's informers (kpgen.inputs.api) with the real ``kubernetes`` client against the test API
server (tests/apiserver.py), which speaks the real list/watch protocol: the store is synced only
once every kind has been listed, then mirrors every change; a 410 Gone relists, a dropped stream
resumes from the last version seen, failures are retried with backoff, bookmarks only move the
version, and the server does the filtering (the node by name, other proxies' services by label).

No kernel: nothing here touches rules. Every test stops its informers (stop event, then the
server ends their watches so that they notice) and checks that they exited.
"""

from __future__ import annotations

import itertools
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polling
import pytest
from apiserver import ApiServer, Request

from kpgen.inputs.api import (
    NODE,
    SERVICE,
    SLICE,
    Backoff,
    Informer,
    Store,
    api_client,
    api_informers,
    typed,
)

Obj = dict[str, Any]
Key = tuple[str, str, str]  # kind, namespace, name
GUARD = 10.0  # seconds: nothing here may wait longer
NODE_NAME = "n1"
PROXY_NAME = "service.kubernetes.io/service-proxy-name"
HEADLESS = "service.kubernetes.io/headless"
# what kube-proxy's service informer asks the server for (kpgen must ask the same)
SERVICE_SELECTOR = f"!{PROXY_NAME},!{HEADLESS}"
PATHS = {
    SERVICE: "/api/v1/services",
    SLICE: "/apis/discovery.k8s.io/v1/endpointslices",
    NODE: "/api/v1/nodes",
}


# --- objects ------------------------------------------------------------------------------


def service(name: str, ip: str = "10.96.0.10", labels: dict[str, str] | None = None) -> Obj:
    meta: Obj = {"name": name, "namespace": "default"}
    if labels:
        meta["labels"] = labels
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"type": "ClusterIP", "clusterIP": ip, "ports": [{"port": 80}]},
    }


def endpoint_slice(name: str, svc: str, *addresses: str) -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }


def node(name: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}


def event(name: str) -> Obj:
    """An Event: a change of a kind no informer watches, which only moves the version on."""
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": name, "namespace": "default"},
        "reason": "Test",
        "message": name,
    }


def rv(obj: Obj) -> str:
    return str(obj["metadata"]["resourceVersion"])


def seed(server: ApiServer) -> None:
    """Two services, a slice, our node and another node."""
    server.create(service("a"))
    server.create(service("b", "10.96.0.11"))
    server.create(endpoint_slice("a-x1", "a", "192.168.1.10", "192.168.1.11"))
    server.create(node(NODE_NAME))
    server.create(node("n2"))


# --- what the store should hold -------------------------------------------------------------


def expected(server: ApiServer, node_name: str = NODE_NAME) -> dict[Key, Obj]:
    """What a store fed by kpgen's informers must hold: the services kube-proxy would proxy,
    every slice, and this node; as the server stores them, less the metadata kpgen never
    reads (kpgen.inputs.api.typed)."""
    wanted: dict[Key, Obj] = {}
    for svc in server.objects("Service"):
        labels = svc["metadata"].get("labels") or {}
        if PROXY_NAME not in labels and HEADLESS not in labels:
            wanted[(SERVICE, "default", svc["metadata"]["name"])] = typed(SERVICE, svc)
    for sl in server.objects("EndpointSlice"):
        wanted[(SLICE, sl["metadata"]["namespace"], sl["metadata"]["name"])] = typed(SLICE, sl)
    own = server.get("Node", None, node_name)
    if own is not None:
        wanted[(NODE, "", node_name)] = typed(NODE, own)
    return wanted


_MIRRORS: weakref.WeakKeyDictionary[Store, dict[Key, Obj]] = weakref.WeakKeyDictionary()


def held(store: Store) -> dict[Key, Obj]:
    """Everything the store knows now, as the objects it has handed out: its changes, taken
    here (only here), applied in turn to a copy (the store itself keeps versions)."""
    mirror = _MIRRORS.setdefault(store, {})
    for key, obj in store.take().changed.items():
        if obj is None:
            mirror.pop(key, None)
        else:
            mirror[key] = obj
    assert len(mirror) == store.count()
    return dict(mirror)


def wait_until(what: str, condition: Callable[[], bool], timeout: float = GUARD) -> float:
    """:func:`polling.wait_until`, bounded by GUARD unless told, polling every 20 ms."""
    return polling.wait_until(what, condition, timeout, poll=0.02)


def wait_mirror(store: Store, server: ApiServer, node_name: str = NODE_NAME) -> None:
    """Until the store holds exactly what it should; takes its pending changes."""
    last: dict[Key, Obj] = {}

    def same() -> bool:
        nonlocal last
        last = held(store)
        return last == expected(server, node_name)

    try:
        wait_until("the store mirrors the server", same, 5)
    except AssertionError:
        want = expected(server, node_name)
        missing = sorted(set(want) - set(last))
        extra = sorted(set(last) - set(want))
        stale = sorted(k for k in set(want) & set(last) if want[k] != last[k])
        raise AssertionError(
            f"store != server: missing {missing}, extra {extra}, stale {stale}"
        ) from None


def wait_counts(store: Store, services: int, endpoints: int) -> None:
    """Until the store has exactly these pending (service, endpoint) changes."""
    wait_until(
        f"{services} service and {endpoints} endpoint changes pending "
        f"(now {store.pending_counts()})",
        lambda: store.pending_counts() == (services, endpoints),
        5,
    )
    time.sleep(0.1)  # and no more come
    assert store.pending_counts() == (services, endpoints)


# --- requests, as the server saw them --------------------------------------------------------


def lists(server: ApiServer, kind: str, status: int | None = 200) -> list[Request]:
    """The list (non-watch) requests of a kind's informer that got ``status`` (None: any)."""
    return [
        r
        for r in server.requests
        if r.path == PATHS[kind] and not r.watch and (status is None or r.status == status)
    ]


def watches(server: ApiServer, kind: str) -> list[Request]:
    return [r for r in server.requests if r.path == PATHS[kind] and r.watch]


# --- running informers -----------------------------------------------------------------------


class Gate:
    """Wraps an informer's API call: while closed, its list (or watch) calls wait at the gate,
    so that a test can change the server while an informer is disconnected. Records when each
    call came and with which arguments."""

    def __init__(self, call: Callable[..., Any]) -> None:
        self._call = call
        self.lists = threading.Event()
        self.watches = threading.Event()
        self.lists.set()
        self.watches.set()
        self._cond = threading.Condition()
        self.waiting = 0  # calls held at the gate now
        self.calls: list[tuple[float, Obj]] = []

    def __call__(self, **kwargs: Any) -> Any:
        gate = self.watches if kwargs.get("watch") else self.lists
        with self._cond:
            self.calls.append((time.monotonic(), dict(kwargs)))
            held = not gate.is_set()
            self.waiting += held
            self._cond.notify_all()
        try:
            gate.wait(GUARD)
        finally:
            with self._cond:
                self.waiting -= held
        return self._call(**kwargs)

    def wait_held(self, count: int = 1) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: self.waiting >= count, GUARD)
        assert ok, "the informer never came back to the gate"

    def open(self) -> None:
        self.lists.set()
        self.watches.set()


class Harness:
    """Informers into a store, each behind a :class:`Gate`; stops them at the end."""

    def __init__(self, server: ApiServer, api: Any) -> None:
        self.server, self.api = server, api
        self.stop = threading.Event()
        self.informers: list[Informer] = []
        self.gates: dict[str, Gate] = {}
        self.first_lists = threading.Semaphore(0)
        self.store = Store((SERVICE, SLICE, NODE), on_change=self._changed)

    def _changed(self) -> None:
        self.first_lists.release()

    def start(
        self,
        node_name: str = NODE_NAME,
        *,
        kinds: tuple[str, ...] = (SERVICE, SLICE, NODE),
        lists_open: bool = True,
        watch_timeout: int | None = None,
        backoff: Backoff | None = None,
    ) -> Harness:
        if kinds != (SERVICE, SLICE, NODE):
            self.store = Store(kinds, on_change=self._changed)
        for informer in api_informers(self.store, self.api, node_name, self.stop):
            if informer.kind not in kinds:
                continue
            gate = Gate(informer.call)
            if not lists_open:
                gate.lists.clear()
            informer.call = gate
            if watch_timeout is not None:
                informer.watch_timeout = watch_timeout
            if backoff is not None:
                informer.backoff = backoff
            self.gates[informer.kind] = gate
            self.informers.append(informer)
            informer.start()
        return self

    def synced(self) -> Harness:
        assert self.store.wait(GUARD, lambda: self.store.synced), "the store never synced"
        return self

    def watching(self) -> None:
        """Until every informer's watch is open. The server counts a watch as open just before
        it answers; a stream dropped before the answer is retried by urllib3 itself, past the
        gates, so wait until the answers are out."""
        self.server.wait_for_watches(len(self.informers), timeout=GUARD)
        for kind in self.gates:
            wait_until(f"{kind} watch answered", lambda k=kind: watches(self.server, k)[-1].status)
        time.sleep(0.1)

    def close_watches(self) -> None:
        for gate in self.gates.values():
            gate.watches.clear()

    def open(self) -> None:
        for gate in self.gates.values():
            gate.open()

    def wait_held(self) -> None:
        for gate in self.gates.values():
            gate.wait_held()

    def shutdown(self) -> None:
        self.stop.set()
        self.open()
        deadline = time.monotonic() + GUARD
        while any(i.is_alive() for i in self.informers) and time.monotonic() < deadline:
            self.server.drop_watches()
            for informer in self.informers:
                informer.join(0.2)
        alive = [i.name for i in self.informers if i.is_alive()]
        assert not alive, f"informers still running after stop: {alive}"


TOKEN = "informer-t0ken"  # the kubeconfig's bearer token, which every request must carry


@pytest.fixture
def server() -> Iterator[ApiServer]:
    # bookmarks only when a test sends them: the versions the informers resume from are then
    # exactly those of the last events they saw
    with ApiServer(bookmark_interval=3600, too_large_wait=0.2) as srv:
        yield srv
    assert srv.errors == []


@pytest.fixture
def api(server: ApiServer, tmp_path: Path) -> Iterator[Any]:
    client = api_client(str(server.kubeconfig(tmp_path / "kubeconfig", token=TOKEN)), None)
    yield client
    client.close()


@pytest.fixture
def harness(server: ApiServer, api: Any) -> Iterator[Harness]:
    running = Harness(server, api)
    yield running
    running.shutdown()


# --- the first lists --------------------------------------------------------------------------


def test_store_is_not_synced_until_services_slices_and_the_node_are_each_listed(
    server: ApiServer, harness: Harness
) -> None:
    seed(server)
    harness.start(lists_open=False)
    for gate in harness.gates.values():
        gate.wait_held()
    for kind in (SERVICE, SLICE, NODE):
        assert not harness.store.synced, f"synced before {kind} was listed"
        harness.gates[kind].lists.set()
        # the store calls on_change once after the first list of each kind
        assert harness.first_lists.acquire(timeout=GUARD), f"{kind} was never listed"
        assert len(lists(server, kind)) == 1
    assert harness.store.synced
    assert held(harness.store) == expected(server)


def test_store_mirrors_creates_updates_and_deletes_after_the_first_lists(
    server: ApiServer, harness: Harness
) -> None:
    seed(server)
    harness.start().synced()
    wait_mirror(harness.store, server)
    server.create(service("c", "10.96.0.12"))
    server.patch("Service", "default", "b", {"spec": {"clusterIP": "10.96.0.21"}})
    server.delete("Service", "default", "a")
    server.create(endpoint_slice("c-x1", "c", "192.168.1.20"))
    server.patch("EndpointSlice", "default", "a-x1", {"endpoints": []})
    server.delete("EndpointSlice", "default", "a-x1")
    server.patch("Node", None, NODE_NAME, {"metadata": {"labels": {"zone": "z1"}}})
    wait_counts(harness.store, 3, 3)
    wait_mirror(harness.store, server)
    assert held(harness.store)[(NODE, "", NODE_NAME)]["metadata"]["labels"] == {"zone": "z1"}
    # one list each, then only watches
    assert [len(lists(server, kind)) for kind in PATHS] == [1, 1, 1]
    # lists and watches authenticate as the generated API classes would
    assert any(r.query.get("watch") == "true" for r in server.requests)
    assert {r.authorization for r in server.requests} == {f"Bearer {TOKEN}"}


# --- reconnecting -------------------------------------------------------------------------------


def test_compacted_history_and_a_dropped_watch_make_it_relist_and_lose_no_change(
    server: ApiServer, harness: Harness
) -> None:
    seed(server)
    harness.start().synced().watching()
    wait_mirror(harness.store, server)
    harness.close_watches()
    assert server.drop_watches() == 3
    harness.wait_held()  # every informer is back, about to watch from its last version
    # changes while they are away, and then the history of them is gone
    server.create(service("c", "10.96.0.12"))
    server.patch("Service", "default", "a", {"spec": {"clusterIP": "10.96.0.20"}})
    server.delete("EndpointSlice", "default", "a-x1")
    server.create(endpoint_slice("c-x1", "c", "192.168.1.20"))
    server.patch("Node", None, NODE_NAME, {"metadata": {"labels": {"zone": "z1"}}})
    server.compact()
    harness.open()
    for kind in PATHS:
        wait_until(f"{kind} listed again", lambda kind=kind: len(lists(server, kind)) == 2)
    # the relist counts what changed, so that the controller syncs
    wait_counts(harness.store, 2, 2)
    wait_mirror(harness.store, server)
    # and the watches go on from the new lists: a change after them arrives
    server.create(service("d", "10.96.0.13"))
    wait_mirror(harness.store, server)
    assert [len(lists(server, kind)) for kind in PATHS] == [2, 2, 2]


def test_dropped_watch_resumes_from_the_last_version_seen_without_relisting(
    server: ApiServer, harness: Harness
) -> None:
    seed(server)
    harness.start().synced().watching()
    # the last event each informer sees: a delete for services, an update for the others
    server.create(service("c", "10.96.0.12"))
    last = {SERVICE: rv(server.delete("Service", "default", "b"))}
    last[SLICE] = rv(server.patch("EndpointSlice", "default", "a-x1", {"endpoints": []}))
    last[NODE] = rv(server.patch("Node", None, NODE_NAME, {"metadata": {"labels": {"x": "1"}}}))
    server.create(event("unwatched"))  # moves the version on; no informer sees it
    wait_mirror(harness.store, server)
    before = {kind: len(watches(server, kind)) for kind in PATHS}

    harness.close_watches()
    assert server.drop_watches() == 3
    harness.wait_held()
    server.create(service("d", "10.96.0.13"))
    server.delete("Service", "default", "c")
    server.create(endpoint_slice("d-x1", "d", "192.168.1.30"))
    server.patch("Node", None, NODE_NAME, {"metadata": {"labels": {"x": "2"}}})
    harness.open()
    wait_counts(harness.store, 2, 1)
    wait_mirror(harness.store, server)
    for kind in PATHS:
        resumed = watches(server, kind)[before[kind]]
        assert resumed.query.get("resourceVersion") == last[kind], (kind, resumed.query)
    assert [len(lists(server, kind, None)) for kind in PATHS] == [1, 1, 1], "it listed again"


def test_watch_that_ends_cleanly_is_resumed_from_the_last_version_seen(
    server: ApiServer, harness: Harness
) -> None:
    seed(server)
    listed_at = str(server.current_resource_version)
    harness.start(kinds=(SERVICE,), watch_timeout=1).synced()
    listed = lists(server, SERVICE)[0]
    created = rv(server.create(service("c", "10.96.0.12")))
    # the server ends each watch after timeoutSeconds=1; the informer watches again
    wait_until("two more watches", lambda: len(watches(server, SERVICE)) >= 3, 5)
    first, second, third = watches(server, SERVICE)[:3]
    assert first.query["timeoutSeconds"] == "1"
    assert first.query["resourceVersion"] == listed_at
    assert second.query["resourceVersion"] == third.query["resourceVersion"] == created
    assert listed.query.get("resourceVersion") in (None, "")
    assert len(lists(server, SERVICE, None)) == 1
    server.delete("Service", "default", "a")
    wait_until(
        "the store follows the delete",
        lambda: (SERVICE, "default", "a") not in held(harness.store),
        5,
    )


# --- failures -----------------------------------------------------------------------------------


def test_failed_lists_and_watches_are_retried_with_growing_backoff(
    server: ApiServer, harness: Harness
) -> None:
    seed(server)
    server.fail_next(3, 500)
    harness.start(kinds=(SERVICE,), backoff=Backoff(initial=0.1, cap=2.0)).synced()
    gate = harness.gates[SERVICE]
    attempts = [at for at, kwargs in gate.calls if not kwargs.get("watch")]
    assert [r.status for r in lists(server, SERVICE, None)] == [500, 500, 500, 200]
    gaps = [b - a for a, b in itertools.pairwise(attempts)]
    assert len(gaps) == 3
    assert gaps[0] >= 0.07, f"retried without a pause: {gaps}"
    assert gaps[0] < gaps[1] < gaps[2], f"the backoff did not grow: {gaps}"
    created = rv(server.create(service("c", "10.96.0.12")))

    # a watch that fails is retried from the same version, without a list
    wait_until("the store has c", lambda: (SERVICE, "default", "c") in held(harness.store), 5)
    harness.watching()
    watched = len(watches(server, SERVICE))
    server.fail_next(2, 500, path=PATHS[SERVICE])
    server.drop_watches()
    wait_until("a watch after the failures", lambda: len(watches(server, SERVICE)) >= watched + 3)
    retries = watches(server, SERVICE)[watched : watched + 3]
    assert [r.status for r in retries] == [500, 500, 200]
    assert {r.query["resourceVersion"] for r in retries} == {created}
    assert len(lists(server, SERVICE, None)) == 4
    server.create(service("d", "10.96.0.13"))
    wait_until("the store has d", lambda: (SERVICE, "default", "d") in held(harness.store), 5)


def test_all_informers_converge_after_injected_server_errors(
    server: ApiServer, harness: Harness
) -> None:
    seed(server)
    server.fail_next(3, 500)
    harness.start().synced()
    failed = [r for r in server.requests if r.status == 500]
    assert len(failed) == 3
    wait_mirror(harness.store, server)
    server.create(service("c", "10.96.0.12"))
    wait_mirror(harness.store, server)


# --- bookmarks and selectors ------------------------------------------------------------------


def test_bookmarks_move_the_resume_version_and_change_nothing_in_the_store(
    server: ApiServer, harness: Harness
) -> None:
    seed(server)
    harness.start().synced().watching()
    wait_mirror(harness.store, server)
    assert not harness.store.pending()
    # the version moves on without any change the informers see
    now = rv(server.create(event("e1")))
    before = {kind: len(watches(server, kind)) for kind in PATHS}
    harness.close_watches()
    server.send_bookmarks()
    server.drop_watches(graceful=True)  # after the bookmark, the stream ends cleanly
    harness.wait_held()
    assert not harness.store.pending(), "a bookmark was taken for a change"
    assert held(harness.store) == expected(server)
    harness.open()
    for kind in PATHS:
        wait_until(f"{kind} watches again", lambda k=kind: len(watches(server, k)) > before[k])
        resumed = watches(server, kind)[before[kind]]
        assert resumed.query["allowWatchBookmarks"] == "true"
        assert resumed.query["resourceVersion"] == now, f"{kind} ignored the bookmark"
    assert not harness.store.pending()
    assert [len(lists(server, kind, None)) for kind in PATHS] == [1, 1, 1]


def test_node_informer_sees_only_its_own_node(server: ApiServer, harness: Harness) -> None:
    seed(server)
    harness.start().synced()
    assert [k for k in held(harness.store) if k[0] == NODE] == [(NODE, "", NODE_NAME)]
    server.patch("Node", None, "n2", {"metadata": {"labels": {"x": "1"}}})
    server.create(node("n3"))
    mine = rv(server.patch("Node", None, NODE_NAME, {"metadata": {"labels": {"x": "1"}}}))
    found: dict[Key, Obj] = {}

    def has_mine() -> bool:
        found.update(held(harness.store))
        return found[(NODE, "", NODE_NAME)]["metadata"]["resourceVersion"] == mine

    wait_until("our node's change arrives", has_mine, 5)
    assert [k for k in found if k[0] == NODE] == [(NODE, "", NODE_NAME)]
    for request in [*lists(server, NODE), *watches(server, NODE)]:
        assert request.query["fieldSelector"] == f"metadata.name={NODE_NAME}"


def test_services_of_another_proxy_are_filtered_by_the_server(
    server: ApiServer, harness: Harness
) -> None:
    seed(server)
    server.create(service("other", "10.96.0.30", {PROXY_NAME: "someone-else"}))
    server.create(service("headless", "10.96.0.31", {HEADLESS: ""}))
    harness.start().synced()
    assert sorted(k[2] for k in held(harness.store) if k[0] == SERVICE) == ["a", "b"]
    for request in [*lists(server, SERVICE), *watches(server, SERVICE)]:
        assert request.query["labelSelector"] == SERVICE_SELECTOR
    # a service that takes the label leaves the store; one that drops it joins
    server.patch("Service", "default", "a", {"metadata": {"labels": {PROXY_NAME: "x"}}})
    server.patch("Service", "default", "other", {"metadata": {"labels": {PROXY_NAME: None}}})
    wait_mirror(harness.store, server)
    services = [r for r in server.requests if r.path == PATHS[SERVICE]]
    assert all(r.query.get("labelSelector") == SERVICE_SELECTOR for r in services)


def test_the_store_tells_versions_apart_by_resource_version_or_else_by_content() -> None:
    """An object the server wrote again has a new resourceVersion: a change, even if what kpgen
    reads is the same; the same version listed or delivered again is none. An object without
    one (written by hand, not by a server) is compared by its content."""
    store = Store([SERVICE])

    def service(name: str, version: str | None, port: int) -> dict[str, Any]:
        meta = {"name": name, "namespace": "default"}
        if version is not None:
            meta["resourceVersion"] = version
        return {"metadata": meta, "spec": {"ports": [{"port": port}]}}

    def changed() -> set[str]:
        return {name for _, _, name in store.take().changed}

    store.replace(SERVICE, [service("a", "10", 80), service("b", None, 80)])
    assert changed() == {"a", "b"}
    store.replace(SERVICE, [service("a", "10", 80), service("b", None, 80)])
    store.apply(SERVICE, "MODIFIED", service("a", "10", 80))
    assert changed() == set()
    store.apply(SERVICE, "MODIFIED", service("a", "11", 80))  # rewritten, the same spec
    store.apply(SERVICE, "MODIFIED", service("b", None, 81))
    assert changed() == {"a", "b"}
    store.replace(SERVICE, [service("a", "11", 80), service("b", None, 81)])
    assert changed() == set()


def test_a_first_list_is_handed_out_a_page_at_a_time_and_completed_as_a_whole() -> None:
    """The pages of a kind's first list are changes as they come (the controller parses them
    while the rest arrives) though the store is not synced; once the list is complete, what
    an earlier, failed first list had brought and this one did not list is deleted."""
    store = Store([SERVICE, SLICE])

    def service(name: str, version: str) -> dict[str, Any]:
        return {"metadata": {"name": name, "namespace": "default", "resourceVersion": version}}

    failed: set[tuple[str, str]] = set()  # a first list that broke off after one page
    store.preview(SERVICE, failed, [service("a", "1"), service("gone", "1")])
    assert set(store.take_objects()) == {(SERVICE, "default", "a"), (SERVICE, "default", "gone")}
    seen: set[tuple[str, str]] = set()  # the list again, in two pages
    store.preview(SERVICE, seen, [service("a", "1")])
    store.preview(SERVICE, seen, [service("b", "1")])
    assert not store.synced and store.objects_waiting()
    assert store.take_objects() == {(SERVICE, "default", "b"): typed(SERVICE, service("b", "1"))}
    store.previewed(SERVICE, seen)
    store.replace(SLICE, [])
    assert store.synced
    snapshot = store.take()
    assert snapshot.changed == {(SERVICE, "default", "gone"): None}
    assert snapshot.service_changes == 4  # a, gone, b, and gone's deletion: all counted once
    store.replace(SERVICE, [service("a", "1"), service("b", "1")])  # a list again: no change
    assert not store.pending()
