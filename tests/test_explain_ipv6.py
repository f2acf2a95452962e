"""``kpgen explain`` for IPv6: the ``ip6`` table and ip6tables explained as IPv4's are, a
packet's family picking its family's rules (offline here; tests/test_explain_live.py reads
them back from the kernel).

The cluster is the dual-stack golden case: ``default/web`` has the ClusterIPs 10.96.0.10 and
fd00:10:96::10, the externalIP 2001:db8::20 and the NodePort 30080; one IPv4 endpoint, two
IPv6 ones (fd00:10:244:1::5 on node-a, fd00:10:244:2::6 elsewhere).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner
from golden.cases import CASES, SEED

from kpgen.cli.main import main

MODES = ("nftables", "iptables")
CASE = CASES["dual-stack"]
NODE_ARGS = [
    "-f",
    str(CASE.input),
    "--hostname-override",
    "node-a",
    "--cluster-cidr",
    "10.244.0.0/16",
    "--cluster-cidr",
    "fd00:10:244::/56",
    "--node-ip",
    "10.20.30.11",
    "--node-ip",
    "fd00::11",
]
CLUSTER_IP6 = "fd00:10:96::10"
EP1, EP2 = "[fd00:10:244:1::5]:8080", "[fd00:10:244:2::6]:8080"  # EP1 is node-a's
OUTSIDE6 = "2001:db8::99"


def _explain(mode: str, *args: str, output: str = "json") -> Any:
    result = CliRunner().invoke(
        main, ["explain", *NODE_ARGS, "--proxy-mode", mode, *args, "-o", output]
    )
    assert result.exit_code == 0, result.stderr
    return result.stdout if output == "text" else json.loads(result.stdout)


def _shares(answer: dict[str, Any]) -> dict[tuple[str, str | None, bool], float]:
    shares: dict[tuple[str, str | None, bool], float] = {}
    for o in answer["outcomes"]:
        key = (o["kind"], o["destination"], o["masquerade"])
        shares[key] = shares.get(key, 0) + o["probability"]
    return shares


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dst", [f"{CLUSTER_IP6}:80", f"[{CLUSTER_IP6}]:80"])
def test_an_ipv6_cluster_ip_from_outside_is_balanced_and_masqueraded(mode: str, dst: str) -> None:
    answer = _explain(mode, "--src", OUTSIDE6, "--dst", dst)
    assert _shares(answer) == {("dnat", EP1, True): 0.5, ("dnat", EP2, True): 0.5}
    assert answer["packet"] == {
        "src": OUTSIDE6,
        "dst": CLUSTER_IP6,
        "port": 80,
        "protocol": "tcp",
        "origin": "another host",
    }
    service = answer["service"]
    assert (service["service"], service["port_name"], service["via"]) == (
        "default/web",
        "http",
        "ClusterIP",
    )
    reasons = {r for o in answer["outcomes"] for r in o["masquerade_reasons"]}
    assert reasons == {f"to a ClusterIP from {OUTSIDE6}, outside the cluster CIDR"}
    assert answer["assumptions"] == [] and answer["notes"] == []


@pytest.mark.parametrize("mode", MODES)
def test_an_ipv6_pod_is_not_masqueraded_except_when_it_reaches_itself(mode: str) -> None:
    answer = _explain(mode, "--src", "fd00:10:244:1::5", "--dst", f"[{CLUSTER_IP6}]:80")
    assert _shares(answer) == {("dnat", EP1, True): 0.5, ("dnat", EP2, False): 0.5}
    hairpin = next(o for o in answer["outcomes"] if o["masquerade"])
    assert hairpin["masquerade_reasons"] == ["hairpin: the endpoint chosen is the client itself"]


@pytest.mark.parametrize("mode", MODES)
def test_ipv6_external_ip_and_node_port_are_named_as_such(mode: str) -> None:
    external = _explain(mode, "--src", OUTSIDE6, "--dst", "[2001:db8::20]:80")
    assert _shares(external) == {("dnat", EP1, True): 0.5, ("dnat", EP2, True): 0.5}
    assert external["service"]["via"] == "externalIP"
    node_port = _explain(mode, "--src", OUTSIDE6, "--dst", "[fd00::11]:30080")
    assert _shares(node_port) == {("dnat", EP1, True): 0.5, ("dnat", EP2, True): 0.5}
    assert node_port["service"]["via"] == "NodePort"
    assert {o["delivery"] for o in node_port["outcomes"]} == {"forwarded"}
    # to the node's own IPv6 address, a port no service has: delivered, untouched
    untouched = _explain(mode, "--src", OUTSIDE6, "--dst", "[fd00::11]:22")
    assert _shares(untouched) == {("untouched", None, False): 1.0}
    assert untouched["outcomes"][0]["delivery"] == "local"


@pytest.mark.parametrize("mode", MODES)
def test_the_same_service_over_ipv4_is_walked_through_the_ipv4_rules(mode: str) -> None:
    answer = _explain(mode, "--src", "203.0.113.99", "--dst", "10.96.0.10:80")
    assert _shares(answer) == {("dnat", "10.244.1.5:8080", True): 1.0}
    path = {step["chain"] for o in answer["outcomes"] for step in o["path"]}
    assert not any("fd00" in chain for chain in path)


def test_the_text_writes_ipv6_destinations_in_brackets() -> None:
    text = _explain("nftables", "--src", OUTSIDE6, "--dst", f"{CLUSTER_IP6}:80", output="text")
    assert text.startswith(f"tcp {OUTSIDE6} -> [{CLUSTER_IP6}]:80, a new connection")
    assert f"50%  DNAT to {EP1}, masqueraded" in text
    assert "ip6 daddr . meta l4proto . th dport vmap @service-ips" in text
    assert max(len(line) for line in text.splitlines()) <= 80


@pytest.mark.parametrize("mode", MODES)
def test_the_service_view_traces_the_clients_family_and_names_the_other(mode: str) -> None:
    ipv4 = _explain(mode, "--service", "default/web")
    assert [(e["via"], e["address"]) for e in ipv4["entries"]] == [
        ("ClusterIP", "10.96.0.10"),
        ("NodePort", "10.20.30.11"),
    ]
    assert ipv4["notes"] == ["default/web has IPv6 addresses too: trace them with an IPv6 --src"]
    ipv6 = _explain(mode, "--service", "default/web", "--src", OUTSIDE6)
    assert ipv6["client"] == OUTSIDE6
    assert [(e["via"], e["address"], e["port"]) for e in ipv6["entries"]] == [
        ("ClusterIP", CLUSTER_IP6, 80),
        ("externalIP", "2001:db8::20", 80),
        ("NodePort", "fd00::11", 30080),
    ]
    for entry in ipv6["entries"]:
        assert [(s["destination"], s["probability"]) for s in entry["outcomes"]] == [
            (EP1, 0.5),
            (EP2, 0.5),
        ]
    assert ipv6["notes"] == ["default/web has IPv4 addresses too: trace them with an IPv4 --src"]


def test_a_cluster_without_ipv6_services_leaves_ipv6_packets_untouched() -> None:
    args = ["explain", "-f", str(SEED), "--hostname-override", "k8s-worker01"]
    result = CliRunner().invoke(main, [*args, "--src", OUTSIDE6, "--dst", "[fd00::20]:80"])
    assert result.exit_code == 0, result.stderr
    assert "untouched: no service of kpgen's answers here" in result.stdout
    assert "kpgen has no IPv6 rules here: no service has an IPv6 ClusterIP" in " ".join(
        result.stdout.split()
    )


@pytest.mark.parametrize(
    ("src", "dst", "message"),
    [
        ("10.0.0.1", f"[{CLUSTER_IP6}]:80", "addresses of one family (IPv4 or IPv6)"),
        (OUTSIDE6, "10.96.0.10:80", "addresses of one family (IPv4 or IPv6)"),
        ("fe80::1%eth0", f"[{CLUSTER_IP6}]:80", "an address without a zone"),
        (OUTSIDE6, f"[{CLUSTER_IP6}]", "needs a port 1-65535"),
        ("not-an-address", "10.96.0.10:80", "not an IPv4 or IPv6 address"),
    ],
)
def test_addresses_the_question_cannot_use_are_refused_in_one_line(
    src: str, dst: str, message: str
) -> None:
    result = CliRunner().invoke(main, ["explain", *NODE_ARGS, "--src", src, "--dst", dst])
    assert result.exit_code == 2
    assert message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
