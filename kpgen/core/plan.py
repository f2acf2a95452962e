"""What the node's rules must do, decided once for both backends.

:func:`build_plan` joins Services to their EndpointSlices for one IP family and one node and
decides every behaviour a user can observe: which addresses each service port answers on,
which endpoints each kind of traffic is balanced over (traffic policies, terminating
endpoints, topology hints), and what is masqueraded. The templates only spell the plan out in
nftables or iptables syntax, so the two backends cannot disagree about behaviour.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import NamedTuple

from kpgen.core.model import (
    ClusterState,
    Endpoint,
    EndpointSlice,
    IPAddress,
    IPFamily,
    IPNetwork,
    Node,
    ObjectRef,
    Service,
    ServicePort,
    SessionAffinity,
    TrafficPolicy,
)
from kpgen.core.node import LocalInterface, NodeConfig


@dataclass(frozen=True, order=True, slots=True)
class Backend:
    """An endpoint of one service port: where DNAT sends a connection."""

    address: IPAddress
    port: int
    node_name: str | None = None
    is_local: bool = False
    host: str = field(init=False, compare=False, repr=False)
    """The address as the rules spell it, made once (the templates spell it three times)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "host", str(self.address))


@dataclass(frozen=True, slots=True)
class PortPlan:
    """One service port on this node: its addresses and the endpoints behind them.

    ``cluster_endpoints`` serve traffic under a Cluster policy (ready ones, narrowed by topology
    hints; serving-and-terminating ones when none is ready), ``local_endpoints`` traffic under a
    Local policy (this node's ready ones; its serving-and-terminating ones when none is ready).
    Both are in :func:`backend_order`, as :func:`usable_endpoints` gives them.
    """

    service: ObjectRef
    port: ServicePort
    cluster_ip: IPAddress
    external_ips: tuple[IPAddress, ...]
    load_balancer_ips: tuple[IPAddress, ...]
    cluster_endpoints: tuple[Backend, ...]
    local_endpoints: tuple[Backend, ...] = ()
    internal_local: bool = False
    external_local: bool = False
    source_ranges: tuple[IPNetwork, ...] = ()
    health_check_node_port: int | None = None
    affinity_timeout: int | None = None  # sessionAffinity ClientIP: seconds; None: no affinity

    # derived once, at construction: the templates read them several times per port
    external_addresses: tuple[IPAddress, ...] = field(init=False, compare=False)
    """externalIPs and load-balancer IPs: both are external destinations. An address that is
    also the ClusterIP stays a ClusterIP (one address, protocol and port: one rule)."""
    endpoints: tuple[Backend, ...] = field(init=False, compare=False)
    """Every endpoint some traffic may reach."""
    key: str = field(init=False, compare=False)
    """A readable, unique name: ``namespace/name/protocol/port`` (in every chain's name)."""

    def __post_init__(self) -> None:
        addresses = dict.fromkeys((*self.external_ips, *self.load_balancer_ips))
        addresses.pop(self.cluster_ip, None)
        endpoints = self.cluster_endpoints  # the usual case: one tuple kept, not two
        if self.local_endpoints and not set(self.local_endpoints) <= set(endpoints):
            endpoints = tuple(sorted({*endpoints, *self.local_endpoints}, key=backend_order))
        object.__setattr__(self, "external_addresses", tuple(addresses))
        object.__setattr__(self, "endpoints", endpoints)
        key = f"{self.service}/{self.port.protocol.lower}/{self.port.port}"
        object.__setattr__(self, "key", key)

    @property
    def port_name(self) -> str:
        """kube-proxy's ServicePortName: ``namespace/name:port-name``."""
        return f"{self.service}:{self.port.name}" if self.port.name else str(self.service)

    @property
    def firewalled_addresses(self) -> tuple[IPAddress, ...]:
        """LB IPs that only ``loadBalancerSourceRanges`` may reach (NodePorts are not
        restricted, nor are externalIPs)."""
        if not self.source_ranges:
            return ()
        return tuple(a for a in self.external_addresses if a in self.load_balancer_ips)

    @property
    def has_external(self) -> bool:
        return self.port.node_port is not None or bool(self.external_addresses)

    @property
    def has_endpoints(self) -> bool:
        """False: every kind of traffic to this port is rejected."""
        return bool(self.cluster_endpoints or self.local_endpoints)

    @property
    def uses_local_chain(self) -> bool:
        return self.internal_local or (self.external_local and self.has_external)

    @property
    def drops_internal(self) -> bool:
        """internalTrafficPolicy Local and no endpoint here: ClusterIP traffic is dropped."""
        return self.internal_local and not self.local_endpoints

    @property
    def drops_external(self) -> bool:
        """externalTrafficPolicy Local and no endpoint here: traffic from outside is dropped
        (traffic from pods and from the node still reaches the cluster's endpoints)."""
        return self.external_local and not self.local_endpoints


