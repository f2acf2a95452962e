"""The node's settings, under kube-proxy's names, from flags and a KubeProxyConfiguration file.

:func:`node_config` validates every value into a typed :class:`NodeConfig`; a bad value raises
:class:`ConfigError` naming the flag or the config field. Flags override the file.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from kpgen.fields import DNS1123_SUBDOMAIN, SUBDOMAIN_MAX, Field, Invalid, parse_cidr, parse_ip
from kpgen.model import IPAddress, IPFamily, IPNetwork

CONFIG_API = ("kubeproxy.config.k8s.io/v1alpha1", "KubeProxyConfiguration")
PRIMARY = "primary"
MASQUERADE_BIT = 14


class ConfigError(Exception):
    """A node setting that cannot be used; the message names the flag or field."""


class ProxyMode(enum.Enum):
    NFTABLES = "nftables"
    IPTABLES = "iptables"


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
    """The node flags as given on the command line; None or empty: not given."""

    mode: str | None = None
    hostname: str | None = None
    cluster_cidrs: Sequence[str] = ()
    masquerade_all: bool | None = None
    nodeport_addresses: Sequence[str] = ()
    node_ips: Sequence[str] = ()
    service_cidrs: Sequence[str] = ()


def _values(flag: str, values: Sequence[str], parser: Any) -> tuple[Any, ...]:
    parsed = []
    for value in values:
        try:
            parsed.append(parser(value))
        except ValueError as error:
            raise ConfigError(f"{flag}: {error}") from None
    return tuple(dict.fromkeys(parsed))


def _split(value: str) -> list[str]:
    """kube-proxy's comma-separated list flags (``--cluster-cidr a,b``)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def read_config_file(path: str) -> NodeFlags:
    """The node settings of a KubeProxyConfiguration file, as if given as flags."""
    try:
        with open(path, encoding="utf-8") as stream:
            doc = yaml.load(stream, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except OSError as error:
        raise ConfigError(f"--config: cannot read {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"--config: {path} is not valid YAML: {error}") from None
    root = Field(doc)
    try:
        root.mapping()
        api = (doc.get("apiVersion"), doc.get("kind"))
        if api != CONFIG_API:
            raise Invalid("kind", f"expected {CONFIG_API[1]} of {CONFIG_API[0]}, got {api[1]}")
        mode = root.get("mode")
        mode_name = mode.string() if mode else None
        masquerade_all = None
        for section in ("iptables", "nftables"):
            block = root.get(section)
            setting = block.get("masqueradeAll") if block else None
            if setting is not None and (mode_name or "nftables") == section:
                masquerade_all = setting.boolean()
        hostname = root.get("hostnameOverride")
        cidrs = root.get("clusterCIDR")
        nodeports = root.get("nodePortAddresses")
        return NodeFlags(
            mode=mode_name or None,
            hostname=hostname.string() if hostname else None,
            cluster_cidrs=_split(cidrs.string()) if cidrs else (),
            masquerade_all=masquerade_all,
            nodeport_addresses=[f.string() for f in nodeports.items()] if nodeports else (),
        )
    except Invalid as error:
        raise ConfigError(f"--config: {path}: {error}") from None


def node_config(flags: NodeFlags, config_file: str | None = None) -> NodeConfig:
    """Validate the node settings; flags override the config file's values."""
    base = read_config_file(config_file) if config_file else NodeFlags()

    def pick(name: str) -> Any:
        given = getattr(flags, name)
        return given if given not in (None, (), []) else getattr(base, name)

    mode_name = pick("mode") or ProxyMode.NFTABLES.value
    try:
        mode = ProxyMode(mode_name)
    except ValueError:
        raise ConfigError(f"--proxy-mode: {mode_name!r} is not nftables or iptables") from None
    hostname = (pick("hostname") or socket.gethostname()).strip().lower()
    try:
        Field(hostname, "--hostname-override").name(DNS1123_SUBDOMAIN, SUBDOMAIN_MAX)
    except Invalid as error:
        raise ConfigError(str(error)) from None
    nodeport_values = [v for value in pick("nodeport_addresses") for v in _split(value)]
    primary = PRIMARY in nodeport_values
    if primary and len(nodeport_values) > 1:
        raise ConfigError(f"--nodeport-addresses: {PRIMARY!r} cannot be combined with CIDRs")
    node_ips = _values("--node-ip", pick("node_ips"), parse_ip)
    if primary and not node_ips:
        raise ConfigError(f"--nodeport-addresses {PRIMARY}: needs the node's address (--node-ip)")
    cidr_values = [v for value in pick("cluster_cidrs") for v in _split(value)]
    return NodeConfig(
        hostname=hostname,
        mode=mode,
        cluster_cidrs=_values("--cluster-cidr", cidr_values, parse_cidr),
        masquerade_all=bool(pick("masquerade_all")),
        nodeport_cidrs=()
        if primary
        else _values("--nodeport-addresses", nodeport_values, parse_cidr),
        nodeport_primary=primary,
        node_ips=node_ips,
        service_cidrs=_values("--service-cidr", pick("service_cidrs"), parse_cidr),
    )
