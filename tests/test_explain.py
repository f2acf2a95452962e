"""``kpgen explain`` and ``kpgen status``: the tracer walks the rules as written (rendered, or
read back from the kernel) and answers what happens to a packet, with what chance.

Most tests run on the golden cases (tests/golden/cases.py) and the seed cluster; the ones
marked ``kernel`` load rules into throwaway network namespaces (tests/kernel.py).
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import kernel
import pytest
from click.testing import CliRunner
from golden.cases import CASES, SEED, golden_path

from kpgen.cli.main import main
from kpgen.core.model import ClusterState, IPAddress, IPFamily, hostport
from kpgen.core.node import NodeConfig, NodeFlags, ProxyMode, node_config
from kpgen.core.parse import parse_documents
from kpgen.core.plan import FamilyPlan, build_plans
from kpgen.dataplane.kernel import iptables_tool
from kpgen.explain import answers as ex
from kpgen.explain.nft_json import read_nft_json
from kpgen.explain.rules import PROTOCOLS, Dnat, Ruleset, parse_nft
from kpgen.explain.trace import Locality, Packet
from kpgen.inputs.manifests import load_documents
from kpgen.render.text import render, render_plan

ROOT = Path(__file__).resolve().parent.parent
E2E_DATA = ROOT / "tests" / "e2e" / "data"
MODES = ("nftables", "iptables")
NODE_IP = "10.20.30.11"  # k8s-worker01's address in the seed cluster; node-a's in the cases
# per family: node-a's address (the IPv6 one in the cases' fd00::/64), clients outside, an
# address of the service CIDR no service has, loopback
NODE_IPS = {IPFamily.V4: NODE_IP, IPFamily.V6: "fd00::11"}
OUTSIDE = {
    IPFamily.V4: ("203.0.113.99", "198.51.100.7"),
    IPFamily.V6: ("2001:db8::99", "2001:db8:1::7"),
}
UNALLOCATED = {IPFamily.V4: "10.96.55.55", IPFamily.V6: "fd00:10:96::5555"}
LOOPBACK = {IPFamily.V4: "127.0.0.1", IPFamily.V6: "::1"}
GATEWAY = "10.20.30.1"
POD1, POD2, TEST_POD = "192.168.69.246", "192.168.79.106", "192.168.69.200"
SEED_FLAGS = NodeFlags(
    hostname="k8s-worker01", cluster_cidrs=("192.168.0.0/16",), node_ips=(NODE_IP,)
)

Outcomes = set[tuple[str, str | None, bool]]


def _state(*paths: Path) -> ClusterState:
    return parse_documents(load_documents([str(p) for p in paths])).state


def _node(mode: str, flags: NodeFlags = SEED_FLAGS) -> NodeConfig:
    return node_config(replace(flags, mode=mode))


def _explain(
    mode: str,
    src: str,
    dst: str,
    *paths: Path,
    flags: NodeFlags = SEED_FLAGS,
    protocol: str = "tcp",
) -> ex.Explanation:
    state = _state(*(paths or (SEED,)))
    node = _node(mode, flags)
    packet = ex.parse_packet(src, dst, protocol)
    ruleset = ex.rendered_ruleset(state, node)
    index = ex.ServiceIndex(state, node)
    return ex.explain_packet(ruleset, packet, ex.node_locality(node), node.hostname, index)


def _shares(explanation: ex.Explanation) -> dict[tuple[str, str | None, bool], float]:
    shares: dict[tuple[str, str | None, bool], float] = {}
    for outcome in explanation.outcomes:
        shares[outcome.key] = shares.get(outcome.key, 0) + outcome.probability
    return shares


def _dnat(*targets: tuple[str, bool]) -> Outcomes:
    return {("dnat", target, masquerade) for target, masquerade in targets}


# --- the seed cluster: the examples -------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_nodeport_from_the_gateway_reaches_both_pods_half_each_masqueraded(mode: str) -> None:
    answer = _explain(mode, GATEWAY, f"{NODE_IP}:30001")
    assert _shares(answer) == {
        ("dnat", f"{POD1}:80", True): 0.5,
        ("dnat", f"{POD2}:80", True): 0.5,
    }
    assert answer.service is not None
    assert (answer.service.service, answer.service.port_name) == ("default/node-port", "node-port")
    assert answer.service.via == "NodePort"
    assert answer.service.policy == "externalTrafficPolicy Cluster"
    assert answer.packet.origin == "another host"
    for outcome in answer.outcomes:
        assert outcome.delivery == "forwarded"
        assert outcome.masquerade_reasons == [
            "to a NodePort, externalIP or LB IP: always masqueraded"
        ]
    assert not answer.assumptions


@pytest.mark.parametrize("mode", MODES)
def test_pod_to_cluster_ip_is_not_masqueraded_except_when_it_reaches_itself(mode: str) -> None:
    answer = _explain(mode, POD2, "10.101.179.255:8080")
    assert _shares(answer) == {
        ("dnat", f"{POD1}:80", False): 0.5,
        ("dnat", f"{POD2}:80", True): 0.5,  # hairpin
    }
    hairpin = next(o for o in answer.outcomes if o.masquerade)
    assert hairpin.masquerade_reasons == ["hairpin: the endpoint chosen is the client itself"]
    assert answer.service is not None and answer.service.via == "ClusterIP"


@pytest.mark.parametrize("mode", MODES)
def test_cluster_ip_from_outside_the_cluster_cidr_is_masqueraded(mode: str) -> None:
    answer = _explain(mode, GATEWAY, "10.101.47.213:8080")
    assert answer.outcome_set() == _dnat((f"{POD1}:80", True), (f"{POD2}:80", True))
    assert {r for o in answer.outcomes for r in o.masquerade_reasons} == {
        f"to a ClusterIP from {GATEWAY}, outside the cluster CIDR"
    }


@pytest.mark.parametrize("mode", MODES)
def test_external_ip_from_the_gateway_is_named_as_such_and_masqueraded(mode: str) -> None:
    answer = _explain(mode, GATEWAY, "10.20.30.20:8080")
    assert answer.outcome_set() == _dnat((f"{POD1}:80", True), (f"{POD2}:80", True))
    assert answer.service is not None
    assert (answer.service.service, answer.service.via) == ("default/external-ip", "externalIP")


@pytest.mark.parametrize("mode", MODES)
def test_from_the_node_itself_the_output_hook_is_walked(mode: str) -> None:
    answer = _explain(mode, NODE_IP, "10.101.47.213:8080")
    assert answer.packet.origin == "this node"
    assert answer.outcome_set() == _dnat((f"{POD1}:80", True), (f"{POD2}:80", True))
    assert all(o.delivery == "sent" for o in answer.outcomes)
    first, hook = answer.outcomes[0].path[:2]
    assert (first.kind, first.rule) == ("route", f"{NODE_IP} is this node's: it sends the packet")
    assert (hook.kind, hook.rule) == (
        "hook",
        "output: nat-output" if mode == "nftables" else "output: nat OUTPUT",
    )


@pytest.mark.parametrize("mode", MODES)
def test_service_without_endpoints_is_rejected_at_once(mode: str) -> None:
    seed_and_idle = (SEED, E2E_DATA / "no-endpoints.yaml")
    for src, dst in (
        (TEST_POD, "10.96.200.10:8080"),  # ClusterIP of a service with an empty slice
        (TEST_POD, "10.96.200.11:8080"),  # the NodePort service's ClusterIP
        (GATEWAY, f"{NODE_IP}:30002"),  # its NodePort
        (NODE_IP, f"{NODE_IP}:30002"),  # the same from the node itself
    ):
        answer = _explain(mode, src, dst, *seed_and_idle)
        assert answer.outcome_set() == {("reject", None, False)}, (src, dst)
        assert answer.outcomes[0].why == (
            "rejected with a TCP reset: the service port has no usable endpoints"
        )
        assert answer.service is not None and answer.service.service is not None
        assert answer.service.service.startswith("default/idle-")


@pytest.mark.parametrize("mode", MODES)
def test_udp_service_without_endpoints_is_rejected_with_icmp(mode: str) -> None:
    case = CASES["no-endpoints"]
    flags = replace(case.flags, node_ips=(NODE_IP,))
    answer = _explain(mode, "10.244.9.9", "10.100.0.5:514", case.input, flags=flags, protocol="udp")
    assert answer.outcome_set() == {("reject", None, False)}
    assert answer.outcomes[0].why.startswith("rejected with ICMP port unreachable")


@pytest.mark.parametrize("mode", MODES)
def test_a_port_no_service_has_is_left_untouched(mode: str) -> None:
    answer = _explain(mode, GATEWAY, f"{NODE_IP}:12345")
    assert answer.outcome_set() == {("untouched", None, False)}
    assert answer.outcomes[0].delivery == "local"
    assert answer.service is None
    elsewhere = _explain(mode, GATEWAY, "198.51.100.9:80")
    assert elsewhere.outcome_set() == {("untouched", None, False)}
    assert elsewhere.outcomes[0].delivery == "forwarded"


@pytest.mark.parametrize("mode", MODES)
def test_service_cidr_rejects_an_unknown_port_and_drops_an_unallocated_address(mode: str) -> None:
    case = CASES["service-cidr"]
    unknown_port = _explain(mode, "10.244.9.9", "10.100.0.7:81", case.input, flags=case.flags)
    assert unknown_port.outcome_set() == {("reject", None, False)}
    assert "has no port 81/tcp" in unknown_port.outcomes[0].why
    unallocated = _explain(mode, "10.244.9.9", "10.96.55.55:80", case.input, flags=case.flags)
    assert unallocated.outcome_set() == {("drop", None, False)}
    assert "no service has it" in unallocated.outcomes[0].why


@pytest.mark.parametrize("mode", MODES)
def test_traffic_policy_local_sends_outside_traffic_to_this_nodes_endpoints_unmasqueraded(
    mode: str,
) -> None:
    case = CASES["policies"]
    flags = replace(case.flags, node_ips=(NODE_IP,))

    def answer(src: str, dst: str) -> ex.Explanation:
        return _explain(mode, src, dst, case.input, flags=flags)

    assert answer("203.0.113.99", f"{NODE_IP}:30101").outcome_set() == _dnat(
        ("10.244.1.10:8080", False)
    )
    from_pod = answer("10.244.9.9", f"{NODE_IP}:30101")
    assert from_pod.outcome_set() == _dnat(("10.244.1.10:8080", False), ("10.244.2.10:8080", False))
    elsewhere = answer("203.0.113.99", f"{NODE_IP}:30102")
    assert elsewhere.outcome_set() == {("drop", None, False)}
    assert (
        elsewhere.outcomes[0].why == "dropped: traffic policy Local, and no endpoint on this node"
    )
    assert elsewhere.service is not None
    assert elsewhere.service.policy == "externalTrafficPolicy Local"
    firewalled = answer("203.0.113.99", "203.0.113.17:80")
    assert firewalled.outcome_set() == {("drop", None, False)}
    assert "loadBalancerSourceRanges" in firewalled.outcomes[0].why
    allowed = answer("198.51.100.7", "203.0.113.17:80")
    assert allowed.outcome_set() == _dnat(("10.244.1.17:80", True), ("10.244.2.17:80", True))
    assert allowed.service is not None and allowed.service.via == "LoadBalancer IP"


# --- probabilities ------------------------------------------------------------------------------


def _service_with(endpoints: int, path: Path) -> Path:
    addresses = [f"192.168.70.{n + 1}" for n in range(endpoints)]
    path.write_text(
        textwrap.dedent(
            f"""\
            apiVersion: v1
            kind: List
            items:
            - apiVersion: v1
              kind: Service
              metadata: {{name: many, namespace: default}}
              spec:
                clusterIP: 10.96.50.50
                ports: [{{name: http, port: 80}}]
            - apiVersion: discovery.k8s.io/v1
              kind: EndpointSlice
              metadata:
                name: many-1
                namespace: default
                labels: {{kubernetes.io/service-name: many}}
              addressType: IPv4
              ports: [{{name: http, port: 8080}}]
              endpoints: [{", ".join(f"{{addresses: [{a}]}}" for a in addresses)}]
            """
        )
    )
    return path


@pytest.mark.parametrize("mode", MODES)
def test_each_of_n_endpoints_gets_one_nth_of_new_connections(mode: str, tmp_path: Path) -> None:
    for count in (1, 2, 3, 4, 5, 7):
        manifest = _service_with(count, tmp_path / f"many-{count}.yaml")
        answer = _explain(mode, TEST_POD, "10.96.50.50:80", manifest)
        assert len(answer.outcomes) == count
        targets = {o.destination for o in answer.outcomes}
        assert targets == {f"192.168.70.{n + 1}:8080" for n in range(count)}
        for outcome in answer.outcomes:
            # nft's numgen is exact; iptables' --probability has 10 decimals
            assert outcome.probability == pytest.approx(1 / count, abs=1e-9)
        assert sum(o.probability for o in answer.outcomes) == pytest.approx(1, abs=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_the_four_endpoint_service_of_the_e2e_suite_gives_each_a_quarter(mode: str) -> None:
    answer = _explain(mode, TEST_POD, "10.96.44.4:8080", SEED, E2E_DATA / "four-endpoints.yaml")
    expected = {"192.168.69.246", "192.168.69.247", "192.168.79.106", "192.168.79.108"}
    assert {o.destination for o in answer.outcomes} == {f"{a}:80" for a in expected}
    assert [round(o.probability, 9) for o in answer.outcomes] == [0.25] * 4
    if mode == "nftables":
        assert [o.fraction for o in answer.outcomes] == ["1/4"] * 4


# --- --service ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_service_view_lists_its_cluster_ip_and_node_port_each_with_both_endpoints(
    mode: str,
) -> None:
    state, node = _state(SEED), _node(mode)
    answer = ex.explain_service(
        ex.rendered_ruleset(state, node),
        "default/node-port",
        ex.node_locality(node),
        node.hostname,
        ex.ServiceIndex(state, node),
    )
    entries = [(e.via, e.address, e.port, e.protocol) for e in answer.entries]
    assert entries == [
        ("ClusterIP", "10.101.179.255", 8080, "tcp"),
        ("NodePort", NODE_IP, 30001, "tcp"),
    ]
    for entry in answer.entries:
        assert [(s.destination, s.probability) for s in entry.outcomes] == [
            (f"{POD1}:80", 0.5),
            (f"{POD2}:80", 0.5),
        ]
        assert entry.port_name == "node-port"


@pytest.mark.parametrize("mode", MODES)
def test_service_view_without_manifests_names_the_service_from_the_rules(mode: str) -> None:
    state, node = _state(SEED), _node(mode)
    ruleset = ex.rendered_ruleset(state, node)
    answer = ex.explain_service(
        ruleset, "default/external-ip", ex.node_locality(node), node.hostname
    )
    assert [(e.address, e.port) for e in answer.entries] == [
        ("10.98.225.181", 8080),
        ("10.20.30.20", 8080),
    ]
    assert [e.via for e in answer.entries] == ["ClusterIP", "external IP"]


# --- the rules, not the model ------------------------------------------------------------------


def _seed_text(mode: str) -> str:
    return render(_state(SEED), _node(mode))


def _walk(text: str, mode: str, src: str, dst: str) -> ex.Explanation:
    ruleset = ex.parse_rules(text, mode, "rendered")
    packet = ex.parse_packet(src, dst, "tcp")
    return ex.explain_packet(ruleset, packet, ex.node_locality(_node(mode)), "k8s-worker01")


@pytest.mark.parametrize("mode", MODES)
def test_a_wrong_rule_gives_a_wrong_answer_not_the_models(mode: str) -> None:
    text = _seed_text(mode)
    if mode == "nftables":
        chain = "\tchain external-default/node-port/tcp/8080 {\n\t\tjump mark-for-masquerade\n"
        assert chain in text
        broken = text.replace(chain, "\tchain external-default/node-port/tcp/8080 {\n")
    else:
        rule = re.search(r"^-A KPGEN-EXT-\S+ .*node-port.*-j KPGEN-MARK-MASQ\n", text, re.M)
        assert rule is not None
        broken = text.replace(rule.group(0), "")
    assert _walk(text, mode, GATEWAY, f"{NODE_IP}:30001").outcome_set() == _dnat(
        (f"{POD1}:80", True), (f"{POD2}:80", True)
    )
    assert _walk(broken, mode, GATEWAY, f"{NODE_IP}:30001").outcome_set() == _dnat(
        (f"{POD1}:80", False), (f"{POD2}:80", False)
    )


def test_a_construct_explain_does_not_know_is_reported_not_guessed() -> None:
    text = _seed_text("nftables")
    unknown = '\t\tip daddr 10.20.30.11 log prefix "kpgen " accept\n'
    broken = text.replace("\tchain services {\n", "\tchain services {\n" + unknown)
    answer = _walk(broken, "nftables", GATEWAY, f"{NODE_IP}:30001")
    assert answer.outcome_set() == {("unknown", None, False)}
    assert answer.outcomes[0].why == (
        'cannot evaluate: ip daddr 10.20.30.11 log prefix "kpgen " accept'
    )
    # a rule the packet never reaches does not matter
    unused = "\tchain unused {\n" + unknown + "\t}\n\n"
    elsewhere = text.replace("\tchain services {\n", unused + "\tchain services {\n")
    assert _walk(elsewhere, "nftables", GATEWAY, f"{NODE_IP}:30001").outcome_set() == _dnat(
        (f"{POD1}:80", True), (f"{POD2}:80", True)
    )


def test_an_unknown_iptables_target_is_reported_not_guessed() -> None:
    text = _seed_text("iptables")
    rule = "-A KPGEN-SERVICES -d 10.20.30.11/32 -j LOG --log-prefix kpgen\n"
    broken = text.replace("-A KPGEN-SERVICES ", rule + "-A KPGEN-SERVICES ", 1)
    answer = _walk(broken, "iptables", GATEWAY, f"{NODE_IP}:30001")
    assert answer.outcome_set() == {("unknown", None, False)}
    assert "cannot evaluate: -A KPGEN-SERVICES -d 10.20.30.11/32 -j LOG" in answer.outcomes[0].why


# The kernel's spellings, as `nft list table ip kpgen` and `iptables-save` print them.
NFT_LISTING = """\
table ip kpgen {
	set cluster-cidrs {
		type ipv4_addr
		flags interval
		elements = { 192.168.0.0/16 }
	}

	set hairpin-endpoints {
		type ipv4_addr . ipv4_addr
		elements = { 192.168.79.106 . 192.168.79.106,
\t\t\t     192.168.69.246 . 192.168.69.246 }
	}

	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 10.101.179.255 . tcp . 8080 : goto service-default/node-port/tcp/8080,
\t\t\t     10.96.200.10 . udp . 53 : goto reject-chain }
	}

	chain mark-for-masquerade {
		meta mark set meta mark | 0x00004000
	}

	chain masquerading {
		meta mark & 0x00004000 == 0x00000000 return
		meta mark set meta mark ^ 0x00004000
		masquerade fully-random
	}

	chain nat-prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr . meta l4proto . th dport vmap @service-ips
	}

	chain nat-postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ct status dnat ip saddr . ip daddr @hairpin-endpoints jump mark-for-masquerade
		jump masquerading
	}

	chain reject-chain {
		reject with tcp reset
		reject
	}

	chain service-default/node-port/tcp/8080 {
		ip daddr 10.101.179.255 tcp dport 8080 ip saddr != @cluster-cidrs jump mark-for-masquerade
		numgen random mod 2 0 meta l4proto tcp dnat to 192.168.69.246:80
		meta l4proto tcp dnat to 192.168.79.106:80
	}
}
"""

IPTABLES_SAVE = """\
# Generated by iptables-save v1.8.9 (nf_tables) on Fri Nov 27 11:50:57 2026
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:DOCKER - [0:0]
:KPGEN-MARK-MASQ - [0:0]
:KPGEN-POSTROUTING - [0:0]
:KPGEN-SEP-A - [0:0]
:KPGEN-SEP-B - [0:0]
:KPGEN-SERVICES - [0:0]
:KPGEN-SVC-X - [0:0]
-A PREROUTING -m comment --comment "kpgen service portals" -j KPGEN-SERVICES
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A POSTROUTING -m comment --comment "kpgen postrouting rules" -j KPGEN-POSTROUTING
-A KPGEN-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000
-A KPGEN-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A KPGEN-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A KPGEN-POSTROUTING -m comment --comment "kpgen service traffic requiring SNAT" \
-j MASQUERADE --random-fully
-A KPGEN-SEP-A -s 192.168.69.246/32 -m comment --comment "default/node-port:node-port" \
-j KPGEN-MARK-MASQ
-A KPGEN-SEP-A -p tcp -m comment --comment "default/node-port:node-port" -m tcp \
-j DNAT --to-destination 192.168.69.246:80
-A KPGEN-SEP-B -s 192.168.79.106/32 -m comment --comment "default/node-port:node-port" \
-j KPGEN-MARK-MASQ
-A KPGEN-SEP-B -p tcp -m comment --comment "default/node-port:node-port" -m tcp \
-j DNAT --to-destination 192.168.79.106:80
-A KPGEN-SERVICES -d 10.101.179.255/32 -p tcp -m comment --comment \
"default/node-port:node-port cluster IP" -m tcp --dport 8080 -j KPGEN-SVC-X
-A KPGEN-SVC-X -d 10.101.179.255/32 ! -s 192.168.0.0/16 -p tcp -m comment --comment \
"default/node-port:node-port cluster IP" -m tcp --dport 8080 -j KPGEN-MARK-MASQ
-A KPGEN-SVC-X -m comment --comment "default/node-port:node-port -> 192.168.69.246:80" \
-m statistic --mode random --probability 0.50000000000 -j KPGEN-SEP-A
-A KPGEN-SVC-X -m comment --comment "default/node-port:node-port -> 192.168.79.106:80" \
-j KPGEN-SEP-B
COMMIT
""".replace("\\\n", "")


@pytest.mark.parametrize(
    ("mode", "listing"), [("nftables", NFT_LISTING), ("iptables", IPTABLES_SAVE)]
)
def test_the_kernels_spelling_of_the_rules_is_read(mode: str, listing: str) -> None:
    ruleset = ex.parse_rules(listing, mode, "kernel")
    assert not [r.text for c in ruleset.chains.values() for r in c.rules if r.error]

    def walk(src: str) -> ex.Explanation:
        packet = ex.parse_packet(src, "10.101.179.255:8080", "tcp")
        locality = Locality([ipaddress.IPv4Network(f"{NODE_IP}/32")], "test")
        return ex.explain_packet(ruleset, packet, locality, "k8s-worker01")

    assert walk(POD2).outcome_set() == _dnat((f"{POD1}:80", False), (f"{POD2}:80", True))
    assert walk(GATEWAY).outcome_set() == _dnat((f"{POD1}:80", True), (f"{POD2}:80", True))
    if mode == "iptables":
        assert ruleset.notes == ["1 rule(s) in nat PREROUTING not made by kpgen were not evaluated"]
    else:  # 'reject with tcp reset' as the kernel lists it: TCP only (its dependency is implied)
        packet = ex.parse_packet(TEST_POD, "10.96.200.10:53", "udp")
        answer = ex.explain_packet(ruleset, packet, Locality([], "test"), "k8s-worker01")
        assert answer.outcome_set() == {("reject", None, False)}
        assert answer.outcomes[0].why.startswith("rejected with ICMP port unreachable")


def test_rendered_nft_rules_parse_without_an_unknown_construct_in_every_case() -> None:
    for name, case in CASES.items():
        for mode in MODES:
            state, node = _state(case.input), _node(mode, case.flags)
            for plan in build_plans(state, node):
                ruleset = ex.rendered_ruleset(state, node, family=plan.family)
                unknown = _unreadable(ruleset)
                assert not unknown, f"{name} {mode} {plan.family.value}: {unknown}"


# --- every golden case: both modes agree, and the rules do what the plan decided ---------------


def _case_packets(ruleset: Ruleset, node: NodeConfig, sources: list[str]) -> Iterator[Packet]:
    """Packets of the ruleset's family to every address the rules name, NodePorts on the
    node's address, the next port of some, an unallocated address, port 22, loopback."""
    family = ruleset.family
    addresses, node_ports = ex.candidates(ruleset)
    node_ip = ipaddress.ip_address(NODE_IPS[family])
    destinations = sorted(addresses) + [(node_ip, proto, port) for proto, port in node_ports]
    destinations += [(a, proto, port + 1) for a, proto, port in sorted(addresses)[:3]]
    destinations += [(ipaddress.ip_address(UNALLOCATED[family]), 6, 80), (node_ip, 6, 22)]
    loopback = ipaddress.ip_address(LOOPBACK[family])
    destinations += [(loopback, p, n) for p, n in sorted(node_ports)]
    for src in sources:
        for dst, protocol, port in destinations:
            yield Packet(ipaddress.ip_address(src), dst, protocol, port)


