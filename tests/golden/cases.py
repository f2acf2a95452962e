"""The golden cases: which cluster, on which node with which flags, and why.

Each case renders to ``tests/golden/<case>.<flags-id>.nft`` and ``.iptables``; the flags id
is made from the node flags (:func:`flags_id`), so a golden file's name says how it was made.
``make golden`` (pytest tests/test_golden.py --update-golden) rewrites them; review the diff.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kpgen.core.node import NodeFlags

GOLDEN = Path(__file__).resolve().parent
INPUTS = GOLDEN / "cases"
REPO = GOLDEN.parent.parent
SEED = REPO / "examples" / "seed-cluster.yaml"


@dataclass(frozen=True)
class Case:
    input: Path
    flags: NodeFlags
    description: str


def _flags(
    hostname: str = "node-a",
    cidrs: tuple[str, ...] = ("10.244.0.0/16",),
    *,
    masquerade_all: bool | None = None,
    nodeport_addresses: tuple[str, ...] = (),
    node_ips: tuple[str, ...] = (),
    service_cidrs: tuple[str, ...] = (),
) -> NodeFlags:
    """The flags of a case; most run on node-a of a cluster with pods in 10.244.0.0/16."""
    return NodeFlags(
        hostname=hostname,
        cluster_cidrs=cidrs,
        masquerade_all=masquerade_all,
        nodeport_addresses=nodeport_addresses,
        node_ips=node_ips,
        service_cidrs=service_cidrs,
    )


SEED_NODE = "k8s-worker01"
SEED_CIDRS = ("192.168.0.0/16",)  # the Makefile's SEED_NODE_FLAGS

CASES: dict[str, Case] = {
    "seed": Case(
        SEED,
        _flags(SEED_NODE, SEED_CIDRS),
        "the seed article's cluster on k8s-worker01: ClusterIP, externalIP, NodePort 30001",
    ),
    "seed-masquerade-all": Case(
        SEED,
        _flags(SEED_NODE, SEED_CIDRS, masquerade_all=True),
        "--masquerade-all: every ClusterIP connection is masqueraded, cluster CIDR or not",
    ),
    "seed-no-cluster-cidr": Case(
        SEED,
        _flags(SEED_NODE, ()),
        "no --cluster-cidr: ClusterIP traffic is not masqueraded, external traffic still is",
    ),
    "seed-cluster-cidrs": Case(
        SEED,
        _flags(SEED_NODE, ("192.168.0.0/16", "10.244.0.0/16,172.16.0.0/12", "fd00:10:244::/56")),
        "several --cluster-cidr (one comma-separated, one IPv6 that IPv4 rules leave out)",
    ),
    "multi-port": Case(
        INPUTS / "multi-port.yaml",
        _flags(),
        "named http/https ports whose slice ports differ from the service ports, 2 slices",
    ),
    "udp-sctp": Case(
        INPUTS / "udp-sctp.yaml",
        _flags(),
        "DNS on udp 53 + tcp 53, and an SCTP NodePort service",
    ),
    "no-endpoints": Case(
        INPUTS / "no-endpoints.yaml",
        _flags(),
        "ClusterIP/NodePort/externalIP/UDP ports with an empty slice or none: all rejected",
    ),
    "external": Case(
        INPUTS / "external.yaml",
        _flags(),
        "NodePort + externalIPs, LoadBalancer ingress IPs (ipMode Proxy and IPv6 left out)",
    ),
    "hairpin": Case(
        INPUTS / "hairpin.yaml",
        _flags(),
        "one pod behind two services, a host-network endpoint, an endpoint in two slices",
    ),
    "not-ready": Case(
        INPUTS / "not-ready.yaml",
        _flags(),
        "ready true/absent endpoints used, ready false (also terminating) not; all down rejects",
    ),
    "nodeport-cidrs": Case(
        INPUTS / "no-endpoints.yaml",
        _flags(nodeport_addresses=("10.20.30.0/24", "172.16.0.0/12,fd00::/64")),
        "--nodeport-addresses CIDRs: NodePorts (served and rejected) only on those addresses",
    ),
    "nodeport-ipv6-only": Case(
        INPUTS / "no-endpoints.yaml",
        _flags(nodeport_addresses=("fd00::/64",)),
        "--nodeport-addresses with IPv6 CIDRs only: no IPv4 address answers NodePorts",
    ),
    "nodeport-primary": Case(
        SEED,
        _flags(SEED_NODE, SEED_CIDRS, nodeport_addresses=("primary",), node_ips=("10.20.30.11",)),
        "--nodeport-addresses primary --node-ip 10.20.30.11: NodePorts on that address only",
    ),
    "service-cidr": Case(
        INPUTS / "no-endpoints.yaml",
        _flags(service_cidrs=("10.96.0.0/12", "fd00:10:96::/112")),
        "--service-cidr: unknown ports of ClusterIPs rejected, unallocated addresses dropped",
    ),
    "policies": Case(
        INPUTS / "policies.yaml",
        _flags(),
        "traffic policies Local, terminating endpoints, zone hints, LB source ranges",
    ),
    "lb-node-in-ranges": Case(
        INPUTS / "lb-source-ranges.yaml",
        _flags(node_ips=("192.168.0.2",)),
        "a node address in loadBalancerSourceRanges: the service's LB IPs are let through too",
    ),
    "lb-node-outside-ranges": Case(
        INPUTS / "lb-source-ranges.yaml",
        _flags(node_ips=("10.20.30.11",)),
        "no node address in loadBalancerSourceRanges: only the ranges are let through",
    ),
    "dual-stack": Case(
        INPUTS / "dual-stack.yaml",
        _flags(cidrs=("10.244.0.0/16", "fd00:10:244::/56")),
        "an IPv4 and an IPv6 ClusterIP: an ip and an ip6 table (ip6tables input after the v4)",
    ),
    "empty": Case(
        INPUTS / "empty.yaml",
        _flags(),
        "no services: the fixed skeleton with empty sets and maps",
    ),
}


def _slug(value: str) -> str:
    return value.replace("/", "-").replace(":", ".").replace(",", "+")


def flags_id(flags: NodeFlags) -> str:
    """A file-name-safe summary of the node flags (the mode is in the file's suffix)."""
    parts = []
    if flags.hostname:
        parts.append(f"host-{flags.hostname}")
    parts += [f"cidr-{_slug(c)}" for c in flags.cluster_cidrs]
    if flags.masquerade_all:
        parts.append("masq-all")
    parts += [f"np-{_slug(a)}" for a in flags.nodeport_addresses]
    parts += [f"ip-{_slug(a)}" for a in flags.node_ips]
    parts += [f"svc-{_slug(c)}" for c in flags.service_cidrs]
    return "_".join(parts) or "defaults"


SUFFIXES = {"nftables": "nft", "iptables": "iptables"}


def golden_path(case: str, mode: str) -> Path:
    return GOLDEN / f"{case}.{flags_id(CASES[case].flags)}.{SUFFIXES[mode]}"
