"""The plan spelled out as rule text, through the jinja2 templates in ``templates/``.

Rendering is a pure function: the same cluster state and node settings give byte-identical
text. Only validated, typed values reach the templates (addresses, ports, enums and names that
passed the API's own name rules), so no rule text is ever built from an unchecked string.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from importlib.resources import files
from pathlib import Path
from typing import Any

import jinja2

from kpgen.core import names
from kpgen.core.model import ClusterState, IPAddress, IPFamily, hostport
from kpgen.core.node import NodeConfig, ProxyMode
from kpgen.core.plan import Backend, FamilyPlan, PortPlan, build_plans

TEMPLATES = {ProxyMode.NFTABLES: "nftables.nft.j2", ProxyMode.IPTABLES: "iptables.rules.j2"}


@dataclass(frozen=True)
class IptablesJump:
    """A rule in a built-in chain that leads into kpgen's chains."""

    table: str
    chain: str
    spec: str

    @property
    def insert_rule(self) -> str:
        return f"-I {self.chain} {self.spec}"


def _jump(
    table: str, chain: str, comment: str, target: str, new_only: bool = False
) -> IptablesJump:
    state = "-m conntrack --ctstate NEW " if new_only else ""
    spec = f'{state}-m comment --comment "{comment}" -j {names.IPT_PREFIX}{target}'
    return IptablesJump(table, chain, spec)


IPTABLES_JUMPS = (
    _jump("nat", "PREROUTING", "kpgen service portals", "SERVICES"),
    _jump("nat", "OUTPUT", "kpgen service portals", "SERVICES"),
    _jump("nat", "POSTROUTING", "kpgen postrouting rules", "POSTROUTING"),
    _jump("filter", "INPUT", "kpgen external services", "EXTERNAL-SERVICES", new_only=True),
    _jump("filter", "FORWARD", "kpgen service portals", "SERVICES", new_only=True),
    _jump("filter", "FORWARD", "kpgen external services", "EXTERNAL-SERVICES", new_only=True),
    _jump("filter", "OUTPUT", "kpgen service portals", "SERVICES", new_only=True),
    _jump("filter", "OUTPUT", "kpgen external services", "EXTERNAL-SERVICES", new_only=True),
)


# The node's name and settings, recorded in the rules for ``kpgen status`` and ``kpgen explain
# --live`` to read back: "rules for kpgen; node=k8s-worker01; cluster-cidr=192.168.0.0/16".
# nft keeps at most 128 characters of a comment; settings that do not fit are left out.
NODE_COMMENT = "rules for kpgen"
NODE_COMMENT_MAX = 128


def node_comment(plan: FamilyPlan) -> str:
    """What the rules record of the node they were made for (a comment's text)."""
    settings = [("node", plan.node_name)]
    settings.append(("cluster-cidr", ",".join(str(n) for n in plan.cluster_cidrs)))
    settings.append(("masquerade-all", "true" if plan.masquerade_all else ""))
    if plan.nodeport_networks is not None:
        addresses = ",".join(str(n) for n in plan.nodeport_networks)
        settings.append(("nodeport-addresses", addresses or "none"))
    settings.append(("service-cidr", ",".join(str(n) for n in plan.service_cidrs)))
    text = NODE_COMMENT
    for key, value in settings:
        value = "".join(c for c in value if c.isprintable() and c not in '"\\;=')
        if not value:
            continue
        item = f"; {key}={value}"
        if len(text) + len(item) > NODE_COMMENT_MAX:
            break
        text += item
    return text


def read_node_comment(comment: str | None) -> dict[str, str] | None:
    """The settings a comment made by :func:`node_comment` records (``node``, ...), or None
    when ``comment`` is not one (rules made before kpgen recorded them: no ``node``)."""
    if not comment or not comment.startswith(f"{NODE_COMMENT};"):
        return None
    found = {}
    for item in comment.split(";")[1:]:
        key, equals, value = item.strip().partition("=")
        if equals and key and value:
            found[key] = value
    return found if "node" in found else None


def _host(address: IPAddress) -> str:
    """An address as a one-host network (``10.0.0.1/32``), as iptables writes it."""
    return f"{address}/{address.max_prefixlen}"


def _hostport(backend: Backend) -> str:
    return hostport(backend.host, backend.port)


def _hairpin(backend: Backend) -> str:
    return f"{backend.host} . {backend.host}"


CHECKOUT_TEMPLATES = Path(__file__).resolve().parents[2] / "templates"


