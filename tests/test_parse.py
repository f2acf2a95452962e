"""kpgen.core.parse.parse_documents: validation, problems, skipped objects and what the model
keeps."""

from __future__ import annotations

import ipaddress
from collections import Counter
from typing import Any

import pytest
from builders import endpoint, endpoint_slice, service
from hypothesis import given, settings
from hypothesis import strategies as st

from kpgen.core import parse
from kpgen.core.fields import Field, Invalid
from kpgen.core.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    EndpointConditions,
    IPFamily,
    ObjectRef,
    Protocol,
    ServicePort,
    ServiceType,
    SessionAffinity,
    TrafficPolicy,
)
from kpgen.core.node import NodeConfig
from kpgen.core.parse import ParseResult, Skipped, parse_documents
from kpgen.core.plan import build_plans

ip = ipaddress.ip_address


def good_objects() -> list[dict]:
    """A valid service and its slice, put beside every bad object."""
    return [
        service("good", cluster_ip="10.96.0.99"),
        endpoint_slice("good-1", service_name="good", endpoints=[endpoint("10.244.9.9")]),
    ]


def parse_beside_good(*docs: dict) -> ParseResult:
    """Parse ``docs`` with a good service and slice, and check those two survived."""
    result = parse_documents([*docs, *good_objects()])
    assert ObjectRef("default", "good") in [s.ref for s in result.state.services]
    assert ObjectRef("default", "good-1") in [s.ref for s in result.state.slices]
    return result


def problem_texts(result: ParseResult) -> list[str]:
    return [str(problem) for problem in result.problems]


def service_refs(result: ParseResult) -> list[str]:
    return [str(s.ref) for s in result.state.services]


def without(doc: dict, section: str, key: str) -> dict:
    del doc[section][key]
    return doc


# --- bad services: one problem each, the rest goes on ---------------------------------------

