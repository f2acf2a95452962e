"""Decoded API objects in, a validated :class:`~kpgen.core.model.ClusterState` out.

This is the edge where untrusted data becomes typed values. A bad object is reported as a
:class:`Problem` (``namespace/name: field: problem``) and left out; everything else goes on.
Objects that kube-proxy deliberately does not program (headless, ExternalName, another proxy's
services, FQDN slices) are left out as :class:`Skipped`, which is not an error.
"""

from __future__ import annotations

import functools
import sys
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kpgen.core.fields import (
    DNS1035_LABEL,
    DNS1123_SUBDOMAIN,
    SUBDOMAIN_MAX,
    Field,
    Invalid,
    is_name,
    parse_ip,
    printable,
)
from kpgen.core.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    SERVICE_NAME_LABEL,
    SERVICE_PROXY_NAME_LABEL,
    ZONE_LABEL,
    ClusterState,
    Endpoint,
    EndpointConditions,
    EndpointPort,
    EndpointSlice,
    IPAddress,
    IPFamily,
    IPNetwork,
    Node,
    ObjectRef,
    Protocol,
    Service,
    ServicePort,
    ServiceType,
    SessionAffinity,
    TrafficPolicy,
)

SERVICE_API = ("v1", "Service")
SLICE_API = ("discovery.k8s.io/v1", "EndpointSlice")
# What clusters before 1.21 served (removed in 1.25): node and zone in ``topology``.
SLICE_API_V1BETA1 = ("discovery.k8s.io/v1beta1", "EndpointSlice")
NODE_API = ("v1", "Node")
CLUSTER_SCOPED = frozenset({"Node"})
HOSTNAME_TOPOLOGY = "kubernetes.io/hostname"


@dataclass(frozen=True)
class Problem:
    """A bad object, left out of the rules."""

    ref: str
    kind: str
    field: str
    problem: str

    def __str__(self) -> str:
        return f"{self.ref}: {self.field}: {self.problem} ({self.kind} skipped)"


@dataclass(frozen=True)
class Skipped:
    """An object kube-proxy leaves alone too, and why."""

    ref: str
    kind: str
    reason: str

    def __str__(self) -> str:
        return f"{self.ref}: {self.kind} not proxied: {self.reason}"


@dataclass
class ParseResult:
    state: ClusterState
    problems: list[Problem] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    ignored: Counter[str] = field(default_factory=Counter)


