"""``kpgen explain`` and ``kpgen status``: what the node's rules do with a packet, and what is
loaded.

The answer comes from walking the rules (kpgen/explain/trace.py) as they are written: the very
text ``kpgen apply`` loads, rendered from the manifests, or, with ``--live``, what the kernel
holds, read through kpgen.dataplane (nftables as libnftables JSON, kpgen/explain/nft_json.py;
iptables as iptables-save prints it). Each IP family has its own rules; a packet is walked
through its family's. The answer is never re-derived from the cluster model, so a wrong rule
shows up as a wrong answer. The manifests, when given, only put names on what the rules do:
which service port, ClusterIP or externalIP or LoadBalancer IP, which traffic policy.

The result is a tree of dataclasses (``-o json`` prints it as is) and a text rendering that
fits an 80-column terminal.
"""

from __future__ import annotations

import contextlib
import difflib
import ipaddress
import json
import re
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from fractions import Fraction
from typing import Any

from kpgen.core.model import ClusterState, IPAddress, IPFamily, IPNetwork, Service, hostport
from kpgen.core.names import IPT_PREFIX, NFT_TABLE
from kpgen.core.node import NodeConfig, ProxyMode
from kpgen.core.plan import FamilyPlan, PortPlan, build_plans
from kpgen.dataplane.kernel import (
    NEEDS_ROOT,
    Nft,
    NoPermission,
    has_net_admin,
    iptables_save,
    iptables_tool,
    iptables_variants,
)
from kpgen.dataplane.run import DataplaneError, run
from kpgen.explain.nft_json import read_nft_json
from kpgen.explain.rules import (
    NETWORKS,
    PROTOCOLS,
    Dnat,
    Element,
    ElementSet,
    Match,
    Ruleset,
    RuleSyntaxError,
    Verdict,
    exact_key,
    parse_iptables,
    parse_nft,
    read_iptables_line,
)
from kpgen.explain.trace import Hop, Locality, Packet, Tracer, Walk, percent
from kpgen.render.text import read_node_comment, render_plan

# "a client somewhere outside": TEST-NET-3, and IPv6's documentation prefix
DEFAULT_CLIENTS: dict[IPFamily, IPAddress] = {
    IPFamily.V4: ipaddress.IPv4Address("203.0.113.1"),
    IPFamily.V6: ipaddress.IPv6Address("2001:db8::1"),
}
DEFAULT_CLIENT = DEFAULT_CLIENTS[IPFamily.V4]
DEFAULT_HEALTHZ = "127.0.0.1:10256"


class ExplainError(Exception):
    """What explain cannot do (no rules loaded, a bad argument); the message says why."""


# --- the rules: rendered, or read back from the kernel ------------------------------------------
#
# Each IP family has its rules (nft tables ip and ip6, iptables and ip6tables): a packet's
# family picks the ruleset it is walked through.


def rendered_ruleset(
    state: ClusterState,
    node: NodeConfig,
    plans: Sequence[FamilyPlan] | None = None,
    family: IPFamily = IPFamily.V4,
) -> Ruleset:
    """The ``family`` rules ``kpgen apply`` would load for ``state`` on ``node``, parsed."""
    plans = plans if plans is not None else build_plans(state, node)
    plan = next((p for p in plans if p.family is family), None)
    if plan is None:
        ruleset = Ruleset(node.mode.value, "rendered", family)
        ruleset.notes.append(
            f"kpgen has no {family.value} rules here: no service has an {family.value} ClusterIP"
        )
        return ruleset
    return parse_rules(render_plan(plan, node.mode), node.mode.value, "rendered", family)


def parse_rules(text: str, mode: str, origin: str, family: IPFamily = IPFamily.V4) -> Ruleset:
    """Rule text of either mode: rendered nft text, or iptables-restore / iptables-save."""
    try:
        if mode == ProxyMode.NFTABLES.value:
            return parse_nft(text, origin, family)
        return parse_iptables(text, origin, family)
    except RuleSyntaxError as error:
        source = "rendered" if origin == "rendered" else "loaded"
        raise ExplainError(f"cannot read the {source} {mode} rules: {error}") from None


@dataclass
class Rendered:
    """The rules ``kpgen apply`` would load for the manifests, each family's when asked for."""

    state: ClusterState
    node: NodeConfig
    plans: Sequence[FamilyPlan] | None = None

    def ruleset(self, family: IPFamily) -> Ruleset:
        return rendered_ruleset(self.state, self.node, self.plans, family)

    def where(self, family: IPFamily) -> str | None:
        return None


