"""``kpgen run`` against an API server, with real packets through the seed article's cluster
(kpgen/lab/lab.py), in each proxy mode.

    gateway 10.20.30.1 ──┬── k8s-worker01 10.20.30.11  kpgen run ── pod1 192.168.69.246
                         ├── k8s-worker02 10.20.30.12  kpgen run ── pod2 192.168.79.106
                         └── k8s-master   10.20.30.10  the API server, :6443

The lab comes up as usual and its ``kpgen apply`` rules are removed again: the rules on the
workers are then only what ``kpgen run`` writes, from the objects of the test API server
(tests/apiserver.py), which listens on k8s-master (tests/e2e/lab_api.py). The tests change the
objects and break the API's connections, and watch what answers on the NodePort from the
gateway. The API starts with the ``kubernetes`` service and the nodes; each test sets the
objects it starts from.
"""

from __future__ import annotations

import re
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import labs
import pytest
from apiserver import ApiServer
from lab_api import KpgenRun, kpgen_rules, master_api_server, node, seed_object, wait_until
from traffic import BackgroundRequests, Tally, curl, requests

from kpgen.lab.lab import MODES, WORKERS, Lab

pytestmark = [pytest.mark.kernel, pytest.mark.e2e]

Obj = dict[str, Any]
NODE_PORT = 30001
BOTH_PODS = {"pod1", "pod2"}
POD3 = ("pod3", "k8s-worker02", "192.168.79.107")
# Full syncs this often (default 30s), so that some happen during the tests' request loops.
SYNC_PERIOD = 5
FOLLOW = 5.0  # seconds: an API change shows in the traffic within this
PATHS = {
    "services": "/api/v1/services",
    "slices": "/apis/discovery.k8s.io/v1/endpointslices",
    "nodes": "/api/v1/nodes",
}


# --- the objects ------------------------------------------------------------------------------


def endpoint(pod: str, address: str, node_name: str) -> Obj:
    return {
        "addresses": [address],
        "conditions": {"ready": True, "serving": True, "terminating": False},
        "nodeName": node_name,
        "targetRef": {"kind": "Pod", "namespace": "default", "name": pod},
    }


POD1 = endpoint("pod1", "192.168.69.246", "k8s-worker01")
POD2 = endpoint("pod2", "192.168.79.106", "k8s-worker02")
POD3_ENDPOINT = endpoint(POD3[0], POD3[2], POD3[1])
BASE = [
    seed_object("Service", "kubernetes"),
    seed_object("EndpointSlice", "kubernetes"),
    *(node(name) for name in ("k8s-master", *WORKERS)),
]
NODE_PORT_OBJECTS = [
    seed_object("Service", "node-port"),
    seed_object("EndpointSlice", "node-port-x8p2w"),
]
NODE_PORT_SLICE = "node-port-x8p2w"


# --- looking at the nodes ---------------------------------------------------------------------


def has_node_port(rules: str) -> bool:
    return str(NODE_PORT) in rules and "node-port" in rules


def tally(lab: Lab, worker: str, count: int = 24) -> Tally:
    """``count`` new connections from the gateway to the worker's NodePort."""
    return requests(lab, "gateway", worker, NODE_PORT, count)


def wait_answering(lab: Lab, wanted: set[str], timeout: float = FOLLOW) -> float:
    """Until every new connection to the NodePort, on both workers, is answered, by exactly
    the pods in ``wanted``; the seconds it took."""
    started = time.monotonic()
    while True:
        last = {worker: tally(lab, worker) for worker in WORKERS}
        if all(t.failed == 0 and set(t.answers) == wanted for t in last.values()):
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            seen = {w: (t.answers, t.failed, t.errors) for w, t in last.items()}
            raise AssertionError(f"not answered by {sorted(wanted)} after {timeout}s: {seen}")
        time.sleep(0.1)


def wait_no_node_port_rules(lab: Lab, timeout: float = FOLLOW) -> float:
    """Until kpgen's rules on both workers have nothing of the node-port service (not even
    its reject rules, which a service without endpoints has)."""
    return wait_until(
        "the node-port service gone from the rules of both workers",
        lambda: not any(has_node_port(kpgen_rules(lab, worker)) for worker in WORKERS),
        timeout,
    )


