"""``kpgen explain`` against real packets: for every packet scenario of the e2e suite, the
outcomes explain predicts (which endpoints, masqueraded or not; rejected) are the outcomes the
packets had in the namespace lab, in both proxy modes; and ``kpgen explain --live`` run on the
worker, from the rules the kernel holds, gives the same answer as manifest mode.

The pods answer ``GET /whoami`` with their name and the client address they saw: a pod that
saw another address than the client's own was reached masqueraded.

This module brings up a lab of its own (``e2e<pid>x-``, the suite's naming of one lab per
module, tests/e2e/labs.py), so that it never meets the lab of another module.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from click.testing import CliRunner
from traffic import DATA, Tally, curl, requests

from kpgen.cli.main import main
from kpgen.lab.lab import MODES, Lab
from kpgen.lab.topology import CLUSTER_CIDR, NODE_BY_NAME, SEED, SEED_PODS, WORKERS

POLICIES = [SEED, DATA / "policies-services.yaml", DATA / "policies-terminating.yaml"]

pytestmark = [pytest.mark.kernel, pytest.mark.e2e]

POD_BY_ADDRESS = {pod.address: pod.name for pod in SEED_PODS}
ADDRESS = {pod.name: pod.address for pod in SEED_PODS} | {
    name: node.address for name, node in NODE_BY_NAME.items()
}
EXTRA_PODS = {
    "pod4": ("k8s-worker01", "192.168.69.247"),
    "pod5": ("k8s-worker02", "192.168.79.108"),
}
REQUESTS = 40  # new connections per scenario: missing one of 2 endpoints has odds 2 / 2**40

Outcome = tuple[str, str | None, bool]  # kind, DNAT destination, masqueraded


@dataclass(frozen=True)
class Scenario:
    """A client in the lab opening connections to ``dst`` through ``node``'s rules."""

    name: str
    client: str  # the lab machine or pod the connections come from
    node: str  # the worker whose rules they meet
    dst: str  # ADDRESS:PORT

    @property
    def src(self) -> str:
        return ADDRESS[self.client]

    @property
    def host_port(self) -> tuple[str, int]:
        host, port = self.dst.rsplit(":", 1)
        return host, int(port)

    def visible(self, outcome: Outcome) -> Outcome:
        """What a pod can see of an outcome: masquerading the node's own connection to the
        node's address changes nothing it could see."""
        kind, destination, masquerade = outcome
        return kind, destination, masquerade and self.client != self.node


SCENARIOS = (
    Scenario("nodeport-via-worker01", "gateway", "k8s-worker01", "10.20.30.11:30001"),
    Scenario("nodeport-via-worker02", "gateway", "k8s-worker02", "10.20.30.12:30001"),
    Scenario("cluster-ip-from-test-pod", "test-pod", "k8s-worker01", "10.101.179.255:8080"),
    Scenario("external-ip-from-gateway", "gateway", "k8s-worker01", "10.20.30.20:8080"),
    Scenario("hairpin-from-pod1", "pod1", "k8s-worker01", "10.101.179.255:8080"),
)


@pytest.fixture(scope="module", params=MODES)
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """This module's own lab, up with kpgen's rules in one proxy mode; down afterwards."""
    instance = Lab(f"e2e{os.getpid()}x-")
    try:
        instance.up(request.param)
        yield instance
    finally:
        instance.down()


@pytest.fixture
def scratch(lab: Lab) -> Iterator[Lab]:
    """The lab for a test that loads other rules or adds pods: restored afterwards."""
    yield lab
    for pod in lab.status().pods:
        if pod.name in EXTRA_PODS:
            lab.remove_pod(pod.name)
    for worker in WORKERS:
        lab.apply(worker, [SEED])


def _node_args(node: str) -> list[str]:
    """The node flags kpgen apply had in the lab, and the node's address."""
    address = NODE_BY_NAME[node].address
    return ["--hostname-override", node, "--cluster-cidr", CLUSTER_CIDR, "--node-ip", address]


