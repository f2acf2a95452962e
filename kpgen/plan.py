"""What the node's rules must do, decided once for both backends.

:func:`build_plan` joins Services to their EndpointSlices for one IP family and one node and
decides every behaviour a user can observe: which addresses each service port answers on,
which endpoints it balances over, and what is masqueraded. The templates only spell the plan
out in nftables or iptables syntax, so the two backends cannot disagree about behaviour.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

from kpgen.model import (
    ClusterState,
    EndpointSlice,
    IPAddress,
    IPFamily,
    IPNetwork,
    ObjectRef,
    Service,
    ServicePort,
)
from kpgen.node import NodeConfig


@dataclass(frozen=True, order=True)
class Backend:
    """An endpoint of one service port: where DNAT sends a connection."""

    address: IPAddress
    port: int
    node_name: str | None = None
    is_local: bool = False


@dataclass(frozen=True)
class PortPlan:
    """One service port on this node: its addresses and the endpoints behind them."""

    service: ObjectRef
    port: ServicePort
    cluster_ip: IPAddress
    external_ips: tuple[IPAddress, ...]
    load_balancer_ips: tuple[IPAddress, ...]
    endpoints: tuple[Backend, ...]

    @property
    def key(self) -> str:
        """A readable, unique name: ``namespace/name/protocol/port``."""
        return f"{self.service}/{self.port.protocol.lower}/{self.port.port}"

    @property
    def port_name(self) -> str:
        """kube-proxy's ServicePortName: ``namespace/name:port-name``."""
        return f"{self.service}:{self.port.name}" if self.port.name else str(self.service)

    @property
    def external_addresses(self) -> tuple[IPAddress, ...]:
        """externalIPs and load-balancer IPs: both are external destinations. An address that
        is also the ClusterIP stays a ClusterIP (one address, protocol and port: one rule)."""
        addresses = dict.fromkeys((*self.external_ips, *self.load_balancer_ips))
        addresses.pop(self.cluster_ip, None)
        return tuple(addresses)

    @property
    def has_external(self) -> bool:
        return self.port.node_port is not None or bool(self.external_addresses)


@dataclass(frozen=True)
class FamilyPlan:
    """Everything the rules of one IP family on one node are made from."""

    family: IPFamily
    ports: tuple[PortPlan, ...]
    cluster_cidrs: tuple[IPNetwork, ...]
    masquerade_all: bool
    masquerade_mark: int
    nodeport_networks: tuple[IPNetwork, ...] | None
    service_cidrs: tuple[IPNetwork, ...] = ()

    @property
    def served(self) -> tuple[PortPlan, ...]:
        """Service ports with endpoints: they DNAT."""
        return tuple(p for p in self.ports if p.endpoints)

    @property
    def unserved(self) -> tuple[PortPlan, ...]:
        """Service ports without endpoints: they reject."""
        return tuple(p for p in self.ports if not p.endpoints)

    @property
    def cluster_ips(self) -> tuple[IPAddress, ...]:
        """Every ClusterIP, served or not."""
        return tuple(sorted({p.cluster_ip for p in self.ports}))

    @property
    def hairpin_addresses(self) -> tuple[IPAddress, ...]:
        """Every endpoint address: a connection DNATed back to its own source is hairpin."""
        return tuple(sorted({b.address for p in self.ports for b in p.endpoints}))


def usable_endpoints(
    port: ServicePort, slices: list[EndpointSlice], hostname: str
) -> tuple[Backend, ...]:
    """The endpoints a service port balances over: ready ones (absent ``ready`` counts as
    ready) of every slice, matched by port name and protocol, without duplicates."""
    backends: dict[tuple[IPAddress, int], Backend] = {}
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
            if endpoint.conditions.is_ready:
                backends.setdefault(
                    (endpoint.address, target),
                    Backend(
                        endpoint.address,
                        target,
                        endpoint.node_name,
                        endpoint.node_name == hostname,
                    ),
                )
    return tuple(sorted(backends.values()))


def _family_addresses(addresses: tuple[IPAddress, ...], family: IPFamily) -> tuple[IPAddress, ...]:
    return tuple(a for a in addresses if IPFamily.of(a) is family)


FAMILIES = (IPFamily.V4,)


def build_plans(state: ClusterState, node: NodeConfig) -> tuple[FamilyPlan, ...]:
    """The plan of every IP family the node serves (IPv4 for now)."""
    return tuple(build_plan(state, node, family) for family in FAMILIES)


def build_plan(state: ClusterState, node: NodeConfig, family: IPFamily) -> FamilyPlan:
    """The plan of ``family``'s rules on ``node`` for the cluster ``state``."""
    slices_of: dict[ObjectRef, list[EndpointSlice]] = defaultdict(list)
    for endpoint_slice in state.slices:
        if endpoint_slice.family is family:
            slices_of[endpoint_slice.service].append(endpoint_slice)
    ports = []
    for service in state.services:
        cluster_ip = service.cluster_ip(family)
        if cluster_ip is None:
            continue
        ports.extend(_port_plans(service, cluster_ip, slices_of[service.ref], node, family))
    return FamilyPlan(
        family=family,
        ports=tuple(sorted(ports, key=lambda p: (p.service, p.port.protocol.value, p.port.port))),
        cluster_cidrs=tuple(n for n in node.cluster_cidrs if IPFamily.of(n) is family),
        masquerade_all=node.masquerade_all,
        masquerade_mark=node.masquerade_mark,
        nodeport_networks=node.nodeport_networks(family),
        service_cidrs=tuple(n for n in node.service_cidrs if IPFamily.of(n) is family),
    )


def _port_plans(
    service: Service,
    cluster_ip: IPAddress,
    slices: list[EndpointSlice],
    node: NodeConfig,
    family: IPFamily,
) -> list[PortPlan]:
    return [
        PortPlan(
            service=service.ref,
            port=port,
            cluster_ip=cluster_ip,
            external_ips=_family_addresses(service.external_ips, family),
            load_balancer_ips=_family_addresses(service.load_balancer_ips, family),
            endpoints=usable_endpoints(port, slices, node.hostname),
        )
        for port in service.ports
    ]
