"""The typed model of what a proxy sees: Services and EndpointSlices, parsed and validated.

Every value here is immutable and already valid: addresses are ``ipaddress`` objects, ports
are checked integers, protocols and families are enums. Nothing in this module does I/O, and
nothing downstream ever sees a raw string from a manifest.
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import NamedTuple

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
SERVICE_PROXY_NAME_LABEL = "service.kubernetes.io/service-proxy-name"
ZONE_LABEL = "topology.kubernetes.io/zone"


def hostport(address: object, port: int) -> str:
    """``10.0.0.1:80``, ``[fd00::1]:80``: how nft, iptables and explain write a destination."""
    host = str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class IPFamily(enum.Enum):
    """An IP family, with the spellings each tool uses for it."""

    V4 = "IPv4"
    V6 = "IPv6"

    @classmethod
    def of(cls, value: IPAddress | IPNetwork) -> IPFamily:
        return cls.V4 if value.version == 4 else cls.V6

    @property
    def nft_family(self) -> str:
        return "ip" if self is IPFamily.V4 else "ip6"

    @property
    def nft_addr_type(self) -> str:
        return "ipv4_addr" if self is IPFamily.V4 else "ipv6_addr"

    @property
    def loopback(self) -> IPNetwork:
        if self is IPFamily.V4:
            return ipaddress.IPv4Network("127.0.0.0/8")
        return ipaddress.IPv6Network("::1/128")

    @property
    def host_mask(self) -> str:
        """A mask that keeps a whole address (xt_recent's ``--mask``)."""
        return (
            "255.255.255.255" if self is IPFamily.V4 else "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
        )

    @property
    def host_prefix(self) -> int:
        return 32 if self is IPFamily.V4 else 128


class Protocol(enum.Enum):
    """A Service port protocol, as the API spells it."""

    TCP = "TCP"
    UDP = "UDP"
    SCTP = "SCTP"

    @property
    def lower(self) -> str:
        """The spelling of nft (``meta l4proto tcp``) and iptables (``-p tcp``)."""
        return self.value.lower()


class ServiceType(enum.Enum):
    CLUSTER_IP = "ClusterIP"
    NODE_PORT = "NodePort"
    LOAD_BALANCER = "LoadBalancer"
    EXTERNAL_NAME = "ExternalName"


class TrafficPolicy(enum.Enum):
    CLUSTER = "Cluster"
    LOCAL = "Local"


class SessionAffinity(enum.Enum):
    NONE = "None"
    CLIENT_IP = "ClientIP"


DEFAULT_AFFINITY_TIMEOUT = 10800


class ObjectRef(NamedTuple):
    """namespace/name of an API object. A named tuple: compared, hashed and sorted in C
    (10,000 services are sorted by it several times on their way to the rules)."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One entry of ``spec.ports``. ``name`` is "" for a service's single unnamed port."""

    name: str
    protocol: Protocol
    port: int
    node_port: int | None = None


@dataclass(frozen=True, slots=True)
class Service:
    """A Service that kube-proxy would program (headless and ExternalName never get here)."""

    ref: ObjectRef
    type: ServiceType
    cluster_ips: tuple[IPAddress, ...]
    ports: tuple[ServicePort, ...]
    external_ips: tuple[IPAddress, ...] = ()
    load_balancer_ips: tuple[IPAddress, ...] = ()
    load_balancer_source_ranges: tuple[IPNetwork, ...] = ()
    external_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    internal_traffic_policy: TrafficPolicy = TrafficPolicy.CLUSTER
    health_check_node_port: int | None = None
    session_affinity: SessionAffinity = SessionAffinity.NONE
    affinity_timeout: int = DEFAULT_AFFINITY_TIMEOUT
    traffic_distribution: str | None = None
    creation_timestamp: str | None = None

    def cluster_ip(self, family: IPFamily) -> IPAddress | None:
        """This service's ClusterIP of ``family``, if it has one."""
        return next((ip for ip in self.cluster_ips if IPFamily.of(ip) is family), None)


@dataclass(frozen=True, slots=True)
class EndpointConditions:
    """``conditions`` of an endpoint; ``None`` means the field was absent."""

    ready: bool | None = None
    serving: bool | None = None
    terminating: bool | None = None

    @property
    def is_ready(self) -> bool:
        """kube-proxy treats an absent ``ready`` as ready."""
        return self.ready is not False

    @property
    def is_serving(self) -> bool:
        """An absent ``serving`` means what ``ready`` means (older controllers)."""
        return self.is_ready if self.serving is None else self.serving

    @property
    def is_terminating(self) -> bool:
        return self.terminating is True


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One entry of an EndpointSlice's ``endpoints``. kube-proxy uses ``addresses[0]`` only."""

    address: IPAddress
    conditions: EndpointConditions = EndpointConditions()
    node_name: str | None = None
    zone: str | None = None
    hints_for_zones: tuple[str, ...] | None = None
    hints_for_nodes: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class EndpointPort:
    """One entry of an EndpointSlice's ``ports``: the resolved target port of a service port."""

    name: str
    protocol: Protocol
    port: int | None


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    ref: ObjectRef
    service: ObjectRef
    family: IPFamily
    ports: tuple[EndpointPort, ...]
    endpoints: tuple[Endpoint, ...]


@dataclass(frozen=True, slots=True)
class Node:
    """What a proxy reads of a Node: its zone label and its addresses."""

    name: str
    zone: str | None = None
    addresses: tuple[IPAddress, ...] = ()
    pod_cidrs: tuple[IPNetwork, ...] = ()  # spec.podCIDRs (detectLocalMode NodeCIDR)

    @property
    def ref(self) -> ObjectRef:
        return ObjectRef("", self.name)


@dataclass(frozen=True, slots=True)
class ClusterState:
    """Everything a proxy knows about the cluster: valid services, slices and nodes, sorted."""

    services: tuple[Service, ...] = ()
    slices: tuple[EndpointSlice, ...] = ()
    nodes: tuple[Node, ...] = ()

    def node(self, name: str) -> Node | None:
        return next((n for n in self.nodes if n.name == name), None)