def _sources(node: NodeConfig, ruleset: Ruleset) -> list[str]:
    """Clients of the ruleset's family: outside, the node, loopback, a pod, each endpoint."""
    family = ruleset.family
    sources = [*OUTSIDE[family], NODE_IPS[family], LOOPBACK[family]]
    sources += [
        str(n.network_address + 300) for n in node.cluster_cidrs if IPFamily.of(n) is family
    ]
    endpoints = {
        str(s.address)
        for c in ruleset.chains.values()
        for r in c.rules
        for s in r.statements
        if isinstance(s, Dnat)
    }
    return sources + sorted(endpoints)


def _key(answer: ex.Explanation) -> list[tuple[str, str | None, bool, float]]:
    return sorted(
        (o.kind, o.destination, o.masquerade, round(o.probability, 6)) for o in answer.outcomes
    )


def _with_node_ip(flags: NodeFlags) -> NodeFlags:
    return flags if flags.node_ips else replace(flags, node_ips=tuple(NODE_IPS.values()))


@pytest.mark.parametrize("case", sorted(CASES))
def test_both_modes_give_the_same_answer_for_every_packet_of_a_golden_case(case: str) -> None:
    state = _state(CASES[case].input)
    flags = _with_node_ip(CASES[case].flags)
    node = _node("nftables", flags)
    for plan in build_plans(state, node):  # IPv4, and IPv6 where a service has it
        rulesets = {
            mode: ex.rendered_ruleset(state, _node(mode, flags), family=plan.family)
            for mode in MODES
        }
        locality = ex.node_locality(node, plan.family)
        checked = 0
        nft = rulesets["nftables"]
        for packet in _case_packets(nft, node, _sources(node, nft)):
            answers = {
                mode: _key(ex.explain_packet(rs, packet, locality, node.hostname))
                for mode, rs in rulesets.items()
            }
            assert answers["nftables"] == answers["iptables"], packet
            checked += 1
        assert checked >= 8  # at least the two fixed destinations from every source


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_service_port_reaches_the_endpoints_its_plan_chose(case: str, mode: str) -> None:
    state = _state(CASES[case].input)
    node = _node(mode, _with_node_ip(CASES[case].flags))
    for plan in build_plans(state, node):  # IPv4, and IPv6 where a service has it
        _check_reached(state, node, plan)


