"""Real packets through the seed article's cluster (kpgen/lab/lab.py), with kpgen's rules loaded
by ``kpgen apply`` on both workers, in each proxy mode.

    gateway 10.20.30.1 ──┬── k8s-worker01 10.20.30.11 ── pod1 192.168.69.246, test-pod .200
                         ├── k8s-worker02 10.20.30.12 ── pod2 192.168.79.106
                         └── k8s-master   10.20.30.10

The pods answer ``GET /whoami`` with their name and the client address they saw.
"""

from __future__ import annotations

import sys

import pytest
from traffic import DATA, E2E, REAPPLY, BackgroundRequests, curl, requests, whoami_until

from kpgen.lab.demo import demo
from kpgen.lab.lab import Lab
from kpgen.lab.topology import EXTERNAL_IP, NODE_BY_NAME, SEED, SEED_PODS, WORKERS

pytestmark = [pytest.mark.kernel, pytest.mark.e2e]

POD_IP = {pod.name: pod.address for pod in SEED_PODS}
NODE_IP = {name: node.address for name, node in NODE_BY_NAME.items()}
NODE_PORT = 30001
NODE_PORT_SERVICE = "http://10.101.179.255:8080"  # the node-port service's ClusterIP
BOTH_PODS = {"pod1", "pod2"}


@pytest.mark.parametrize("worker", WORKERS)
def test_nodeport_on_either_worker_reaches_both_pods_masqueraded_to_that_worker(
    lab: Lab, worker: str
) -> None:
    # the pod on the other node can only answer through the node that took the request if
    # that node replaced the gateway's address with its own
    seen = whoami_until(lab, "gateway", f"http://{worker}:{NODE_PORT}", BOTH_PODS)
    assert seen == {"pod1": {NODE_IP[worker]}, "pod2": {NODE_IP[worker]}}


def test_cluster_ip_from_a_pod_reaches_both_pods_which_see_the_pods_own_address(
    lab: Lab,
) -> None:
    # --cluster-cidr 192.168.0.0/16: traffic from the pod network is not masqueraded
    seen = whoami_until(lab, "test-pod", NODE_PORT_SERVICE, BOTH_PODS)
    test_pod = POD_IP["test-pod"]
    assert seen == {"pod1": {test_pod}, "pod2": {test_pod}}


def test_external_ip_routed_to_a_worker_reaches_both_pods_from_outside(lab: Lab) -> None:
    seen = whoami_until(lab, "gateway", f"http://{EXTERNAL_IP}:8080", BOTH_PODS)
    worker01 = NODE_IP["k8s-worker01"]  # the gateway routes the externalIP there
    assert seen == {"pod1": {worker01}, "pod2": {worker01}}


def test_pod_reaching_its_own_service_can_be_answered_by_itself(lab: Lab) -> None:
    seen = whoami_until(lab, "pod1", NODE_PORT_SERVICE, {"pod1"})
    assert "pod1" in seen, "pod1 never answered itself through its service"
    # hairpin: masqueraded to the node, or pod1 would get a packet from its own address
    assert seen["pod1"] == {NODE_IP["k8s-worker01"]}
    # the other endpoint sees pod1 itself, not masqueraded
    assert seen.get("pod2", {POD_IP["pod1"]}) == {POD_IP["pod1"]}


def test_service_without_endpoints_is_refused_at_once(scratch: Lab) -> None:
    lab = scratch
    # a socket on worker01 itself at the NodePort: it answers until kpgen rejects the port
    decoy = lab.serve("k8s-worker01", "worker01-socket", 30002)
    try:
        assert curl(lab, "gateway", "http://k8s-worker01:30002").body == "worker01-socket\n"
        lab.apply("k8s-worker01", [SEED, DATA / "no-endpoints.yaml"])
        for where, url in (
            ("test-pod", "http://10.96.200.10:8080"),  # ClusterIP, empty slice
            ("test-pod", "http://10.96.200.11:8080"),  # the NodePort service's ClusterIP
            ("gateway", "http://k8s-worker01:30002"),  # the NodePort
        ):
            answer = curl(lab, where, url)
            assert answer.exit_code == 7, f"{url} from {where}: {answer} (7: refused)"
            assert answer.seconds < 0.5, f"{url} from {where}: refused only after {answer}"
    finally:
        lab.stop(decoy)


