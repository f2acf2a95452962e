"""The node's settings, under kube-proxy's names, from flags and a KubeProxyConfiguration.

:func:`node_config` validates every value into a typed :class:`NodeConfig`; a bad value raises
:class:`ConfigError` naming the flag or the config field. Flags override the file's values.
Values only: reading the file and asking the host its name is kpgen.inputs.config's business.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kpgen.core.fields import (
    DNS1123_SUBDOMAIN,
    SUBDOMAIN_MAX,
    Field,
    Invalid,
    parse_cidr,
    parse_ip,
    show,
)
from kpgen.core.model import IPAddress, IPFamily, IPNetwork

CONFIG_API = ("kubeproxy.config.k8s.io/v1alpha1", "KubeProxyConfiguration")
PRIMARY = "primary"
MASQUERADE_BIT = 14


class ConfigError(Exception):
    """A node setting that cannot be used; the message names the flag or field."""


class ProxyMode(enum.Enum):
    NFTABLES = "nftables"
    IPTABLES = "iptables"


class DetectLocal(enum.Enum):
    """kube-proxy's detectLocalMode: how traffic from this node's pods is told apart."""

    CLUSTER_CIDR = "ClusterCIDR"  # the source is in clusterCIDR
    NODE_CIDR = "NodeCIDR"  # the source is in the Node's spec.podCIDRs
    BRIDGE_INTERFACE = "BridgeInterface"  # it came in on detectLocal.bridgeInterface
    INTERFACE_NAME_PREFIX = "InterfaceNamePrefix"  # on an interface named prefix*


# A Linux interface name (at most 15 characters, IFNAMSIZ - 1), restricted to characters that
# need no quoting in nft or iptables rules.
INTERFACE_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")


@dataclass(frozen=True, order=True)
class LocalInterface:
    """Local traffic by the interface it came in on: ``name`` exactly, or (``prefix``) every
    interface whose name starts with it (nft ``iifname "name*"``, iptables ``-i name+``)."""

    name: str
    prefix: bool = False


@dataclass(frozen=True)
class NodeConfig:
    """What a proxy needs to know about the node it programs."""

    hostname: str
    mode: ProxyMode = ProxyMode.NFTABLES
    cluster_cidrs: tuple[IPNetwork, ...] = ()
    masquerade_all: bool = False
    nodeport_cidrs: tuple[IPNetwork, ...] = ()
    nodeport_primary: bool = False
    node_ips: tuple[IPAddress, ...] = ()
    service_cidrs: tuple[IPNetwork, ...] = ()
    masquerade_bit: int = MASQUERADE_BIT
    detect_local: DetectLocal = DetectLocal.CLUSTER_CIDR
    local_interface: LocalInterface | None = None  # BridgeInterface, InterfaceNamePrefix

    def local_cidrs(
        self, family: IPFamily, pod_cidrs: Sequence[IPNetwork] = ()
    ) -> tuple[IPNetwork, ...]:
        """The sources that count as this node's pods for ``family`` (``pod_cidrs``: the
        Node's spec.podCIDRs); empty: no local detection by address."""
        if self.detect_local is DetectLocal.CLUSTER_CIDR:
            networks: Sequence[IPNetwork] = self.cluster_cidrs
        elif self.detect_local is DetectLocal.NODE_CIDR:
            networks = _merged(tuple(pod_cidrs))
        else:
            networks = ()
        return tuple(n for n in networks if IPFamily.of(n) is family)

    @property
    def masquerade_mark(self) -> int:
        return 1 << self.masquerade_bit

    def nodeport_networks(self, family: IPFamily) -> tuple[IPNetwork, ...] | None:
        """The networks whose local addresses answer NodePorts; None: every local address
        but loopback."""
        if self.nodeport_primary:
            return tuple(
                ipaddress.ip_network(f"{ip}/{family.host_prefix}")
                for ip in self.node_ips
                if IPFamily.of(ip) is family
            )
        if not self.nodeport_cidrs:
            return None
        return tuple(n for n in self.nodeport_cidrs if IPFamily.of(n) is family)


@dataclass(frozen=True)
class NodeFlags:
    """The node settings as given on the command line (or read from a config file);
    None or empty: not given."""

    mode: str | None = None
    hostname: str | None = None
    cluster_cidrs: Sequence[str] = ()
    masquerade_all: bool | None = None
    nodeport_addresses: Sequence[str] = ()
    node_ips: Sequence[str] = ()
    service_cidrs: Sequence[str] = ()
    # A config file has masqueradeAll per mode section; which applies is known once flags
    # have overridden the mode.
    masquerade_all_by_mode: Mapping[str, bool] = field(default_factory=dict)
    masquerade_bit_by_mode: Mapping[str, int] = field(default_factory=dict)
    detect_local_mode: str | None = None
    bridge_interface: str | None = None
    interface_prefix: str | None = None


# Each setting's name as a flag and as a KubeProxyConfiguration field, for messages.
SETTING_NAMES = {
    "mode": ("--proxy-mode", "mode"),
    "hostname": ("--hostname-override", "hostnameOverride"),
    "cluster_cidrs": ("--cluster-cidr", "clusterCIDR"),
    "masquerade_all": ("--masquerade-all", "masqueradeAll"),
    "nodeport_addresses": ("--nodeport-addresses", "nodePortAddresses"),
    "node_ips": ("--node-ip", "--node-ip"),
    "service_cidrs": ("--service-cidr", "--service-cidr"),
    "detect_local_mode": ("--detect-local-mode", "detectLocalMode"),
    "bridge_interface": ("--pod-bridge-interface", "detectLocal.bridgeInterface"),
    "interface_prefix": ("--pod-interface-name-prefix", "detectLocal.interfaceNamePrefix"),
}