def _check_reached(state: ClusterState, node: NodeConfig, plan: FamilyPlan) -> None:
    ruleset = ex.rendered_ruleset(state, node, family=plan.family)
    locality = ex.node_locality(node, plan.family)
    own = [a for a in node.node_ips if IPFamily.of(a) is plan.family]  # the case's, if any
    node_ip = own[0] if own else ipaddress.ip_address(NODE_IPS[plan.family])
    outside = ipaddress.ip_address(OUTSIDE[plan.family][0])

    def reached(dst: IPAddress, port: int) -> set[str]:
        protocol = PROTOCOLS[p.port.protocol.lower]
        packet = Packet(outside, dst, protocol, port)
        answer = ex.explain_packet(ruleset, packet, locality, node.hostname)
        return {o.destination or o.kind for o in answer.outcomes}

    for p in plan.ports:
        if not p.has_endpoints:
            for address in (p.cluster_ip, *p.external_addresses):
                assert reached(address, p.port.port) == {"reject"}, p.port_name
            continue
        internal = p.local_endpoints if p.internal_local else p.cluster_endpoints
        want = {hostport(b.address, b.port) for b in internal} or {"drop"}
        assert reached(p.cluster_ip, p.port.port) == want, p.port_name
        external = p.local_endpoints if p.external_local else p.cluster_endpoints
        want = {hostport(b.address, b.port) for b in external} or {"drop"}
        for address in p.external_addresses:
            if address not in p.firewalled_addresses:
                assert reached(address, p.port.port) == want, (p.port_name, address)
        answers = plan.nodeport_networks is None or any(
            node_ip in n for n in plan.nodeport_networks
        )
        if p.port.node_port is not None and answers:
            assert reached(node_ip, p.port.node_port) == want, p.port_name