@dataclass
class Loaded:
    """kpgen's rules of one kind (nftables, or one iptables variant) loaded in this network
    namespace; each family's are read from the kernel when first asked for (nftables as
    libnftables JSON, iptables as iptables-save prints them)."""

    mode: str
    variant: str | None = None  # iptables: nft, legacy
    nft: Nft | None = field(default=None, repr=False)  # nftables: the context that found them
    nft_families: frozenset[IPFamily] = frozenset()  # nftables: those kpgen has a table of
    _read: dict[IPFamily, Ruleset | None] = field(default_factory=dict, repr=False)
    _recorded: dict[str, str] | None = field(default=None, repr=False)

    def recorded(self) -> dict[str, str] | None:
        """The node's name and settings the rules record (``node``, ``cluster-cidr``, ...),
        or None where they record none (rules loaded by a kpgen that did not write them)."""
        for family in self.families():
            self.read(family)
            if self._recorded is not None:
                break
        return self._recorded

    def where(self, family: IPFamily = IPFamily.V4) -> str:
        """``nft table ip kpgen``, ``iptables-nft``, ``ip6tables-legacy``, ..."""
        if self.variant is None:
            return f"nft table {_nft_table(family)}"
        return iptables_tool(self.variant, family)

    def ruleset(self, family: IPFamily = IPFamily.V4) -> Ruleset:
        """The ``family`` rules (none, with a note, where kpgen has none loaded)."""
        found = self.read(family)
        if found is not None:
            return found
        empty = Ruleset(self.mode, "kernel", family)
        empty.notes.append(f"kpgen has no {family.value} rules loaded here ({self.where(family)})")
        return empty

    def families(self) -> list[IPFamily]:
        """The families kpgen has rules of here."""
        return [family for family in IPFamily if self.read(family) is not None]

    def read(self, family: IPFamily) -> Ruleset | None:
        """The ``family`` rules read from the kernel, or None where kpgen has none."""
        if family not in self._read:
            try:
                self._read[family] = self._load(family)
            except NoPermission as error:
                raise ExplainError(str(error)) from None
            except DataplaneError as error:
                raise ExplainError(f"cannot read the {self.mode} rules: {error}") from None
            except RuleSyntaxError as error:
                raise ExplainError(f"cannot read the loaded {self.mode} rules: {error}") from None
        return self._read[family]

    def _load(self, family: IPFamily) -> Ruleset | None:
        if self.nft is not None:
            if family not in self.nft_families:
                return None
            items = self.nft.listing(family)
            for item in items:  # the table's comment (newer nft lists it), or a rule's
                obj = item.get("table") or item.get("rule")
                if self._recorded is None and isinstance(obj, dict):
                    self._recorded = read_node_comment(obj.get("comment"))
            return read_nft_json(items, family)
        assert self.variant is not None
        saved = iptables_save(self.variant, family)
        if self._recorded is None:
            found = _RECORDED.search(saved)
            self._recorded = read_node_comment(found.group(1)) if found else None
        ruleset = parse_iptables(saved, "kernel", family)
        if not any(c.name.startswith(IPT_PREFIX) for c in ruleset.chains.values()):
            return None
        for name, element_set in ruleset.sets.items():
            if name.startswith("recent:"):
                _read_recent(name.removeprefix("recent:"), element_set)
        return ruleset


_RECORDED = re.compile(r'--comment "(rules for kpgen;[^"]*)"')


def _nft_table(family: IPFamily) -> str:
    """``ip kpgen``, ``ip6 kpgen``."""
    return f"{family.nft_family} {NFT_TABLE}"


def loaded_rules(mode: str | None = None, iptables_backend: str = "auto") -> list[Loaded]:
    """kpgen's rules loaded in the current network namespace, per kind (``mode``: only that
    mode's). Reading never creates anything (legacy iptables is read only when its tables
    exist). kpgen always loads IPv4 rules: iptables variants are told by their IPv4 rules."""
    if not has_net_admin():
        raise ExplainError(NEEDS_ROOT)
    found = []
    if mode in (None, ProxyMode.NFTABLES.value):
        try:
            nft = Nft()  # the terse listing of each family's objects: fast at any size
            families = frozenset(f for f in IPFamily if nft.objects(f))
        except DataplaneError as error:
            if isinstance(error, NoPermission):
                raise ExplainError(str(error)) from None
            if mode is not None:
                raise ExplainError(f"cannot read the nftables rules: {error}") from None
            families = frozenset()
        if families:
            found.append(Loaded(ProxyMode.NFTABLES.value, nft=nft, nft_families=families))
    if mode in (None, ProxyMode.IPTABLES.value):
        installed = iptables_variants(IPFamily.V4)
        for variant in installed if iptables_backend == "auto" else (iptables_backend,):
            loaded = Loaded(ProxyMode.IPTABLES.value, variant)
            try:
                if variant in installed and loaded.read(IPFamily.V4) is not None:
                    found.append(loaded)
            except ExplainError as error:
                if mode is not None or NEEDS_ROOT in str(error):
                    raise
    return found


def live_rules(mode: str | None = None, iptables_backend: str = "auto") -> Loaded:
    """The one kind of kpgen's rules loaded here (``mode``, ``iptables_backend``: choose)."""
    found = loaded_rules(mode, iptables_backend)
    if not found:
        wanted = f"{mode} " if mode else ""
        raise ExplainError(f"no kpgen {wanted}rules are loaded in this network namespace")
    if len(found) > 1:
        names = ", ".join(f.where() for f in found)
        raise ExplainError(
            f"kpgen rules of more than one kind are loaded ({names}): "
            "choose with --proxy-mode / --iptables-backend"
        )
    return found[0]


RECENT = "/proc/net/xt_recent"


def _read_recent(name: str, element_set: ElementSet) -> None:
    """The clients an iptables ``recent`` list holds (session affinity), from /proc."""
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        return
    try:
        with open(f"{RECENT}/{name}", encoding="ascii") as stream:
            lines = stream.read().splitlines()
    except OSError:
        return
    for line in lines:
        found = re.match(r"src=(\S+)", line)
        if found:
            address = found.group(1)
            with contextlib.suppress(ValueError):  # not an address: not a client
                element_set.add(Element(address, (address,), ("addr",)))


def live_locality(family: IPFamily = IPFamily.V4) -> Locality:
    """This network namespace's local addresses of ``family``: its ``local`` routes, which is
    what ``fib daddr type local`` and ``-m addrtype --dst-type LOCAL`` look at."""
    unknown = Locality(None, "the local routes could not be read")
    version = "-4" if family is IPFamily.V4 else "-6"
    try:
        result = run(["ip", version, "-j", "route", "show", "table", "local"])
        routes = json.loads(result.stdout or "[]") if result.returncode == 0 else None
        networks = [
            ipaddress.ip_network(route["dst"], strict=False)
            for route in routes or []
            if route.get("type") == "local"
        ]
    except (DataplaneError, ValueError, KeyError, TypeError, AttributeError):
        return unknown
    if routes is None:
        return unknown
    return Locality(networks, "the local routes of this network namespace")


def node_locality(node: NodeConfig, family: IPFamily = IPFamily.V4) -> Locality:
    """What the node flags say about the node's addresses of ``family`` (``--node-ip``)."""
    addresses = [a for a in node.node_ips if IPFamily.of(a) is family]
    if not addresses:
        given = f"no {family.value} --node-ip given" if node.node_ips else "no --node-ip given"
        return Locality(None, given)
    networks: list[IPNetwork] = [ipaddress.ip_network(a) for a in addresses]
    return Locality([*networks, family.loopback], "--node-ip")