def wait_no_rules_to(lab: Lab, address: str, timeout: float = FOLLOW) -> float:
    """Until the rules of both workers send nothing to ``address`` any more (its hairpin
    element, which sends nothing anywhere, may wait for a later transaction)."""
    dnat = re.compile(rf"(dnat to|--to-destination) {re.escape(address)}:")
    return wait_until(
        f"{address} gone from the rules of both workers",
        lambda: not any(dnat.search(kpgen_rules(lab, worker)) for worker in WORKERS),
        timeout,
    )


def refused(lab: Lab, worker: str) -> bool:
    answer = curl(lab, "gateway", f"http://{worker}:{NODE_PORT}", max_time=2)
    return answer.exit_code == 7  # connection refused


def wait_refused(lab: Lab, timeout: float = FOLLOW) -> float:
    return wait_until(
        f"port {NODE_PORT} refused on both workers",
        lambda: all(refused(lab, worker) for worker in WORKERS),
        timeout,
    )


def lists(server: ApiServer, path: str, status: int | None = 200) -> int:
    """How many list (not watch) requests of this path got ``status`` (None: any)."""
    return sum(
        1
        for r in server.requests
        if r.path == path and not r.watch and (status is None or r.status == status)
    )


# --- the lab, the API server and kpgen ----------------------------------------------------------


@dataclass
class Cluster:
    lab: Lab
    server: ApiServer
    kpgens: dict[str, KpgenRun]
    mode: str

    def start_kpgen(self) -> None:
        for kpgen in self.kpgens.values():
            if not kpgen.running:
                kpgen.start()

    def kill_kpgen(self) -> None:
        for kpgen in self.kpgens.values():
            kpgen.kill()

    def reset(self, *, node_port: bool) -> None:
        """The objects a test starts from: the kubernetes service and the nodes, and the
        seed's node-port service with pod1 and pod2 if ``node_port``; kpgen running on both
        workers, and the traffic showing it."""
        self.server.fail_next(0)
        self.start_kpgen()
        for kpgen in self.kpgens.values():
            kpgen.wait_for_log(r"sync: full")
        self.server.set_objects(BASE + (NODE_PORT_OBJECTS if node_port else []))
        if node_port:
            wait_answering(self.lab, BOTH_PODS, timeout=15)
        else:
            # the service and its slice go in separate watches: for a moment kpgen may have
            # the service without endpoints, whose port refuses too
            wait_no_node_port_rules(self.lab, timeout=15)
            wait_refused(self.lab, timeout=15)


@pytest.fixture(scope="module", params=MODES)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """The lab in one proxy mode with ``kpgen run`` on both workers, fed by an API server on
    k8s-master. Everything is stopped and removed afterwards, also when a test failed."""
    mode = request.param
    labs.remove_labs_of_dead_runs()
    lab = Lab(labs.prefix("r"))  # "r": never the name of another module's lab
    logs = tmp_path_factory.mktemp(f"kpgen-run-{mode}")
    server: ApiServer | None = None
    kpgens: dict[str, KpgenRun] = {}
    try:
        lab.up(mode)
        for worker in WORKERS:  # only what kpgen run writes from here on
            cleanup = lab.exec_in(worker, [sys.executable, "-m", "kpgen", "cleanup"])
            assert cleanup.returncode == 0, cleanup.stderr
            assert kpgen_rules(lab, worker) == "", f"kpgen cleanup left rules on {worker}"
        server = master_api_server(lab, bookmark_interval=3600)
        server.set_objects(BASE)
        kubeconfig = server.kubeconfig(logs / "kubeconfig")
        kpgens = {
            worker: KpgenRun(
                lab,
                worker,
                kubeconfig,
                mode,
                logs / f"{worker}.log",
                "--sync-period",
                f"{SYNC_PERIOD}s",
            )
            for worker in WORKERS
        }
        instance = Cluster(lab, server, kpgens, mode)
        instance.start_kpgen()
        yield instance
    finally:
        for kpgen in kpgens.values():
            kpgen.kill()
        errors = []
        if server is not None:
            server.stop()
            errors = server.errors
        lab.down()
    leftovers = labs.namespaces(lab.prefix)
    assert not leftovers, f"lab down left namespaces behind: {leftovers}"
    assert errors == [], errors


# --- the tests ----------------------------------------------------------------------------------