# --- the command line ---------------------------------------------------------------------------

SEED_ARGS = [
    "-f",
    str(SEED),
    "--hostname-override",
    "k8s-worker01",
    "--cluster-cidr",
    "192.168.0.0/16",
    "--node-ip",
    NODE_IP,
]


def _cli(*args: str, color: bool = False) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, ["explain", *args], color=color)
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize("mode", MODES)
def test_cli_text_fits_80_columns_and_shows_outcomes_and_rules(mode: str) -> None:
    code, out, err = _cli(
        *SEED_ARGS, "--proxy-mode", mode, "--src", GATEWAY, "--dst", f"{NODE_IP}:30001"
    )
    assert code == 0, err
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "\x1b[" not in out  # not a terminal: no colour
    assert f"50%  DNAT to {POD1}:80, masqueraded" in out
    assert f"50%  DNAT to {POD2}:80, masqueraded" in out
    assert "service: default/node-port, port node-port (tcp/8080)" in out
    assert "via:     NodePort; externalTrafficPolicy Cluster" in out
    if mode == "nftables":
        assert "    jump mark-for-masquerade\n" in out
        assert "-> @service-nodeports: tcp . 30001 : goto" in out
    else:
        assert "--dport 30001 -j KPGEN-EXT-" in out


def test_cli_colours_only_a_terminal() -> None:
    args = (*SEED_ARGS, "--src", GATEWAY, "--dst", f"{NODE_IP}:30001")
    assert "\x1b[" in _cli(*args, color=True)[1]
    assert "\x1b[" not in _cli(*args, color=False)[1]


