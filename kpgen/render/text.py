"""The plan spelled out as rule text, through the jinja2 templates in ``templates/``.

Rendering is a pure function: the same cluster state and node settings give byte-identical
text. Only validated, typed values reach the templates (addresses, ports, enums and names that
passed the API's own name rules), so no rule text is ever built from an unchecked string.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

import jinja2

from kpgen.core import names
from kpgen.core.model import ClusterState, IPAddress, IPFamily
from kpgen.core.node import NodeConfig, ProxyMode
from kpgen.core.plan import FamilyPlan, build_plans

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


def _host(address: IPAddress) -> str:
    """An address as a one-host network (``10.0.0.1/32``), as iptables writes it."""
    return f"{address}/{address.max_prefixlen}"


def _hostport(address: IPAddress, port: int) -> str:
    return f"{address}:{port}" if address.version == 4 else f"[{address}]:{port}"


def _hairpin(address: IPAddress) -> str:
    return f"{address} . {address}"


def _load_template(name: str) -> str:
    return files("kpgen.templates").joinpath(name).read_text(encoding="utf-8")


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
    env.filters.update(host=_host, hostport=_hostport, hairpin=_hairpin)
    env.globals.update(
        nft_chain=names.nft_chain,
        nft_affinity_set=names.nft_affinity_set,
        ipt_chain=names.ipt_chain,
        table=names.NFT_TABLE,
        prefix=names.IPT_PREFIX,
    )
    return env


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
    template = _environment().get_template(TEMPLATES[mode])
    return template.render(plan=plan, insert_jumps=insert_jumps, delete_chains=delete_chains or {})


def render(state: ClusterState, node: NodeConfig) -> str:
    """The node's rules in its proxy mode, every family's in turn (iptables: the IPv6 part is
    ip6tables-restore input, headed by a comment saying so)."""
    parts = []
    for plan in build_plans(state, node):
        if node.mode is ProxyMode.IPTABLES and plan.family is IPFamily.V6:
            parts.append("# ip6tables-restore input (IPv6)\n")
        parts.append(render_plan(plan, node.mode))
    return "".join(parts)