BAD_SERVICES = [
    (
        "invalid-cluster-ip",
        service("a", cluster_ip="10.0.0.300"),
        'default/a: spec.clusterIP: "10.0.0.300" is not an IP address (Service skipped)',
    ),
    (
        "invalid-cluster-ips-entry",
        service("a", cluster_ip=None, clusterIPs=["10.96.0.1", "nope"]),
        'default/a: spec.clusterIPs[1]: "nope" is not an IP address (Service skipped)',
    ),
    (
        "invalid-external-ip",
        service("a", externalIPs=["10.20.30.20", "10.20.30"]),
        'default/a: spec.externalIPs[1]: "10.20.30" is not an IP address (Service skipped)',
    ),
    (
        "ipv6-cluster-ip-with-zone",
        service("a", cluster_ip="fe80::1%eth0"),
        'default/a: spec.clusterIP: "fe80::1%eth0" has a zone; a service address may not'
        " (Service skipped)",
    ),
    (
        "ipv6-external-ip-with-zone",
        service("a", externalIPs=["fe80::1%eth0"]),
        'default/a: spec.externalIPs[0]: "fe80::1%eth0" has a zone; a service address may not'
        " (Service skipped)",
    ),
    (
        "port-zero",
        service("a", ports=[{"port": 0}]),
        "default/a: spec.ports[0].port: 0 is out of range 1-65535 (Service skipped)",
    ),
    (
        "port-70000",
        service("a", ports=[{"port": 70000}]),
        "default/a: spec.ports[0].port: 70000 is out of range 1-65535 (Service skipped)",
    ),
    (
        "port-as-string",
        service("a", ports=[{"port": "http"}]),
        'default/a: spec.ports[0].port: "http" is not a port number (Service skipped)',
    ),
    (
        "node-port-70000",
        service("a", type="NodePort", ports=[{"port": 80, "nodePort": 70000}]),
        "default/a: spec.ports[0].nodePort: 70000 is out of range 1-65535 (Service skipped)",
    ),
    (
        "node-port-zero",
        service("a", type="NodePort", ports=[{"port": 80, "nodePort": 0}]),
        "default/a: spec.ports[0].nodePort: 0 is out of range 1-65535 (Service skipped)",
    ),
    (
        "unknown-protocol",
        service("a", ports=[{"port": 80, "protocol": "ICMP"}]),
        'default/a: spec.ports[0].protocol: "ICMP" is not one of TCP, UDP, SCTP (Service skipped)',
    ),
    (
        "missing-ports",
        without(service("a"), "spec", "ports"),
        "default/a: spec.ports: required field is missing (Service skipped)",
    ),
    (
        "empty-ports",
        service("a", ports=[]),
        "default/a: spec.ports: a service needs at least one port (Service skipped)",
    ),
    (
        "missing-cluster-ip",
        service("a", cluster_ip=None),
        "default/a: spec.clusterIP: required field is missing (Service skipped)",
    ),
    (
        "missing-name",
        without(service("a"), "metadata", "name"),
        "default/(no name): metadata.name: required field is missing (Service skipped)",
    ),
    (
        "missing-spec",
        {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "a"}},
        "default/a: spec: required field is missing (Service skipped)",
    ),
    (
        "two-ports-without-names",
        service("a", ports=[{"port": 80}, {"port": 443}]),
        "default/a: spec.ports[0].name: required when a service has several ports"
        " (Service skipped)",
    ),
    (
        "second-port-without-name",
        service("a", ports=[{"name": "http", "port": 80}, {"port": 443}]),
        "default/a: spec.ports[1].name: required when a service has several ports"
        " (Service skipped)",
    ),
    (
        "duplicate-port-name",
        service("a", ports=[{"name": "web", "port": 80}, {"name": "web", "port": 443}]),
        'default/a: spec.ports[1].name: "web" is used by another port (Service skipped)',
    ),
    (
        "duplicate-port-and-protocol",
        service(
            "a", ports=[{"name": "x", "port": 53}, {"name": "y", "port": 53, "protocol": "TCP"}]
        ),
        "default/a: spec.ports[1].port: 53/TCP is used by another port (Service skipped)",
    ),
    (
        "node-port-on-cluster-ip-service",
        service("a", ports=[{"port": 80, "nodePort": 30080}]),
        "default/a: spec.ports[0].nodePort: may not be set on a ClusterIP service"
        " (Service skipped)",
    ),
    (
        "cluster-ips-disagree-with-cluster-ip",
        service("a", cluster_ip="10.96.0.1", clusterIPs=["10.96.0.2"]),
        "default/a: spec.clusterIPs[0]: must equal spec.clusterIP (Service skipped)",
    ),
    (
        "two-cluster-ips-of-one-family",
        service("a", cluster_ip=None, clusterIPs=["10.96.0.1", "10.96.0.2"]),
        "default/a: spec.clusterIPs: at most one address per IP family (Service skipped)",
    ),
    (
        "unknown-type",
        service("a", type="Ingress"),
        'default/a: spec.type: "Ingress" is not one of ClusterIP, NodePort, LoadBalancer,'
        " ExternalName (Service skipped)",
    ),
    (
        "unknown-external-traffic-policy",
        service("a", type="NodePort", externalTrafficPolicy="Remote"),
        'default/a: spec.externalTrafficPolicy: "Remote" is not one of Cluster, Local'
        " (Service skipped)",
    ),
    (
        "affinity-timeout-out-of-range",
        service(
            "a",
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 86401}},
        ),
        "default/a: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 86401 is out of range"
        " 1-86400 (Service skipped)",
    ),
    (
        "source-range-not-a-cidr",
        service("a", type="LoadBalancer", loadBalancerSourceRanges=["203.0.113.0"]),
        'default/a: spec.loadBalancerSourceRanges[0]: "203.0.113.0" is not a CIDR'
        " (address/prefix-length) (Service skipped)",
    ),
    (
        "invalid-load-balancer-ingress-ip",
        service(
            "a", type="LoadBalancer", status={"loadBalancer": {"ingress": [{"ip": "lb.example"}]}}
        ),
        'default/a: status.loadBalancer.ingress[0].ip: "lb.example" is not an IP address'
        " (Service skipped)",
    ),
    (
        "port-name-upper-case",
        service("a", ports=[{"name": "HTTP", "port": 80}]),
        'default/a: spec.ports[0].name: "HTTP" is not an RFC 1123 label (lower case, at most 63)'
        " (Service skipped)",
    ),
]


@pytest.mark.parametrize(
    ("doc", "expected"),
    [case[1:] for case in BAD_SERVICES],
    ids=[case[0] for case in BAD_SERVICES],
)
def test_bad_service_is_one_problem_and_the_other_objects_still_parse(doc, expected):
    result = parse_beside_good(doc)
    assert problem_texts(result) == [expected]
    assert service_refs(result) == ["default/good"]
    assert result.skipped == []


# --- names that are not DNS labels never reach the model (nor rule text) --------------------

BAD_NAMES = [
    ("upper-case", "Web", "default/Web", '"Web" is not an RFC 1035 label'),
    ("too-long", "a" * 64, "default/" + "a" * 64, '"' + "a" * 56 + "... is not an RFC 1035 label"),
    ("with-quote", 'web"x', 'default/web"x', '"web"x" is not an RFC 1035 label'),
    ("with-space", "web x", "default/web x", '"web x" is not an RFC 1035 label'),
    ("with-semicolon", "web;drop", "default/web;drop", '"web;drop" is not an RFC 1035 label'),
    ("leading-digit", "1web", "default/1web", '"1web" is not an RFC 1035 label'),
]