@dataclass(frozen=True, slots=True)
class FamilyPlan:
    """Everything the rules of one IP family on one node are made from."""

    family: IPFamily
    ports: tuple[PortPlan, ...]
    cluster_cidrs: tuple[IPNetwork, ...]
    masquerade_all: bool
    masquerade_mark: int
    nodeport_networks: tuple[IPNetwork, ...] | None
    service_cidrs: tuple[IPNetwork, ...] = ()
    node_name: str = ""  # recorded in the rules, for kpgen status and explain --live
    # detectLocalMode BridgeInterface / InterfaceNamePrefix: this node's pods' traffic comes in
    # on this interface (then cluster_cidrs is empty). ClusterCIDR and NodeCIDR: None, and
    # cluster_cidrs holds the clusterCIDR or the Node's podCIDRs.
    local_interface: LocalInterface | None = None

    @property
    def served(self) -> tuple[PortPlan, ...]:
        """Service ports with endpoints: they DNAT."""
        return tuple(p for p in self.ports if p.has_endpoints)

    @property
    def unserved(self) -> tuple[PortPlan, ...]:
        """Service ports without endpoints: they reject."""
        return tuple(p for p in self.ports if not p.has_endpoints)

    @property
    def cluster_ips(self) -> tuple[IPAddress, ...]:
        """Every ClusterIP, served or not."""
        return tuple(sorted({p.cluster_ip for p in self.ports}))

    @property
    def hairpin_addresses(self) -> tuple[IPAddress, ...]:
        """Every endpoint address: a connection DNATed back to its own source is hairpin."""
        return tuple(sorted({b.address for p in self.ports for b in p.endpoints}))


def backend_order(backend: Backend) -> tuple[int, int]:
    """The order of a service port's endpoints (all of one family): by address, then port.
    The same order as Backend's own, computed once per endpoint rather than per comparison
    (an address compares in Python)."""
    return (int(backend.address), backend.port)


class _Candidate(NamedTuple):
    endpoint: Endpoint
    backend: Backend


def _candidates(port: ServicePort, slices: list[EndpointSlice], hostname: str) -> list[_Candidate]:
    """Every endpoint of the service's slices for ``port``, matched by port name and
    protocol (the slice's port number is the DNAT target), without duplicates."""
    found: dict[tuple[str, int], _Candidate] = {}
    for endpoint_slice in slices:
        target = next(
            (
                p.port
                for p in endpoint_slice.ports
                if p.name == port.name and p.protocol is port.protocol and p.port is not None
            ),
            None,
        )
        if target is None:
            continue
        for endpoint in endpoint_slice.endpoints:
            backend = Backend(
                endpoint.address, target, endpoint.node_name, endpoint.node_name == hostname
            )
            found.setdefault((backend.host, target), _Candidate(endpoint, backend))
    return list(found.values())


def _topology(ready: list[_Candidate], hostname: str, zone: str | None) -> list[_Candidate]:
    """kube-proxy's hints: this node's endpoints if every ready endpoint has node hints and
    one names this node; else this zone's if every one has zone hints and one names the
    node's zone; else all of them."""
    if ready and all(c.endpoint.hints_for_nodes is not None for c in ready):
        mine = [c for c in ready if hostname in (c.endpoint.hints_for_nodes or ())]
        if mine:
            return mine
    if zone and ready and all(c.endpoint.hints_for_zones is not None for c in ready):
        near = [c for c in ready if zone in (c.endpoint.hints_for_zones or ())]
        if near:
            return near
    return ready


def _usable(candidates: Iterable[_Candidate]) -> tuple[Backend, ...]:
    """Ready ones; when none is ready, serving-and-terminating ones (KEP-1669)."""
    pool = list(candidates)
    ready = [c.backend for c in pool if c.endpoint.conditions.is_ready]
    if ready:
        return tuple(sorted(ready, key=backend_order))
    return tuple(
        sorted(
            (
                c.backend
                for c in pool
                if c.endpoint.conditions.is_serving and c.endpoint.conditions.is_terminating
            ),
            key=backend_order,
        )
    )


def usable_endpoints(
    port: ServicePort,
    slices: list[EndpointSlice],
    hostname: str,
    zone: str | None = None,
) -> tuple[tuple[Backend, ...], tuple[Backend, ...]]:
    """(cluster endpoints, local endpoints) of a service port, as kube-proxy categorises them."""
    candidates = _candidates(port, slices, hostname)
    ready = [c for c in candidates if c.endpoint.conditions.is_ready]
    cluster = _usable(_topology(ready, hostname, zone)) if ready else _usable(candidates)
    local = _usable(c for c in candidates if c.backend.is_local)
    return cluster, local


def _family_addresses(addresses: tuple[IPAddress, ...], family: IPFamily) -> tuple[IPAddress, ...]:
    return tuple(a for a in addresses if IPFamily.of(a) is family)