def test_reapplying_rules_under_load_fails_no_request(scratch: Lab) -> None:
    lab = scratch
    lab.add_pod("pod3", "k8s-worker02", "192.168.79.107")
    with_pod3 = [SEED, DATA / "node-port-third-endpoint.yaml"]
    with BackgroundRequests(lab, "gateway", "k8s-worker01", NODE_PORT, minimum=500) as load:
        for turn in range(50):
            # pod3 becomes an endpoint at turn 10 and stops being one at turn 30
            lab.apply("k8s-worker01", with_pod3 if 10 <= turn < 30 else [SEED])
        tally = load.finish()
    assert tally.count >= 500
    assert set(tally.answers) == {"pod1", "pod2", "pod3"}, tally.answers
    after = requests(lab, "gateway", "k8s-worker01", NODE_PORT, 60)
    assert after.failed == 0, after.failures
    assert set(after.answers) == BOTH_PODS, f"pod3 still answers: {after.answers}"
    assert tally.failed == 0, f"{tally.failed} of {tally.count} failed: {tally.failures}"


def test_back_to_back_reapplies_let_no_new_connection_through_untranslated(lab: Lab) -> None:
    # kpgen's applier, as fast as it goes, with the same rules: many more commits than the
    # test above, so that a connection arriving during one is a certainty, not luck
    seconds = 10
    with BackgroundRequests(lab, "gateway", "k8s-worker01", NODE_PORT, minimum=500) as load:
        argv = [sys.executable, str(REAPPLY), str(seconds), str(lab.mode), "k8s-worker01"]
        rounds = lab.exec_in("k8s-worker01", [*argv, str(SEED)], timeout=seconds + 60)
        tally = load.finish()
    assert rounds.returncode == 0, rounds.stderr
    assert tally.count >= 500
    assert tally.failed == 0, (
        f"{tally.failed} of {tally.count} new connections failed during "
        f"{rounds.stdout.strip()} re-applies: {tally.errors}, {tally.failures[:3]}"
    )


def test_new_connections_spread_evenly_over_four_endpoints(scratch: Lab) -> None:
    lab = scratch
    lab.add_pod("pod4", "k8s-worker01", "192.168.69.247")
    lab.add_pod("pod5", "k8s-worker02", "192.168.79.108")
    lab.apply("k8s-worker01", [SEED, DATA / "four-endpoints.yaml"])
    tally = requests(lab, "test-pod", "10.96.44.4", 8080, 2000)
    assert tally.failed == 0, tally.failures
    assert set(tally.answers) == {"pod1", "pod2", "pod4", "pod5"}, tally.answers
    for pod, count in tally.answers.items():
        # 25% +- 5%: five standard deviations of a fair draw
        assert 400 <= count <= 600, f"{pod} took {count} of 2000: {tally.answers}"


def test_article_loops_are_all_answered_by_the_pods(lab: Lab) -> None:
    lines: list[str] = []
    assert demo(lab, lines.append), "\n".join(lines)
    prompts = [line for line in lines if line.startswith("[")]
    assert prompts == [
        "[gateway ~]$ for i in 1 2 3 4 5 ;do curl -s http://k8s-worker01:30001 | grep pod; done",
        "[gateway ~]$ for i in 1 2 3 4 5 ;do curl -s http://k8s-worker02:30001 | grep pod; done",
        "[test-pod ~]$ for i in 1 2 3 4 5 ;do curl -s http://10.101.179.255:8080 | grep pod; done",
        "[gateway ~]$ for i in 1 2 3 4 5 ;do curl -s http://10.20.30.20:8080 | grep pod; done",
    ]
    assert sorted(set(lines) & BOTH_PODS) == ["pod1", "pod2"]
    assert sum(line in BOTH_PODS for line in lines) == 20
    shown = (E2E.parent.parent / "docs" / "lab.md").read_text()
    assert all(f"\n{prompt}\n" in shown for prompt in prompts), "docs/lab.md shows other loops"