@pytest.mark.parametrize(
    ("name", "ref", "problem"),
    [case[1:] for case in BAD_NAMES],
    ids=[case[0] for case in BAD_NAMES],
)
def test_service_name_that_is_not_a_dns_label_is_a_problem(name, ref, problem):
    result = parse_beside_good(service(name))
    assert problem_texts(result) == [
        f"{ref}: metadata.name: {problem} (lower case, at most 63) (Service skipped)"
    ]
    assert service_refs(result) == ["default/good"]


def test_name_of_63_characters_is_a_valid_service_name():
    name = "a" * 63
    result = parse_beside_good(service(name))
    assert result.problems == []
    assert service_refs(result) == [f"default/{name}", "default/good"]


def test_namespace_that_is_not_a_dns_label_is_a_problem():
    result = parse_beside_good(service("web", namespace="Prod Env"))
    assert problem_texts(result) == [
        'Prod Env/web: metadata.namespace: "Prod Env" is not an RFC 1123 label'
        " (lower case, at most 63) (Service skipped)"
    ]


def test_service_without_metadata_is_reported_as_no_metadata():
    result = parse_beside_good({"apiVersion": "v1", "kind": "Service", "spec": {}})
    assert problem_texts(result) == [
        "(no metadata): metadata: required field is missing (Service skipped)"
    ]


def test_problem_text_of_a_name_with_a_newline_stays_on_one_line():
    result = parse_beside_good(service("web\nkpgen: error: forged"))
    assert len(result.problems) == 1
    assert "\n" not in str(result.problems[0])


@pytest.mark.parametrize(
    "doc",
    [
        {"apiVersion": ["v1"], "kind": "Service"},
        {"apiVersion": "v1", "kind": {"name": "Service"}},
    ],
    ids=["list-api-version", "mapping-kind"],
)
def test_object_with_unhashable_kind_does_not_stop_the_others(doc):
    result = parse_beside_good(doc)
    assert result.problems == []
    assert sum(result.ignored.values()) == 1


# --- bad endpoint slices ---------------------------------------------------------------------


def slice_of_a(**changes: object) -> dict:
    doc = endpoint_slice("a-1", service_name="a", endpoints=[endpoint("10.244.1.1")])
    doc.update(changes)
    return doc


BAD_SLICES = [
    (
        "invalid-endpoint-address",
        slice_of_a(endpoints=[endpoint("10.244.1.1"), endpoint("10.244.1.300")]),
        'default/a-1: endpoints[1].addresses[0]: "10.244.1.300" is not an IP address'
        " (EndpointSlice skipped)",
    ),
    (
        "ipv6-address-in-ipv4-slice",
        slice_of_a(endpoints=[endpoint("fd00::1")]),
        "default/a-1: endpoints[0].addresses[0]: fd00::1 is not an IPv4 address"
        " (EndpointSlice skipped)",
    ),
    (
        "ipv6-address-with-zone",
        slice_of_a(addressType="IPv6", endpoints=[endpoint("fe80::1%eth0")]),
        'default/a-1: endpoints[0].addresses[0]: "fe80::1%eth0" has a zone; a service address'
        " may not (EndpointSlice skipped)",
    ),
    (
        "endpoint-without-addresses",
        slice_of_a(endpoints=[{"addresses": []}]),
        "default/a-1: endpoints[0].addresses: needs at least one address (EndpointSlice skipped)",
    ),
    (
        "slice-port-zero",
        slice_of_a(ports=[{"port": 0}]),
        "default/a-1: ports[0].port: 0 is out of range 1-65535 (EndpointSlice skipped)",
    ),
    (
        "slice-port-unknown-protocol",
        slice_of_a(ports=[{"port": 80, "protocol": "ICMP"}]),
        'default/a-1: ports[0].protocol: "ICMP" is not one of TCP, UDP, SCTP'
        " (EndpointSlice skipped)",
    ),
    (
        "unknown-address-type",
        slice_of_a(addressType="IPv5"),
        'default/a-1: addressType: "IPv5" is not one of IPv4, IPv6 (EndpointSlice skipped)',
    ),
    (
        "node-name-upper-case",
        slice_of_a(endpoints=[endpoint("10.244.1.1", nodeName="Worker-1")]),
        'default/a-1: endpoints[0].nodeName: "Worker-1" is not an RFC 1123 subdomain'
        " (lower case, at most 253) (EndpointSlice skipped)",
    ),
    (
        "ready-not-a-boolean",
        slice_of_a(endpoints=[endpoint("10.244.1.1", conditions={"ready": "yes"})]),
        'default/a-1: endpoints[0].conditions.ready: "yes" is not true or false'
        " (EndpointSlice skipped)",
    ),
    (
        "service-name-label-not-a-dns-label",
        endpoint_slice("a-1", service_name="Web Server"),
        'default/a-1: metadata.labels.kubernetes.io/service-name: "Web Server" is not an'
        " RFC 1035 label (lower case, at most 63) (EndpointSlice skipped)",
    ),
]