# --- what the manifests say: names for what the rules do ----------------------------------------


@dataclass(frozen=True)
class Named:
    """A service port of the manifests, as explain names it."""

    port: PortPlan
    service: Service | None

    @property
    def family(self) -> IPFamily:
        return IPFamily.of(self.port.cluster_ip)


class ServiceIndex:
    """The manifests' service ports of every family, to put names on what the rules do (a
    dual-stack service port has one per family)."""

    def __init__(
        self, state: ClusterState, node: NodeConfig, plans: Sequence[FamilyPlan] | None = None
    ) -> None:
        plans = plans if plans is not None else build_plans(state, node)
        services = {s.ref: s for s in state.services}
        self.ports = [Named(p, services.get(p.service)) for plan in plans for p in plan.ports]
        self._by_key: dict[tuple[IPFamily, str], Named] = {}
        # (address or, for NodePorts, the family), protocol, port
        self._by_address: dict[tuple[object, str, int], list[Named]] = {}
        for named in self.ports:
            p = named.port
            self._by_key.setdefault((named.family, p.key), named)
            self._by_key.setdefault((named.family, p.port_name), named)
            protocol = p.port.protocol.lower
            for address in (p.cluster_ip, *p.external_addresses):
                self._by_address.setdefault((address, protocol, p.port.port), []).append(named)
            if p.port.node_port is not None:
                key = (named.family, protocol, p.port.node_port)
                self._by_address.setdefault(key, []).append(named)

    def by_key(self, key: str, family: IPFamily = IPFamily.V4) -> Named | None:
        """``ns/name/proto/port`` (nft chain names) or ``ns/name:port-name`` (iptables)."""
        return self._by_key.get((family, key))

    def by_address(self, address: IPAddress, protocol: str, port: int) -> list[Named]:
        """The service ports that answer ``address:port`` (or have it as their NodePort)."""
        served = self._by_address.get((address, protocol, port), [])
        node_ports = self._by_address.get((IPFamily.of(address), protocol, port), [])
        return served + [n for n in node_ports if n not in served]

    def of_service(self, ref: str, family: IPFamily | None = None) -> list[Named]:
        return [n for n in self.ports if str(n.port.service) == ref and family in (None, n.family)]


def address_kind(named: Named, address: IPAddress, port: int) -> str:
    """How a packet to ``address:port`` reaches this service port."""
    p = named.port
    if address == p.cluster_ip and port == p.port.port:
        return "ClusterIP"
    if address in p.external_ips and port == p.port.port:
        return "externalIP"
    if address in p.load_balancer_ips and port == p.port.port:
        return "LoadBalancer IP"
    if p.port.node_port == port:
        return "NodePort"
    return "?"


def policy_of(named: Named, kind: str) -> str | None:
    service = named.service
    if service is None:
        return None
    if kind == "ClusterIP":
        text = f"internalTrafficPolicy {service.internal_traffic_policy.value}"
    else:
        text = f"externalTrafficPolicy {service.external_traffic_policy.value}"
    if service.session_affinity.value != "None":
        text += f", sessionAffinity {service.session_affinity.value}"
    if kind == "LoadBalancer IP" and service.load_balancer_source_ranges:
        ranges = ", ".join(str(r) for r in service.load_balancer_source_ranges)
        text += f", loadBalancerSourceRanges {ranges}"
    return text


# --- labels the rules carry: chain names (nft), comments (iptables) ---------------------------

_NFT_PORT_CHAIN = re.compile(
    r"^(?P<kind>service|external|local|firewall)-"
    r"(?P<key>[^/\s]+/[^/\s]+/(?:tcp|udp|sctp)/\d+)$"
)
_COMMENT = re.compile(r'--comment (?:"((?:[^"\\]|\\.)*)"|(\S+))')
_IPT_LABEL = re.compile(
    r"^(?:(?:masquerade |pod |masquerade LOCAL |route LOCAL )traffic for )?"
    r"(?P<key>[^/\s]+/[^:\s]+(?::\S+)?)"
    r"(?P<rest>| cluster IP| external IP| loadbalancer IP| has no endpoints"
    r"| has no local endpoints| source outside loadBalancerSourceRanges| -> \S+"
    r"| external destinations)$"
)


def _comment(text: str) -> str | None:
    found = _COMMENT.search(text)
    if found is None:
        return None
    return found.group(1) if found.group(1) is not None else found.group(2)


@dataclass(frozen=True)
class Labels:
    """What the path's rules say about where the packet went."""

    key: str | None  # ns/name/proto/port or ns/name:port-name
    via: str | None  # ClusterIP, NodePort, external IP, ...
    no_endpoints: bool = False  # rejected: the port has no endpoints
    unknown_port: bool = False  # rejected: a ClusterIP's port that no service has
    unallocated: bool = False  # dropped: an address of the service CIDR no service has
    no_local: bool = False  # dropped: traffic policy Local, no endpoint on this node
    firewalled: bool = False  # dropped: source outside loadBalancerSourceRanges


_VIA_OF_CHAIN = {"service": "ClusterIP", "local": "ClusterIP", "external": "external IP",
                 "firewall": "LoadBalancer IP"}  # fmt: skip


def labels(path: Sequence[Hop]) -> Labels:
    """Names for what a path did, from kpgen's chain names (nft) and comments (iptables)."""
    key = via = None
    flags: set[str] = set()
    for hop in path:
        chain = hop.chain
        found = _NFT_PORT_CHAIN.match(chain)
        if found:
            key = key or found.group("key")
            via = via or _VIA_OF_CHAIN[found.group("kind")]
            if found.group("kind") == "firewall":
                flags.add("visited-firewall")
        if chain.startswith("nat KPGEN-FW-"):
            via = "LoadBalancer IP"
            flags.add("visited-firewall")
        if hop.kind == "rule" and hop.note.startswith("@"):
            via = _via_of_lookup(hop.note, via, flags)
        if chain == "cluster-ips-check" and hop.kind == "rule":
            via = via or "ClusterIP"
            flags.add("unknown_port" if "@cluster-ips" in hop.text else "unallocated")
        if chain == "nat KPGEN-NODEPORTS" and hop.kind == "rule":
            via = "NodePort"
        if hop.kind == "rule":
            key, via = _ipt_labels(hop, key, via, flags)
    return Labels(
        key,
        via,
        no_endpoints="no_endpoints" in flags,
        unknown_port="unknown_port" in flags,
        unallocated="unallocated" in flags,
        no_local="no_local" in flags,
        firewalled="firewalled" in flags,
    )


