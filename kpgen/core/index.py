"""The cluster as the controller knows it, changed one object at a time.

:class:`ClusterIndex` takes decoded objects as they change (a watch event, a file) and keeps
them parsed, joined and free of conflicts, so that a change costs in proportion to itself: it
answers which services a change touched, and the plan of just those (:meth:`port_plans`).
Planning everything from an index gives exactly what :func:`kpgen.core.plan.build_plans`
gives for the same objects (tests/test_index.py checks it on random sequences of changes).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kpgen.core.model import EndpointSlice, IPFamily, Node, ObjectRef, Service
from kpgen.core.node import NodeConfig
from kpgen.core.parse import (
    Claim,
    Outcome,
    Problem,
    parse_object,
    resolve_conflicts,
    service_claims,
)
from kpgen.core.plan import PortPlan, service_port_plans

DocKey = tuple[str, str, str]
"""(kind, namespace, name) of a document: what identifies it in a store."""


@dataclass
class Changes:
    """What an update did: the services whose rules may differ, whether the node's own
    settings did (its Node object, or the IP families served: everything must be planned
    again), and what was wrong with the objects that changed."""

    services: set[ObjectRef] = field(default_factory=set)
    node_wide: bool = False
    problems: list[Problem | str] = field(default_factory=list)


class ClusterIndex:
    """Services (after conflicts), their EndpointSlices and this node's Node object."""

    def __init__(self, node: NodeConfig) -> None:
        self.node = node
        self._outcomes: dict[DocKey, Outcome] = {}
        self._parsed: dict[ObjectRef, Service] = {}  # every valid Service
        self.services: dict[ObjectRef, Service] = {}  # those kept after conflicts
        self._slices: dict[ObjectRef, EndpointSlice] = {}
        self._slices_of: defaultdict[ObjectRef, dict[ObjectRef, EndpointSlice]] = defaultdict(dict)
        self._claimants: defaultdict[Claim, set[ObjectRef]] = defaultdict(set)
        self._claims: dict[ObjectRef, set[Claim]] = {}
        self._ipv6 = 0  # kept services with an IPv6 ClusterIP
        self.node_object: Node | None = None

    @property
    def families(self) -> tuple[IPFamily, ...]:
        """As :func:`kpgen.core.plan.families`: IPv6 once a service has an IPv6 ClusterIP."""
        return (IPFamily.V4, IPFamily.V6) if self._ipv6 else (IPFamily.V4,)

    def update(self, changes: Mapping[DocKey, Any | None]) -> Changes:
        """Take the new version of each changed document (None: deleted)."""
        return self.take(dict(changes))

    def take(self, changes: dict[DocKey, Any | None]) -> Changes:
        """As :meth:`update`, emptying ``changes``: each document is dropped once parsed, so
        that the decoded objects of a first list are never all alive beside their parsed
        form (at 10,000 services the process kept 45 MB more, in the holes they left)."""
        result = Changes()
        families = self.families
        touched: set[ObjectRef] = set()  # services whose own object changed
        for key in list(changes):
            doc = changes.pop(key)
            old = self._outcomes.pop(key, None)
            new = parse_object(doc) if doc is not None else None
            del doc
            if new is not None:
                self._outcomes[key] = new
                if isinstance(new, Problem):
                    result.problems.append(new)
            for outcome, adding in ((old, False), (new, True)):
                if isinstance(outcome, Service):
                    touched.add(outcome.ref)
                    if adding:
                        self._parsed[outcome.ref] = outcome
                    elif self._parsed.get(outcome.ref) is outcome:
                        del self._parsed[outcome.ref]
                elif isinstance(outcome, EndpointSlice):
                    result.services.add(outcome.service)
                    mine = self._slices_of[outcome.service]
                    if adding:
                        self._slices[outcome.ref] = mine[outcome.ref] = outcome
                    elif self._slices.get(outcome.ref) is outcome:
                        del self._slices[outcome.ref], mine[outcome.ref]
                        if not mine:
                            del self._slices_of[outcome.service]
                elif isinstance(outcome, Node) and outcome.name == self.node.hostname:
                    result.node_wide = True
                    self.node_object = outcome if adding else None
        result.services |= self._resolve(touched, result.problems)
        result.node_wide |= self.families != families
        return result

    def _resolve(self, touched: set[ObjectRef], problems: list[Problem | str]) -> set[ObjectRef]:
        """Conflicts again among the services that share a claim with a touched one, directly
        or through others; returns the services whose kept version changed."""
        group: set[ObjectRef] = set()
        todo = list(touched)
        while todo:
            ref = todo.pop()
            if ref in group:
                continue
            group.add(ref)
            claims = set(self._claims.get(ref, ()))
            if ref in self._parsed:
                claims |= service_claims(self._parsed[ref]).keys()
            todo += [other for claim in claims for other in self._claimants.get(claim, ())]
        for ref in group:  # their claims are made again below
            for claim in self._claims.pop(ref, ()):
                self._claimants[claim].discard(ref)
                if not self._claimants[claim]:
                    del self._claimants[claim]
        found: list[Problem] = []
        kept = {
            s.ref: s
            for s in resolve_conflicts((self._parsed[r] for r in group if r in self._parsed), found)
        }
        names = {str(ref) for ref in touched}  # a conflict is news when it involves a change
        problems += [p for p in found if p.ref in names]
        changed = set()
        for ref in group:
            service = self._parsed.get(ref)
            if service is not None:
                claims = set(service_claims(service))
                self._claims[ref] = claims
                for claim in claims:
                    self._claimants[claim].add(ref)
            before, after = self.services.get(ref), kept.get(ref)
            if before is after:
                continue
            changed.add(ref)
            self._ipv6 -= bool(before and before.cluster_ip(IPFamily.V6))
            self._ipv6 += bool(after and after.cluster_ip(IPFamily.V6))
            if after is None:
                del self.services[ref]
            else:
                self.services[ref] = after
        return changed

    def port_plans(self, ref: ObjectRef, family: IPFamily) -> list[PortPlan]:
        """The plans of a service's ports in ``family`` (none if it is not served)."""
        service = self.services.get(ref)
        if service is None:
            return []
        # in name order, as build_plans sees them: of two slices listing one endpoint, the
        # first one's conditions count
        slices = sorted(self._slices_of.get(ref, {}).values(), key=lambda s: s.ref)
        return service_port_plans(service, slices, self.node, self.node_object, family)

    def all_port_plans(self, family: IPFamily) -> Iterable[PortPlan]:
        for ref in self.services:
            yield from self.port_plans(ref, family)

    def problems(self) -> list[Problem]:
        """Every object's problem now (conflicts included)."""
        found = [o for o in self._outcomes.values() if isinstance(o, Problem)]
        resolve_conflicts(self._parsed.values(), found)
        return found