@pytest.mark.parametrize(
    ("doc", "expected"),
    [case[1:] for case in BAD_SLICES],
    ids=[case[0] for case in BAD_SLICES],
)
def test_bad_slice_is_one_problem_and_the_other_objects_still_parse(doc, expected):
    result = parse_beside_good(doc)
    assert problem_texts(result) == [expected]
    assert [str(s.ref) for s in result.state.slices] == ["default/good-1"]


# --- two services that claim one address --------------------------------------------------


def node_port_service(name: str, cluster_ip: str, node_port: int, protocol: str = "TCP", **kw):
    return service(
        name,
        cluster_ip=cluster_ip,
        type="NodePort",
        ports=[{"port": 80, "protocol": protocol, "nodePort": node_port}],
        **kw,
    )


def test_node_port_of_two_services_stays_with_the_older_by_creation_timestamp():
    result = parse_beside_good(
        node_port_service("a", "10.96.0.1", 30001, created="2024-02-01T00:00:00Z"),
        node_port_service("b", "10.96.0.2", 30001, created="2024-01-01T00:00:00Z"),
    )
    assert problem_texts(result) == [
        "default/a: spec.ports[0].nodePort: nodePort 30001/TCP is already used by default/b"
        " (Service skipped)"
    ]
    assert service_refs(result) == ["default/b", "default/good"]


def test_node_port_of_two_services_without_timestamps_stays_with_the_first_by_namespace_name():
    result = parse_beside_good(
        node_port_service("a", "10.96.0.2", 30001, namespace="zeta"),
        node_port_service("z", "10.96.0.1", 30001, namespace="alpha"),
    )
    assert problem_texts(result) == [
        "zeta/a: spec.ports[0].nodePort: nodePort 30001/TCP is already used by alpha/z"
        " (Service skipped)"
    ]
    assert service_refs(result) == ["alpha/z", "default/good"]


def test_service_with_a_timestamp_is_older_than_one_without():
    result = parse_beside_good(
        node_port_service("a", "10.96.0.1", 30001),
        node_port_service("b", "10.96.0.2", 30001, created="2024-01-01T00:00:00Z"),
    )
    assert problem_texts(result) == [
        "default/a: spec.ports[0].nodePort: nodePort 30001/TCP is already used by default/b"
        " (Service skipped)"
    ]


def test_same_node_port_number_with_different_protocols_is_not_a_conflict():
    result = parse_beside_good(
        node_port_service("dns-tcp", "10.96.0.1", 30053, "TCP"),
        node_port_service("dns-udp", "10.96.0.2", 30053, "UDP"),
    )
    assert result.problems == []
    assert service_refs(result) == ["default/dns-tcp", "default/dns-udp", "default/good"]


def test_external_ip_equal_to_another_services_cluster_ip_on_the_same_port_conflicts():
    result = parse_beside_good(
        service("a", cluster_ip="10.96.0.1"),
        service("b", cluster_ip="10.96.0.2", externalIPs=["10.96.0.1"]),
    )
    assert problem_texts(result) == [
        "default/b: spec.ports[0].port: 10.96.0.1:80/TCP is already used by default/a"
        " (Service skipped)"
    ]
    assert service_refs(result) == ["default/a", "default/good"]


def test_load_balancer_ip_equal_to_another_services_external_ip_conflicts():
    result = parse_beside_good(
        service("a", cluster_ip="10.96.0.1", externalIPs=["203.0.113.7"]),
        service(
            "b",
            cluster_ip="10.96.0.2",
            type="LoadBalancer",
            ports=[{"port": 80, "nodePort": 30080}],
            status={"loadBalancer": {"ingress": [{"ip": "203.0.113.7"}]}},
        ),
    )
    assert problem_texts(result) == [
        "default/b: spec.ports[0].port: 203.0.113.7:80/TCP is already used by default/a"
        " (Service skipped)"
    ]