def test_no_rules_are_written_before_every_kind_has_been_listed(cluster: Cluster) -> None:
    lab, server = cluster.lab, cluster.server
    cluster.reset(node_port=True)
    cluster.kill_kpgen()
    for worker in WORKERS:
        assert lab.exec_in(worker, [sys.executable, "-m", "kpgen", "cleanup"]).returncode == 0
        assert kpgen_rules(lab, worker) == ""
    server.clear_requests()
    # services and slices list fine; the node does not
    server.fail_next(1_000_000, 503, path=PATHS["nodes"])
    cluster.start_kpgen()
    wait_until(
        "both kpgens listed services and slices and failed on their node",
        lambda: (
            lists(server, PATHS["services"]) == 2
            and lists(server, PATHS["slices"]) == 2
            and lists(server, PATHS["nodes"], 503) >= 2
        ),
        15,
    )
    for _ in range(10):  # a second of not writing
        for worker in WORKERS:
            assert kpgen_rules(lab, worker) == "", f"{worker} got rules before the node list"
        time.sleep(0.1)
    assert all(refused(lab, worker) for worker in WORKERS)
    for kpgen in cluster.kpgens.values():
        assert "waiting for the first complete list" in kpgen.log()
        assert kpgen.count(r"sync: ") == 0, kpgen.tail()
    server.fail_next(0)
    for kpgen in cluster.kpgens.values():
        kpgen.wait_for_log(r"sync: full")
    for worker in WORKERS:
        assert has_node_port(kpgen_rules(lab, worker))
    wait_answering(lab, BOTH_PODS)


def test_creating_the_node_port_service_makes_both_workers_answer_from_both_pods(
    cluster: Cluster,
) -> None:
    lab, server = cluster.lab, cluster.server
    cluster.reset(node_port=False)
    for worker in WORKERS:
        rules = kpgen_rules(lab, worker)
        assert "kubernetes" in rules and not has_node_port(rules), f"{worker}:\n{rules}"
    for obj in NODE_PORT_OBJECTS:
        server.create(obj)
    took = wait_answering(lab, BOTH_PODS)
    assert took < FOLLOW
    for worker in WORKERS:
        final = tally(lab, worker, 60)
        assert final.failed == 0 and set(final.answers) == BOTH_PODS, final


def test_endpoint_changes_are_followed_by_the_traffic(cluster: Cluster) -> None:
    lab, server = cluster.lab, cluster.server
    cluster.reset(node_port=True)
    lab.add_pod(*POD3)
    try:
        server.patch(
            "EndpointSlice", "default", NODE_PORT_SLICE, {"endpoints": [POD1, POD2, POD3_ENDPOINT]}
        )
        wait_answering(lab, {"pod1", "pod2", "pod3"})
        server.patch("EndpointSlice", "default", NODE_PORT_SLICE, {"endpoints": [POD3_ENDPOINT]})
        wait_answering(lab, {"pod3"})
        for worker in WORKERS:
            final = tally(lab, worker, 60)
            assert final.failed == 0 and set(final.answers) == {"pod3"}, final
    finally:
        # pod3 goes only once no rule sends to it, as a pod stops after its endpoint is gone.
        # kpgen follows the change a sync later (--min-sync-period): a connection of the next
        # test DNATed to pod3 after it was removed would get no answer, and its conntrack entry
        # (SYN_SENT, unreplied, 120 s) keeps that NAT for any later connection from the same
        # client port; the gateway reuses its ports within seconds under the request loops, and
        # such a request of a later test times out.
        server.set_objects(BASE + NODE_PORT_OBJECTS)
        try:
            wait_no_rules_to(lab, POD3[2], timeout=15)
        finally:
            lab.remove_pod(POD3[0])


def test_deleting_the_service_makes_the_node_port_refuse(cluster: Cluster) -> None:
    lab, server = cluster.lab, cluster.server
    cluster.reset(node_port=True)
    server.delete("Service", "default", "node-port")  # its slice stays, as until GC
    wait_refused(lab)
    wait_no_node_port_rules(lab)
    for worker in WORKERS:
        rules = kpgen_rules(lab, worker)
        assert "kubernetes" in rules and not has_node_port(rules), f"{worker}:\n{rules}"