def _values(where: str, values: Sequence[str], parser: Any) -> tuple[Any, ...]:
    parsed = []
    for value in values:
        try:
            parsed.append(parser(value))
        except ValueError as error:
            raise ConfigError(f"{where}: {error}") from None
    return tuple(dict.fromkeys(parsed))


def _merged(networks: tuple[IPNetwork, ...]) -> tuple[IPNetwork, ...]:
    """The same addresses with overlaps merged (nft's interval sets refuse overlaps)."""
    v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    return (*ipaddress.collapse_addresses(v4), *ipaddress.collapse_addresses(v6))


def _split(values: Sequence[str]) -> list[str]:
    """kube-proxy's comma-separated list values (``--cluster-cidr a,b``), flattened."""
    return [part.strip() for value in values for part in value.split(",") if part.strip()]


def config_flags(doc: Any, source: str) -> NodeFlags:
    """The node settings of a decoded KubeProxyConfiguration, as if given as flags; ``source``
    names it in messages (``--config: FILE``). The whole file: kpgen.core.kubeproxy."""
    from kpgen.core.kubeproxy import read_config

    return read_config(doc, source).node


def node_config(
    flags: NodeFlags,
    *,
    base: NodeFlags | None = None,
    base_source: str = "--config",
    host_name: str | None = None,
    base_origin: Mapping[str, str] | None = None,
) -> NodeConfig:
    """Validate the node settings; ``flags`` override ``base`` (a config file's values, read
    from ``base_source``). The node's name defaults to ``host_name``. A bad value is reported
    under the flag, or the file and field, it came from (``base_origin``: the base's fields
    that kube-proxy flags set, by field)."""
    base = base or NodeFlags()
    base_origin = base_origin or {}

    def pick(name: str) -> tuple[Any, str]:
        flag, config_field = SETTING_NAMES[name]
        given = getattr(flags, name)
        if given not in (None, (), []):
            return given, flag
        return getattr(base, name), base_origin.get(config_field, f"{base_source}: {config_field}")

    mode_name, where = pick("mode")
    try:
        mode = ProxyMode(mode_name or ProxyMode.NFTABLES.value)
    except ValueError:
        raise ConfigError(f"{where}: {show(mode_name)} is not nftables or iptables") from None
    hostname, where = pick("hostname")
    hostname = (hostname or host_name or "").strip().lower()
    if not hostname:
        raise ConfigError("--hostname-override: this node's name is needed")
    try:
        Field(hostname, where).name(DNS1123_SUBDOMAIN, SUBDOMAIN_MAX)
    except Invalid as error:
        raise ConfigError(str(error)) from None
    nodeport_values, nodeport_where = pick("nodeport_addresses")
    nodeport_values = _split(nodeport_values)
    primary = PRIMARY in nodeport_values
    if primary and len(nodeport_values) > 1:
        raise ConfigError(f"{nodeport_where}: {PRIMARY!r} cannot be combined with CIDRs")
    # --node-ip; else a specific bindAddress (kube-proxy takes it as the node's IP)
    node_ips = _values("--node-ip", flags.node_ips or base.node_ips, parse_ip)
    if primary and not node_ips:
        raise ConfigError(f"{nodeport_where}: {PRIMARY} needs the node's address (--node-ip)")
    masquerade_all = flags.masquerade_all
    if masquerade_all is None:
        masquerade_all = base.masquerade_all_by_mode.get(mode.value, False)
    cidrs, cidr_where = pick("cluster_cidrs")
    detect_local, local_interface = _detect_local(pick)
    return NodeConfig(
        hostname=hostname,
        mode=mode,
        cluster_cidrs=_merged(_values(cidr_where, _split(cidrs), parse_cidr)),
        masquerade_all=masquerade_all,
        nodeport_cidrs=()
        if primary
        else _merged(_values(nodeport_where, nodeport_values, parse_cidr)),
        nodeport_primary=primary,
        node_ips=node_ips,
        service_cidrs=_merged(_values("--service-cidr", _split(flags.service_cidrs), parse_cidr)),
        masquerade_bit=base.masquerade_bit_by_mode.get(mode.value, MASQUERADE_BIT),
        detect_local=detect_local,
        local_interface=local_interface,
    )


def _detect_local(pick: Any) -> tuple[DetectLocal, LocalInterface | None]:
    """detectLocalMode and the interface it needs, as kube-proxy validates them."""
    mode_name, where = pick("detect_local_mode")
    try:
        mode = DetectLocal(mode_name or DetectLocal.CLUSTER_CIDR.value)
    except ValueError:
        allowed = ", ".join(m.value for m in DetectLocal)
        raise ConfigError(f"{where}: {show(mode_name)} is not one of {allowed}") from None
    if mode not in (DetectLocal.BRIDGE_INTERFACE, DetectLocal.INTERFACE_NAME_PREFIX):
        return mode, None
    prefix = mode is DetectLocal.INTERFACE_NAME_PREFIX
    name, where = pick("interface_prefix" if prefix else "bridge_interface")
    if not name:
        raise ConfigError(f"{where}: must be set for detectLocalMode {mode.value}")
    if not INTERFACE_NAME.match(name) or name in (".", ".."):
        raise ConfigError(
            f"{where}: {show(name)} is not an interface name (at most 15 of A-Z a-z 0-9 _ . @ -)"
        )
    return mode, LocalInterface(name, prefix)