def test_same_address_on_another_port_or_protocol_is_not_a_conflict():
    result = parse_beside_good(
        service("a", cluster_ip="10.96.0.1"),
        service("b", cluster_ip="10.96.0.2", externalIPs=["10.96.0.1"], ports=[{"port": 81}]),
        service(
            "c",
            cluster_ip="10.96.0.3",
            externalIPs=["10.96.0.1"],
            ports=[{"port": 80, "protocol": "UDP"}],
        ),
    )
    assert result.problems == []
    assert service_refs(result) == ["default/a", "default/b", "default/c", "default/good"]


# --- skipped as kube-proxy skips them: not problems -----------------------------------------


def test_objects_kube_proxy_does_not_program_are_skipped_with_a_reason():
    other_proxy = service("mesh", labels={"service.kubernetes.io/service-proxy-name": "cilium"})
    result = parse_beside_good(
        service("headless", cluster_ip="None"),
        service("alias", cluster_ip=None, type="ExternalName", externalName="db.example.com"),
        other_proxy,
        endpoint_slice("alias-1", service_name="alias", address_type="FQDN"),
        endpoint_slice("orphan", service_name=None, endpoints=[endpoint("10.244.1.1")]),
    )
    assert result.problems == []
    assert result.skipped == [
        Skipped("default/headless", "Service", "headless (clusterIP: None)"),
        Skipped("default/alias", "Service", "type ExternalName"),
        Skipped(
            "default/mesh",
            "Service",
            "labelled service.kubernetes.io/service-proxy-name: another proxy serves it",
        ),
        Skipped("default/alias-1", "EndpointSlice", "addressType FQDN"),
        Skipped(
            "default/orphan",
            "EndpointSlice",
            "no kubernetes.io/service-name label: it belongs to no Service",
        ),
    ]
    assert service_refs(result) == ["default/good"]
    assert [str(s.ref) for s in result.state.slices] == ["default/good-1"]


def test_headless_service_given_by_cluster_ips_is_skipped():
    result = parse_beside_good(service("headless", cluster_ip=None, clusterIPs=["None"]))
    assert [str(s) for s in result.skipped] == [
        "default/headless: Service not proxied: headless (clusterIP: None)"
    ]