def _outcomes(answer: dict[str, Any]) -> dict[Outcome, float]:
    found: dict[Outcome, float] = {}
    for o in answer["outcomes"]:
        key = (o["kind"], o["destination"], o["masquerade"])
        found[key] = found.get(key, 0.0) + o["probability"]
    return found


def explain_both_ways(
    lab: Lab, scenario: Scenario, manifests: list[str], flags: tuple[str, ...] = ()
) -> tuple[dict[Outcome, float], dict[Outcome, float]]:
    """explain in manifest mode (here, with the node ``flags`` apply had besides the lab's)
    and with --live (on the worker): their outcomes."""
    question = ["--src", scenario.src, "--dst", scenario.dst, "-o", "json"]
    files = [arg for path in manifests for arg in ("-f", path)]
    args = ["explain", *files, *_node_args(scenario.node), *flags, "--proxy-mode", str(lab.mode)]
    offline = CliRunner().invoke(main, [*args, *question])
    assert offline.exit_code == 0, offline.stderr
    live = lab.exec_in(scenario.node, [sys.executable, "-m", "kpgen", "explain", "--live",
                                        *question])  # fmt: skip
    assert live.returncode == 0, live.stderr
    live_answer = json.loads(live.stdout)
    assert live_answer["rules"] == "kernel" and live_answer["assumptions"] == []
    return _outcomes(json.loads(offline.stdout)), _outcomes(live_answer)


def observed(tally: Tally, src: str) -> set[Outcome]:
    """What the connections did: the endpoint each reached (the pods listen on :80) and
    whether it saw another client address than the client's own."""
    assert tally.failed == 0, tally.failures
    return {
        ("dnat", f"{ADDRESS[pod]}:80", client != src)
        for pod, clients in tally.clients.items()
        for client in clients
    }


@pytest.mark.parametrize("scenario", SCENARIOS, ids=lambda s: s.name)
def test_explain_predicts_the_endpoints_and_masquerade_that_real_packets_get(
    lab: Lab, scenario: Scenario
) -> None:
    predicted, live = explain_both_ways(lab, scenario, [str(SEED)])
    assert live == predicted
    assert all(kind == "dnat" for kind, _, _ in predicted)
    assert sorted(predicted.values()) == pytest.approx([0.5, 0.5])
    tally = requests(lab, scenario.client, *scenario.host_port, REQUESTS)
    assert observed(tally, scenario.src) == set(predicted)


def test_explain_predicts_the_reject_of_a_service_without_endpoints(scratch: Lab) -> None:
    lab = scratch
    # a socket on worker01 itself at the NodePort: it answers unless kpgen rejects the port
    decoy = lab.serve("k8s-worker01", "worker01-socket", 30002)
    try:
        manifests = [str(SEED), str(DATA / "no-endpoints.yaml")]
        lab.apply("k8s-worker01", manifests)
        for scenario in (
            Scenario("idle-cluster-ip", "test-pod", "k8s-worker01", "10.96.200.10:8080"),
            Scenario("idle-node-port", "gateway", "k8s-worker01", "10.20.30.11:30002"),
        ):
            predicted, live = explain_both_ways(lab, scenario, manifests)
            assert predicted == live == {("reject", None, False): 1.0}
            answer = curl(lab, scenario.client, f"http://{scenario.dst}")
            assert answer.exit_code == 7, f"{scenario.name}: {answer} (7: refused)"
            assert answer.seconds < 0.5, f"{scenario.name}: refused only after {answer}"
        # and the decoy answers a port kpgen has nothing for: explain says untouched
        untouched = Scenario("decoy", "gateway", "k8s-worker01", "10.20.30.11:30002")
        lab.apply("k8s-worker01", [SEED])
        predicted, live = explain_both_ways(lab, untouched, [str(SEED)])
        assert predicted == live == {("untouched", None, False): 1.0}
        assert curl(lab, "gateway", "http://10.20.30.11:30002").body == "worker01-socket\n"
    finally:
        lab.stop(decoy)


