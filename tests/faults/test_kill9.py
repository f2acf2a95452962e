"""kill -9 of ``kpgen run`` at random moments of its syncs, under traffic, in each proxy mode
(docs/reliability.md).

The ``churn`` service has 20 ports; each generation g moves all of them at once (one change of
one object: ports 40000 + 100 g + i), so that any sync writes 20 new port chains and map
elements and deletes 20. kpgen is started, the test issues a new generation every 50-200 ms,
and kills kpgen with SIGKILL at a random moment: mostly from 0 to 1 s after its initial lists
(during its first full sync or the partial syncs after it), every fourth time from 0 to 1 s
after its start (while it starts and lists); then it is started again, and
so on. After each kill the node must hold exactly one generation's ports (old or new rules,
never a mix of two), and the unchanged ``node-port`` service keeps answering every request of a
client loop that runs through the whole test.

``KPGEN_FAULT_KILLS`` (default 10 per mode) sets how many kills; the syncs they interrupt are
counted from kpgen's own log and printed.
"""

from __future__ import annotations

import os
import random
import re
import time
from collections.abc import Iterator

import pytest
from faultkit import NODE_PORT, PODS, WORKER, Cluster, kpgen_rules, lab_cluster, wait_until
from traffic import BackgroundRequests

from kpgen.lab.lab import MODES

pytestmark = [pytest.mark.kernel, pytest.mark.faults]

KILLS = int(os.environ.get("KPGEN_FAULT_KILLS") or 10)
PORTS = 20
CHURN_IP = "10.101.179.210"


def generation_ports(g: int) -> set[int]:
    return {40000 + 100 * g + i for i in range(PORTS)}


def churn_service(g: int) -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "churn", "namespace": "default"},
        "spec": {
            "type": "ClusterIP",
            "clusterIP": CHURN_IP,
            "clusterIPs": [CHURN_IP],
            "ports": [
                {"name": f"p{i}", "port": port, "protocol": "TCP", "targetPort": 80}
                for i, port in enumerate(sorted(generation_ports(g)))
            ],
        },
    }


CHURN_SLICE = {
    "apiVersion": "discovery.k8s.io/v1",
    "kind": "EndpointSlice",
    "metadata": {
        "name": "churn-1",
        "namespace": "default",
        "labels": {"kubernetes.io/service-name": "churn"},
    },
    "addressType": "IPv4",
    "endpoints": [
        {"addresses": [address], "conditions": {"ready": True}, "nodeName": node}
        for address, node in PODS.values()
    ],
    "ports": [{"name": f"p{i}", "port": 80, "protocol": "TCP"} for i in range(PORTS)],
}


def churn_ports(rules: str) -> set[int]:
    """The churn service's port numbers that the node's rules serve: nft chains with rules
    (a port gone leaves its chain flushed, and its dispatch element, until a deletion that
    waits is made), iptables lines."""
    found: set[int] = set()
    chains = re.findall(r"chain service-default/churn/tcp/(\d{5}) \{\n((?:\t\t.*\n)*)\t\}", rules)
    found |= {int(port) for port, body in chains if body.strip()}
    for line in rules.splitlines():
        if "churn" in line and line.startswith("-A "):
            found |= {int(p) for p in re.findall(r"dport (\d{5})\b", line)}
    return found


@pytest.fixture(scope="module", params=MODES)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp(f"kill9-{request.param}")
    with lab_cluster(request.param, logs, "x") as instance:
        yield instance


def test_kill_9_at_random_moments_leaves_old_or_new_rules_never_a_mix(cluster: Cluster) -> None:
    server, lab = cluster.server, cluster.lab
    rng = random.Random(int(os.environ.get("KPGEN_FAULT_SEED") or time.time_ns()))
    generation = 0
    server.create(churn_service(generation))
    server.create(CHURN_SLICE)
    first = cluster.kpgen(name="-0").start()
    first.wait_for_log(r"sync: full", timeout=20)
    wait_until(
        "generation 0 loaded",
        lambda: churn_ports(kpgen_rules(lab, WORKER)) == generation_ports(0),
        10,
    )
    first.kill9()
    syncs = 0
    seen: list[int] = []
    with BackgroundRequests(lab, "gateway", WORKER, NODE_PORT, minimum=100) as loop:
        for life in range(KILLS):
            kpgen = cluster.kpgen(name=f"-{life + 1}").start()
            if life % 4 == 3:  # now and then while it starts and lists
                kill_at = time.monotonic() + rng.uniform(0.0, 1.0)
            else:  # else during its first full sync or the partial ones after it
                kpgen.wait_for_log("initial lists complete", timeout=20)
                kill_at = time.monotonic() + rng.uniform(0.0, 1.0)
            while time.monotonic() < kill_at:
                generation += 1
                server.update(churn_service(generation))
                time.sleep(min(rng.uniform(0.05, 0.2), max(0.0, kill_at - time.monotonic())))
            kpgen.kill9()
            log = kpgen.log()
            syncs += len(re.findall(r"sync: (full|partial)", log))
            rules = kpgen_rules(lab, WORKER)
            ports = churn_ports(rules)
            loaded = [g for g in range(generation + 1) if generation_ports(g) == ports]
            assert loaded, f"kill {life + 1}: a mix of generations: {sorted(ports)}"
            assert f"{NODE_PORT}" in rules, f"kill {life + 1}: the stable service is gone"
            seen.append(loaded[0])
        last = cluster.kpgen(name="-last").start()
        wait_until(
            "the last generation loaded after the kills",
            lambda: churn_ports(kpgen_rules(lab, WORKER)) == generation_ports(generation),
            20,
        )
        tally = loop.finish()
    last.kill()
    server.delete("Service", "default", "churn")
    server.delete("EndpointSlice", "default", "churn-1")
    print(
        f"\n{cluster.mode}: {KILLS} kills, {syncs} syncs before them, {generation} generations,"
        f" {len(set(seen))} distinct generations found loaded, {tally.count} requests"
    )
    assert tally.failed == 0, f"{tally.failed} of {tally.count}: {tally.failures[:3]}"
    assert set(tally.answers) == {"pod1", "pod2"}, tally.answers
    assert syncs >= KILLS // 2, "the kills came before the syncs: little was tested"
