"""Generated clusters: valid ones parse cleanly, render deterministically, and load.

Clusters are plain dicts, as a manifest would decode: 1-15 Services of every type with 1-4
ports (TCP, UDP, SCTP), unique ClusterIPs in 10.96.0.0/12, externalIPs, load-balancer IPs,
unique NodePorts, 0-50 endpoints over 0-3 EndpointSlices, ready true/false/absent, and odd but
legal names (1 character, 63 characters, runs of dashes, digits). The node flags vary too.
"""

from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass, replace
from typing import Any

import kernel
import pytest
from builders import nft_elements
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kpgen.core.node import NodeFlags, node_config
from kpgen.core.parse import parse_documents
from kpgen.render.text import render

LOWER = "abcdefghijklmnopqrstuvwxyz"
DIGITS = "0123456789"
ALNUM = LOWER + DIGITS
HOSTNAME = "node-a"
SERVICE_NET = ipaddress.IPv4Network("10.96.0.0/12")
EXTERNAL_NET = ipaddress.IPv4Network("198.18.0.0/15")
POD_NET = ipaddress.IPv4Network("10.244.0.0/16")
# non-overlapping, so that no known bug decides the outcome (see test_kernel_validity.py)
CLUSTER_CIDRS = ("10.244.0.0/16", "192.168.0.0/16", "172.16.0.0/12", "fd00:10:244::/56")
NODEPORT_CIDRS = ("10.20.30.0/24", "172.31.0.0/16", "127.0.0.0/8", "fd00::/64")
SERVICE_CIDRS = ("10.96.0.0/12", "198.18.0.0/15", "fd00:10:96::/112")
MODES = ("nftables", "iptables")

QUICK = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KERNEL = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def labels(first: str, max_size: int = 63) -> st.SearchStrategy[str]:
    """DNS labels whose first character is from ``first``: the odd shapes and the rest."""
    last = st.sampled_from(ALNUM)
    head = st.sampled_from(first)
    return st.one_of(
        head,  # one character
        st.builds(lambda a, n, z: a + "-" * n + z, head, st.integers(1, max_size - 2), last),
        st.builds(  # exactly max_size characters
            lambda a, m, z: a + m + z,
            head,
            st.text(ALNUM + "-", min_size=max_size - 2, max_size=max_size - 2),
            last,
        ),
        st.builds(lambda a, m, z: a + m + z, head, st.text(ALNUM + "-", max_size=12), last),
        st.builds(lambda a, d: a + d, head, st.text(DIGITS, min_size=1, max_size=8)),
    )


service_names = labels(LOWER)  # RFC 1035: starts with a letter
namespaces = labels(ALNUM)  # RFC 1123: may start with a digit
port_names = labels(ALNUM)


def _address(network: ipaddress.IPv4Network, offset: int) -> str:
    return str(network.network_address + offset)


@dataclass
class Cluster:
    documents: list[dict[str, Any]]
    services: list[dict[str, Any]]


@st.composite
def service_ports(
    draw: st.DrawFn, service_type: str, node_ports: list[int]
) -> list[dict[str, Any]]:
    count = len(node_ports)
    numbers = draw(st.lists(st.integers(1, 65535), min_size=count, max_size=count, unique=True))
    names = draw(st.lists(port_names, min_size=count, max_size=count, unique=True))
    unnamed = count == 1 and draw(st.booleans())
    with_node_ports = service_type == "NodePort" or (
        service_type == "LoadBalancer" and draw(st.booleans())
    )
    ports = []
    for number, name, node_port in zip(numbers, names, node_ports, strict=True):
        port: dict[str, Any] = {"port": number, "targetPort": draw(st.integers(1, 65535))}
        protocol = draw(st.sampled_from(["TCP", "UDP", "SCTP", None]))  # None: default TCP
        if protocol:
            port["protocol"] = protocol
        if not unnamed:
            port["name"] = name
        if with_node_ports:
            port["nodePort"] = node_port
        ports.append(port)
    return ports