def test_explain_predicts_a_quarter_each_for_four_endpoints(scratch: Lab) -> None:
    lab = scratch
    for name, (node, address) in EXTRA_PODS.items():
        lab.add_pod(name, node, address)
        ADDRESS[name] = address
    manifests = [str(SEED), str(DATA / "four-endpoints.yaml")]
    lab.apply("k8s-worker01", manifests)
    scenario = Scenario("four", "test-pod", "k8s-worker01", "10.96.44.4:8080")
    predicted, live = explain_both_ways(lab, scenario, manifests)
    assert live.keys() == predicted.keys()
    assert sorted(predicted.values()) == pytest.approx([0.25] * 4)
    assert sorted(live.values()) == pytest.approx([0.25] * 4)
    tally = requests(lab, "test-pod", "10.96.44.4", 8080, 120)
    assert observed(tally, scenario.src) == set(predicted)


def test_explain_predicts_what_the_service_cidr_rules_do(scratch: Lab) -> None:
    lab = scratch
    worker = "k8s-worker01"
    flags = ("--service-cidr", "10.96.0.0/12")
    argv = [sys.executable, "-m", "kpgen", "apply", "-f", str(SEED)]
    argv += [*_node_args(worker), *flags, "--proxy-mode", str(lab.mode)]
    applied = lab.exec_in(worker, argv)
    assert applied.returncode == 0, applied.stderr
    refused = Scenario("unknown-port", "test-pod", worker, "10.101.179.255:9999")
    predicted, live = explain_both_ways(lab, refused, [str(SEED)], flags)
    assert predicted == live == {("reject", None, False): 1.0}
    answer = curl(lab, "test-pod", "http://10.101.179.255:9999/", max_time=1)
    assert (answer.exit_code, answer.seconds < 0.5) == (7, True), answer  # refused at once
    unallocated = Scenario("unallocated", "test-pod", worker, "10.96.250.250:80")
    predicted, live = explain_both_ways(lab, unallocated, [str(SEED)], flags)
    assert predicted == live == {("drop", None, False): 1.0}
    assert curl(lab, "test-pod", "http://10.96.250.250/", max_time=1).exit_code == 28
    served = Scenario("served", "test-pod", worker, "10.101.179.255:8080")
    predicted, live = explain_both_ways(lab, served, [str(SEED)], flags)
    assert live == predicted and len(predicted) == 2
    tally = requests(lab, "test-pod", *served.host_port, REQUESTS)
    assert observed(tally, served.src) == set(predicted)


# --- the traffic-policy scenarios of tests/e2e/test_policies.py --------------------------------

LB_IP = "10.20.30.21"  # source-ranges: loadBalancerSourceRanges [10.20.30.1/32]
POLICY_SCENARIOS = (
    # externalTrafficPolicy Local: only the node's own pod, which sees the client
    Scenario("etp-local-via-worker01", "gateway", "k8s-worker01", "10.20.30.11:30101"),
    Scenario("etp-local-via-worker02", "gateway", "k8s-worker02", "10.20.30.12:30101"),
    Scenario("etp-local-external-ip", "gateway", "k8s-worker01", "10.20.30.20:8081"),
    # ... no endpoint on the node: dropped for outside clients, pods still served
    Scenario("etp-remote-via-worker02", "gateway", "k8s-worker02", "10.20.30.12:30102"),
    Scenario("etp-remote-via-worker01", "gateway", "k8s-worker01", "10.20.30.11:30102"),
    Scenario("etp-remote-from-a-pod", "test-pod", "k8s-worker01", "10.20.30.11:30102"),
    # internalTrafficPolicy Local
    Scenario("itp-local-from-test-pod", "test-pod", "k8s-worker01", "10.96.100.3:8080"),
    Scenario("itp-local-from-pod2", "pod2", "k8s-worker02", "10.96.100.3:8080"),
    Scenario("itp-remote-from-worker02", "k8s-worker02", "k8s-worker02", "10.96.100.4:8080"),
    Scenario("itp-remote-from-test-pod", "test-pod", "k8s-worker01", "10.96.100.4:8080"),
    # the serving-and-terminating endpoint, as no endpoint is ready
    Scenario("terminating", "test-pod", "k8s-worker01", "10.96.100.5:8080"),
    # loadBalancerSourceRanges (the LB IP routed to worker01 by both clients)
    Scenario("lb-listed-source", "gateway", "k8s-worker01", f"{LB_IP}:8080"),
    Scenario("lb-other-source", "k8s-master", "k8s-worker01", f"{LB_IP}:8080"),
    Scenario("lb-node-port-unrestricted", "k8s-master", "k8s-worker01", "10.20.30.11:30106"),
    # topology hints
    Scenario("topology-from-zone-a", "test-pod", "k8s-worker01", "10.96.100.7:8080"),
    Scenario("topology-from-zone-b", "pod2", "k8s-worker02", "10.96.100.7:8080"),
    Scenario("topology-partial", "test-pod", "k8s-worker01", "10.96.100.8:8080"),
)
DROP_TIMEOUT = 1.0  # curl exit 28: timed out (dropped); 7 would be refused