def _load_template(name: str) -> str:
    try:
        return files("kpgen.templates").joinpath(name).read_text(encoding="utf-8")
    except ModuleNotFoundError:  # run from a checkout, not installed: the tree's templates/
        if not (CHECKOUT_TEMPLATES / name).is_file():
            raise
        return (CHECKOUT_TEMPLATES / name).read_text(encoding="utf-8")


@cache
def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FunctionLoader(_load_template),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        undefined=jinja2.StrictUndefined,
        autoescape=False,
        extensions=["jinja2.ext.do"],
    )
    # filters, not globals, where a template calls them for every port: jinja calls a filter
    # directly, a global through its context (Context.call), several times slower
    env.filters.update(
        host=_host,
        hostport=_hostport,
        hairpin=_hairpin,
        nft_chain=lambda port, kind: names.nft_chain(kind, port),
        nft_affinity_set=names.nft_affinity_set,
    )
    env.globals.update(
        ipt_chain=names.ipt_chain,
        table=names.NFT_TABLE,
        prefix=names.IPT_PREFIX,
        node_comment=node_comment,
    )
    return env


@dataclass(frozen=True)
class NftPort:
    """One service port's share of the nftables tables, rendered on its own by
    templates/nftables.port.j2: its elements of the shared sets and maps (``(container,
    element)`` pairs, in the table's order), its own sets and chains as they stand in its
    shard table (empty for a port without endpoints), and that table's number."""

    elements: tuple[tuple[str, str], ...]
    objects: str
    shard: int

    @property
    def in_shard(self) -> bool:
        """Whether the port has anything in its shard table (a shard table exists while one
        of its ports does)."""
        return bool(self.objects) or any(c in NFT_SHARD_CONTAINERS for c, _ in self.elements)


# The shared sets and maps that service ports put elements into, in the table's order; the
# ones whose elements several ports may share (an endpoint of two ports, a ClusterIP of a
# multi-port service) are listed once, ordered by address. The dispatch maps are in each
# shard table (the port's), the others in the node-wide table.
NFT_CONTAINERS = (
    "cluster-ips",
    "hairpin-endpoints",
    "service-ips",
    "service-nodeports",
    "no-endpoint-services",
    "no-endpoint-nodeports",
)
NFT_SHARED = frozenset({"cluster-ips", "hairpin-endpoints"})
NFT_SHARD_CONTAINERS = frozenset({"service-ips", "service-nodeports"})
NFT_NODE_CONTAINERS = tuple(name for name in NFT_CONTAINERS if name not in NFT_SHARD_CONTAINERS)
_CONTAINER_NAMES = {name: name for name in NFT_CONTAINERS}


def element_order(element: str) -> tuple[int, bytes]:
    """The order of elements by their (first) address: IPv4 before IPv6, then numeric. The
    address was rendered from a parsed one: inet_pton reads it, faster than ipaddress."""
    address = element.split(" ", 1)[0]
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    return (family == socket.AF_INET6, socket.inet_pton(family, address))


def nft_port_renderer(plan: FamilyPlan) -> Any:
    """The port macros of templates/nftables.port.j2 for ``plan``'s node-wide settings (its
    ports are not read)."""
    return _environment().get_template("nftables.port.j2").make_module({"plan": plan})


def render_nft_port(renderer: Any, port: PortPlan) -> NftPort:
    """One service port's share of the tables, through ``renderer`` (:func:`nft_port_renderer`)."""
    lines = str(renderer.elements(port)).splitlines()
    # the container names are the constants (one string each, not one per element)
    pairs = tuple(
        (_CONTAINER_NAMES[line[: line.index(" ")]], line[line.index(" ") + 1 :]) for line in lines
    )
    return NftPort(pairs, str(renderer.objects(port)), names.nft_shard(str(port.service)))


def nft_elements(
    ports: Iterable[NftPort], containers: Iterable[str] = NFT_CONTAINERS, *, keyed: bool = False
) -> dict[str, list[Any]]:
    """The elements of the shared sets and maps (``containers``), from the ports' shares, in
    the table's order; those several ports may share (:data:`NFT_SHARED`) each once, by
    address, as ``(order, element)`` pairs when ``keyed`` (:func:`element_order`: two sorted
    lists of pairs merge without computing it again)."""
    found: dict[str, list[Any]] = {name: [] for name in containers}
    for port in ports:
        for container, element in port.elements:
            if container in found:
                found[container].append(element)
    for name in NFT_SHARED & found.keys():
        pairs = sorted({(element_order(element), element) for element in found[name]})
        found[name] = pairs if keyed else [element for _, element in pairs]
    return found