def _via_of_lookup(note: str, via: str | None, flags: set[str]) -> str | None:
    """What a verdict map's element says (``@map: KEY : VERDICT``)."""
    verdict = note.rsplit(" : ", 1)[-1]
    if note.startswith(("@service-nodeports", "@no-endpoint-nodeports")):
        via = "NodePort"
    elif note.startswith("@service-ips"):
        for kind, name in _VIA_OF_CHAIN.items():
            if verdict.startswith(f"goto {kind}-"):
                via = name
    elif note.startswith("@no-endpoint-services"):
        via = via or "ClusterIP or external IP"
    if note.startswith("@no-endpoint"):
        if verdict == "drop":
            flags.add("firewalled" if "visited-firewall" in flags else "no_local")
        else:
            flags.add("no_endpoints")
    return via


_IPT_FLAGS = {" has no endpoints": "no_endpoints", " has no local endpoints": "no_local",
              " source outside loadBalancerSourceRanges": "firewalled"}  # fmt: skip


def _ipt_labels(
    hop: Hop, key: str | None, via: str | None, flags: set[str]
) -> tuple[str | None, str | None]:
    """What an iptables rule's comment says."""
    comment = _comment(hop.text) or ""
    if comment == "unknown port of a cluster IP":
        flags.add("unknown_port")
        return key, via or "ClusterIP"
    if comment == "unallocated service address":
        flags.add("unallocated")
        return key, via or "ClusterIP"
    label = _IPT_LABEL.match(comment)
    if label is None:
        return key, via
    key = key or label.group("key")
    rest = label.group("rest")
    if rest == " cluster IP" and via is None:
        via = "ClusterIP"
    elif rest == " external IP" and via in (None, "ClusterIP"):
        via = "external IP"
    elif rest == " loadbalancer IP":
        via = "LoadBalancer IP"
    elif rest in _IPT_FLAGS:
        flags.add(_IPT_FLAGS[rest])
        if "--dst-type LOCAL" in hop.text:
            via = "NodePort"
        elif hop.chain.endswith("EXTERNAL-SERVICES"):
            via = via or "external IP"
        else:
            via = via or "ClusterIP"
    return key, via


# --- the answer ----------------------------------------------------------------------------------


@dataclass
class PathStep:
    kind: str
    chain: str
    rule: str
    note: str = ""


@dataclass
class Outcome:
    """One way the connection ends."""

    kind: str  # dnat, untouched, reject, drop, unknown
    probability: float
    fraction: str
    destination: str | None  # after DNAT (address:port)
    masquerade: bool
    masquerade_reasons: list[str]
    delivery: str  # forwarded, local, sent, "" (ended before routing)
    why: str
    path: list[PathStep]

    @property
    def key(self) -> tuple[str, str | None, bool]:
        return (self.kind, self.destination, self.masquerade)


@dataclass
class ServiceMatch:
    service: str | None  # ns/name; None: the rules do not say and no manifests name it
    port_name: str | None
    protocol: str
    port: int | None  # the service port
    via: str  # ClusterIP, NodePort, externalIP, LoadBalancer IP, external IP, ...
    policy: str | None = None


@dataclass
class PacketView:
    src: str
    dst: str
    port: int
    protocol: str
    origin: str  # "another host" or "this node"


@dataclass
class Explanation:
    node: str
    mode: str
    rules: str  # rendered, kernel
    packet: PacketView
    service: ServiceMatch | None
    outcomes: list[Outcome]
    assumptions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    where: str | None = None  # with rules "kernel": where they were read

    def outcome_set(self) -> set[tuple[str, str | None, bool]]:
        return {o.key for o in self.outcomes}


