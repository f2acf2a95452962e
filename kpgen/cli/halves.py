"""A one-shot command's nftables rules made on two cores: each process parses, plans and
renders half of the services.

``kpgen render`` and ``kpgen apply`` spent most of their time in Python, one core at a time
(10,000 services x 5 endpoints: parse 0.5 s, plan 0.2 s, render 0.5 s; docs/performance.md).
A service's rules depend only on the service, its EndpointSlices and the node, and its ports
live in one of the shard tables (by a hash of namespace/name). So a forked child takes the
services of the odd-numbered shard tables and this process the even ones (an EndpointSlice
goes with the service its ``kubernetes.io/service-name`` label names; Nodes to both): each
reads and decodes the whole input, at the same time, then parses, plans and renders its half
and renders its shard tables whole. The child sends back its shard tables, its elements of
the node-wide sets and maps, and what parsing said of its documents; this process renders the
node-wide table from both halves' elements (:func:`~kpgen.render.text.render_nft_tables`).
The text is byte for byte the text of :func:`~kpgen.render.text.render`
(tests/test_halves.py).

Where the halves could differ from the whole, nothing is split: :func:`render_halves` returns
no rules and the caller makes them in one process. That is when two services claim the same
address or NodePort (which one keeps it depends on both: the API server never lets it happen,
a set of manifests might), when two EndpointSlices of one namespace/name went to different
halves, when a port lands in the other half's shard tables, when the child fails in any way,
and for input too small to be worth a fork, iptables mode, a machine with one core, or a
process with another thread. Problems and skips are reported in document order, each once.
"""

from __future__ import annotations

import heapq
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kpgen.core.model import (
    SERVICE_NAME_LABEL,
    ClusterState,
    EndpointSlice,
    IPFamily,
    Node,
    ObjectRef,
    Service,
)
from kpgen.core.names import nft_shard
from kpgen.core.node import NodeConfig, ProxyMode
from kpgen.core.parse import (
    Claim,
    Outcome,
    ParseResult,
    Problem,
    Skipped,
    assemble,
    parse_object,
)
from kpgen.core.plan import FamilyPlan, build_plans, family_plan, port_order
from kpgen.render.text import (
    NFT_NODE_CONTAINERS,
    NFT_SHARED,
    nft_elements,
    nft_port_renderer,
    nft_shard_tables,
    render_nft_port,
    render_nft_tables,
)

# Below these a fork costs about what half the work saves (``kpgen render`` of 600 services
# as the API lists them, 1.2 MB of JSON: 0.25 s in one process, 0.24 s in two): manifests of
# 1 MiB, or a list of 1,000 objects.
SPLIT_MIN_BYTES = 1 << 20
SPLIT_MIN_DOCUMENTS = 1000
_SHARED_KINDS = frozenset({"Node"})  # parsed by both halves: every plan reads this node's
_OBJECTS = (Service, EndpointSlice, Node)
_FAMILIES = (IPFamily.V4, IPFamily.V6)


@dataclass
class Rendered:
    """The rules of both halves: each family's nftables tables as one text, plans that carry
    the node-wide settings (not the service ports: ``ports`` counts those), and what parsing
    found to report."""

    result: ParseResult
    plans: tuple[FamilyPlan, ...]
    tables: dict[IPFamily, str]
    ports: int
    # what the rules were made of (the documents, the halves), kept with them: a one-shot
    # command leaves it for the kernel to free at its exit, rather than free it object by
    # object before it writes (60 ms at 10,000 services)
    made_of: tuple[Any, ...] = field(default=(), repr=False)

    @property
    def text(self) -> str:
        return "".join(self.tables[plan.family] for plan in self.plans)


