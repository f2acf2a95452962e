"""The node's rules as ``kpgen run`` keeps them between syncs, so that a change costs in
proportion to itself: the cluster index (kpgen.core.index), each family's service port
plans, and in nftables mode what is loaded, as counts (kpgen.render.delta). A change
re-plans the services it touched, renders the ports whose plan differs (their old plan and
their new one: rendered text is not kept), and loads one transaction made of those pieces.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

from kpgen.core.index import Changes, ClusterIndex, DocKey
from kpgen.core.model import IPFamily, ObjectRef
from kpgen.core.node import NodeConfig, ProxyMode
from kpgen.core.plan import FamilyPlan, PortPlan, family_plan
from kpgen.dataplane.apply import RuleLoader
from kpgen.render.delta import Chains, NftLoaded, iptables_chains, iptables_change
from kpgen.render.text import (
    IptPort,
    NftPort,
    ipt_port_renderer,
    nft_port_renderer,
    render_ipt_port,
    render_ipt_rules,
    render_nft_port,
    render_nft_table,
)


class NodeRules:
    def __init__(self, node: NodeConfig) -> None:
        self.node = node
        self.nft = node.mode is ProxyMode.NFTABLES
        self.index = ClusterIndex(node)
        self.ports: dict[IPFamily, dict[str, PortPlan]] = {}
        self._keys_of: dict[IPFamily, dict[ObjectRef, tuple[str, ...]]] = {}
        self._renderers: dict[IPFamily, Any] = {}
        self._ipt_pieces: dict[IPFamily, dict[str, IptPort]] = {}
        # iptables: the chains of the rules of no port at all as loaded last (the shared
        # chains' own rules)
        self._ipt_rest: dict[IPFamily, Chains] = {}
        self._loaded: dict[IPFamily, NftLoaded] = {}
        # the ports the last sync changed (before, after), for stale UDP conntrack entries
        self._changed: tuple[list[FamilyPlan] | None, list[FamilyPlan]] = (None, [])
        self._last_loaded: list[FamilyPlan] | None = None
        self.health_checks_changed = False

    @property
    def port_count(self) -> int:
        return sum(len(ports) for ports in self.ports.values())

    def update(self, changed: Mapping[DocKey, Any | None]) -> Changes:
        return self.index.update(changed)

    def take(self, changed: dict[DocKey, Any | None]) -> Changes:
        """As :meth:`update`, emptying ``changed`` (:meth:`ClusterIndex.take`)."""
        return self.index.take(changed)

    def rebuild(self) -> None:
        """Everything planned (and rendered) again from the index."""
        families = self.index.families
        self.ports = {f: {p.key: p for p in self.index.all_port_plans(f)} for f in families}
        self._keys_of = {f: {} for f in families}
        for family, ports in self.ports.items():
            keys = self._keys_of[family]
            for key, port in ports.items():  # the dict's key: one string per port, not two
                keys[port.service] = (*keys.get(port.service, ()), key)
        header = {f: family_plan(self.node, f, (), self.index.node_object) for f in families}
        if self.nft:  # the ports' shares are rendered when loaded (and kept as counts only)
            self._renderers = {f: nft_port_renderer(header[f]) for f in families}
        else:
            self._renderers = {f: ipt_port_renderer(header[f]) for f in families}
            self._ipt_pieces = {
                f: {k: render_ipt_port(self._renderers[f], p) for k, p in ports.items()}
                for f, ports in self.ports.items()
            }

    def plans(self) -> list[FamilyPlan]:
        node = self.index.node_object
        return [family_plan(self.node, f, ports.values(), node) for f, ports in self.ports.items()]

    def load(self, loader: RuleLoader) -> None:
        """Load everything whole."""
        plans = self.plans()
        if self.nft:
            tables, loaded = {}, {}
            for plan in plans:
                renderer = self._renderers[plan.family]
                pieces = [render_nft_port(renderer, port) for port in plan.ports]
                tables[plan.family] = render_nft_table(plan, pieces)
                referenced = ("cluster-cidrs",) if plan.cluster_cidrs else ()
                loaded[plan.family] = NftLoaded.of(
                    plan.family.nft_family, renderer, pieces, referenced
                )
            pieces = []  # not kept (nor alive during the load): the counts are
            loader.load_nft(plans, tables)
            self._loaded = loaded
        else:
            self._ipt_rest = {}  # if the load fails, what is loaded is unknown: loaded whole
            loader.full(plans)
            self._ipt_rest = {plan.family: _ipt_rest(plan) for plan in plans}
        self._changed = (self._last_loaded, plans)
        self._last_loaded = plans

    def change(self, services: set[ObjectRef], loader: RuleLoader) -> int | None:
        """Plan the ``services`` again and load what changed; returns the number of lines
        written (None: everything, when iptables needed a full load)."""
        before_all: list[FamilyPlan] = []
        after_all: list[FamilyPlan] = []
        script = []
        cached = False  # whether the transaction makes libnftables copy the kernel's tables
        ipt_shares: dict[IPFamily, list[tuple[IptPort | None, IptPort | None]]] = {}
        self.health_checks_changed = False
        for family, ports in self.ports.items():
            keys_of = self._keys_of[family]
            before: dict[str, PortPlan | None] = {}
            after: dict[str, PortPlan | None] = {}
            for ref in services:
                new = {p.key: p for p in self.index.port_plans(ref, family)}
                for key in keys_of.get(ref, ()):
                    if key not in new:
                        before[key], after[key] = ports.pop(key), None
                for key, port in new.items():
                    old = ports.get(key)
                    if old != port:
                        before[key], after[key] = old, port
                        ports[key] = port
                if new:
                    keys_of[ref] = tuple(new)
                else:
                    keys_of.pop(ref, None)
            changed = [p for p in (*before.values(), *after.values()) if p is not None]
            if any(p.health_check_node_port is not None for p in changed):
                self.health_checks_changed = True
            node = self.index.node_object
            before_all.append(
                family_plan(self.node, family, (p for p in before.values() if p), node)
            )
            after_all.append(family_plan(self.node, family, (p for p in after.values() if p), node))
            if not self.nft:
                renderer, ipt_pieces = self._renderers[family], self._ipt_pieces[family]
                pairs = ipt_shares[family] = []
                for key, wanted in after.items():
                    share = render_ipt_port(renderer, wanted) if wanted is not None else None
                    pairs.append((ipt_pieces.pop(key, None), share))
                    if share is not None:
                        ipt_pieces[key] = share
            if self.nft and after:
                # a port's share as loaded is its old plan rendered again: the same text
                renderer = self._renderers[family]
                shares: dict[str, tuple[NftPort | None, NftPort | None]] = {
                    key: (
                        render_nft_port(renderer, was) if (was := before[key]) else None,
                        render_nft_port(renderer, wanted) if wanted else None,
                    )
                    for key, wanted in after.items()
                }
                text, costly = self._loaded[family].change(shares)
                script.append(text)
                cached |= costly
        self._changed = (before_all, after_all)
        if not self.nft:
            plans = self.plans()
            if any(plan.family not in self._ipt_rest for plan in plans):
                self.load(loader)  # nothing loaded yet (or not known): everything
                return None
            scripts = {}
            for plan in plans:
                rest = _ipt_rest(plan)
                scripts[plan.family] = iptables_change(
                    ipt_shares.get(plan.family, ()),
                    (self._ipt_rest[plan.family], rest),
                    partial(_ipt_rules, plan, self._ipt_pieces[plan.family]),
                )
                self._ipt_rest[plan.family] = rest
            return loader.change_ipt(scripts)
        text = "".join(script)
        if text:
            loader.change_nft(text, cached=cached)
        return text.count("\n")

    def delete_stale(self, loader: RuleLoader) -> int:
        """Delete the elements whose deletion waited (nftables); returns the lines written."""
        script = "".join(loaded.delete_stale() for loaded in self._loaded.values())
        if script:
            loader.change_nft(script, cached=True)
        return script.count("\n")

    def take_changed_ports(self) -> tuple[Sequence[FamilyPlan] | None, Sequence[FamilyPlan]]:
        """The plans of the ports the last sync changed, before and after (after a full load:
        all of them, and those of the full load before; None at the first), once: they are
        let go (after a full load, the old ones would otherwise stay alive beside the new)."""
        changed, self._changed = self._changed, (None, [])
        return changed


def _ipt_rules(plan: FamilyPlan, pieces: Mapping[str, IptPort]) -> str:
    """The iptables rules of ``plan`` assembled from its ports' kept shares."""
    return render_ipt_rules(plan, [pieces[p.key] for p in plan.ports], insert_jumps=())


def _ipt_rest(plan: FamilyPlan) -> Chains:
    """The chains of ``plan``'s iptables rules without any port's share: the shared chains'
    own rules."""
    return iptables_chains(render_ipt_rules(plan, [], insert_jumps=()))
