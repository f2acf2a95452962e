"""loadBalancerSourceRanges with a node inside them: the service's own LB IPs are let through.

kube-proxy (both modes) accepts packets whose source is one of a service's load-balancer IPs when
a node address lies in the service's ranges: a VIP-like load balancer (its address also local to
the node, or routed back to it) loops the node's own requests to the LB IP back with that address
as the source. These tests ask ``kpgen explain`` what the rendered rules do, in both modes, with a
node address inside and outside the ranges; tests/e2e/test_policies.py shows it with packets.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from kpgen.cli.main import main

LB = Path(__file__).resolve().parent / "golden" / "cases" / "lb-source-ranges.yaml"
INSIDE, OUTSIDE = "192.168.0.2", "10.20.30.11"  # node addresses in and outside the ranges
MODES = ("nftables", "iptables")


def outcomes(mode: str, node_ip: str, src: str, dst: str) -> list[tuple[str, str | None, bool]]:
    """(kind, destination, masqueraded) of every outcome ``explain`` gives the packet."""
    result = CliRunner().invoke(
        main,
        ["explain", "-f", str(LB), "--proxy-mode", mode, "--hostname-override", "node-a",
         "--cluster-cidr", "10.244.0.0/16", "--node-ip", node_ip,
         "--src", src, "--dst", dst, "-o", "json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    return [
        (o["kind"], o["destination"], o["masquerade"])
        for o in json.loads(result.stdout)["outcomes"]
    ]


SERVED = [("dnat", "10.244.1.20:8080", True), ("dnat", "10.244.2.20:8080", True)]
DROPPED = [("drop", None, False)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("src", "dst"), [("1.2.3.4", "1.2.3.4:80"), ("5.6.7.8", "1.2.3.4:80")])
def test_an_lb_ip_as_source_passes_when_the_node_is_in_the_ranges(
    mode: str, src: str, dst: str
) -> None:
    assert outcomes(mode, INSIDE, src, dst) == SERVED  # masqueraded: external traffic


@pytest.mark.parametrize("mode", MODES)
def test_an_lb_ip_as_source_is_dropped_when_no_node_address_is_in_the_ranges(mode: str) -> None:
    assert outcomes(mode, OUTSIDE, "1.2.3.4", "1.2.3.4:80") == DROPPED


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("node_ip", [INSIDE, OUTSIDE])
def test_other_sources_node_ports_and_cluster_ips_are_unchanged(mode: str, node_ip: str) -> None:
    assert outcomes(mode, node_ip, "203.0.113.9", "5.6.7.8:80") == SERVED  # in the ranges
    assert outcomes(mode, node_ip, "198.51.100.9", "5.6.7.8:80") == DROPPED  # outside them
    # NodePorts are not subject to the ranges; nor is the ClusterIP
    assert outcomes(mode, node_ip, "198.51.100.9", f"{node_ip}:30210") == SERVED
    assert outcomes(mode, node_ip, "198.51.100.9", "10.96.2.10:80") == SERVED


@pytest.mark.parametrize("mode", MODES)
def test_an_lb_ip_of_another_service_is_no_pass(mode: str) -> None:
    assert outcomes(mode, INSIDE, "9.9.9.9", "1.2.3.4:80") == DROPPED
