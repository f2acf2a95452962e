"""The seed article's cluster as data: its machines, their addresses, the links between them,
their routes and the pods (examples/seed-cluster.yaml, header comment; docs/lab.md draws it).

Every machine is a network namespace: the ``gateway`` outside the cluster, the ``k8s-master``
and two workers on the node network 10.20.30.0/24, an L2 segment (a bridge in a namespace of
its own, :data:`NET_NS`); and each pod a namespace of its own, attached to its node the way
Calico attaches pods (:func:`pod_wiring`). The workers route each other's pod CIDRs, and the
gateway routes the externalIP to k8s-worker01 (:data:`CLUSTER_WIRING`).

Nothing here builds anything: kpgen/lab/lab.py makes what this describes, in the order
:class:`Wiring` lists it.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

NODE_NETWORK = ipaddress.ip_network("10.20.30.0/24")
CLUSTER_CIDR = "192.168.0.0/16"
POD_GATEWAY = "169.254.1.1"  # Calico's: every pod's default gateway, answered by proxy ARP
EXTERNAL_IP = "10.20.30.20"
EXTERNAL_IP_NODE = "k8s-worker01"  # the externalIP is routed to this worker
NET_NS = "kpgen-lab-net"  # holds the node network's bridge
BRIDGE = "br0"
HTTP_PORT = 80  # the pods answer HTTP (and UDP) on it
# The services and endpoint slices of the seed cluster: package data, so that an installed
# kpgen has it (examples/seed-cluster.yaml links here).
SEED = Path(str(files("kpgen.lab").joinpath("seed-cluster.yaml")))


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    pod_cidr: str | None = None  # workers only

    @property
    def is_worker(self) -> bool:
        return self.pod_cidr is not None


@dataclass(frozen=True)
class Pod:
    name: str
    node: str
    address: str
    serve: bool = True  # answers HTTP on port 80

    @property
    def veth(self) -> str:
        """The node's side of the pod's veth: ``cali`` and the pod's name (a hash of it if
        that is too long for an interface name), as Calico names them."""
        name = f"cali{self.name}"
        if len(name) > 15:
            name = "cali" + hashlib.sha1(self.name.encode()).hexdigest()[:11]
        return name


NODES = (
    Node("gateway", "10.20.30.1"),
    Node("k8s-master", "10.20.30.10"),
    Node("k8s-worker01", "10.20.30.11", "192.168.69.192/26"),
    Node("k8s-worker02", "10.20.30.12", "192.168.79.64/26"),
)
NODE_BY_NAME = {node.name: node for node in NODES}
WORKERS = tuple(node.name for node in NODES if node.is_worker)
CLUSTER_NODES = ("k8s-master", *WORKERS)
SEED_PODS = (
    Pod("pod1", "k8s-worker01", "192.168.69.246"),
    Pod("pod2", "k8s-worker02", "192.168.79.106"),
    # the article's test pod, for the ClusterIP loop: a free address of worker01's pod CIDR
    Pod("test-pod", "k8s-worker01", "192.168.69.200", serve=False),
)


# --- the wiring: what connects the machines, in the words of `ip` and `sysctl` --------------


@dataclass(frozen=True)
class Veth:
    """A veth pair: ``name`` in ``machine``, its peer ``peer_name`` in machine ``peer``,
    there a port of ``bridge`` when one is named."""

    machine: str
    name: str
    peer: str
    peer_name: str
    bridge: str | None = None


@dataclass(frozen=True)
class Address:
    machine: str
    device: str
    cidr: str


@dataclass(frozen=True)
class Route:
    """A route in ``machine``'s table: to ``destination`` (a CIDR or ``default``) via a
    gateway, or on-link through ``device`` (scope link) when there is none."""

    machine: str
    destination: str
    via: str | None = None
    device: str | None = None


@dataclass(frozen=True)
class Sysctl:
    machine: str
    setting: str  # key=value


@dataclass(frozen=True)
class Wiring:
    """One part of the lab, made in this order: links (up at both ends), sysctls, addresses,
    routes (a route needs its link up and its gateway reachable)."""

    veths: tuple[Veth, ...] = ()
    sysctls: tuple[Sysctl, ...] = ()
    addresses: tuple[Address, ...] = ()
    routes: tuple[Route, ...] = ()


def node_wiring(node: Node) -> Wiring:
    """A machine on the node network: ``eth0`` with its address, a veth into the bridge."""
    return Wiring(
        veths=(Veth(node.name, "eth0", NET_NS, node.name, BRIDGE),),
        addresses=(Address(node.name, "eth0", f"{node.address}/{NODE_NETWORK.prefixlen}"),),
    )


def _cluster_wiring() -> Wiring:
    gateway = NODE_BY_NAME["gateway"].address
    routes = []
    for name in CLUSTER_NODES:
        # a default route, as nodes have one; it also lets proxy ARP answer for 169.254.1.1
        routes.append(Route(name, "default", via=gateway))
        # each worker's pod CIDR through its node address, as Calico's BGP routes would
        routes += [
            Route(name, other.pod_cidr, via=other.address)
            for other in NODES
            if other.pod_cidr is not None and other.name != name
        ]
    routes.append(Route("gateway", f"{EXTERNAL_IP}/32", via=NODE_BY_NAME[EXTERNAL_IP_NODE].address))
    return Wiring(
        sysctls=tuple(Sysctl(name, "net.ipv4.ip_forward=1") for name in CLUSTER_NODES),
        routes=tuple(routes),
    )


# Between the nodes, once every node is on the node network: forwarding and routes.
CLUSTER_WIRING = _cluster_wiring()


def pod_wiring(pod: Pod) -> Wiring:
    """A pod attached the way Calico attaches one: a /32 on its ``eth0`` and a default route
    via 169.254.1.1, which the node answers by proxy ARP (without delay) on its side of the
    veth; the node routes the pod's /32 over that veth."""
    return Wiring(
        veths=(Veth(pod.node, pod.veth, pod.name, "eth0"),),
        sysctls=(
            Sysctl(pod.node, f"net.ipv4.conf.{pod.veth}.proxy_arp=1"),
            Sysctl(pod.node, f"net.ipv4.neigh.{pod.veth}.proxy_delay=0"),
        ),
        addresses=(Address(pod.name, "eth0", f"{pod.address}/32"),),
        routes=(
            Route(pod.node, f"{pod.address}/32", device=pod.veth),
            Route(pod.name, POD_GATEWAY, device="eth0"),
            Route(pod.name, "default", via=POD_GATEWAY, device="eth0"),
        ),
    )


def host_names(pods: Iterable[Pod]) -> list[tuple[str, str]]:
    """(address, name) of every node and of ``pods``: the names the machines know each other
    by (the lab's hosts files; there is no cluster DNS)."""
    unique = {pod.name: pod for pod in pods}.values()
    return [(node.address, node.name) for node in NODES] + [(p.address, p.name) for p in unique]