class _Skip(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _ref(meta: Field, kind: str) -> ObjectRef:
    if kind == "Service":
        name = meta["name"].name(DNS1035_LABEL)
    else:
        name = meta["name"].name(DNS1123_SUBDOMAIN, SUBDOMAIN_MAX)
    namespace = meta.get("namespace")
    return ObjectRef(sys.intern(namespace.name()) if namespace else "default", name)


def _labels(meta: Field) -> Mapping[str, Any]:
    labels = meta.get("labels")
    return labels.mapping() if labels else {}


def _display_ref(doc: Mapping[str, Any], kind: str) -> str:
    """namespace/name of a document as well as it can be read, for a message; a
    cluster-scoped object (a Node) is named by its kind and name: ``Node worker-1``."""
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return "(no metadata)"
    name = meta.get("name") or "(no name)"
    if kind in CLUSTER_SCOPED:
        return printable(f"{kind} {name}")
    return printable(f"{meta.get('namespace') or 'default'}/{name}")


def _port_name(entry: Field) -> str:
    """The name of a Service's or an EndpointSlice's port: "" for the unnamed port, whether
    the name is absent, null or "" (the EndpointSlice controller writes ``name: ""``)."""
    name = entry.get("name")
    return sys.intern(name.name()) if name is not None and name.value != "" else ""


# --- Services ---------------------------------------------------------------------------


def _service_ports(spec: Field, service_type: ServiceType) -> tuple[ServicePort, ...]:
    ports_field = spec["ports"]
    entries = list(ports_field.items())
    if not entries:
        raise ports_field.invalid("a service needs at least one port")
    seen_names: set[str] = set()
    seen_ports: set[tuple[Protocol, int]] = set()
    seen_node_ports: set[tuple[Protocol, int]] = set()
    ports = []
    for entry in entries:
        name = _port_name(entry)
        if len(entries) > 1 and not name:
            raise Invalid(f"{entry.path}.name", "required when a service has several ports")
        if name in seen_names:
            raise Invalid(f"{entry.path}.name", f'"{name}" is used by another port')
        seen_names.add(name)
        protocol_field = entry.get("protocol")
        protocol = protocol_field.choice(Protocol) if protocol_field else Protocol.TCP
        port = entry["port"].port()
        if (protocol, port) in seen_ports:
            raise Invalid(f"{entry.path}.port", f"{port}/{protocol.value} is used by another port")
        seen_ports.add((protocol, port))
        node_port_field = entry.get("nodePort")
        node_port = node_port_field.port() if node_port_field else None
        if node_port is not None and service_type is ServiceType.CLUSTER_IP:
            raise Invalid(f"{entry.path}.nodePort", "may not be set on a ClusterIP service")
        if node_port is not None and (protocol, node_port) in seen_node_ports:
            problem = f"{node_port}/{protocol.value} is used by another port"
            raise Invalid(f"{entry.path}.nodePort", problem)
        if node_port is not None:
            seen_node_ports.add((protocol, node_port))
        ports.append(ServicePort(name, protocol, port, node_port))
    return tuple(ports)


def _addresses(spec: Field | None, key: str) -> tuple[IPAddress, ...]:
    values = spec.get(key) if spec else None
    if values is None:
        return ()
    return tuple(dict.fromkeys(entry.ip() for entry in values.items()))


def _cluster_ips(spec: Field) -> tuple[IPAddress, ...]:
    listed = spec.get("clusterIPs")
    single = spec.get("clusterIP")
    raw = [f.value for f in listed.items()] if listed else ([single.value] if single else [])
    if not raw:
        raise Invalid(f"{spec.path}.clusterIP", "required field is missing")
    if "None" in raw:
        raise _Skip("headless (clusterIP: None)")
    if listed and single and single.value != raw[0]:
        raise Invalid(f"{spec.path}.clusterIPs[0]", "must equal spec.clusterIP")
    ips = _addresses(spec, "clusterIPs") if listed else (single.ip(),) if single else ()
    families = [IPFamily.of(ip) for ip in ips]
    if len(set(families)) != len(families):
        raise Invalid(f"{spec.path}.clusterIPs", "at most one address per IP family")
    return ips


def _load_balancer_ips(doc: Field) -> tuple[IPAddress, ...]:
    status = doc.get("status")
    balancer = status.get("loadBalancer") if status else None
    ingress = balancer.get("ingress") if balancer else None
    if ingress is None:
        return ()
    ips = []
    for entry in ingress.items():
        ip = entry.get("ip")
        mode = entry.get("ipMode")
        # ipMode Proxy: the load balancer must not be short-circuited (KEP-1860).
        if ip is not None and not (mode is not None and mode.string() == "Proxy"):
            ips.append(ip.ip())
    return tuple(dict.fromkeys(ips))


def parse_service(doc: Field) -> Service:
    meta = doc["metadata"]
    ref = _ref(meta, "Service")
    if SERVICE_PROXY_NAME_LABEL in _labels(meta):
        raise _Skip(f"labelled {SERVICE_PROXY_NAME_LABEL}: another proxy serves it")
    spec = doc["spec"]
    type_field = spec.get("type")
    service_type = type_field.choice(ServiceType) if type_field else ServiceType.CLUSTER_IP
    if service_type is ServiceType.EXTERNAL_NAME:
        raise _Skip("type ExternalName")
    cluster_ips = _cluster_ips(spec)
    ports = _service_ports(spec, service_type)

    def policy(key: str) -> TrafficPolicy:
        value = spec.get(key)
        return value.choice(TrafficPolicy) if value else TrafficPolicy.CLUSTER

    affinity_field = spec.get("sessionAffinity")
    affinity = affinity_field.choice(SessionAffinity) if affinity_field else SessionAffinity.NONE
    timeout = DEFAULT_AFFINITY_TIMEOUT
    config = spec.get("sessionAffinityConfig")
    client_ip = config.get("clientIP") if config else None
    timeout_field = client_ip.get("timeoutSeconds") if client_ip else None
    if timeout_field is not None:
        timeout = timeout_field.integer(1, 86400)
    health_field = spec.get("healthCheckNodePort")
    distribution = spec.get("trafficDistribution")
    ranges = spec.get("loadBalancerSourceRanges")
    created = meta.get("creationTimestamp")
    return Service(
        ref=ref,
        type=service_type,
        cluster_ips=cluster_ips,
        ports=ports,
        external_ips=_addresses(spec, "externalIPs"),
        load_balancer_ips=_load_balancer_ips(doc),
        load_balancer_source_ranges=tuple(r.cidr() for r in ranges.items()) if ranges else (),
        external_traffic_policy=policy("externalTrafficPolicy"),
        internal_traffic_policy=policy("internalTrafficPolicy"),
        health_check_node_port=health_field.port() if health_field else None,
        session_affinity=affinity,
        affinity_timeout=timeout,
        traffic_distribution=distribution.string() if distribution else None,
        creation_timestamp=str(created.value) if created else None,
    )


# --- EndpointSlices ---------------------------------------------------------------------


def _conditions(entry: Field) -> EndpointConditions:
    conditions = entry.get("conditions")
    if conditions is None:
        return _CONDITIONS(None, None, None)

    def flag(key: str) -> bool | None:
        value = conditions.get(key)
        return value.boolean() if value else None

    return _CONDITIONS(flag("ready"), flag("serving"), flag("terminating"))


# one object for each of the few combinations: 100,000 endpoints share them
_CONDITIONS = functools.cache(EndpointConditions)


def _hints(entry: Field, key: str) -> tuple[str, ...] | None:
    hints = entry.get("hints")
    listed = hints.get(key) if hints else None
    if listed is None:
        return None
    return tuple(item["name"].string() for item in listed.items())


def _placement(entry: Field, beta: bool) -> tuple[Field | None, Field | None]:
    """(node name, zone) of an endpoint: v1's ``nodeName`` and ``zone``; v1beta1's
    ``topology`` labels where those are absent (v1beta1 gained ``nodeName`` in 1.20)."""
    node, zone = entry.get("nodeName"), entry.get("zone")
    topology = entry.get("topology") if beta else None
    if topology is not None:
        labels = topology.mapping()
        if node is None and labels.get(HOSTNAME_TOPOLOGY) is not None:
            node = Field(labels[HOSTNAME_TOPOLOGY], f"{topology.path}.{HOSTNAME_TOPOLOGY}")
        if zone is None and labels.get(ZONE_LABEL) is not None:
            zone = Field(labels[ZONE_LABEL], f"{topology.path}.{ZONE_LABEL}")
    return node, zone


def _endpoint(entry: Field, family: IPFamily, beta: bool) -> Endpoint:
    if not beta:  # the common shape, read directly; anything else (or wrong) the long way
        plain = _plain_endpoint(entry.value, family)
        if plain is not None:
            return plain
    return _checked_endpoint(entry, family, beta)


@functools.lru_cache(maxsize=4096)
def _node_name(text: str) -> str | None:
    """A valid node name, interned (thousands of endpoints name the same few nodes), or None."""
    return sys.intern(text) if is_name(text, DNS1123_SUBDOMAIN, SUBDOMAIN_MAX) else None


def _plain_endpoint(raw: Any, family: IPFamily) -> Endpoint | None:
    """An endpoint of the shape the EndpointSlice controller writes (an address, conditions,
    a node and a zone; no hints), read straight from the dict: the same Endpoint
    :func:`_checked_endpoint` makes of it. None for any other shape or any bad value, which
    :func:`_checked_endpoint` then reads (and names the field that is wrong): a slice's
    endpoints are most of what a cluster's objects hold."""
    if type(raw) is not dict or raw.get("hints") is not None:
        return None
    addresses = raw.get("addresses")
    if type(addresses) is not list or not addresses:
        return None
    try:
        address = parse_ip(addresses[0])
    except ValueError:
        return None
    if IPFamily.of(address) is not family:
        return None
    node, zone = raw.get("nodeName"), raw.get("zone")
    if node is not None and (type(node) is not str or (node := _node_name(node)) is None):
        return None
    if zone is not None and type(zone) is not str:
        return None
    conditions = raw.get("conditions")
    if conditions is None:
        flags: tuple[Any, ...] = (None, None, None)
    elif type(conditions) is dict:
        flags = (conditions.get("ready"), conditions.get("serving"), conditions.get("terminating"))
        if any(flag is not None and type(flag) is not bool for flag in flags):
            return None
    else:
        return None
    return Endpoint(
        address, _CONDITIONS(*flags), node, sys.intern(zone) if zone is not None else None
    )


def _checked_endpoint(entry: Field, family: IPFamily, beta: bool) -> Endpoint:
    addresses = list(entry["addresses"].items())
    if not addresses:
        raise Invalid(f"{entry.path}.addresses", "needs at least one address")
    address = addresses[0].ip()
    if IPFamily.of(address) is not family:
        raise addresses[0].invalid(f"{address} is not an {family.value} address")
    node, zone = _placement(entry, beta)
    return Endpoint(
        address=address,
        conditions=_conditions(entry),
        # interned: thousands of endpoints name the same few nodes and zones
        node_name=sys.intern(node.name(DNS1123_SUBDOMAIN, SUBDOMAIN_MAX)) if node else None,
        zone=sys.intern(zone.string()) if zone else None,
        hints_for_zones=_hints(entry, "forZones"),
        hints_for_nodes=_hints(entry, "forNodes"),
    )


def _endpoint_port(entry: Field) -> EndpointPort:
    protocol = entry.get("protocol")
    port = entry.get("port")
    return EndpointPort(
        name=_port_name(entry),
        protocol=protocol.choice(Protocol) if protocol else Protocol.TCP,
        port=port.port() if port else None,
    )


def parse_slice(doc: Field, beta: bool = False) -> EndpointSlice:
    """A discovery.k8s.io/v1 EndpointSlice, or (``beta``) a v1beta1 one."""
    meta = doc["metadata"]
    ref = _ref(meta, "EndpointSlice")
    service_name = _labels(meta).get(SERVICE_NAME_LABEL)
    if service_name is None:
        raise _Skip(f"no {SERVICE_NAME_LABEL} label: it belongs to no Service")
    service = Field(service_name, f"metadata.labels.{SERVICE_NAME_LABEL}").name(DNS1035_LABEL)
    address_type = doc["addressType"].string()
    if address_type == "FQDN":
        raise _Skip("addressType FQDN")
    family = doc["addressType"].choice(IPFamily)
    ports = doc.get("ports")
    endpoints = doc.get("endpoints")
    return EndpointSlice(
        ref=ref,
        service=ObjectRef(ref.namespace, service),
        family=family,
        ports=tuple(_endpoint_port(p) for p in ports.items()) if ports else (),
        endpoints=tuple(_endpoint(e, family, beta) for e in endpoints.items()) if endpoints else (),
    )


def parse_node(doc: Field) -> Node:
    """The zone label and the internal and external addresses of a Node."""
    meta = doc["metadata"]
    zone = _labels(meta).get(ZONE_LABEL)
    status = doc.get("status")
    listed = status.get("addresses") if status else None
    addresses = []
    for entry in listed.items() if listed else ():
        kind = entry.get("type")
        if kind is not None and kind.string() in ("InternalIP", "ExternalIP"):
            addresses.append(entry["address"].ip())
    spec = doc.get("spec")
    cidrs = (spec.get("podCIDRs") or spec.get("podCIDR")) if spec else None
    pod_cidrs: tuple[IPNetwork, ...]
    if cidrs is not None and isinstance(cidrs.value, str):  # podCIDR, the older single field
        pod_cidrs = (cidrs.cidr(),)
    else:
        pod_cidrs = tuple(c.cidr() for c in cidrs.items()) if cidrs else ()
    return Node(
        name=meta["name"].name(DNS1123_SUBDOMAIN, SUBDOMAIN_MAX),
        zone=Field(zone, f"metadata.labels.{ZONE_LABEL}").string() if zone is not None else None,
        addresses=tuple(dict.fromkeys(addresses)),
        pod_cidrs=tuple(dict.fromkeys(pod_cidrs)),
    )


# --- Documents --------------------------------------------------------------------------

_PARSERS: dict[tuple[str, str], Callable[[Field], Service | EndpointSlice | Node]] = {
    SERVICE_API: parse_service,
    SLICE_API: parse_slice,
    SLICE_API_V1BETA1: lambda doc: parse_slice(doc, beta=True),
    NODE_API: parse_node,
}


Claim = tuple[Any, ...]


def service_claims(service: Service) -> dict[Claim, str]:
    """What a service claims (its NodePorts; each address, protocol and port), and the field
    that claims it."""
    claims: dict[Claim, str] = {}
    for i, port in enumerate(service.ports):
        path = f"spec.ports[{i}]"
        if port.node_port is not None:
            claims[("nodePort", port.protocol, port.node_port)] = f"{path}.nodePort"
        addresses = (*service.cluster_ips, *service.external_ips, *service.load_balancer_ips)
        for address in addresses:
            claims.setdefault(("address", address, port.protocol, port.port), f"{path}.port")
    return claims


def _age(service: Service) -> tuple[bool, str, ObjectRef]:
    stamp = service.creation_timestamp
    return (stamp is None, stamp or "", service.ref)


def resolve_conflicts(
    services: Iterable[Service],
    problems: list[Problem],
    owners: dict[Claim, ObjectRef] | None = None,
) -> list[Service]:
    """Keep the first service (oldest, then by name) of any that claim the same address.

    Two services may not share a NodePort, nor an address, protocol and port: the API
    server prevents it, but a set of manifests may not have been through one. ``owners``,
    when given, is filled with what the kept services claim, and which claims each.
    """
    owners = {} if owners is None else owners
    kept = []
    for service in sorted(services, key=_age):
        claims = service_claims(service)
        clash = next(((k, p) for k, p in claims.items() if k in owners), None)
        if clash is not None:
            key, path = clash
            what = (
                f"nodePort {key[2]}/{key[1].value}"
                if key[0] == "nodePort"
                else f"{key[1]}:{key[3]}/{key[2].value}"
            )
            problem = f"{what} is already used by {owners[key]}"
            problems.append(Problem(str(service.ref), "Service", path, problem))
            continue
        owners.update(dict.fromkeys(claims, service.ref))
        kept.append(service)
    return kept


def _api_of(doc: Any) -> tuple[str, str]:
    """(apiVersion, kind) of a decoded document, as text fit for a message."""
    if not isinstance(doc, dict):
        return ("", f"(not an object: {type(doc).__name__})")
    api, kind = doc.get("apiVersion"), doc.get("kind")
    return (
        printable(api, 60) if isinstance(api, str) else "",
        printable(kind, 60) if isinstance(kind, str) else "(no kind)",
    )


Outcome = Service | EndpointSlice | Node | Problem | Skipped | str
"""What one document parses to: an object, a problem, a skip, or (a str) an ignored kind."""


def parse_object(doc: Any) -> Outcome:
    """One decoded API object, parsed and validated on its own."""
    api_version, kind = _api_of(doc)
    parser = _PARSERS.get((api_version, kind))
    if parser is None:
        return f"{kind} ({api_version or 'no apiVersion'})"
    try:
        return parser(Field(doc))
    except _Skip as skip:
        return Skipped(_display_ref(doc, kind), kind, skip.reason)
    except Invalid as error:
        return Problem(_display_ref(doc, kind), kind, error.field, error.problem)


def assemble(
    outcomes: Iterable[Outcome], owners: dict[Claim, ObjectRef] | None = None
) -> ParseResult:
    """The cluster state of parsed objects: conflicts resolved, everything sorted. Of two
    objects with one kind and namespace/name, the later one wins, as a later ``kubectl
    apply`` would. ``owners``: as :func:`resolve_conflicts` fills it."""
    result = ParseResult(ClusterState())
    parsed: dict[tuple[type, ObjectRef], Service | EndpointSlice | Node] = {}
    for outcome in outcomes:
        if isinstance(outcome, str):
            result.ignored[outcome] += 1
        elif isinstance(outcome, Skipped):
            result.skipped.append(outcome)
        elif isinstance(outcome, Problem):
            result.problems.append(outcome)
        else:
            parsed[(type(outcome), outcome.ref)] = outcome
    services = [o for o in parsed.values() if isinstance(o, Service)]
    slices = [o for o in parsed.values() if isinstance(o, EndpointSlice)]
    services = resolve_conflicts(services, result.problems, owners)
    result.state = ClusterState(
        services=tuple(sorted(services, key=lambda s: s.ref)),
        slices=tuple(sorted(slices, key=lambda s: s.ref)),
        nodes=tuple(
            sorted((o for o in parsed.values() if isinstance(o, Node)), key=lambda n: n.name)
        ),
    )
    return result


def parse_documents(documents: Iterable[Any]) -> ParseResult:
    """Turn decoded API objects into a :class:`ClusterState`; bad objects become problems,
    objects of other kinds are counted in ``ignored``."""
    return assemble(parse_object(doc) for doc in documents)