def test_cli_json_is_the_explanation_for_scripts() -> None:
    code, out, err = _cli(*SEED_ARGS, "-o", "json", "--src", POD2, "--dst", "10.101.179.255:8080")
    assert code == 0, err
    answer = json.loads(out)
    assert answer["service"]["service"] == "default/node-port"
    assert answer["service"]["via"] == "ClusterIP"
    outcomes = {(o["destination"], o["masquerade"], o["probability"]) for o in answer["outcomes"]}
    assert outcomes == {(f"{POD1}:80", False, 0.5), (f"{POD2}:80", True, 0.5)}
    assert all(o["path"] and o["fraction"] == "1/2" for o in answer["outcomes"])


def test_cli_service_lists_every_address_with_its_endpoints() -> None:
    code, out, err = _cli(*SEED_ARGS, "--service", "default/node-port")
    assert code == 0, err
    assert "  ClusterIP 10.101.179.255:8080/tcp (port node-port)\n" in out
    assert f"  NodePort {NODE_IP}:30001/tcp (port node-port)\n" in out
    assert out.count(f"50%  DNAT to {POD1}:80") == 2
    assert max(len(line) for line in out.splitlines()) <= 80


def test_cli_says_what_it_assumed_without_node_ip() -> None:
    args = [a for a in SEED_ARGS if a not in ("--node-ip", NODE_IP)]
    code, out, _ = _cli(*args, "--src", GATEWAY, "--dst", f"{NODE_IP}:30001")
    assert code == 0
    assert f"50%  DNAT to {POD1}:80, masqueraded" in out
    flat = " ".join(out.split())
    assert f"assumed: {NODE_IP} taken for this node's own address (no --node-ip given)" in flat
    assert f"assumed: {GATEWAY}, {POD1}, {POD2} taken for other hosts' addresses" in flat


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--src", GATEWAY, "--dst", f"{NODE_IP}:30001"], "--kubeconfig FILE (or --live"),
        ([*SEED_ARGS, "--dst", f"{NODE_IP}:30001"], "--dst needs --src"),
        ([*SEED_ARGS, "--src", GATEWAY], "either --dst (with --src) or --service"),
        ([*SEED_ARGS, "--src", GATEWAY, "--dst", NODE_IP], "needs a port 1-65535"),
        ([*SEED_ARGS, "--service", "node-port"], "NAMESPACE/NAME"),
    ],
)
def test_cli_refuses_a_question_it_cannot_answer_in_one_line(args: list[str], message: str) -> None:
    code, _, err = _cli(*args)
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1