def parse_address(option: str, text: str) -> IPAddress:
    """An IPv4 or IPv6 address given to ``option``; a bad one is an ExplainError."""
    try:
        address = ipaddress.ip_address(text.removeprefix("[").removesuffix("]"))
    except ValueError:
        raise ExplainError(f"{option} {text}: not an IPv4 or IPv6 address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
        raise ExplainError(f"{option} {text}: an address without a zone (%...)")
    return address


def parse_packet(src: str, dst: str, protocol: str) -> Packet:
    """``--src``, ``--dst ADDRESS:PORT`` (an IPv6 address as ``[ADDRESS]:PORT`` or
    ``ADDRESS:PORT``), ``--protocol``; a bad one is an ExplainError."""
    address, colon, port = dst.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise ExplainError(f"--dst {dst}: needs a port 1-65535 (ADDRESS:PORT)")
    source = parse_address("--src", src)
    destination = parse_address("--dst", address)
    if source.version != destination.version:
        raise ExplainError(f"--src {src} / --dst {dst}: addresses of one family (IPv4 or IPv6)")
    if protocol.lower() not in PROTOCOLS or protocol.lower() == "icmp":
        raise ExplainError(f"--protocol {protocol}: tcp, udp or sctp")
    return Packet(source, destination, PROTOCOLS[protocol.lower()], int(port))


def _fraction(value: Fraction) -> str:
    return f"{value.numerator}/{value.denominator}" if value.denominator < 1000 else ""


def _masquerade_reasons(walk: Walk, packet: Packet) -> list[str]:
    reasons: list[str] = []
    for hop in walk.flow.marked_by:
        text, chain = hop.text, hop.chain
        if "@hairpin" in text or chain.startswith("nat KPGEN-SEP-"):
            reason = "hairpin: the endpoint chosen is the client itself"
        elif "@cluster-cidrs" in text or "! -s " in text or "MARK-NONCLUSTER" in text:
            reason = f"to a ClusterIP from {packet.src}, outside the cluster CIDR"
        elif "fib saddr type local" in text or "--src-type LOCAL" in text:
            reason = "from this node to an external address of a Local-policy service"
        elif chain.startswith(("external-", "nat KPGEN-EXT-")):
            reason = "to a NodePort, externalIP or LB IP: always masqueraded"
        elif chain.startswith(("service-", "local-", "nat KPGEN-SVC-", "nat KPGEN-SVL-")):
            reason = "to a ClusterIP, all of which is masqueraded (--masquerade-all)"
        else:
            reason = f"marked by {chain}: {text}"
        if reason not in reasons:
            reasons.append(reason)
    return reasons


def _why(walk: Walk, packet: Packet, found: Labels) -> str:
    flow = walk.flow
    if walk.verdict == "unknown":
        return walk.detail
    if walk.verdict == "reject":
        how = "a TCP reset" if walk.detail == "tcp reset" else "ICMP port unreachable"
        if found.no_endpoints:
            cause = "the service port has no usable endpoints"
        elif found.unknown_port:
            cause = f"the ClusterIP {packet.dst} has no port {packet.port}/{packet.protocol_name}"
        else:
            cause = "a rule rejects it"
        return f"rejected with {how}: {cause}"
    if walk.verdict == "drop":
        if found.unallocated:
            return f"dropped: {packet.dst} is in the service CIDR but no service has it"
        if found.firewalled:
            return f"dropped: {packet.src} is outside the loadBalancerSourceRanges"
        if found.no_local:
            return "dropped: traffic policy Local, and no endpoint on this node"
        return "dropped by a rule"
    where = {"local": "delivered to this node", "forwarded": "forwarded", "sent": "sent"}.get(
        walk.delivery, walk.delivery
    )
    if flow.dnat is None:
        text = f"untouched: no service of kpgen's answers here; {where} as addressed"
    else:
        text = f"DNAT to {hostport(flow.daddr, flow.dport)}, {where}"
    if not flow.masquerade and flow.marked_by and walk.delivery == "local":
        text += " (marked for masquerade, but delivered locally: its source stays)"
    return text


def _outcome(walk: Walk, packet: Packet) -> Outcome:
    flow = walk.flow
    found = labels(flow.hops)
    if walk.verdict == "accept":
        kind = "untouched" if flow.dnat is None else "dnat"
    else:
        kind = walk.verdict
    return Outcome(
        kind=kind,
        probability=float(flow.probability),
        fraction=_fraction(flow.probability),
        destination=None if flow.dnat is None else hostport(*flow.dnat),
        masquerade=flow.masquerade,
        masquerade_reasons=_masquerade_reasons(walk, packet) if flow.masquerade else [],
        delivery=walk.delivery,
        why=_why(walk, packet, found),
        path=[PathStep(h.kind, h.chain, h.text, h.note) for h in flow.hops],
    )


def _service_match(
    walks: list[Walk], packet: Packet, index: ServiceIndex | None, notes: list[str]
) -> ServiceMatch | None:
    found = [labels(w.flow.hops) for w in walks]
    key = next((f.key for f in found if f.key), None)
    via = next((f.via for f in found if f.via), None)
    if key is None and via is None:
        return None
    protocol = packet.protocol_name
    named: Named | None = None
    if index is not None:
        if key is not None:
            named = index.by_key(key, packet.family)
        candidates = index.by_address(packet.dst, protocol, packet.port)
        if named is None and len(candidates) == 1:
            named = candidates[0]
        elif named is not None and candidates and named not in candidates:
            others = ", ".join(c.port.port_name for c in candidates)
            notes.append(
                f"the rules send this packet to {named.port.port_name}, "
                f"but the manifests give {hostport(packet.dst, packet.port)} to {others}"
            )
    if named is not None:
        kind = address_kind(named, packet.dst, packet.port)
        return ServiceMatch(
            service=str(named.port.service),
            port_name=named.port.port.name or None,
            protocol=named.port.port.protocol.lower,
            port=named.port.port.port,
            via=kind if kind != "?" else (via or "?"),
            policy=policy_of(named, kind),
        )
    service = port_name = None
    port = None
    if key is not None and "/" in key:
        if ":" in key:
            service, port_name = key.split(":", 1)
        elif key.count("/") == 3:
            namespace, name, protocol, number = key.split("/")
            service, port = f"{namespace}/{name}", int(number)
        else:
            service = key
    return ServiceMatch(service, port_name, protocol, port, via or "?")


_SERVICE_NETWORKS: dict[int, tuple[Ruleset, list[IPNetwork]]] = {}


def service_networks(ruleset: Ruleset) -> list[IPNetwork]:
    """The addresses the rules give to services (ClusterIPs, externalIPs, LB IPs) and the
    service CIDRs: never the node's own, where that is not known."""
    cached = _SERVICE_NETWORKS.get(id(ruleset))
    if cached is not None and cached[0] is ruleset:
        return cached[1]
    addresses, _ = candidates(ruleset)
    networks: set[IPNetwork] = {ipaddress.ip_network(address) for address, _, _ in addresses}
    for name in ("cluster-ips", "service-cidrs"):
        if name in ruleset.sets:
            for element in ruleset.sets[name].elements:
                if isinstance(element.key[0], NETWORKS):
                    networks.add(element.key[0])
    for chain in ruleset.chains.values():
        if chain.table != "filter" or chain.name not in ("KPGEN-SERVICES", "KPGEN-CLUSTER-IPS"):
            continue
        for rule in chain.rules:
            matches = [m for m in rule.matches if isinstance(m, Match) and not m.negate]
            if any(m.key[0].field == "fib_daddr" for m in matches):
                continue  # NodePorts: the node's addresses
            for match in matches:
                pattern = match.patterns[0] if match.patterns else None
                if match.key[0].field == "daddr" and isinstance(pattern, NETWORKS):
                    networks.add(pattern)
    found = sorted(networks)
    _SERVICE_NETWORKS.clear()  # one ruleset at a time is all a command needs
    _SERVICE_NETWORKS[id(ruleset)] = (ruleset, found)
    return found


def explain_packet(
    ruleset: Ruleset,
    packet: Packet,
    locality: Locality,
    node_name: str,
    index: ServiceIndex | None = None,
) -> Explanation:
    """Every outcome of a new connection of ``packet`` on this node, by walking ``ruleset``
    (the rules of the packet's family)."""
    if ruleset.family is not packet.family:
        raise ExplainError(
            f"an {packet.family.value} packet never meets the {ruleset.family.value} rules"
        )
    if locality.networks is None:  # only then is it guessed what is the node's
        locality.service_networks = service_networks(ruleset)
    tracer = Tracer(ruleset, locality)
    walks = tracer.trace(packet)
    notes = [*ruleset.notes, *tracer.notes]
    outcomes = [_outcome(w, packet) for w in walks]
    outcomes.sort(key=lambda o: (-o.probability, o.kind, o.destination or ""))
    origin = "this node" if tracer.from_node else "another host"
    view = PacketView(str(packet.src), str(packet.dst), packet.port, packet.protocol_name, origin)
    return Explanation(
        node=node_name,
        mode=ruleset.mode,
        rules=ruleset.origin,
        packet=view,
        service=_service_match(walks, packet, index, notes),
        outcomes=outcomes,
        assumptions=list(locality.assumptions),
        notes=notes,
    )


def compare_with_manifests(
    answer: Explanation, state: ClusterState, node: NodeConfig, packet: Packet, locality: Locality
) -> None:
    """Add a note on whether the rules rendered from the manifests (in the mode of the rules
    read from the kernel) would answer the same."""
    config = replace(node, mode=ProxyMode(answer.mode))
    fresh = Locality(locality.networks, locality.source)
    ruleset = rendered_ruleset(state, config, family=packet.family)
    rendered = explain_packet(ruleset, packet, fresh, node.hostname)
    if _outcome_keys(rendered) == _outcome_keys(answer):
        answer.notes.append("the rules rendered from the manifests give the same answer")
        return
    expected = "; ".join(outcome_summary(rendered.outcomes))
    answer.notes.append(
        "the rules loaded here differ from those rendered from the manifests, which give: "
        + expected
    )


def _outcome_keys(answer: Explanation) -> list[tuple[str, str | None, bool, float]]:
    return sorted(
        (o.kind, o.destination, o.masquerade, round(o.probability, 6)) for o in answer.outcomes
    )


# --- a service: every address it answers on, and the endpoints behind each ---------------------


@dataclass
class Share:
    kind: str  # dnat, reject, drop, untouched, unknown
    destination: str | None
    probability: float
    fraction: str
    masquerade: bool


@dataclass
class Entry:
    via: str
    address: str
    port: int
    protocol: str
    port_name: str | None
    policy: str | None
    outcomes: list[Share]


@dataclass
class ServiceExplanation:
    node: str
    mode: str
    rules: str
    service: str
    client: str
    entries: list[Entry]
    assumptions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    where: str | None = None


Addresses = set[tuple[IPAddress, int, int]]
ADDRESSES = (ipaddress.IPv4Address, ipaddress.IPv6Address)


def _names(text: str, service: str) -> bool:
    """Whether an iptables rule's text names ``service`` (namespace/name) in its comment."""
    return any(f"{service}{after}" in text for after in (":", " ", '"'))


def candidates(
    ruleset: Ruleset, service: str | None = None
) -> tuple[Addresses, set[tuple[int, int]]]:
    """Every address . protocol . port and protocol . port (NodePorts) the rules mention; with
    ``service`` (namespace/name), only those of its rules (nft: its chains' map elements and
    the reject and drop ones, which name no chain; iptables: the rules its comments name)."""
    addresses: Addresses = set()
    node_ports: set[tuple[int, int]] = set()
    for element_set in ruleset.sets.values():
        if element_set.kinds not in (("addr", "proto", "port"), ("proto", "port")):
            continue
        for element in element_set.elements:
            target = element.verdict.target if isinstance(element.verdict, Verdict) else None
            if service and target and target != "reject-chain" and f"-{service}/" not in target:
                continue
            if element_set.kinds == ("addr", "proto", "port"):
                network, protocol, port = element.key
                address = exact_key(network)
                if (
                    isinstance(address, ADDRESSES)
                    and isinstance(protocol, int)
                    and isinstance(port, int)
                ):
                    addresses.add((address, protocol, port))
            elif element_set.is_map:
                protocol, port = element.key
                if isinstance(protocol, int) and isinstance(port, int):
                    node_ports.add((protocol, port))
    for chain in ruleset.chains.values():
        if chain.reader is not read_iptables_line:
            continue  # nft rules name no service address that the maps do not
        sources = chain.sources
        if service is not None:
            sources = [text for text in sources if _names(text, service)]
        for text in sources:
            rule = read_iptables_line(chain.name, text)
            found: dict[str, Any] = {}
            for match in rule.matches:
                if isinstance(match, Match) and match.patterns and not match.negate:
                    found[match.key[0].field] = match.patterns[0]
            if "dport" not in found or "l4proto" not in found:
                continue
            daddr = exact_key(found["daddr"]) if "daddr" in found else None
            if isinstance(daddr, ADDRESSES) and "fib_daddr" not in found:
                addresses.add((daddr, found["l4proto"], found["dport"]))
            elif isinstance(found["dport"], int):
                node_ports.add((found["l4proto"], found["dport"]))
    return addresses, node_ports


def service_names(ruleset: Ruleset) -> set[str]:
    """The services (namespace/name) the rules name: nft's chain names (a service port
    without endpoints has none), iptables' comments."""
    found: set[str] = set()
    for chain in ruleset.chains.values():
        named = _NFT_PORT_CHAIN.match(chain.name)
        if named is not None:
            found.add("/".join(named.group("key").split("/")[:2]))
        for rule in chain.rules:
            label = _IPT_LABEL.match(rule.comment or "")
            if label is not None:
                found.add(label.group("key").split(":")[0])
    return found


def check_service(ref: str, known: set[str], where: str, rules_name_all: bool = True) -> None:
    """An ExplainError naming ``ref`` and the services of ``known`` close to it, unless it is
    one of them; ``where`` says where it was looked for."""
    if ref in known:
        return
    message = f"--service {ref}: no such service {where}"
    close = difflib.get_close_matches(ref, sorted(known), n=3, cutoff=0.75)
    name = ref.rpartition("/")[2]  # the right name in another namespace
    close += [k for k in sorted(known) if k.rpartition("/")[2] == name and k not in close]
    if close:
        message += "; did you mean " + " or ".join(close) + "?"
    elif known:
        message += f" ({len(known)} service{'s' if len(known) != 1 else ''} there)"
    if not rules_name_all:
        message += (
            "; nftables rules do not name a service without endpoints: give -f MANIFESTS or "
            "--kubeconfig FILE to look for it there"
        )
    raise ExplainError(message)


def explain_service(
    ruleset: Ruleset,
    ref: str,
    locality: Locality,
    node_name: str,
    index: ServiceIndex | None = None,
    client: IPAddress = DEFAULT_CLIENT,
    others: Sequence[Ruleset] = (),
) -> ServiceExplanation:
    """Every address:port of ``ruleset``'s family on which service ``ref`` (namespace/name)
    answers on this node, and the outcomes (endpoints with their probabilities) behind each,
    traced from ``client``. ``others``: the other families' rules, to say that the service
    answers there too."""
    notes = list(ruleset.notes)
    addresses, node_ports = candidates(ruleset, ref)
    named_ports = index.of_service(ref, ruleset.family) if index is not None else []
    for named in named_ports:
        protocol = PROTOCOLS[named.port.port.protocol.lower]
        for address in (named.port.cluster_ip, *named.port.external_addresses):
            if IPFamily.of(address) is ruleset.family:
                addresses.add((address, protocol, named.port.port.port))
        if named.port.port.node_port is not None:
            node_ports.add((protocol, named.port.port.node_port))
    node_addresses = locality.addresses
    if node_ports and not node_addresses:
        notes.append(
            "NodePorts are not traced: which addresses are this node's is not known "
            "(give --node-ip, or use --live)"
        )
    packets = [Packet(client, a, proto, port) for a, proto, port in sorted(addresses)]
    packets += [
        Packet(client, a, proto, port) for proto, port in sorted(node_ports) for a in node_addresses
    ]
    entries: list[Entry] = []
    combined = Locality(locality.networks, locality.source)
    for packet in packets:
        fresh = Locality(locality.networks, locality.source)
        explanation = explain_packet(ruleset, packet, fresh, node_name, index)
        match = explanation.service
        named_here = [
            n
            for n in named_ports
            if address_kind(n, packet.dst, packet.port) != "?"
            and n.port.port.protocol.lower == packet.protocol_name
        ]
        ours = match is not None and match.service == ref
        if not ours and not named_here:
            continue
        if not ours and all(o.kind == "untouched" for o in explanation.outcomes):
            kinds = {address_kind(n, packet.dst, packet.port) for n in named_here}
            if kinds == {"NodePort"}:
                continue  # a node address that --nodeport-addresses leaves out
        combined.absorb(fresh)
        via = match.via if match is not None and ours else "?"
        port_name = match.port_name if match is not None and ours else None
        policy = match.policy if match is not None and ours else None
        if named_here:
            via = address_kind(named_here[0], packet.dst, packet.port)
            port_name = named_here[0].port.port.name or None
            policy = policy_of(named_here[0], via)
        entries.append(
            Entry(
                via,
                str(packet.dst),
                packet.port,
                packet.protocol_name,
                port_name,
                policy,
                _shares(explanation.outcomes),
            )
        )
    order = {"ClusterIP": 0, "externalIP": 1, "LoadBalancer IP": 2, "external IP": 3}
    entries.sort(
        key=lambda e: (order.get(e.via, 5), e.port, ipaddress.ip_address(e.address), e.protocol)
    )
    for other in others:
        if any(candidates(other, ref)):
            family = other.family.value
            notes.append(f"{ref} has {family} addresses too: trace them with an {family} --src")
    return ServiceExplanation(
        node=node_name,
        mode=ruleset.mode,
        rules=ruleset.origin,
        service=ref,
        client=str(client),
        entries=entries,
        assumptions=combined.assumptions,
        notes=notes,
    )


def _shares(outcomes: list[Outcome]) -> list[Share]:
    grouped: dict[tuple[str, str | None, bool], Fraction] = {}
    for outcome in outcomes:
        exact = Fraction(outcome.fraction) if outcome.fraction else Fraction(outcome.probability)
        grouped[outcome.key] = grouped.get(outcome.key, Fraction(0)) + exact
    shares = [
        Share(kind, destination, float(p), _fraction(p), masquerade)
        for (kind, destination, masquerade), p in grouped.items()
    ]
    return sorted(shares, key=lambda s: (-s.probability, s.destination or ""))


# --- kpgen status --------------------------------------------------------------------------------


@dataclass
class Health:
    address: str
    reachable: bool
    code: int | None = None
    healthy: bool | None = None
    last_updated: str | None = None
    current_time: str | None = None
    error: str | None = None
    refused: bool = False  # nothing listens there: no kpgen run on this node


@dataclass
class Counts:
    services: int  # with endpoints
    service_ports: int  # with endpoints
    endpoints: int  # endpoint . port DNAT targets, summed over the service ports
    addresses: int  # address . protocol . port entries that DNAT
    node_ports: int
    rejected: int  # entries that reject (no endpoints)


@dataclass
class Status:
    mode: str | None
    rules: str | None  # where they were found
    counts: Counts | None
    health: Health
    problems: list[str] = field(default_factory=list)
    node: str | None = None  # the node the rules were made for, as they record it
    settings: dict[str, str] = field(default_factory=dict)  # the other settings they record
    unreadable: str | None = None  # why the rules could not be read (not root)

    @property
    def controller(self) -> bool:
        """Whether a ``kpgen run`` answers /healthz here."""
        return not self.health.refused

    @property
    def ok(self) -> bool:
        """Rules are loaded (of one mode), and kpgen run says it is healthy or none runs (the
        rules of ``kpgen apply``, which stay as loaded)."""
        healthy = bool(self.health.healthy) or not self.controller
        return self.counts is not None and healthy and not self.problems


def health(address: str = DEFAULT_HEALTHZ, timeout: float = 3.0) -> Health:
    """GET /healthz of a running ``kpgen run``."""
    host, _, port = address.rpartition(":")
    host = f"[{host.strip('[]')}]" if ":" in host.strip("[]") else host
    url = f"http://{host}:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            code, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        code, body = error.code, error.read()
    except (OSError, ValueError) as error:
        reason = getattr(error, "reason", error)
        refused = isinstance(reason, ConnectionRefusedError)
        return Health(address, False, error=f"{url}: {reason}", refused=refused)
    try:
        data = json.loads(body)
    except ValueError:
        return Health(address, True, code, False, error=f"{url}: not kube-proxy's JSON")
    return Health(
        address,
        True,
        code,
        bool(data.get("healthy", code == 200)),
        data.get("lastUpdated") or None,
        data.get("currentTime") or None,
    )


_REJECT_CHAIN = Verdict("goto", "reject-chain")


def count(*rulesets: Ruleset) -> Counts:
    """How much of kpgen's layout the rules hold (docs/design.md), read into the model;
    service ports, endpoints and addresses summed over the families' rulesets."""
    services: set[str] = set()  # namespace/name
    total = Counts(0, 0, 0, 0, 0, 0)
    for ruleset in rulesets:
        if ruleset.mode == ProxyMode.NFTABLES.value:
            _count_nft(ruleset, services, total)
        else:
            _count_iptables(ruleset, services, total)
    total.services = len(services)
    return total


def _count_nft(ruleset: Ruleset, services: set[str], total: Counts) -> None:
    targets: dict[str, set[Dnat]] = {}  # service port -> its endpoints
    for chain in ruleset.chains.values():
        found = _NFT_PORT_CHAIN.match(chain.name)
        if found is None:
            continue
        key = found.group("key")
        if found.group("kind") == "service":
            total.service_ports += 1
            services.add("/".join(key.split("/")[:2]))
        dnats = {s for rule in chain.rules for s in rule.statements if isinstance(s, Dnat)}
        targets.setdefault(key, set()).update(dnats)
    total.endpoints += sum(len(found) for found in targets.values())
    maps = ruleset.sets
    total.addresses += len(maps["service-ips"].elements) if "service-ips" in maps else 0
    total.node_ports += (
        len(maps["service-nodeports"].elements) if "service-nodeports" in maps else 0
    )
    for name in ("no-endpoint-services", "no-endpoint-nodeports"):
        elements = maps[name].elements if name in maps else []
        total.rejected += sum(e.verdict == _REJECT_CHAIN for e in elements)


def _count_iptables(ruleset: Ruleset, services: set[str], total: Counts) -> None:
    for chain in ruleset.chains.values():
        if chain.name.startswith(f"{IPT_PREFIX}SVC-"):
            total.service_ports += 1
        elif chain.name.startswith(f"{IPT_PREFIX}SEP-"):
            total.endpoints += 1
        entry = chain.table == "nat" and chain.name in (
            f"{IPT_PREFIX}SERVICES",
            f"{IPT_PREFIX}NODEPORTS",
        )
        if not entry and chain.table != "filter":
            continue  # the rules of the other chains are not counted: not read
        for rule in chain.rules:
            label = _IPT_LABEL.match(rule.comment or "")
            if label is None:
                continue
            if chain.table == "nat" and chain.name == f"{IPT_PREFIX}SERVICES":
                services.add(label.group("key").split(":")[0])
                total.addresses += 1
            elif chain.table == "nat":
                total.node_ports += 1
            elif label.group("rest") == " has no endpoints":
                total.rejected += 1


def status(healthz: str = DEFAULT_HEALTHZ, iptables_backend: str = "auto") -> Status:
    """What kpgen has loaded in this network namespace (every family), and how ``kpgen run``
    is doing."""
    problems = []
    mode = rules = unreadable = None
    counts = None
    recorded: dict[str, str] = {}
    try:
        found = loaded_rules(None, iptables_backend)
        if len(found) > 1:
            problems.append(
                "rules of both modes are loaded: " + ", ".join(f.where() for f in found)
            )
        if found:
            first = found[0]
            families = first.families()
            mode, rules = first.mode, ", ".join(first.where(f) for f in families)
            counts = count(*(first.ruleset(f) for f in families))
            recorded = dict(first.recorded() or {})
        else:
            problems.append("no kpgen rules are loaded in this network namespace")
    except ExplainError as error:
        if NEEDS_ROOT in str(error):
            unreadable = str(error)
        else:
            problems.append(str(error))
    state = health(healthz)
    node = recorded.pop("node", None)
    return Status(mode, rules, counts, state, problems, node, recorded, unreadable)


# --- output -------------------------------------------------------------------------------------


def to_json(value: Any) -> str:
    """An explanation, service explanation or status as JSON (the dataclass tree)."""
    return json.dumps(asdict(value), indent=2)


def outcome_line(outcome: Outcome | Share) -> str:
    """``DNAT to 10.0.0.1:80, masqueraded``, ``rejected``, ..."""
    if outcome.kind == "dnat":
        masqueraded = ", masqueraded" if outcome.masquerade else ", not masqueraded"
        return f"DNAT to {outcome.destination}{masqueraded}"
    words = {"untouched": "untouched", "reject": "rejected", "drop": "dropped"}
    return words.get(outcome.kind, "cannot tell")


def outcome_summary(outcomes: Sequence[Outcome]) -> list[str]:
    """One line per outcome (for comparing two explanations)."""
    return [f"{percent(o.probability)} {outcome_line(o)}" for o in outcomes]