def test_dropped_and_expired_watches_remove_no_rule_and_fail_no_request(
    cluster: Cluster,
) -> None:
    lab, server = cluster.lab, cluster.server
    cluster.reset(node_port=True)
    watchers = 3 * len(WORKERS)
    listed = {kind: lists(server, path) for kind, path in PATHS.items()}
    with (
        BackgroundRequests(lab, "gateway", "k8s-worker01", NODE_PORT, minimum=200) as one,
        BackgroundRequests(lab, "gateway", "k8s-worker02", NODE_PORT, minimum=200) as two,
    ):
        for _ in range(2):  # the streams break: kpgen resumes them, without listing again
            server.wait_for_watches(watchers, timeout=10)
            assert server.drop_watches() >= watchers
            server.wait_for_watches(watchers, timeout=10)
        assert {kind: lists(server, path) for kind, path in PATHS.items()} == listed
        # the history of everything kpgen saw is compacted away: 410 Gone, kpgen lists again
        server.create(
            {"apiVersion": "v1", "kind": "Event", "metadata": {"name": "moves-the-version-on"}}
        )
        server.compact()
        assert server.drop_watches() >= watchers
        for kind, path in PATHS.items():
            wait_until(
                f"both kpgens list {kind} again",
                lambda path=path, kind=kind: lists(server, path) == listed[kind] + 2,
                10,
            )
        server.wait_for_watches(watchers, timeout=10)
        for worker in WORKERS:
            assert has_node_port(kpgen_rules(lab, worker)), f"{worker} lost the NodePort"
        time.sleep(0.5)
        tallies = [one.finish(), two.finish()]
    for result in tallies:
        assert result.failed == 0, f"{result.failed} of {result.count}: {result.failures[:3]}"
        assert set(result.answers) == BOTH_PODS, result.answers
    # the new watches carry changes
    server.patch("EndpointSlice", "default", NODE_PORT_SLICE, {"endpoints": [POD2]})
    wait_answering(lab, {"pod2"})


def test_restarting_kpgen_under_load_fails_no_request(cluster: Cluster) -> None:
    lab = cluster.lab
    cluster.reset(node_port=True)
    kpgens = list(cluster.kpgens.values())
    with (
        BackgroundRequests(lab, "gateway", "k8s-worker01", NODE_PORT, minimum=200) as one,
        BackgroundRequests(lab, "gateway", "k8s-worker02", NODE_PORT, minimum=200) as two,
    ):
        time.sleep(0.3)
        for kpgen in kpgens:
            kpgen.sigterm()
        for kpgen in kpgens:
            assert kpgen.wait_exit(SYNC_PERIOD + 5) is not None, f"{kpgen.worker} did not exit"
            assert kpgen.process is not None and kpgen.process.returncode == 0, kpgen.tail()
            assert "the rules stay in place" in kpgen.log()
        for worker in WORKERS:  # while kpgen is down, its rules answer
            assert has_node_port(kpgen_rules(lab, worker)), f"{worker} lost its rules"
        time.sleep(1.0)
        for kpgen in kpgens:
            kpgen.start()
        for kpgen in kpgens:
            kpgen.wait_for_log(r"sync: full")  # the first sync after the start
        time.sleep(0.5)
        tallies = [one.finish(), two.finish()]
    for result in tallies:
        assert result.failed == 0, f"{result.failed} of {result.count}: {result.failures[:3]}"
        assert set(result.answers) == BOTH_PODS, result.answers
    for worker in WORKERS:
        assert has_node_port(kpgen_rules(lab, worker))


def test_kpgen_exits_within_a_second_of_sigterm(cluster: Cluster) -> None:
    # It used to exit only at its next full sync (up to --sync-period, 30s by default): the
    # signal handler set the stop event, but the loop was waiting on the store.
    cluster.reset(node_port=True)
    kpgen = cluster.kpgens["k8s-worker01"]
    # right after a full sync, when the next one is furthest away
    kpgen.wait_for_log(r"sync: full", count=kpgen.count(r"sync: full") + 1, timeout=15)
    kpgen.sigterm()
    try:
        took = kpgen.wait_exit(3)
        assert took is not None and took < 1.0, f"exit after {took}s:\n{kpgen.tail()}"
        assert kpgen.process is not None and kpgen.process.returncode == 0, kpgen.tail()
        assert "the rules stay in place" in kpgen.log()
    finally:
        kpgen.kill()