def families(state: ClusterState) -> tuple[IPFamily, ...]:
    """The IP families to program: IPv4 always, IPv6 too once a service has an IPv6
    ClusterIP (single-stack IPv6 or dual-stack)."""
    if any(service.cluster_ip(IPFamily.V6) for service in state.services):
        return (IPFamily.V4, IPFamily.V6)
    return (IPFamily.V4,)


def build_plans(state: ClusterState, node: NodeConfig) -> tuple[FamilyPlan, ...]:
    """The plan of every IP family the node serves, IPv4 first."""
    return tuple(build_plan(state, node, family) for family in families(state))


def build_plan(state: ClusterState, node: NodeConfig, family: IPFamily) -> FamilyPlan:
    """The plan of ``family``'s rules on ``node`` for the cluster ``state``."""
    slices_of: dict[ObjectRef, list[EndpointSlice]] = defaultdict(list)
    for endpoint_slice in state.slices:
        if endpoint_slice.family is family:
            slices_of[endpoint_slice.service].append(endpoint_slice)
    node_object = state.node(node.hostname)
    ports = []
    for service in state.services:
        ports.extend(service_port_plans(service, slices_of[service.ref], node, node_object, family))
    return family_plan(node, family, ports, node_object)


def port_order(port: PortPlan) -> tuple[ObjectRef, str, int]:
    """The order of service ports in a plan (and in the rules)."""
    return (port.service, port.port.protocol.value, port.port.port)


def family_plan(
    node: NodeConfig, family: IPFamily, ports: Iterable[PortPlan], node_object: Node | None = None
) -> FamilyPlan:
    """The plan of ``family`` on ``node`` with these service ports (``node_object``: its Node,
    whose podCIDRs are the local range under detectLocalMode NodeCIDR)."""
    return FamilyPlan(
        family=family,
        ports=tuple(sorted(ports, key=port_order)),
        cluster_cidrs=node.local_cidrs(family, node_object.pod_cidrs if node_object else ()),
        masquerade_all=node.masquerade_all,
        masquerade_mark=node.masquerade_mark,
        nodeport_networks=node.nodeport_networks(family),
        service_cidrs=tuple(n for n in node.service_cidrs if IPFamily.of(n) is family),
        node_name=node.hostname,
        local_interface=node.local_interface,
    )


def service_port_plans(
    service: Service,
    slices: Iterable[EndpointSlice],
    node: NodeConfig,
    node_object: Node | None,
    family: IPFamily,
) -> list[PortPlan]:
    """The plans of one service's ports in ``family`` (none without a ClusterIP of it), from
    its EndpointSlices (those of other families are left out) and this node's Node object."""
    cluster_ip = service.cluster_ip(family)
    if cluster_ip is None:
        return []
    zone = node_object.zone if node_object else None
    # the node's own addresses: --node-ip, and those its Node object lists
    node_addresses = (*node.node_ips, *(node_object.addresses if node_object else ()))
    ranges = _source_ranges(service, family, node_addresses)
    own = [s for s in slices if s.family is family]
    return _port_plans(service, cluster_ip, own, node, zone, family, ranges)


def _source_ranges(
    service: Service, family: IPFamily, node_addresses: tuple[IPAddress, ...]
) -> tuple[IPNetwork, ...]:
    """The sources a service's load-balancer firewall lets through: its
    ``loadBalancerSourceRanges``, and, when one of them holds an address of this node, the
    service's own LB IPs as well. A load balancer that is VIP-like (its address also local to
    the node, or routed back to it) loops the node's own requests back with the LB IP as their
    source; kube-proxy lets those through in that case, and so does kpgen."""
    ranges = tuple(r for r in service.load_balancer_source_ranges if IPFamily.of(r) is family)
    if not any(a in r for r in ranges for a in node_addresses if IPFamily.of(a) is family):
        return ranges
    own = _family_addresses(service.load_balancer_ips, family)
    return (*ranges, *(ipaddress.ip_network(a) for a in own))


def _port_plans(
    service: Service,
    cluster_ip: IPAddress,
    slices: list[EndpointSlice],
    node: NodeConfig,
    zone: str | None,
    family: IPFamily,
    source_ranges: tuple[IPNetwork, ...],
) -> list[PortPlan]:
    plans = []
    for port in service.ports:
        cluster, local = usable_endpoints(port, slices, node.hostname, zone)
        plans.append(
            PortPlan(
                service=service.ref,
                port=port,
                cluster_ip=cluster_ip,
                external_ips=_family_addresses(service.external_ips, family),
                load_balancer_ips=_family_addresses(service.load_balancer_ips, family),
                cluster_endpoints=cluster,
                local_endpoints=local,
                internal_local=service.internal_traffic_policy is TrafficPolicy.LOCAL,
                external_local=service.external_traffic_policy is TrafficPolicy.LOCAL,
                source_ranges=source_ranges,
                health_check_node_port=service.health_check_node_port,
                affinity_timeout=service.affinity_timeout
                if service.session_affinity is SessionAffinity.CLIENT_IP
                else None,
            )
        )
    return plans
