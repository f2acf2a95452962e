"""Traffic policies, terminating endpoints, loadBalancerSourceRanges and topology hints, with
real packets through the seed article's cluster (kpgen/lab/lab.py), in each proxy mode.

    gateway 10.20.30.1 ──┬── k8s-worker01 10.20.30.11 (zone-a) ── pod1 192.168.69.246, test-pod .200
                         ├── k8s-worker02 10.20.30.12 (zone-b) ── pod2 192.168.79.106
                         └── k8s-master   10.20.30.10  (no kpgen: a second client outside)

Both workers get the seed cluster plus tests/e2e/data/policies-services.yaml (one service per
feature, and a Node per worker with its zone) and policies-terminating.yaml. The pods answer
``GET /whoami`` with their name and the client address they saw. "Dropped" is asserted as a
connect that times out (curl exit 28 after 1 s), never one that is refused (exit 7).
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import labs
import pytest
from traffic import DATA, curl, requests

from kpgen.lab.lab import MODES, Lab
from kpgen.lab.topology import (
    CLUSTER_CIDR,
    EXTERNAL_IP,
    NODE_BY_NAME,
    SEED,
    SEED_PODS,
    WORKERS,
)

pytestmark = [pytest.mark.kernel, pytest.mark.e2e]

SERVICES = DATA / "policies-services.yaml"
TERMINATING = DATA / "policies-terminating.yaml"
TERMINATING_POD2_READY = DATA / "policies-terminating-ready.yaml"
MANIFESTS = [SEED, SERVICES, TERMINATING]

POD_IP = {pod.name: pod.address for pod in SEED_PODS}
NODE_IP = {name: node.address for name, node in NODE_BY_NAME.items()}
GATEWAY = NODE_IP["gateway"]
LOCAL_POD = {"k8s-worker01": "pod1", "k8s-worker02": "pod2"}

# the services of policies-services.yaml / policies-terminating.yaml
ETP_LOCAL_NODE_PORT = 30101  # endpoints pod1 and pod2; externalIP 10.20.30.20:8081
ETP_LOCAL_EXTERNAL_PORT = 8081
ETP_REMOTE_NODE_PORT = 30102  # endpoint pod2 only
ITP_LOCAL = ("10.96.100.3", 8080)  # endpoints pod1 and pod2
ITP_REMOTE = ("10.96.100.4", 8080)  # endpoint pod2 only
TERMINATING_IP = ("10.96.100.5", 8080)
LB_IP = "10.20.30.21"  # source-ranges: loadBalancerSourceRanges [10.20.30.1/32]
LB_PORT = 8080
LB_NODE_PORT = 30106
# source-ranges-node: its LB IPs 10.20.30.22 and .23, ranges [10.20.30.11/32] (k8s-worker01)
NODE_LB_IP, NODE_LB_OTHER_IP = "10.20.30.22", "10.20.30.23"
TOPOLOGY = ("10.96.100.7", 8080)  # pod1 hinted for zone-a, pod2 for zone-b
TOPOLOGY_PARTIAL = ("10.96.100.8", 8080)  # pod1 hinted for zone-a, pod2 without hints

# New connections per check: with two endpoints picked at random, a policy that failed to
# narrow them would still look right with probability 2**-40.
REQUESTS = 40
DROP_TIMEOUT = 1.0  # seconds; curl exit 28 is a timeout, 7 a refusal
CURL_TIMED_OUT = 28


@pytest.fixture(scope="module", params=MODES)
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """This module's own lab, in place of conftest's ``lab`` ("p": never the name of another
    module's lab), up in one proxy mode with the policy services on both workers; brought
    down afterwards, always."""
    labs.remove_labs_of_dead_runs()
    instance = Lab(labs.prefix("p"))
    try:
        instance.up(request.param)
        for worker in WORKERS:
            instance.apply(worker, MANIFESTS)
        yield instance
    finally:
        instance.down()
    leftovers = labs.namespaces(instance.prefix)
    assert not leftovers, f"lab down left namespaces behind: {leftovers}"


def answers(lab: Lab, where: str, host: str, port: int) -> dict[str, list[str]]:
    """``REQUESTS`` new connections from ``where``, every one answered: each pod that
    answered, with the client addresses it saw."""
    tally = requests(lab, where, host, port, REQUESTS)
    assert tally.failed == 0, f"{host}:{port} from {where}: {tally.errors} {tally.failures[:3]}"
    return tally.clients


def assert_dropped(lab: Lab, where: str, host: str, port: int) -> None:
    """A new connection from ``where`` gets no answer at all: not refused, not served."""
    answer = curl(lab, where, f"http://{host}:{port}/whoami", max_time=DROP_TIMEOUT)
    assert answer.exit_code == CURL_TIMED_OUT, (
        f"{host}:{port} from {where}: curl exit {answer.exit_code} after {answer.seconds} s, "
        f"body {answer.body!r} (wanted {CURL_TIMED_OUT}, a timeout: dropped; 7 is refused)"
    )


def ip(lab: Lab, where: str, *argv: str) -> None:
    result = lab.exec_in(where, ["ip", *argv])
    assert result.returncode == 0, f"ip {' '.join(argv)} in {where}: {result.stderr}"


# --- externalTrafficPolicy: Local -------------------------------------------------------------


@pytest.mark.parametrize("worker", WORKERS)
def test_etp_local_node_port_is_answered_only_by_that_nodes_pod_which_sees_the_client(
    lab: Lab, worker: str
) -> None:
    # not masqueraded: the pod sees the gateway itself, and only the node's own pod answers
    seen = answers(lab, "gateway", NODE_IP[worker], ETP_LOCAL_NODE_PORT)
    assert seen == {LOCAL_POD[worker]: [GATEWAY]}


def test_etp_local_node_port_without_local_endpoint_drops_outside_traffic_but_serves_pods(
    lab: Lab,
) -> None:
    worker01, worker02 = NODE_IP["k8s-worker01"], NODE_IP["k8s-worker02"]
    # the only endpoint, pod2, is on worker02: there it answers the gateway ...
    assert answers(lab, "gateway", worker02, ETP_REMOTE_NODE_PORT) == {"pod2": [GATEWAY]}
    # ... worker01 drops the gateway's connection (nothing listens on worker01's port 30102:
    # without kpgen's drop the kernel would refuse it) ...
    assert_dropped(lab, "gateway", worker01, ETP_REMOTE_NODE_PORT)
    # ... and still takes a pod's connection to the other node's endpoint (kube-proxy's
    # short-circuit for pod traffic: the Cluster policy, not masqueraded)
    seen = answers(lab, "test-pod", worker01, ETP_REMOTE_NODE_PORT)
    assert seen == {"pod2": [POD_IP["test-pod"]]}


def test_etp_local_external_ip_is_answered_only_by_the_local_pod_which_sees_the_client(
    lab: Lab,
) -> None:
    # the gateway routes the externalIP 10.20.30.20 to k8s-worker01 (lab.EXTERNAL_IP_NODE)
    seen = answers(lab, "gateway", EXTERNAL_IP, ETP_LOCAL_EXTERNAL_PORT)
    assert seen == {"pod1": [GATEWAY]}


# --- internalTrafficPolicy: Local -------------------------------------------------------------


def test_itp_local_cluster_ip_reaches_only_the_endpoint_on_the_clients_node(lab: Lab) -> None:
    # test-pod runs on k8s-worker01, as pod1 does; pod2 (worker02) must never answer
    seen = answers(lab, "test-pod", *ITP_LOCAL)
    assert seen == {"pod1": [POD_IP["test-pod"]]}
    # and from worker02's side (pod2 itself, answered through hairpin) only pod2
    assert set(answers(lab, "pod2", *ITP_LOCAL)) == {"pod2"}


def test_itp_local_cluster_ip_without_local_endpoint_is_dropped(lab: Lab) -> None:
    # the service works where its endpoint is: worker02 itself reaches pod2 ...
    assert set(answers(lab, "k8s-worker02", *ITP_REMOTE)) == {"pod2"}
    # ... but a pod on worker01 gets neither pod2 nor a refusal. (A ClusterIP no rule took
    # would time out as well, lost at the gateway, which forwards nothing: what this shows is
    # that the one endpoint is never used from here, and that nothing refuses.)
    assert_dropped(lab, "test-pod", *ITP_REMOTE)


# --- terminating endpoints --------------------------------------------------------------------


def test_serving_terminating_endpoint_is_used_only_until_a_ready_one_returns(lab: Lab) -> None:
    # no endpoint ready: pod1 (serving, terminating) is used, pod2 (not serving) never
    assert answers(lab, "test-pod", *TERMINATING_IP) == {"pod1": [POD_IP["test-pod"]]}
    try:
        # pod2 ready again: ready endpoints first, pod1 is no longer used
        lab.apply("k8s-worker01", [SEED, SERVICES, TERMINATING_POD2_READY])
        assert answers(lab, "test-pod", *TERMINATING_IP) == {"pod2": [POD_IP["test-pod"]]}
    finally:
        lab.apply("k8s-worker01", MANIFESTS)


# --- loadBalancerSourceRanges -----------------------------------------------------------------


def test_lb_source_ranges_admit_only_listed_sources_to_the_lb_ip_but_not_the_node_port(
    lab: Lab,
) -> None:
    # The LB IP is routed to k8s-worker01 from two clients on the node network: the gateway
    # (10.20.30.1, the only source in loadBalancerSourceRanges) and k8s-master (10.20.30.10,
    # outside it). k8s-master runs no kpgen in the lab, so it is as plain a client as the
    # gateway, on the same segment; no namespace beyond the lab's own is needed.
    worker01 = NODE_IP["k8s-worker01"]
    routed: list[str] = []
    try:
        for client in ("gateway", "k8s-master"):
            ip(lab, client, "route", "add", f"{LB_IP}/32", "via", worker01)
            routed.append(client)
        # listed: reaches both endpoints, masqueraded as any external traffic
        seen = answers(lab, "gateway", LB_IP, LB_PORT)
        assert seen == {"pod1": [worker01], "pod2": [worker01]}
        # not listed: dropped, not refused (without the restriction k8s-master is answered)
        assert_dropped(lab, "k8s-master", LB_IP, LB_PORT)
        # the same service's NodePort is not restricted
        seen = answers(lab, "k8s-master", worker01, LB_NODE_PORT)
        assert seen == {"pod1": [worker01], "pod2": [worker01]}
    finally:
        # best effort, so that a failure above is the one reported (lab down removes the
        # namespaces, routes and all, in any case)
        for client in routed:
            lab.exec_in(client, ["ip", "route", "del", f"{LB_IP}/32", "via", worker01])


def test_a_node_in_the_source_ranges_lets_its_lb_ips_through_as_sources(lab: Lab) -> None:
    # A VIP-like load balancer loops the node's own request to an LB IP back with an LB IP as
    # the source. k8s-master plays that load balancer: it holds the service's other LB IP
    # (10.20.30.23) and sends from it to 10.20.30.22, routed through a worker. k8s-worker01's
    # address is the service's only source range: there the LB IPs pass as sources (issue 15),
    # on k8s-worker02 (not in the ranges) they stay dropped, as does k8s-master's own address.
    url = f"http://{NODE_LB_IP}:{LB_PORT}/whoami"
    device = lab.exec_in(
        "k8s-master", ["ip", "-o", "-4", "addr", "show", "to", NODE_IP["k8s-master"]]
    )
    interface = device.stdout.split()[1]
    ip(lab, "k8s-master", "addr", "add", f"{NODE_LB_OTHER_IP}/32", "dev", interface)
    try:
        for worker, let_through in (("k8s-worker01", True), ("k8s-worker02", False)):
            ip(lab, "k8s-master", "route", "replace", f"{NODE_LB_IP}/32", "via", NODE_IP[worker])
            if not let_through:
                answer = curl(lab, "k8s-master", url, DROP_TIMEOUT, source=NODE_LB_OTHER_IP)
                assert answer.exit_code == CURL_TIMED_OUT, (worker, answer)
                continue
            seen: dict[str, set[str]] = {}
            for _ in range(REQUESTS):
                answer = curl(lab, "k8s-master", url, source=NODE_LB_OTHER_IP)
                assert answer.exit_code == 0, (worker, answer)
                pod, client = answer.body.split()
                seen.setdefault(pod, set()).add(client)
            # both endpoints, masqueraded as any external traffic
            assert seen == {"pod1": {NODE_IP[worker]}, "pod2": {NODE_IP[worker]}}
            # k8s-master's own address is in no range: dropped on the same node
            assert_dropped(lab, "k8s-master", NODE_LB_IP, LB_PORT)
    finally:
        lab.exec_in("k8s-master", ["ip", "route", "del", f"{NODE_LB_IP}/32"])
        lab.exec_in("k8s-master", ["ip", "addr", "del", f"{NODE_LB_OTHER_IP}/32", "dev", interface])


# --- topology hints ---------------------------------------------------------------------------


def test_topology_hints_keep_cluster_ip_traffic_in_the_nodes_zone(lab: Lab) -> None:
    # k8s-worker01 is in zone-a (its Node object); pod1 is hinted for zone-a, pod2 for zone-b
    assert answers(lab, "test-pod", *TOPOLOGY) == {"pod1": [POD_IP["test-pod"]]}
    # k8s-worker02 is in zone-b: from its side (pod2 itself, through hairpin) only pod2
    assert set(answers(lab, "pod2", *TOPOLOGY)) == {"pod2"}


def test_topology_hints_are_ignored_when_one_endpoint_has_none(lab: Lab) -> None:
    seen = answers(lab, "test-pod", *TOPOLOGY_PARTIAL)
    test_pod = POD_IP["test-pod"]
    assert seen == {"pod1": [test_pod], "pod2": [test_pod]}


# --- sessionAffinity: ClientIP ------------------------------------------------------------------

AFFINITY = ("10.96.100.9", 8080)
AFFINITY_NODE_PORT = 30109


@pytest.mark.parametrize(
    ("client", "host", "port"),
    [
        ("test-pod", *AFFINITY),
        ("gateway", "k8s-worker01", AFFINITY_NODE_PORT),
        ("k8s-master", "k8s-worker02", AFFINITY_NODE_PORT),
    ],
)
def test_session_affinity_keeps_each_client_on_one_pod(
    lab: Lab, client: str, host: str, port: int
) -> None:
    # REQUESTS new connections: without affinity both pods answer (the test just above shows
    # it for another service), with it every one goes where the first went
    seen = answers(lab, client, host, port)
    assert len(seen) == 1, f"{client} -> {host}:{port} reached {sorted(seen)}"


# --- --service-cidr -----------------------------------------------------------------------------

CURL_REFUSED = 7


def test_service_cidr_rejects_unknown_ports_and_drops_unallocated_addresses(lab: Lab) -> None:
    worker = "k8s-worker01"  # test-pod's node
    argv = [sys.executable, "-m", "kpgen", "apply", "--hostname-override", worker]
    argv += ["--cluster-cidr", CLUSTER_CIDR, "--proxy-mode", str(lab.mode)]
    argv += ["--service-cidr", "10.96.0.0/12"]
    argv += [arg for path in MANIFESTS for arg in ("-f", str(path))]
    try:
        applied = lab.exec_in(worker, argv)
        assert applied.returncode == 0, applied.stderr
        # a ClusterIP on a port no service has: refused at once (the lab's gateway would answer
        # "unreachable" without the rule too; the drop below is what only the rule does)
        unknown_port = curl(lab, "test-pod", "http://10.101.179.255:9999/", max_time=DROP_TIMEOUT)
        assert unknown_port.exit_code == CURL_REFUSED, unknown_port
        # an address of the service range that no service has: dropped
        assert_dropped(lab, "test-pod", "10.96.250.250", 80)
        # and the services themselves still answer
        assert set(answers(lab, "test-pod", "10.101.179.255", 8080)) == {"pod1", "pod2"}
    finally:
        lab.apply(worker, MANIFESTS)