@st.composite
def endpoint_slices(
    draw: st.DrawFn, namespace: str, service: str, ports: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    count = draw(st.integers(0, 3))
    endpoints = draw(st.integers(0, 50)) if count else 0
    slices: list[dict[str, Any]] = []
    for index in range(count):
        slice_ports = []
        for port in ports:
            if draw(st.integers(0, 9)) == 0:
                continue  # a slice that lacks this port: no endpoints for it from here
            entry: dict[str, Any] = {"port": draw(st.sampled_from([port["targetPort"], 8080]))}
            if "name" in port:
                entry["name"] = port["name"]
            if "protocol" in port:
                entry["protocol"] = port["protocol"]
            slice_ports.append(entry)
        separator = draw(st.sampled_from(["-", "."]))
        slices.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{service}{separator}s{index}",
                    "namespace": namespace,
                    "labels": {"kubernetes.io/service-name": service},
                },
                "addressType": "IPv4",
                "ports": slice_ports,
                "endpoints": [],
            }
        )
    for _ in range(endpoints):
        endpoint: dict[str, Any] = {
            "addresses": [_address(POD_NET, draw(st.integers(1, 2**16 - 2)))]
        }
        ready = draw(st.sampled_from([True, False, None, "no-conditions"]))
        if ready == "no-conditions":
            pass
        elif ready is None:
            endpoint["conditions"] = {"serving": True}
        else:
            endpoint["conditions"] = {"ready": ready}
        node = draw(st.sampled_from([HOSTNAME, "node-b", "n.example", None]))
        if node:
            endpoint["nodeName"] = node
        slices[draw(st.integers(0, count - 1))]["endpoints"].append(endpoint)
    return slices