def nft_shard_tables(plan: FamilyPlan, ports: Sequence[NftPort]) -> dict[int, str]:
    """The shard tables of these service ports (in plan order), each whole, by number."""
    renderer = nft_port_renderer(plan)
    by_shard: dict[int, list[NftPort]] = {}
    for port in ports:
        if port.in_shard:
            by_shard.setdefault(port.shard, []).append(port)
    return {
        shard: str(
            renderer.shard(
                names.nft_shard_table(shard),
                nft_elements(by_shard[shard], NFT_SHARD_CONTAINERS),
                [port.objects for port in by_shard[shard] if port.objects],
            )
        )
        for shard in sorted(by_shard)
    }


def render_nft_tables(
    plan: FamilyPlan, elements_of: Mapping[str, Sequence[str]], shard_tables: Mapping[int, str]
) -> str:
    """The family's nftables tables: the node-wide one with these elements of its sets and
    maps (:data:`NFT_NODE_CONTAINERS`), then the shard tables in order."""
    template = _environment().get_template(TEMPLATES[ProxyMode.NFTABLES])
    shards = [shard_tables[shard] for shard in sorted(shard_tables)]
    return template.render(plan=plan, elements_of=elements_of, shards=shards)


def render_nft_table(plan: FamilyPlan, ports: Sequence[NftPort]) -> str:
    """The family's nftables tables (the node-wide one, then the shard tables in order),
    assembled from its service ports' shares."""
    elements_of = nft_elements(ports, NFT_NODE_CONTAINERS)
    return render_nft_tables(plan, elements_of, nft_shard_tables(plan, ports))


@dataclass(frozen=True)
class IptPort:
    """One service port's share of the iptables rules, rendered on its own by
    templates/iptables.port.j2: the chains it declares, its nat and its filter rules."""

    served: bool
    chains: str
    nat: str
    filter: str


def ipt_port_renderer(plan: FamilyPlan) -> Any:
    """The port macros of templates/iptables.port.j2 for ``plan``'s node-wide settings."""
    return _environment().get_template("iptables.port.j2").make_module({"plan": plan})


def render_ipt_port(renderer: Any, port: PortPlan) -> IptPort:
    return IptPort(
        port.has_endpoints,
        str(renderer.chains(port)),
        str(renderer.nat(port)),
        str(renderer.filter(port)),
    )


def render_ipt_rules(
    plan: FamilyPlan,
    ports: Sequence[IptPort],
    *,
    insert_jumps: tuple[IptablesJump, ...] = IPTABLES_JUMPS,
    delete_chains: Mapping[str, tuple[str, ...]] | None = None,
) -> str:
    """The family's iptables-restore input, assembled from its service ports' shares (see
    :func:`render_plan` for ``insert_jumps`` and ``delete_chains``)."""
    template = _environment().get_template(TEMPLATES[ProxyMode.IPTABLES])
    return template.render(
        plan=plan, pieces=ports, insert_jumps=insert_jumps, delete_chains=delete_chains or {}
    )


def render_plan(
    plan: FamilyPlan,
    mode: ProxyMode,
    *,
    insert_jumps: tuple[IptablesJump, ...] = IPTABLES_JUMPS,
    delete_chains: Mapping[str, tuple[str, ...]] | None = None,
) -> str:
    """One family's rules: an nft table, or iptables-restore input.

    For iptables, ``insert_jumps`` are the jumps from built-in chains to insert (all of them
    for a fresh ruleset; an applier passes only the missing ones) and ``delete_chains`` the
    stale chains of ours, per table, to flush and delete. Chain names must be validated by
    the caller (:func:`kpgen.core.names.is_ipt_chain`).
    """
    if mode is ProxyMode.NFTABLES:
        renderer = nft_port_renderer(plan)
        return render_nft_table(plan, [render_nft_port(renderer, p) for p in plan.ports])
    renderer = ipt_port_renderer(plan)
    pieces = [render_ipt_port(renderer, p) for p in plan.ports]
    return render_ipt_rules(plan, pieces, insert_jumps=insert_jumps, delete_chains=delete_chains)


def render(state: ClusterState, node: NodeConfig) -> str:
    """The node's rules in its proxy mode, every family's in turn (iptables: the IPv6 part is
    ip6tables-restore input, headed by a comment saying so)."""
    parts = []
    for plan in build_plans(state, node):
        if node.mode is ProxyMode.IPTABLES and plan.family is IPFamily.V6:
            parts.append("# ip6tables-restore input (IPv6)\n")
        parts.append(render_plan(plan, node.mode))
    return "".join(parts)