@dataclass
class _Half:
    """What one half made: the problems, skips and ignored kinds of its documents (with their
    indices), whether it found what would make the halves differ from the whole (a conflict
    between its services, a service port in the other half's shard tables), what its services
    claim and which EndpointSlices it holds (as hashes: the same in a forked child), and for
    each family its shard tables and its elements of the node-wide sets and maps."""

    notes: list[tuple[int, Outcome]] = field(default_factory=list)
    differs: bool = False
    claims: set[int] = field(default_factory=set)
    slices: set[int] = field(default_factory=set)
    tables: dict[IPFamily, _Tables] = field(default_factory=dict)
    plans: tuple[FamilyPlan, ...] = ()
    nodes: tuple[Node, ...] = ()
    made_of: tuple[Any, ...] = ()  # its documents, parsed objects, ports' shares: kept

    def __getstate__(self) -> dict[str, Any]:
        """What the child sends: not its plans and Nodes (the parent has its own), nor what
        it was made of (which stays in the child until it exits, never freed)."""
        return {**self.__dict__, "plans": (), "nodes": (), "made_of": ()}


@dataclass
class _Tables:
    """One family's share of a half: its shard tables, whole, and its elements of the node-wide
    sets and maps: ordered by address where ports may share one, else with their port's plan
    order."""

    shards: dict[int, str]
    shared: Mapping[str, Sequence[tuple[Any, str]]]
    ordered: Mapping[str, Sequence[tuple[Any, str]]]
    ports: int


def _service_of(doc: Any) -> str | None:
    """The service a document belongs with (``namespace/name``), or None: a Node, or anything
    this cannot read (the half that takes it reports what is wrong)."""
    if not isinstance(doc, dict) or doc.get("kind") in _SHARED_KINDS:
        return None
    meta = doc.get("metadata")
    if not isinstance(meta, dict):
        return None
    if doc.get("kind") == "EndpointSlice":
        labels = meta.get("labels")
        name = labels.get(SERVICE_NAME_LABEL) if isinstance(labels, dict) else None
    else:
        name = meta.get("name")
    namespace = meta.get("namespace") or "default"
    if not isinstance(name, str) or not isinstance(namespace, str):
        return None
    return f"{namespace}/{name}"


def split(documents: Sequence[Any]) -> tuple[list[int], list[int], frozenset[int]]:
    """The indices of the documents each half parses, and those both parse (Nodes). A service
    and its EndpointSlices go to the half whose shard tables (even or odd numbers) hold its
    ports."""
    halves: tuple[list[int], list[int]] = ([], [])
    shared = []
    for index, doc in enumerate(documents):
        if isinstance(doc, dict) and doc.get("kind") in _SHARED_KINDS:
            shared.append(index)
            halves[0].append(index)
            halves[1].append(index)
            continue
        service = _service_of(doc)
        halves[nft_shard(service) & 1 if service else 0].append(index)
    return halves[0], halves[1], frozenset(shared)


def _make_half(
    documents: Sequence[Any],
    indices: list[int],
    number: int,
    node: NodeConfig,
    unreported: frozenset[int],
) -> _Half:
    """Parse, plan and render the documents at ``indices`` as half ``number`` (the notes of
    ``unreported`` ones are the other half's to report)."""
    outcomes = [(index, parse_object(documents[index])) for index in indices]
    owners: dict[Claim, ObjectRef] = {}  # what its services claim
    result = assemble((outcome for _, outcome in outcomes), owners)
    half = _Half()
    half.notes = [
        (index, outcome)
        for index, outcome in outcomes
        if not isinstance(outcome, _OBJECTS) and index not in unreported
    ]
    parse_problems = sum(isinstance(outcome, Problem) for _, outcome in outcomes)
    half.differs = len(result.problems) > parse_problems  # conflicts were found
    # hash() of a claim (addresses, enums, ints) and of an ObjectRef is the same in a forked
    # child; two equal hashes of different values only make the caller render in one process
    half.claims = {hash(claim) for claim in owners}
    half.slices = {hash(endpoint_slice.ref) for endpoint_slice in result.state.slices}
    half.plans = build_plans(result.state, node)
    half.nodes = result.state.nodes
    for plan in half.plans:
        renderer = nft_port_renderer(plan)
        ports = [render_nft_port(renderer, port) for port in plan.ports]
        half.differs |= any(port.shard & 1 != number for port in ports)
        ordered: dict[str, list[tuple[Any, str]]] = {name: [] for name in _ORDERED_CONTAINERS}
        for port_plan, port in zip(plan.ports, ports, strict=True):
            for container, element in port.elements:
                if container in ordered:
                    ordered[container].append((port_order(port_plan), element))
        half.tables[plan.family] = _Tables(
            nft_shard_tables(plan, ports),
            nft_elements(ports, _SHARED_CONTAINERS, keyed=True),
            ordered,
            len(ports),
        )
        half.made_of += (ports,)
    half.made_of += (outcomes, result)
    return half