@st.composite
def clusters(draw: st.DrawFn, min_services: int = 1, max_services: int = 15) -> Cluster:
    ns_pool = draw(st.lists(namespaces, min_size=1, max_size=3, unique=True))
    refs = draw(
        st.lists(
            st.tuples(st.sampled_from(ns_pool), service_names),
            min_size=min_services,
            max_size=max_services,
            unique=True,
        )
    )
    count = len(refs)
    cluster_ips = draw(
        st.lists(
            st.integers(1, SERVICE_NET.num_addresses - 2),
            min_size=count,
            max_size=count,
            unique=True,
        )
    )
    port_counts = [draw(st.integers(1, 4)) for _ in refs]
    node_ports = draw(
        st.lists(
            st.integers(30000, 32767),
            min_size=sum(port_counts),
            max_size=sum(port_counts),
            unique=True,
        )
    )
    external_counts = [(draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in refs]
    externals = iter(
        draw(
            st.lists(
                st.integers(1, EXTERNAL_NET.num_addresses - 2),
                min_size=sum(a + b for a, b in external_counts),
                max_size=sum(a + b for a, b in external_counts),
                unique=True,
            )
        )
    )
    documents: list[dict[str, Any]] = []
    services = []
    used = 0
    for (namespace, name), ip_offset, ports_count, (n_ext, n_lb) in zip(
        refs, cluster_ips, port_counts, external_counts, strict=True
    ):
        service_type = draw(st.sampled_from(["ClusterIP", "NodePort", "LoadBalancer"]))
        ports = draw(service_ports(service_type, node_ports[used : used + ports_count]))
        used += ports_count
        cluster_ip = _address(SERVICE_NET, ip_offset)
        spec: dict[str, Any] = {"ports": ports}
        ip_style = draw(st.sampled_from(["clusterIP", "clusterIPs", "both"]))
        if ip_style != "clusterIPs":
            spec["clusterIP"] = cluster_ip
        if ip_style != "clusterIP":
            spec["clusterIPs"] = [cluster_ip]
        if service_type != "ClusterIP" or draw(st.booleans()):
            spec["type"] = service_type
        external_ips = [_address(EXTERNAL_NET, next(externals)) for _ in range(n_ext)]
        lb_ips = [_address(EXTERNAL_NET, next(externals)) for _ in range(n_lb)]
        if external_ips:
            spec["externalIPs"] = external_ips
        service: dict[str, Any] = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
        if service_type == "LoadBalancer" and lb_ips:
            ingress: list[dict[str, Any]] = [{"ip": ip} for ip in lb_ips]
            if draw(st.booleans()):
                ingress.append({"hostname": f"{name}.lb.example"})
            service["status"] = {"loadBalancer": {"ingress": ingress}}
        services.append(service)
        documents.append(service)
        documents.extend(draw(endpoint_slices(namespace, name, ports)))
    return Cluster(documents, services)


@st.composite
def node_flags(draw: st.DrawFn) -> NodeFlags:
    nodeports = draw(st.sampled_from(["all", "cidrs", "primary"]))
    node_ips: tuple[str, ...] = ()
    addresses: tuple[str, ...] = ()
    if nodeports == "cidrs":
        addresses = tuple(draw(st.lists(st.sampled_from(NODEPORT_CIDRS), min_size=1, unique=True)))
    elif nodeports == "primary":
        addresses, node_ips = ("primary",), ("10.20.30.11",)
    return NodeFlags(
        hostname=HOSTNAME,
        cluster_cidrs=tuple(draw(st.lists(st.sampled_from(CLUSTER_CIDRS), unique=True))),
        masquerade_all=draw(st.booleans()),
        nodeport_addresses=addresses,
        node_ips=node_ips,
        service_cidrs=tuple(draw(st.lists(st.sampled_from(SERVICE_CIDRS), unique=True))),
    )


def render_mode(documents: list[dict[str, Any]], flags: NodeFlags, mode: str) -> str:
    return render(parse_documents(documents).state, node_config(replace(flags, mode=mode)))


def assert_kernel_accepts(
    documents: list[dict[str, Any]], flags: NodeFlags, namespace: str
) -> None:
    nft = render_mode(documents, flags, "nftables")
    ok, stderr = kernel.nft_check(nft, namespace)
    assert ok, f"nft -c rejected the nftables rules:\n{stderr}"
    iptables = render_mode(documents, flags, "iptables")
    ok, stderr = kernel.iptables_load(iptables)
    assert ok, f"iptables-restore rejected the iptables rules:\n{stderr}"


# --- Without the kernel ------------------------------------------------------------------


@QUICK
@given(clusters())
def test_generated_valid_clusters_parse_without_problems(cluster: Cluster) -> None:
    result = parse_documents(cluster.documents)
    assert [str(p) for p in result.problems] == []
    assert result.skipped == []
    assert len(result.state.services) == len(cluster.services)


@QUICK
@given(clusters(), node_flags(), st.randoms(use_true_random=False))
def test_rendering_is_deterministic_and_independent_of_document_order(
    cluster: Cluster, flags: NodeFlags, rnd: random.Random
) -> None:
    shuffled = list(cluster.documents)
    rnd.shuffle(shuffled)
    for mode in MODES:
        first = render_mode(cluster.documents, flags, mode)
        assert render_mode(cluster.documents, flags, mode) == first
        assert render_mode(shuffled, flags, mode) == first


@QUICK
@given(clusters(), node_flags())
def test_every_service_port_is_either_dispatched_or_rejected_exactly_once(
    cluster: Cluster, flags: NodeFlags
) -> None:
    nft = render_mode(cluster.documents, flags, "nftables")
    by_address = [
        e.split(" : ")[0]
        for m in ("service-ips", "no-endpoint-services")
        for e in nft_elements(nft, m)
    ]
    by_node_port = [
        e.split(" : ")[0]
        for m in ("service-nodeports", "no-endpoint-nodeports")
        for e in nft_elements(nft, m)
    ]
    expected_addresses, expected_node_ports = [], []
    for service in cluster.services:
        spec = service["spec"]
        ingress = service.get("status", {}).get("loadBalancer", {}).get("ingress", [])
        addresses = [spec.get("clusterIP") or spec["clusterIPs"][0]]
        addresses += spec.get("externalIPs", []) + [i["ip"] for i in ingress if "ip" in i]
        for port in spec["ports"]:
            protocol = port.get("protocol", "TCP").lower()
            expected_addresses += [f"{a} . {protocol} . {port['port']}" for a in addresses]
            if "nodePort" in port:
                expected_node_ports.append(f"{protocol} . {port['nodePort']}")
    assert sorted(by_address) == sorted(expected_addresses)
    assert sorted(by_node_port) == sorted(expected_node_ports)


# --- With the kernel ---------------------------------------------------------------------


@pytest.mark.kernel
@KERNEL
@given(cluster=clusters(), flags=node_flags())
def test_kernel_accepts_rules_of_generated_clusters(
    cluster: Cluster, flags: NodeFlags, check_namespace: str
) -> None:
    assert_kernel_accepts(cluster.documents, flags, check_namespace)


def _ports_of(service: dict[str, Any]) -> list[dict[str, Any]]:
    ports: list[dict[str, Any]] = service["spec"]["ports"]
    return ports


def _claim(target: dict[str, Any], port: dict[str, Any], node_port: bool = False) -> None:
    """Make ``target``'s first port use ``port``'s protocol and number (and NodePort),
    dropping its other ports that would then repeat a protocol and number."""
    first = _ports_of(target)[0]
    first["protocol"] = port.get("protocol", "TCP")
    if node_port:
        first["nodePort"] = port["nodePort"]
    else:
        first["port"] = port["port"]
    key = (first["protocol"], first["port"])
    rest = [p for p in _ports_of(target)[1:] if (p.get("protocol", "TCP"), p["port"]) != key]
    target["spec"]["ports"] = [first, *rest]


@st.composite
def conflicting_clusters(draw: st.DrawFn) -> Cluster:
    """A valid cluster in which 1-3 services then claim what another one uses: its ClusterIP
    and port, its ClusterIP and port as an externalIP, or its NodePort."""
    cluster = draw(clusters(min_services=2, max_services=8))
    services = cluster.services
    conflicts = 0
    for kind in draw(
        st.lists(
            st.sampled_from(["cluster-ip", "external-ip", "node-port"]), min_size=1, max_size=3
        )
    ):
        i, j = draw(
            st.lists(st.integers(0, len(services) - 1), min_size=2, max_size=2, unique=True)
        )
        owner, claimer = services[i], services[j]
        owner_port = _ports_of(owner)[0]
        owner_ip = owner["spec"].get("clusterIP") or owner["spec"]["clusterIPs"][0]
        if kind == "cluster-ip":
            claimer["spec"]["clusterIP"] = owner_ip
            claimer["spec"]["clusterIPs"] = [owner_ip]
            _claim(claimer, owner_port)
        elif kind == "external-ip":
            claimer["spec"]["externalIPs"] = [owner_ip]
            _claim(claimer, owner_port)
        else:
            if "nodePort" not in owner_port or "nodePort" not in _ports_of(claimer)[0]:
                continue
            _claim(claimer, owner_port, node_port=True)
        conflicts += 1
    assume(conflicts > 0)
    return cluster


@pytest.mark.kernel
@KERNEL
@given(cluster=conflicting_clusters(), flags=node_flags())
def test_conflicting_services_are_reported_and_the_rest_still_loads(
    cluster: Cluster, flags: NodeFlags, check_namespace: str
) -> None:
    result = parse_documents(cluster.documents)
    assert result.problems, "a claimed ClusterIP, externalIP or NodePort must be reported"
    assert all("is already used by" in p.problem for p in result.problems), result.problems
    assert len(result.state.services) == len(cluster.services) - len(result.problems)
    assert_kernel_accepts(cluster.documents, flags, check_namespace)