def test_other_kinds_and_api_versions_are_counted_as_ignored():
    result = parse_beside_good(
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-1"}},
        {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web-2"}},
        {"apiVersion": "discovery.k8s.io/v1alpha1", "kind": "EndpointSlice"},
        {"metadata": {"name": "nothing"}},
    )
    assert result.ignored == Counter(
        {
            "Deployment (apps/v1)": 1,
            "Pod (v1)": 2,
            "EndpointSlice (discovery.k8s.io/v1alpha1)": 1,
            "(no kind) (no apiVersion)": 1,
        }
    )
    assert result.problems == []
    assert result.skipped == []


# --- what the model keeps ---------------------------------------------------------------------


def test_endpoint_conditions_keep_true_false_and_absent():
    doc = endpoint_slice(
        "a-1",
        service_name="a",
        endpoints=[
            endpoint(
                "10.244.1.1", conditions={"ready": True, "serving": True, "terminating": False}
            ),
            endpoint(
                "10.244.1.2", conditions={"ready": False, "serving": True, "terminating": True}
            ),
            endpoint("10.244.1.3", conditions={}),
            endpoint("10.244.1.4"),
        ],
    )
    (parsed,) = parse_documents([doc]).state.slices
    assert [e.conditions for e in parsed.endpoints] == [
        EndpointConditions(ready=True, serving=True, terminating=False),
        EndpointConditions(ready=False, serving=True, terminating=True),
        EndpointConditions(ready=None, serving=None, terminating=None),
        EndpointConditions(ready=None, serving=None, terminating=None),
    ]
    assert [e.conditions.is_ready for e in parsed.endpoints] == [True, False, True, True]


def test_endpoint_keeps_node_name_zone_and_hints():
    doc = endpoint_slice(
        "a-1",
        service_name="a",
        endpoints=[
            endpoint(
                "10.244.1.1",
                nodeName="worker-1",
                zone="zone-a",
                hints={
                    "forZones": [{"name": "zone-a"}, {"name": "zone-b"}],
                    "forNodes": [{"name": "worker-1"}],
                },
            ),
            endpoint("10.244.1.2"),
        ],
    )
    (parsed,) = parse_documents([doc]).state.slices
    first, second = parsed.endpoints
    assert first.address == ip("10.244.1.1")
    assert first.node_name == "worker-1"
    assert first.zone == "zone-a"
    assert first.hints_for_zones == ("zone-a", "zone-b")
    assert first.hints_for_nodes == ("worker-1",)
    assert (second.node_name, second.zone, second.hints_for_zones, second.hints_for_nodes) == (
        None,
        None,
        None,
        None,
    )


def test_slice_keeps_its_service_family_and_ports():
    doc = endpoint_slice(
        "web-x1",
        service_name="web",
        namespace="shop",
        address_type="IPv6",
        ports=[
            {"name": "https", "protocol": "TCP", "port": 8443},
            {"name": "dns", "protocol": "UDP"},
        ],
        endpoints=[endpoint("fd00::10")],
    )
    (parsed,) = parse_documents([doc]).state.slices
    assert parsed.ref == ObjectRef("shop", "web-x1")
    assert parsed.service == ObjectRef("shop", "web")
    assert parsed.family is IPFamily.V6
    assert [(p.name, p.protocol, p.port) for p in parsed.ports] == [
        ("https", Protocol.TCP, 8443),
        ("dns", Protocol.UDP, None),
    ]
    assert parsed.endpoints[0].address == ip("fd00::10")


def test_service_defaults_when_fields_are_absent():
    (parsed,) = parse_documents([service("web", cluster_ip="10.96.0.5")]).state.services
    assert parsed.ref == ObjectRef("default", "web")
    assert parsed.type is ServiceType.CLUSTER_IP
    assert parsed.cluster_ips == (ip("10.96.0.5"),)
    assert parsed.ports == (ServicePort("", Protocol.TCP, 80, None),)
    assert parsed.external_ips == ()
    assert parsed.load_balancer_ips == ()
    assert parsed.load_balancer_source_ranges == ()
    assert parsed.external_traffic_policy is TrafficPolicy.CLUSTER
    assert parsed.internal_traffic_policy is TrafficPolicy.CLUSTER
    assert parsed.session_affinity is SessionAffinity.NONE
    assert parsed.affinity_timeout == DEFAULT_AFFINITY_TIMEOUT == 10800
    assert parsed.traffic_distribution is None
    assert parsed.creation_timestamp is None


def test_service_keeps_policies_affinity_ranges_and_traffic_distribution():
    doc = service(
        "web",
        cluster_ip="10.96.0.5",
        type="LoadBalancer",
        ports=[
            {"name": "http", "port": 80, "nodePort": 30080},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ],
        externalIPs=["203.0.113.1", "203.0.113.1", "203.0.113.2"],
        externalTrafficPolicy="Local",
        internalTrafficPolicy="Local",
        healthCheckNodePort=31000,
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": 60}},
        loadBalancerSourceRanges=["198.51.100.0/24", "203.0.113.9/32"],
        trafficDistribution="PreferClose",
        created="2024-01-01T00:00:00Z",
    )
    (parsed,) = parse_documents([doc]).state.services
    assert parsed.type is ServiceType.LOAD_BALANCER
    assert parsed.ports == (
        ServicePort("http", Protocol.TCP, 80, 30080),
        ServicePort("dns", Protocol.UDP, 53, None),
    )
    assert parsed.external_ips == (ip("203.0.113.1"), ip("203.0.113.2"))
    assert parsed.external_traffic_policy is TrafficPolicy.LOCAL
    assert parsed.internal_traffic_policy is TrafficPolicy.LOCAL
    assert parsed.health_check_node_port == 31000
    assert parsed.session_affinity is SessionAffinity.CLIENT_IP
    assert parsed.affinity_timeout == 60
    assert parsed.load_balancer_source_ranges == (
        ipaddress.ip_network("198.51.100.0/24"),
        ipaddress.ip_network("203.0.113.9/32"),
    )
    assert parsed.traffic_distribution == "PreferClose"
    assert parsed.creation_timestamp == "2024-01-01T00:00:00Z"


def test_client_ip_affinity_without_config_has_the_default_timeout():
    doc = service("web", sessionAffinity="ClientIP")
    (parsed,) = parse_documents([doc]).state.services
    assert parsed.session_affinity is SessionAffinity.CLIENT_IP
    assert parsed.affinity_timeout == 10800


def test_load_balancer_ingress_keeps_ips_but_not_proxy_mode_ones_nor_hostnames():
    ingress = [
        {"ip": "203.0.113.10"},
        {"ip": "203.0.113.11", "ipMode": "Proxy"},
        {"ip": "203.0.113.12", "ipMode": "VIP"},
        {"hostname": "lb.example.com"},
        {"ip": "203.0.113.10"},
    ]
    doc = service(
        "web",
        type="LoadBalancer",
        ports=[{"port": 80, "nodePort": 30080}],
        status={"loadBalancer": {"ingress": ingress}},
    )
    (parsed,) = parse_documents([doc]).state.services
    assert parsed.load_balancer_ips == (ip("203.0.113.10"), ip("203.0.113.12"))


def test_dual_stack_service_keeps_one_cluster_ip_per_family():
    doc = service("web", cluster_ip="10.96.0.5", clusterIPs=["10.96.0.5", "fd00:96::5"])
    (parsed,) = parse_documents([doc]).state.services
    assert parsed.cluster_ip(IPFamily.V4) == ip("10.96.0.5")
    assert parsed.cluster_ip(IPFamily.V6) == ip("fd00:96::5")


def test_later_object_with_the_same_name_replaces_the_earlier_one():
    result = parse_documents(
        [service("web", cluster_ip="10.96.0.5"), service("web", cluster_ip="10.96.0.6")]
    )
    (parsed,) = result.state.services
    assert parsed.cluster_ips == (ip("10.96.0.6"),)


def test_state_is_sorted_by_namespace_and_name_whatever_the_input_order():
    docs = [
        service("b", namespace="x", cluster_ip="10.96.0.1"),
        service("a", namespace="y", cluster_ip="10.96.0.2"),
        service("a", namespace="x", cluster_ip="10.96.0.3"),
        endpoint_slice("s2", service_name="a"),
        endpoint_slice("s1", service_name="a"),
    ]
    forward = parse_documents(docs).state
    backward = parse_documents(list(reversed(docs))).state
    assert [str(s.ref) for s in forward.services] == ["x/a", "x/b", "y/a"]
    assert [str(s.ref) for s in forward.slices] == ["default/s1", "default/s2"]
    assert forward == backward


# --- shapes a real API server writes ----------------------------------------------------------


@pytest.mark.parametrize("service_name", [None, "", "absent"], ids=["null", "empty", "absent"])
@pytest.mark.parametrize("slice_name", [None, "", "absent"], ids=["null", "empty", "absent"])
def test_unnamed_port_is_the_same_port_however_the_name_is_spelled(service_name, slice_name):
    """The EndpointSlice controller writes ``name: ""`` for an unnamed service port; a user's
    manifest leaves it out; a server may write null. All three are the unnamed port, and the
    service's endpoints come through whichever spelling each side uses."""

    def port(name: object, number: int) -> dict:
        entry = {"protocol": "TCP", "port": number}
        return entry if name == "absent" else {"name": name, **entry}

    docs = [
        service("web", cluster_ip="10.96.0.5", ports=[port(service_name, 80)]),
        endpoint_slice(
            "web-x1",
            service_name="web",
            ports=[port(slice_name, 8080)],
            endpoints=[endpoint("10.244.1.1", conditions={"ready": True})],
        ),
    ]
    result = parse_documents(docs)
    assert result.problems == []
    (plan,) = build_plans(result.state, NodeConfig(hostname="worker-1"))
    (port_plan,) = plan.ports
    assert port_plan.port.name == ""
    assert [(str(b.address), b.port) for b in port_plan.cluster_endpoints] == [("10.244.1.1", 8080)]


def test_a_named_port_still_needs_a_dns_label():
    bad_name = service("web", ports=[{"name": "Web_Port", "port": 80}])
    result = parse_beside_good(bad_name)
    assert problem_texts(result) == [
        'default/web: spec.ports[0].name: "Web_Port" is not an RFC 1123 label'
        " (lower case, at most 63) (Service skipped)"
    ]


def test_two_unnamed_ports_are_still_a_problem_with_either_spelling():
    doc = service("web", ports=[{"name": "", "port": 80}, {"port": 81}])
    assert problem_texts(parse_beside_good(doc)) == [
        "default/web: spec.ports[0].name: required when a service has several ports"
        " (Service skipped)"
    ]


def v1beta1_slice(**endpoint_fields: object) -> dict:
    doc = endpoint_slice(
        "web-b1",
        service_name="web",
        ports=[{"name": "", "protocol": "TCP", "port": 8080}],
        endpoints=[endpoint("10.244.1.1", conditions={"ready": True}, **endpoint_fields)],
    )
    return {**doc, "apiVersion": "discovery.k8s.io/v1beta1"}


def test_v1beta1_slice_takes_node_and_zone_from_its_topology():
    topology = {
        "kubernetes.io/hostname": "worker-1",
        "topology.kubernetes.io/zone": "zone-a",
        "topology.kubernetes.io/region": "region-1",
    }
    (parsed,) = parse_documents([v1beta1_slice(topology=topology)]).state.slices
    (only,) = parsed.endpoints
    assert (only.node_name, only.zone) == ("worker-1", "zone-a")


def test_v1beta1_slice_prefers_its_node_name_field_to_the_topology_label():
    doc = v1beta1_slice(nodeName="worker-2", topology={"kubernetes.io/hostname": "worker-1"})
    (parsed,) = parse_documents([doc]).state.slices
    assert parsed.endpoints[0].node_name == "worker-2"


def test_v1beta1_slice_with_a_bad_topology_hostname_names_the_field():
    doc = v1beta1_slice(topology={"kubernetes.io/hostname": "Worker_1"})
    assert problem_texts(parse_beside_good(doc)) == [
        "default/web-b1: endpoints[0].topology.kubernetes.io/hostname:"
        ' "Worker_1" is not an RFC 1123 subdomain (lower case, at most 253)'
        " (EndpointSlice skipped)"
    ]


def test_a_v1_slice_ignores_a_topology_field():
    doc = {**v1beta1_slice(topology={"kubernetes.io/hostname": "worker-1"})}
    doc["apiVersion"] = "discovery.k8s.io/v1"
    (parsed,) = parse_documents([doc]).state.slices
    assert parsed.endpoints[0].node_name is None


def test_a_node_is_named_without_a_namespace():
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "ci-worker-b"},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.300"}]},
    }
    assert problem_texts(parse_beside_good(node)) == [
        'Node ci-worker-b: status.addresses[0].address: "10.0.0.300" is not an IP address'
        " (Node skipped)"
    ]