# --- the kernel: --live reads back what apply loaded --------------------------------------------


def _in(namespace: str, *argv: str, stdin: str | None = None) -> str:
    return kernel.output_of(namespace, list(argv), stdin)


def _load(namespace: str, mode: str, *plans: FamilyPlan) -> str:
    """Load the plans' rendered rules as the only rules of the namespace; what the kernel
    lists of the first plan's family (``nft list ruleset``, ``iptables-save``)."""
    _in(namespace, "nft", "flush", "ruleset")
    for plan in plans:
        text = render_plan(plan, ProxyMode(mode))
        if mode == "nftables":
            _in(namespace, "nft", "-f", "-", stdin=text)
        else:
            _in(namespace, iptables_tool("nft", plan.family, "-restore"), stdin=text)
    family = plans[0].family
    if mode == "nftables":
        return _in(namespace, "nft", "list", "ruleset", family.nft_family)
    return _in(namespace, iptables_tool("nft", family, "-save"))


def _read_back(namespace: str, mode: str, family: IPFamily) -> Ruleset:
    """The namespace's rules of ``family`` as --live reads them: nftables as the JSON nft
    prints (``nft -j list ruleset``: kpgen's tables are the namespace's only ones), iptables
    as iptables-save prints them."""
    if mode == "nftables":
        listing = _in(namespace, "nft", "-j", "list", "ruleset", family.nft_family)
        return read_nft_json(json.loads(listing)["nftables"], family)
    saved = _in(namespace, iptables_tool("nft", family, "-save"))
    return ex.parse_rules(saved, mode, "kernel", family)


def _unreadable(ruleset: Ruleset) -> list[str]:
    """The rules and set elements explain could not read."""
    rules = [f"{r.text}: {r.error}" for c in ruleset.chains.values() for r in c.rules if r.error]
    for element_set in ruleset.sets.values():
        element_set.elements  # noqa: B018  (read now: an element that cannot be read is an error)
    return rules + [error for s in ruleset.sets.values() for error in s.errors]


@kernel.kernel
@pytest.mark.parametrize("mode", MODES)
def test_rules_read_back_from_the_kernel_answer_as_the_rendered_ones(mode: str) -> None:
    """Every golden case, loaded and read back as --live reads it (nftables: the JSON nft
    really prints), in each family: every construct is read, ``kpgen status`` counts as
    much, and every packet gets the answer the rendered rules give."""
    with kernel.netns() as namespace:
        for name, case in CASES.items():
            state = _state(case.input)
            node = _node(mode, _with_node_ip(case.flags))
            plans = build_plans(state, node)
            _load(namespace, mode, *plans)
            for plan in plans:
                rendered = ex.rendered_ruleset(state, node, plans, plan.family)
                live = _read_back(namespace, mode, plan.family)
                assert _unreadable(live) == [], name
                assert ex.count(live) == ex.count(rendered), name
                locality = ex.node_locality(node, plan.family)
                for packet in _case_packets(rendered, node, _sources(node, rendered)[:4]):
                    want = _key(ex.explain_packet(rendered, packet, locality, node.hostname))
                    got = _key(ex.explain_packet(live, packet, locality, node.hostname))
                    assert got == want, (name, packet)


