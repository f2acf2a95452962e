"""The test API server (tests/apiserver.py) speaks the list/watch protocol as the real
kube-apiserver does, as seen by the real ``kubernetes`` client configured from the kubeconfig
the server writes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import urllib3
from apiserver import ApiError, ApiServer
from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

Obj = dict[str, Any]
PROXY_SELECTOR = "!service.kubernetes.io/service-proxy-name,!service.kubernetes.io/headless"
GUARD = 5  # seconds: a client read that waits longer fails the test instead of hanging it


def service(name: str, namespace: str = "default", labels: dict[str, str] | None = None) -> Obj:
    meta: Obj = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = labels
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "ports": [{"port": 80}]},
    }


def endpoint_slice(name: str, svc: str, namespace: str = "default") -> Obj:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": svc},
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["192.168.1.10"], "conditions": {"ready": True}}],
        "ports": [{"port": 8080, "protocol": "TCP"}],
    }


def node(name: str) -> Obj:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}


@pytest.fixture
def server() -> Iterator[ApiServer]:
    with ApiServer(bookmark_interval=0.05, too_large_wait=0.2) as srv:
        yield srv
    assert srv.errors == []


@pytest.fixture
def api(server: ApiServer, tmp_path: Path) -> Iterator[client.ApiClient]:
    configuration = client.Configuration()
    config.load_kube_config(
        config_file=str(server.kubeconfig(tmp_path / "kubeconfig")),
        client_configuration=configuration,
    )
    with client.ApiClient(configuration) as api_client:
        yield api_client


@pytest.fixture
def core(api: client.ApiClient) -> client.CoreV1Api:
    return client.CoreV1Api(api)


def services_stream(core: client.CoreV1Api, **kwargs: Any) -> Iterator[Obj]:
    """A watch of all services, raw events."""
    return watch.Watch().stream(
        core.list_service_for_all_namespaces, deserialize=False, _request_timeout=GUARD, **kwargs
    )


def until(stream: Iterator[Obj], name: str) -> list[tuple[str, str]]:
    """(type, name) of the events of a stream up to and with the one about ``name``."""
    seen: list[tuple[str, str]] = []
    for event in stream:
        seen.append((event["type"], event["object"]["metadata"].get("name", "")))
        if seen[-1][1] == name:
            return seen
    raise AssertionError(f"the stream ended before {name}: {seen}")


def rv_of(obj: Obj) -> int:
    return int(obj["metadata"]["resourceVersion"])


# --- objects and lists ------------------------------------------------------------------------


def test_every_change_takes_the_next_global_resource_version(server: ApiServer) -> None:
    start = server.current_resource_version
    a = server.create(service("a"))
    n = server.create(node("n1"))
    a2 = server.patch("Service", "default", "a", {"spec": {"clusterIP": "10.96.0.11"}})
    gone = server.delete("Node", None, "n1")
    assert [rv_of(o) for o in (a, n, a2, gone)] == [start + 1, start + 2, start + 3, start + 4]
    assert server.current_resource_version == start + 4
    assert a["metadata"]["uid"] == a2["metadata"]["uid"] != n["metadata"]["uid"]
    assert a["metadata"]["creationTimestamp"].endswith("Z")
    assert server.get("Node", None, "n1") is None
    with pytest.raises(ApiError) as exc:
        server.create(service("a"))
    assert exc.value.code == 409


def test_an_update_that_changes_nothing_writes_nothing(server: ApiServer) -> None:
    stored = server.create(service("a"))
    again = server.update(service("a"))
    assert again == stored
    assert server.current_resource_version == rv_of(stored)


def test_update_with_a_stale_resource_version_is_a_conflict(server: ApiServer) -> None:
    old = server.create(service("a"))
    server.patch("Service", "default", "a", {"metadata": {"labels": {"x": "1"}}})
    with pytest.raises(ApiError) as exc:
        server.update(old)
    assert exc.value.code == 409


def test_list_returns_objects_and_the_current_resource_version(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    server.create(service("b", "other"))
    server.create(service("a"))
    server.create(node("n1"))
    typed = core.list_service_for_all_namespaces()
    assert [(s.metadata.namespace, s.metadata.name) for s in typed.items] == [
        ("default", "a"),
        ("other", "b"),
    ]
    assert typed.metadata.resource_version == str(server.current_resource_version)
    raw = json.loads(core.list_namespaced_service("other", _preload_content=False).data)
    assert raw["kind"] == "ServiceList" and raw["apiVersion"] == "v1"
    assert [i["metadata"]["name"] for i in raw["items"]] == ["b"]
    assert "kind" not in raw["items"][0] and "apiVersion" not in raw["items"][0]
    assert raw["items"][0]["metadata"]["resourceVersion"] == "2"


def test_endpoint_slices_and_nodes_are_served(server: ApiServer, api: client.ApiClient) -> None:
    server.create(endpoint_slice("web-abc", "web"))
    server.create(endpoint_slice("db-abc", "db", "other"))
    server.create(node("n1"))
    discovery = client.DiscoveryV1Api(api)
    every = discovery.list_endpoint_slice_for_all_namespaces()
    assert [s.metadata.name for s in every.items] == ["web-abc", "db-abc"]
    assert every.items[0].endpoints[0].addresses == ["192.168.1.10"]
    assert [s.metadata.name for s in discovery.list_namespaced_endpoint_slice("other").items] == [
        "db-abc"
    ]
    core = client.CoreV1Api(api)
    assert core.read_node("n1").metadata.name == "n1"
    with pytest.raises(ApiException) as exc:
        core.read_node("n2")
    assert exc.value.status == 404


def test_label_selectors_filter_lists(server: ApiServer, core: client.CoreV1Api) -> None:
    server.create(service("plain", labels={"app": "web"}))
    server.create(service("db", labels={"app": "db"}))
    server.create(service("other-proxy", labels={"service.kubernetes.io/service-proxy-name": "x"}))
    server.create(service("headless", labels={"service.kubernetes.io/headless": ""}))

    def names(selector: str) -> list[str]:
        listed = core.list_service_for_all_namespaces(label_selector=selector)
        return [s.metadata.name for s in listed.items]

    assert names(PROXY_SELECTOR) == ["db", "plain"]
    assert names("app=web") == ["plain"]
    assert names("app==db") == ["db"]
    assert names("app") == ["db", "plain"]
    assert names("app!=web") == ["db", "headless", "other-proxy"]
    assert names("app in (web, db)") == ["db", "plain"]
    assert names("app notin (web)") == ["db", "headless", "other-proxy"]
    with pytest.raises(ApiException) as exc:
        names("app in web")
    assert exc.value.status == 400


def test_field_selector_picks_a_node_by_name(server: ApiServer, core: client.CoreV1Api) -> None:
    server.create(node("n1"))
    server.create(node("n2"))
    listed = core.list_node(field_selector="metadata.name=n2")
    assert [n.metadata.name for n in listed.items] == ["n2"]
    assert [n.metadata.name for n in core.list_node(field_selector="metadata.name!=n2").items] == [
        "n1"
    ]
    with pytest.raises(ApiException) as exc:
        core.list_node(field_selector="spec.podCIDR=x")
    assert exc.value.status == 400


def test_paging_serves_one_snapshot_and_an_expired_continue_is_410(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    for i in range(25):
        server.create(service(f"s{i:02}"))
    first = core.list_service_for_all_namespaces(limit=10)
    assert [s.metadata.name for s in first.items] == [f"s{i:02}" for i in range(10)]
    assert first.metadata.remaining_item_count == 15
    # changes after the first page do not show in the next pages of the same list
    server.delete("Service", "default", "s15")
    server.create(service("s99"))
    second = core.list_service_for_all_namespaces(limit=10, _continue=first.metadata._continue)
    third = core.list_service_for_all_namespaces(limit=10, _continue=second.metadata._continue)
    names = [s.metadata.name for page in (first, second, third) for s in page.items]
    assert names == [f"s{i:02}" for i in range(25)]
    assert third.metadata._continue is None
    assert first.metadata.resource_version == third.metadata.resource_version

    server.compact()
    with pytest.raises(ApiException) as exc:
        core.list_service_for_all_namespaces(limit=10, _continue=first.metadata._continue)
    assert exc.value.status == 410
    status = json.loads(exc.value.body)
    assert status["reason"] == "Expired" and status["metadata"]["continue"]


def test_exact_list_shows_a_past_state_and_410_once_compacted(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    server.create(service("a"))
    before = str(server.current_resource_version)
    server.create(service("b"))
    server.delete("Service", "default", "a")
    past = core.list_service_for_all_namespaces(
        resource_version=before, resource_version_match="Exact"
    )
    assert [s.metadata.name for s in past.items] == ["a"]
    assert past.metadata.resource_version == before
    # "not older than" an old version is the current state
    now = core.list_service_for_all_namespaces(resource_version=before)
    assert [s.metadata.name for s in now.items] == ["b"]

    server.compact()
    for kwargs in ({"resource_version_match": "Exact"}, {"limit": 5}):
        with pytest.raises(ApiException) as exc:
            core.list_service_for_all_namespaces(resource_version=before, **kwargs)
        assert exc.value.status == 410, kwargs
        assert json.loads(exc.value.body)["reason"] == "Expired"
    # a list "not older than" it is still fine
    assert len(core.list_service_for_all_namespaces(resource_version=before).items) == 1


def test_list_not_older_than_a_future_version_is_504(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    future = str(server.current_resource_version + 10)
    with pytest.raises(ApiException) as exc:
        core.list_service_for_all_namespaces(resource_version=future)
    assert exc.value.status == 504


# --- watch ------------------------------------------------------------------------------------


def test_watch_from_a_listed_version_sees_later_changes_in_order_and_nothing_earlier(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    server.create(service("before"))
    server.patch("Service", "default", "before", {"metadata": {"labels": {"v": "2"}}})
    listed = core.list_service_for_all_namespaces()
    server.create(service("a"))
    server.patch("Service", "default", "a", {"spec": {"clusterIP": "10.96.0.99"}})
    server.delete("Service", "default", "before")
    server.create(node("n1"))  # another resource: not in this watch
    stream = services_stream(core, resource_version=listed.metadata.resource_version)
    first = until(stream, "a")
    server.delete("Service", "default", "a")  # live, after the watch began
    server.create(service("end"))
    assert first + until(stream, "end") == [
        ("ADDED", "a"),
        ("MODIFIED", "a"),
        ("DELETED", "before"),
        ("DELETED", "a"),
        ("ADDED", "end"),
    ]


def test_watch_events_carry_kind_and_the_resource_version_of_the_change(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    start = str(server.current_resource_version)
    created = server.create(service("a"))
    deleted = server.delete("Service", "default", "a")
    events = []
    for event in services_stream(core, resource_version=start):
        events.append(event)
        if len(events) == 2:
            break
    assert [e["object"]["kind"] for e in events] == ["Service", "Service"]
    assert [e["object"]["apiVersion"] for e in events] == ["v1", "v1"]
    assert [rv_of(e["object"]) for e in events] == [rv_of(created), rv_of(deleted)]
    assert rv_of(deleted) > rv_of(created)


@pytest.mark.parametrize("start", ["", "0"])
def test_watch_from_empty_or_zero_version_starts_with_the_current_objects(
    server: ApiServer, core: client.CoreV1Api, start: str
) -> None:
    server.create(service("a"))
    server.create(service("gone"))
    server.delete("Service", "default", "gone")
    server.create(service("b"))
    stream = services_stream(core, resource_version=start)
    assert until(stream, "b") == [("ADDED", "a"), ("ADDED", "b")]
    server.create(service("c"))
    assert until(stream, "c") == [("ADDED", "c")]


def test_watch_with_a_label_selector_sees_objects_enter_and_leave_it(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    start = str(server.current_resource_version)
    server.create(service("a"))
    server.create(service("skipped", labels={"service.kubernetes.io/headless": ""}))
    server.patch(
        "Service", "default", "a", {"metadata": {"labels": {"service.kubernetes.io/headless": ""}}}
    )
    server.patch("Service", "default", "a", {"metadata": {"labels": None}})
    server.create(service("end"))
    stream = services_stream(core, resource_version=start, label_selector=PROXY_SELECTOR)
    assert until(stream, "end") == [
        ("ADDED", "a"),
        ("DELETED", "a"),  # it got the headless label
        ("ADDED", "a"),  # and lost it
        ("ADDED", "end"),
    ]


def test_watch_with_a_field_selector_sees_only_that_node(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    server.create(node("n1"))
    server.create(node("n2"))
    stream = watch.Watch().stream(
        core.list_node,
        field_selector="metadata.name=n2",
        resource_version="",
        deserialize=False,
        _request_timeout=GUARD,
    )
    assert next(stream)["object"]["metadata"]["name"] == "n2"
    server.patch("Node", None, "n1", {"metadata": {"labels": {"x": "1"}}})
    server.patch("Node", None, "n2", {"metadata": {"labels": {"x": "1"}}})
    event = next(stream)
    assert (event["type"], event["object"]["metadata"]["name"]) == ("MODIFIED", "n2")


def test_namespaced_watch_sees_only_its_namespace(server: ApiServer, api: client.ApiClient) -> None:
    start = str(server.current_resource_version)
    server.create(endpoint_slice("x-1", "x", "other"))
    server.create(endpoint_slice("web-1", "web"))
    discovery = client.DiscoveryV1Api(api)
    stream = watch.Watch().stream(
        discovery.list_namespaced_endpoint_slice,
        "default",
        resource_version=start,
        _request_timeout=GUARD,
    )
    event = next(stream)
    assert event["type"] == "ADDED"
    assert event["object"].metadata.name == "web-1"  # a typed V1EndpointSlice
    assert event["object"].endpoints[0].conditions.ready is True


def test_bookmarks_come_only_when_allowed_and_carry_the_current_version(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    start = str(server.current_resource_version)
    server.create(service("a"))
    plain = services_stream(core, resource_version=start)
    with_bookmarks = services_stream(core, resource_version=start, allow_watch_bookmarks=True)
    assert until(plain, "a") == [("ADDED", "a")]
    assert until(with_bookmarks, "a") == [("ADDED", "a")]
    server.send_bookmarks()
    server.create(node("n1"))  # moves the resourceVersion on, not a service event
    server.send_bookmarks()
    bookmark = next(with_bookmarks)
    while rv_of(bookmark["object"]) < server.current_resource_version:
        bookmark = next(with_bookmarks)
    assert bookmark == {
        "type": "BOOKMARK",
        "object": {
            "kind": "Service",
            "apiVersion": "v1",
            "metadata": {"resourceVersion": str(server.current_resource_version)},
        },
    }
    time.sleep(0.2)  # four bookmark intervals
    server.create(service("end"))
    assert until(plain, "end") == [("ADDED", "end")]
    periodic = until(with_bookmarks, "end")
    assert periodic.count(("BOOKMARK", "")) >= 2
    assert periodic[-1] == ("ADDED", "end")


def test_watch_from_a_compacted_version_fails_with_410(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    old = str(server.current_resource_version)
    server.create(service("a"))
    server.compact()
    stream = watch.Watch().stream(
        core.list_service_for_all_namespaces, resource_version=old, timeout_seconds=5
    )
    began = time.monotonic()
    with pytest.raises(ApiException) as exc:
        next(stream)
    assert exc.value.status == 410
    assert "too old resource version" in exc.value.reason
    assert time.monotonic() - began < 2  # the ERROR event came at once, not at the timeout
    # the request log shows what the client did
    watches = [r for r in server.requests if r.watch]
    assert [(r.status, r.query["resourceVersion"]) for r in watches] == [(200, old)]
    # from the current version, watching works again
    stream = services_stream(core, resource_version=str(server.current_resource_version))
    server.create(service("b"))
    assert until(stream, "b") == [("ADDED", "b")]


def test_history_limit_expires_old_versions_but_not_open_watches(tmp_path: Path) -> None:
    with ApiServer(history_limit=10) as server:
        configuration = client.Configuration()
        config.load_kube_config(
            config_file=str(server.kubeconfig(tmp_path / "kc")),
            client_configuration=configuration,
        )
        core = client.CoreV1Api(client.ApiClient(configuration))
        start = str(server.current_resource_version)
        live = services_stream(core, resource_version=start)
        server.create(service("first"))
        assert until(live, "first") == [("ADDED", "first")]
        for i in range(30):
            server.create(service(f"s{i:02}"))
        assert len(until(live, "s29")) == 30  # the open watch missed nothing
        with pytest.raises(ApiException) as exc:
            next(
                watch.Watch().stream(
                    core.list_service_for_all_namespaces, resource_version=start, timeout_seconds=5
                )
            )
        assert exc.value.status == 410


def test_timeout_seconds_ends_the_stream_cleanly(server: ApiServer, core: client.CoreV1Api) -> None:
    began = time.monotonic()
    events = list(
        services_stream(
            core, resource_version=str(server.current_resource_version), timeout_seconds=1
        )
    )
    assert events == []
    assert 0.9 < time.monotonic() - began < 3


def test_dropped_watch_fails_the_read_and_a_watch_from_the_last_seen_version_loses_nothing(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    start = str(server.current_resource_version)
    server.create(service("a"))
    stream = services_stream(core, resource_version=start)
    seen = until(stream, "a")
    last = rv_of(server.get("Service", "default", "a") or {})
    server.create(service("b"))
    assert server.drop_watches() == 1
    server.create(service("c"))
    with pytest.raises(urllib3.exceptions.ProtocolError):
        for event in stream:  # what was sent before the drop may still arrive
            seen.append((event["type"], event["object"]["metadata"]["name"]))
            last = rv_of(event["object"])
    assert server.open_watches() == 0
    resumed = services_stream(core, resource_version=str(last))
    server.create(service("d"))
    assert seen + until(resumed, "d") == [
        ("ADDED", "a"),
        ("ADDED", "b"),
        ("ADDED", "c"),
        ("ADDED", "d"),
    ]


def test_gracefully_ended_watch_is_resumed_by_the_client_from_its_last_version(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    start = str(server.current_resource_version)
    server.create(service("a"))
    stream = watch.Watch().stream(
        core.list_service_for_all_namespaces, resource_version=start, _request_timeout=GUARD
    )
    assert next(stream)["object"].metadata.name == "a"
    last = server.get("Service", "default", "a")
    assert server.drop_watches(graceful=True) == 1
    server.create(service("b"))
    assert next(stream)["object"].metadata.name == "b"  # without deserialize, it would not track
    watches = [r.query["resourceVersion"] for r in server.requests if r.watch]
    assert watches == [start, (last or {})["metadata"]["resourceVersion"]]


def test_send_initial_events_ends_with_the_initial_events_end_bookmark(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    server.create(service("a"))
    stream = services_stream(
        core,
        send_initial_events=True,
        resource_version_match="NotOlderThan",
        allow_watch_bookmarks=True,
    )
    added, bookmark = next(stream), next(stream)
    assert (added["type"], added["object"]["metadata"]["name"]) == ("ADDED", "a")
    assert bookmark["type"] == "BOOKMARK"
    assert bookmark["object"]["metadata"]["annotations"] == {"k8s.io/initial-events-end": "true"}


# --- faults, events, discovery, scale ---------------------------------------------------------


def test_fail_next_answers_the_client_with_500_then_recovers(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    server.create(node("n1"))
    server.fail_next(2)
    for _ in range(2):
        with pytest.raises(ApiException) as exc:
            core.list_node()
        assert exc.value.status == 500
    assert [n.metadata.name for n in core.list_node().items] == ["n1"]
    server.fail_next(1, 503, path="/api/v1/services")
    assert core.list_node().items  # another path: not failed
    with pytest.raises(ApiException) as exc:
        next(services_stream(core, resource_version="0", timeout_seconds=1))
    assert exc.value.status == 503
    assert [r.status for r in server.requests] == [500, 500, 200, 200, 503]


def test_events_posted_and_patched_by_the_client_are_recorded(
    server: ApiServer, api: client.ApiClient
) -> None:
    core = client.CoreV1Api(api)
    created = core.create_namespaced_event(
        "default",
        client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name="n1."),
            involved_object=client.V1ObjectReference(kind="Node", name="n1"),
            reason="Starting",
            message="kpgen started",
            type="Normal",
            count=1,
        ),
    )
    assert created.metadata.name.startswith("n1.")
    core.patch_namespaced_event(created.metadata.name, "default", {"count": 2})
    client.EventsV1Api(api).create_namespaced_event(
        "default",
        client.EventsV1Event(
            metadata=client.V1ObjectMeta(name="n1.sync"),
            event_time=datetime.now(UTC),
            reason="SyncFailed",
            action="Sync",
            note="nft said no",
            type="Warning",
            reporting_controller="kpgen",
            reporting_instance="kpgen-n1",
            regarding=client.V1ObjectReference(kind="Node", name="n1"),
        ),
    )
    events = server.events()
    assert [(e["apiVersion"], e["reason"]) for e in events] == [
        ("v1", "Starting"),
        ("events.k8s.io/v1", "SyncFailed"),
    ]
    assert events[0]["count"] == 2 and events[0]["involvedObject"]["name"] == "n1"
    assert [e["note"] for e in server.events(api_version="events.k8s.io/v1")] == ["nft said no"]
    writes = [(r.method, r.path) for r in server.requests if r.method != "GET"]
    assert writes == [
        ("POST", "/api/v1/namespaces/default/events"),
        ("PATCH", f"/api/v1/namespaces/default/events/{created.metadata.name}"),
        ("POST", "/apis/events.k8s.io/v1/namespaces/default/events"),
    ]


def test_discovery_answers_the_client(api: client.ApiClient) -> None:
    assert client.VersionApi(api).get_code().git_version.startswith("v1.")
    assert client.CoreApi(api).get_api_versions().versions == ["v1"]
    groups = {g.name for g in client.ApisApi(api).get_api_versions().groups}
    assert groups == {"discovery.k8s.io", "events.k8s.io"}
    resources = client.DiscoveryV1Api(api).get_api_resources().resources
    assert [(r.name, r.kind, r.namespaced) for r in resources] == [
        ("endpointslices", "EndpointSlice", True)
    ]
    core = {r.name for r in client.CoreV1Api(api).get_api_resources().resources}
    assert core == {"services", "nodes", "events"}


def test_set_objects_applies_the_difference_as_changes(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    server.set_objects([service("a"), service("b"), node("n1")])
    start = str(server.current_resource_version)
    changed = service("b")
    changed["spec"]["clusterIP"] = "10.96.0.12"
    server.set_objects([service("a"), changed, service("c"), node("n1")])
    server.create(service("end"))
    stream = services_stream(core, resource_version=start)
    assert until(stream, "end") == [("MODIFIED", "b"), ("ADDED", "c"), ("ADDED", "end")]
    server.set_objects([node("n2")])
    assert server.objects("Service") == [] and server.get("Node", None, "n1") is None


def test_ten_thousand_services_are_created_and_listed_quickly(
    server: ApiServer, core: client.CoreV1Api
) -> None:
    began = time.monotonic()
    for i in range(10_000):
        server.create(service(f"s{i:05}", f"ns{i % 10}"))
    raw = core.list_service_for_all_namespaces(_preload_content=False)
    listed = json.loads(raw.data)
    took = time.monotonic() - began
    assert len(listed["items"]) == 10_000
    assert listed["metadata"]["resourceVersion"] == str(server.current_resource_version)
    assert took < 3, f"{took:.2f}s"