@pytest.fixture(scope="module")
def policies(lab: Lab) -> Iterator[Lab]:
    """The lab with the policy services on both workers and the LB IP routed to worker01
    from the gateway and k8s-master; the seed cluster's rules again afterwards."""
    worker01 = NODE_BY_NAME["k8s-worker01"].address
    routed = []
    try:
        for worker in WORKERS:
            lab.apply(worker, POLICIES)
        for client in ("gateway", "k8s-master"):
            result = lab.exec_in(client, ["ip", "route", "add", f"{LB_IP}/32", "via", worker01])
            assert result.returncode == 0, result.stderr
            routed.append(client)
        yield lab
    finally:
        for client in routed:
            lab.exec_in(client, ["ip", "route", "del", f"{LB_IP}/32", "via", worker01])
        for worker in WORKERS:
            lab.apply(worker, [SEED])


@pytest.mark.parametrize("scenario", POLICY_SCENARIOS, ids=lambda s: s.name)
def test_explain_predicts_what_traffic_policies_do_to_real_packets(
    policies: Lab, scenario: Scenario
) -> None:
    lab = policies
    predicted, live = explain_both_ways(lab, scenario, [str(p) for p in POLICIES])
    assert live == predicted
    if set(predicted) == {("drop", None, False)}:
        answer = curl(lab, scenario.client, f"http://{scenario.dst}/whoami", DROP_TIMEOUT)
        assert answer.exit_code == 28, f"{scenario.name}: {answer} (28: timed out, dropped)"
        return
    assert all(kind == "dnat" for kind, _, _ in predicted)
    share = 1 / len(predicted)
    assert sorted(predicted.values()) == pytest.approx([share] * len(predicted))
    tally = requests(lab, scenario.client, *scenario.host_port, REQUESTS)
    assert observed(tally, scenario.src) == {scenario.visible(o) for o in predicted}


# sessionAffinity ClientIP (test_policies.py): the kernel remembers each client's endpoint
AFFINITY_SCENARIOS = (
    Scenario("affinity-cluster-ip", "test-pod", "k8s-worker01", "10.96.100.9:8080"),
    Scenario("affinity-node-port-via-worker01", "gateway", "k8s-worker01", "10.20.30.11:30109"),
    Scenario("affinity-node-port-via-worker02", "k8s-master", "k8s-worker02", "10.20.30.12:30109"),
)


@pytest.mark.parametrize("scenario", AFFINITY_SCENARIOS, ids=lambda s: s.name)
def test_explain_live_names_the_endpoint_session_affinity_pinned_a_client_to(
    policies: Lab, scenario: Scenario
) -> None:
    lab = policies
    manifests = [str(p) for p in POLICIES]
    first, live = explain_both_ways(lab, scenario, manifests)
    assert live == first  # the kernel remembers nothing of this client yet
    assert sorted(first.values()) == pytest.approx([0.5, 0.5])
    tally = requests(lab, scenario.client, *scenario.host_port, REQUESTS)
    (pinned,) = observed(tally, scenario.src)  # every connection reached one endpoint
    assert scenario.visible(pinned) in {scenario.visible(o) for o in first}
    offline, live = explain_both_ways(lab, scenario, manifests)
    assert offline == first  # the manifests know no client
    assert live == {pinned: 1.0}