def _namespace_with_node_address(namespace: str) -> None:
    _in(namespace, "ip", "link", "set", "lo", "up")
    _in(namespace, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
    _in(namespace, "ip", "addr", "add", f"{NODE_IP}/24", "dev", "eth0")
    _in(namespace, "ip", "link", "set", "eth0", "up")
    _in(namespace, "ip", "link", "set", "eth1", "up")


@kernel.kernel
@pytest.mark.parametrize("mode", MODES)
def test_live_explain_after_apply_agrees_with_manifest_mode(mode: str) -> None:
    node_args = ["--hostname-override", "k8s-worker01", "--cluster-cidr", "192.168.0.0/16"]
    with kernel.netns() as namespace:
        _namespace_with_node_address(namespace)
        kpgen = [sys.executable, "-m", "kpgen"]
        _in(namespace, *kpgen, "apply", "-f", str(SEED), *node_args, "--proxy-mode", mode)
        for src, dst in ((GATEWAY, f"{NODE_IP}:30001"), (POD2, "10.101.179.255:8080")):
            question = ["--src", src, "--dst", dst, "-o", "json"]
            live = json.loads(_in(namespace, *kpgen, "explain", "--live", *question))
            code, out, err = _cli(*SEED_ARGS, "--proxy-mode", mode, *question)
            assert code == 0, err
            offline = json.loads(out)
            assert live["rules"] == "kernel" and offline["rules"] == "rendered"
            assert live["mode"] == offline["mode"] == mode

            def outcomes(answer: Any) -> list[tuple[Any, ...]]:
                found = answer["outcomes"]
                return sorted(
                    (o["kind"], o["destination"], o["masquerade"], o["probability"]) for o in found
                )

            assert outcomes(live) == outcomes(offline)
            assert live["service"]["service"] == offline["service"]["service"]
            assert live["assumptions"] == []  # the kernel's local routes say what is local
        with_manifests = _in(
            namespace,
            *kpgen,
            "explain",
            "--live",
            "-f",
            str(SEED),
            *node_args,
            "--src",
            GATEWAY,
            "--dst",
            f"{NODE_IP}:30001",
        )
        assert "the rules rendered from the manifests give the same answer" in " ".join(
            with_manifests.split()
        )


@kernel.kernel
def test_live_explain_without_rules_says_none_are_loaded() -> None:
    with kernel.netns() as namespace:
        result = subprocess.run(
            [
                "ip",
                "netns",
                "exec",
                namespace,
                sys.executable,
                "-m",
                "kpgen",
                "explain",
                "--live",
                "--src",
                GATEWAY,
                "--dst",
                f"{NODE_IP}:30001",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert "no kpgen rules are loaded in this network namespace" in result.stderr


# --- kpgen status -------------------------------------------------------------------------------

HEALTHZ = 10256


@pytest.fixture
def running(tmp_path: Path) -> Iterator[str]:
    """``kpgen run --source manifests:DIR`` on the seed cluster in a fresh namespace."""
    if kernel.unavailable_reason() is not None:
        pytest.skip(kernel.unavailable_reason() or "")
    directory = tmp_path / "manifests"
    directory.mkdir()
    (directory / "seed.yaml").write_text(SEED.read_text())
    with kernel.netns() as namespace:
        _in(namespace, "ip", "link", "set", "lo", "up")
        log = (tmp_path / "run.log").open("wb")
        process = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                namespace,
                sys.executable,
                "-m",
                "kpgen",
                "run",
                "--source",
                f"manifests:{directory}",
                "--hostname-override",
                "k8s-worker01",
                "--cluster-cidr",
                "192.168.0.0/16",
                "--healthz-bind-address",
                f"127.0.0.1:{HEALTHZ}",
                "--metrics-bind-address",
                "",
                "--min-sync-period",
                "100ms",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        try:
            yield namespace
        finally:
            process.kill()
            process.wait(10)
            log.close()


def _status(namespace: str) -> tuple[int, dict[str, object]]:
    result = subprocess.run(
        ["ip", "netns", "exec", namespace, sys.executable, "-m", "kpgen", "status", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return result.returncode, json.loads(result.stdout)


@pytest.mark.kernel
def test_status_reports_the_running_proxys_rules_and_health(running: str) -> None:
    deadline = time.monotonic() + 15
    while True:
        code, state = _status(running)
        health = state["health"]
        assert isinstance(health, dict)
        # until its first sync: before it, /healthz is 200 too, with no lastUpdated
        if (code == 0 and health["last_updated"]) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert code == 0, state
    assert state["mode"] == "nftables" and state["rules"] == "nft table ip kpgen"
    assert state["counts"] == {
        "services": 4,
        "service_ports": 4,
        "endpoints": 7,
        "addresses": 5,
        "node_ports": 1,
        "rejected": 0,
    }
    assert health["healthy"] is True and health["code"] == 200 and health["last_updated"]
    text = subprocess.run(
        ["ip", "netns", "exec", running, sys.executable, "-m", "kpgen", "status"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    assert "mode:       nftables (nft table ip kpgen)" in text
    assert "health:     healthy (HTTP 200 from 127.0.0.1:10256)" in text
    assert max(len(line) for line in text.splitlines()) <= 80


@kernel.kernel
def test_status_without_kpgen_says_so_and_fails() -> None:
    with kernel.netns() as namespace:
        code, state = _status(namespace)
    assert code == 1
    assert state["mode"] is None and state["counts"] is None
    assert state["problems"] == ["no kpgen rules are loaded in this network namespace"]
    health = state["health"]
    assert isinstance(health, dict) and health["reachable"] is False


def test_shard_tables_are_read_as_one_table_and_a_copy_that_differs_is_named() -> None:
    rendered = golden_path("seed", "nftables").read_text()
    assert rendered.count("\n\tchain services {") > 1  # several shard tables, one each
    ruleset = parse_nft(rendered)
    assert ruleset.notes == []
    # the dispatch maps of every shard are one map: each of its keys leads to its chain
    dispatched = {e.verdict.target for e in ruleset.sets["service-ips"].elements if e.verdict}
    chains = {c.name for c in ruleset.chains.values()}
    assert len(dispatched) > 1 and dispatched <= chains
    assert [c.name for c in ruleset.chains.values()].count("services") == 1
    last = rendered.rindex("\tchain services {\n") + len("\tchain services {\n")
    tampered = rendered[:last] + "\t\tdrop\n" + rendered[last:]
    assert parse_nft(tampered).notes == ["chain services differs between kpgen's tables"]


def test_nft_parser_reads_every_golden_file_the_way_the_renderer_wrote_it() -> None:
    for path in sorted((ROOT / "tests" / "golden").glob("*.nft")):
        text = path.read_text()
        ruleset = parse_nft(text)
        assert "nat-postrouting" in {c.name for c in ruleset.chains.values()}, path.name
        # the NAT hooks of the service ports are in their shard tables, read as one table
        prerouting = ruleset.hook_chains("prerouting")
        assert len(prerouting) == (1 if "\ntable ip kpgen-" in text else 0), path.name
        assert all(chain.priority == -100 for chain in prerouting)


# --- docs/explain.md shows real output ----------------------------------------------------------


def _doc_examples() -> list[tuple[list[str], str]]:
    """The complete examples of docs/explain.md: (the arguments of ``kpgen``, its output).
    Examples run on the lab (``--live``) or cut short (``...``) are not checked here."""
    text = (ROOT / "docs" / "explain.md").read_text()
    examples = []
    for block in re.findall(r"^```\n(.*?)^```$", text, re.M | re.S):
        lines = block.splitlines()
        if not lines or not lines[0].startswith("$ kpgen explain"):
            continue
        command = lines[0]
        rest = lines[1:]
        while command.endswith("\\"):
            command = command[:-1] + rest.pop(0).strip()
        if "--live" in command or any(line.strip() == "..." for line in rest):
            continue
        examples.append((shlex.split(command)[2:], "\n".join(rest) + "\n"))
    return examples


def test_the_examples_of_docs_explain_md_are_the_real_output() -> None:
    examples = _doc_examples()
    assert len(examples) >= 6
    for args, shown in examples:
        args = [str(ROOT / a) if a.endswith(".yaml") else a for a in args]
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 0, result.stderr
        assert result.stdout == shown, f"kpgen {' '.join(args)}"


# --- session affinity ---------------------------------------------------------------------------

AFFINITY = """\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Service
  metadata: {name: sticky, namespace: default}
  spec:
    clusterIP: 10.96.60.60
    sessionAffinity: ClientIP
    sessionAffinityConfig: {clientIP: {timeoutSeconds: 600}}
    ports: [{name: http, port: 80}]
- apiVersion: discovery.k8s.io/v1
  kind: EndpointSlice
  metadata:
    name: sticky-1
    namespace: default
    labels: {kubernetes.io/service-name: sticky}
  addressType: IPv4
  ports: [{name: http, port: 8080}]
  endpoints: [{addresses: [192.168.70.1]}, {addresses: [192.168.70.2]}]
"""
STICKY = "10.96.60.60:80"
BOTH_STICKY = _dnat(("192.168.70.1:8080", False), ("192.168.70.2:8080", False))


def _affinity_rules(mode: str, tmp_path: Path) -> tuple[Path, Ruleset]:
    manifest = tmp_path / "sticky.yaml"
    manifest.write_text(AFFINITY)
    ruleset = ex.rendered_ruleset(_state(manifest), _node(mode))
    if not any(s.dynamic for s in ruleset.sets.values()):
        pytest.skip("kpgen renders no session affinity")
    return manifest, ruleset


@pytest.mark.parametrize("mode", MODES)
def test_session_affinity_offline_shows_a_first_connection_and_says_so(
    mode: str, tmp_path: Path
) -> None:
    manifest, _ = _affinity_rules(mode, tmp_path)
    answer = _explain(mode, TEST_POD, STICKY, manifest)
    assert answer.outcome_set() == BOTH_STICKY
    assert answer.service is not None and "sessionAffinity ClientIP" in (
        answer.service.policy or ""
    )
    assert any(
        n.startswith(f"session affinity: a first connection of {TEST_POD}") for n in answer.notes
    )


@kernel.kernel
@pytest.mark.parametrize("mode", MODES)
def test_live_session_affinity_sends_a_remembered_client_back_to_its_endpoint(
    mode: str, tmp_path: Path
) -> None:
    manifest, _ = _affinity_rules(mode, tmp_path)
    state = _state(manifest)
    node = _node(mode)
    (v4,) = [p for p in build_plans(state, node) if p.family.name == "V4"]
    with kernel.netns() as namespace:
        listing = _load(namespace, mode, v4)
        if mode == "nftables":
            (table,) = re.findall(r"^table ip (kpgen-\d+) \{", listing, re.M)
            (name,) = re.findall(r"set (affinity-\S+192\.168\.70\.2\S*) \{", listing)
            _in(namespace, "nft", "add", "element", "ip", table, name, f"{{ {TEST_POD} }}")
        else:
            (name,) = {
                n
                for n, rule in re.findall(r"--name (\S+) .*(-j DNAT .*)$", listing, re.M)
                if "192.168.70.2:8080" in rule
            }
            _in(namespace, "sh", "-c", f"echo +{TEST_POD} > /proc/net/xt_recent/{name}")
        kpgen = [sys.executable, "-m", "kpgen", "explain", "--live", "-o", "json"]
        remembered = json.loads(_in(namespace, *kpgen, "--src", TEST_POD, "--dst", STICKY))
        other = json.loads(_in(namespace, *kpgen, "--src", "192.168.69.201", "--dst", STICKY))
    assert [(o["destination"], o["probability"]) for o in remembered["outcomes"]] == [
        ("192.168.70.2:8080", 1.0)
    ]
    assert any(f"{TEST_POD} is remembered" in note for note in remembered["notes"])
    assert sorted(o["destination"] for o in other["outcomes"]) == [
        "192.168.70.1:8080",
        "192.168.70.2:8080",
    ]


def test_a_map_of_20000_elements_is_read_and_looked_up_at_once() -> None:
    # one element a line after the first, as the kernel lists a big map
    elements = [
        f"10.{n // 65536}.{n // 256 % 256}.{n % 256} . tcp . 80 : goto svc" for n in range(20000)
    ]
    listing = "elements = { " + ",\n\t\t\t     ".join(elements) + " }"
    text = textwrap.dedent(
        f"""\
        table ip kpgen {{
        \tmap service-ips {{
        \t\ttype ipv4_addr . inet_proto . inet_service : verdict
        \t\t{listing}
        \t}}
        \tchain svc {{
        \t\tmeta l4proto tcp dnat to 192.168.70.1:8080
        \t}}
        \tchain nat-prerouting {{
        \t\ttype nat hook prerouting priority dstnat; policy accept;
        \t\tip daddr . meta l4proto . th dport vmap @service-ips
        \t}}
        }}
        """
    )
    started = time.monotonic()
    ruleset = ex.parse_rules(text, "nftables", "kernel")
    packet = ex.parse_packet(GATEWAY, "10.0.78.31:80", "tcp")
    answer = ex.explain_packet(ruleset, packet, Locality([], "test"), "node-a")
    assert answer.outcome_set() == _dnat(("192.168.70.1:8080", False))
    assert time.monotonic() - started < 3  # minutes when reading it was quadratic