# --- the direct read of common endpoints -------------------------------------------------

_damaged = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-2, 2),
    st.sampled_from(["", "worker-1", "Worker_1", "a" * 254, "zone-a", "10.0.0.1", "fd00::1"]),
    st.lists(st.sampled_from(["10.0.0.1", "fd00::1", "010.0.0.1", "fe80::1%eth0", 7]), max_size=2),
    st.dictionaries(st.sampled_from(["ready", "forZones"]), st.booleans(), max_size=1),
)


def _often(usual: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A value of ``usual`` three times in four, else a damaged one."""
    return st.sampled_from([usual, usual, usual, _damaged]).flatmap(lambda strategy: strategy)


def _mostly(*usual: Any) -> st.SearchStrategy[Any]:
    """One of the usual values (a few are wrong in ways a direct read could miss: 1 for
    true, an empty zone), or a damaged one."""
    return _often(st.sampled_from(usual))


_condition = _mostly(None, True, False, 1, 0)
_endpoints = st.fixed_dictionaries(
    {"addresses": _mostly(["10.0.0.1"], ["fd00::1"], ["10.0.0.2", "10.0.0.3"], [" 10.0.0.4"])},
    optional={
        "conditions": _often(
            st.fixed_dictionaries(
                {}, optional={k: _condition for k in ("ready", "serving", "terminating")}
            )
        ),
        "nodeName": _mostly(None, "worker-1", "node.example.com", "", "Node-1"),
        "zone": _mostly(None, "", "zone-a"),
        "hints": _mostly(None, {"forZones": [{"name": "zone-a"}]}),
        "targetRef": _damaged,
    },
)


def _outcome(read: Any, raw: Any, family: IPFamily) -> Any:
    try:
        return read(Field(raw, "endpoints[0]"), family, False)
    except Invalid as error:
        return ("invalid", error.field, error.problem)


@given(raw=st.one_of(_endpoints, _damaged), family=st.sampled_from(list(IPFamily)))
@settings(max_examples=400, deadline=None)
def test_an_endpoint_read_directly_is_what_the_checked_read_makes_of_it(
    raw: Any, family: IPFamily
) -> None:
    """Most endpoints are read straight from their dict (a slice's endpoints are most of a
    cluster's objects); whatever the shape or value, the outcome (the Endpoint, or the field
    named as wrong) is the one the field-by-field read gives."""
    assert _outcome(parse._endpoint, raw, family) == _outcome(parse._checked_endpoint, raw, family)


def test_an_endpoint_of_the_controllers_shape_is_read_directly() -> None:
    """The direct read is not dead code: a controller-written endpoint takes it."""
    raw = {
        "addresses": ["10.0.0.1"],
        "conditions": {"ready": True, "serving": True, "terminating": False},
        "nodeName": "worker-1",
        "zone": "zone-a",
        "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "default"},
    }
    direct = parse._plain_endpoint(raw, IPFamily.V4)
    assert direct == parse._checked_endpoint(Field(raw), IPFamily.V4, False)
    assert direct is not None and direct.node_name == "worker-1"