def _child_half(load: Callable[[], Sequence[Any]], node: NodeConfig) -> _Half:
    """The forked child's half."""
    documents = load()
    _, theirs, shared = split(documents)
    half = _make_half(documents, theirs, 1, node, shared)
    half.made_of += (documents,)
    return half


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def render_halves(
    load: Callable[[], Sequence[Any]], node: NodeConfig, many: bool
) -> tuple[Rendered | None, Sequence[Any]]:
    """The node's nftables rules for the documents ``load`` gives, half of them made in a
    forked child (which decodes them too, while this process does: ``many`` says they are
    worth it), and those documents. The rules are None when the documents were not split or
    the halves could differ from the whole: the caller then makes them in one process."""
    from kpgen.dataplane.run import can_fork, forked  # here: subprocess's imports are slow

    if not many or node.mode is not ProxyMode.NFTABLES or _cores() < 2 or not can_fork():
        return None, load()
    with forked(lambda: _child_half(load, node)) as other_half:
        documents = load()
        mine, _, _ = split(documents)
        own = _make_half(documents, mine, 0, node, frozenset())
        other = other_half()
        if not isinstance(other, _Half) or own.differs or other.differs:
            return None, documents
        if own.claims & other.claims or own.slices & other.slices:
            return None, documents
        rendered = _assemble(own, other, node)  # while the child exits
    rendered.made_of = (documents, own, other)
    return rendered, documents


def _assemble(own: _Half, other: _Half, node: NodeConfig) -> Rendered:
    """Both halves as one: their notes in document order, each family's node-wide table with
    both halves' elements (in the table's order) and both halves' shard tables."""
    notes = [outcome for _, outcome in heapq.merge(own.notes, other.notes, key=_first)]
    result = ParseResult(ClusterState(nodes=own.nodes))
    result.problems = [n for n in notes if isinstance(n, Problem)]
    result.skipped = [n for n in notes if isinstance(n, Skipped)]
    result.ignored = Counter(n for n in notes if isinstance(n, str))
    planned = {plan.family: plan for plan in own.plans}
    node_object = result.state.node(node.hostname)
    plans, tables, count = [], {}, 0
    for family in _FAMILIES:
        if family not in own.tables and family not in other.tables:
            continue
        plan = planned.get(family) or family_plan(node, family, (), node_object)
        mine, theirs = own.tables.get(family, _NONE), other.tables.get(family, _NONE)
        elements_of: dict[str, list[str]] = {
            name: [e for _, e in heapq.merge(mine.ordered[name], theirs.ordered[name], key=_first)]
            for name in _ORDERED_CONTAINERS
        }
        for name in _SHARED_CONTAINERS:
            merged = heapq.merge(mine.shared[name], theirs.shared[name])
            elements_of[name] = list(dict.fromkeys(element for _, element in merged))
        plans.append(plan)
        tables[family] = render_nft_tables(plan, elements_of, {**mine.shards, **theirs.shards})
        count += mine.ports + theirs.ports
    return Rendered(result, tuple(plans), tables, count)


def _first(pair: tuple[Any, Any]) -> Any:
    return pair[0]


_SHARED_CONTAINERS = tuple(name for name in NFT_NODE_CONTAINERS if name in NFT_SHARED)
_ORDERED_CONTAINERS = tuple(name for name in NFT_NODE_CONTAINERS if name not in NFT_SHARED)
_NONE = _Tables(
    {}, dict.fromkeys(_SHARED_CONTAINERS, ()), dict.fromkeys(_ORDERED_CONTAINERS, ()), 0
)
