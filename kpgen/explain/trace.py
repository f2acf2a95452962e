"""The packet tracer of ``kpgen explain``: one new connection walked through a parsed ruleset.

In the spirit of upstream kube-proxy's test tracers, a packet walks the netfilter hooks a real
one would: ``prerouting`` (from another host or a pod) or ``output`` (from the node itself),
the routing decision, then ``input`` (for this node) or ``forward`` and ``postrouting``. At each
hook the base chains run in priority order, rule by rule, following jumps, gotos, returns and
verdict maps. Random matches (``numgen random mod K 0``, ``statistic --probability P``) split
the walk: every branch is followed with its probability, so the result is every possible
outcome of the connection with its chance.

What cannot be known from the rules is asked of a :class:`Locality` (which addresses are the
node's own), which records what it had to assume.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, replace
from fractions import Fraction

from kpgen.core.model import IPAddress, IPFamily, IPNetwork
from kpgen.explain.rules import (
    PROTOCOL_NAMES,
    Chain,
    Chance,
    Dnat,
    Element,
    ElementSet,
    Masquerade,
    Match,
    Reject,
    Remember,
    Rule,
    Ruleset,
    Selector,
    SetMark,
    Statement,
    Verdict,
    VerdictMap,
    pattern_matches,
)

MAX_DEPTH = 400  # rules matched on one path: far more than kpgen's rules ever need
MAX_STACK = 32  # nested jumps


@dataclass(frozen=True)
class Packet:
    """The first packet of a new connection (``src`` and ``dst`` of one family)."""

    src: IPAddress
    dst: IPAddress
    protocol: int
    port: int

    @property
    def family(self) -> IPFamily:
        return IPFamily.of(self.src)

    @property
    def protocol_name(self) -> str:
        return PROTOCOL_NAMES.get(self.protocol, str(self.protocol))


class Locality:
    """Which addresses belong to this node: ``networks`` (its local routes), or None when that
    is not known; then what had to be assumed is recorded in ``assumptions``."""

    def __init__(self, networks: list[IPNetwork] | None, source: str) -> None:
        self.networks = networks
        self.source = source
        self.service_networks: list[IPNetwork] = []  # never taken for the node's own
        self._assumed: dict[bool, list[IPAddress]] = {True: [], False: []}

    def is_service(self, address: IPAddress) -> bool:
        return any(address in network for network in self.service_networks)

    def is_local(self, address: IPAddress, assume: bool) -> bool:
        """Whether ``address`` is this node's; ``assume`` when that is not known."""
        if address.is_loopback:
            return True
        if self.networks is not None:
            return any(address in network for network in self.networks)
        if address not in self._assumed[assume]:
            self._assumed[assume].append(address)
        return assume

    def absorb(self, other: Locality) -> None:
        """Take over what ``other`` had to assume."""
        for assumed, addresses in other._assumed.items():
            for address in addresses:
                if address not in self._assumed[assumed]:
                    self._assumed[assumed].append(address)

    @property
    def assumptions(self) -> list[str]:
        """What :meth:`is_local` had to assume, in words."""
        found = []
        if self._assumed[True]:
            listed = ", ".join(str(a) for a in sorted(self._assumed[True]))
            found.append(f"{listed} taken for this node's own address ({self.source})")
        if self._assumed[False]:
            listed = ", ".join(str(a) for a in sorted(self._assumed[False]))
            found.append(f"{listed} taken for other hosts' addresses ({self.source})")
        return found

    @property
    def addresses(self) -> list[IPAddress]:
        """The node's own host addresses, when known: not loopback, nor IPv6 link-local (every
        interface has one, reached only with a zone)."""
        if self.networks is None:
            return []
        return [
            n.network_address
            for n in self.networks
            if n.prefixlen == n.max_prefixlen
            and not n.network_address.is_loopback
            and not (n.version == 6 and n.network_address.is_link_local)
        ]


@dataclass(frozen=True)
class Hop:
    """One step of a packet's path.

    ``kind``: ``hook`` (a base chain is entered), ``rule`` (a rule matched), ``lookup`` (the
    element a verdict map found), ``miss`` (a lookup found nothing, or no rule of a chain
    matched), ``skip`` (a random match not taken), ``route`` (the routing decision), ``end``
    (a base chain's policy)."""

    kind: str
    chain: str
    text: str
    note: str = ""


@dataclass(frozen=True)
class Flow:
    """The packet as the rules see it on one branch of the walk."""

    saddr: IPAddress
    daddr: IPAddress
    l4proto: int
    dport: int
    mark: int = 0
    dnat: tuple[IPAddress, int] | None = None
    masquerade: bool = False
    probability: Fraction = Fraction(1)
    hops: tuple[Hop, ...] = ()
    marked_by: tuple[Hop, ...] = ()

    def add(self, hop: Hop) -> Flow:
        return replace(self, hops=(*self.hops, hop))


@dataclass(frozen=True)
class Result:
    flow: Flow
    verdict: str  # accept drop reject unknown
    detail: str = ""


@dataclass(frozen=True)
class Frame:
    chain: Chain
    index: int
    hops_at_entry: int


class _Unknown(Exception):
    pass


def percent(probability: Fraction | float) -> str:
    """``50%``, ``33.3%``, ``14.3%``, ``100%``."""
    return f"{float(probability) * 100:.3g}%"


@dataclass
class Walk:
    """The end of one branch: how the connection ends, with what chance, by which path."""

    flow: Flow
    verdict: str  # accept drop reject unknown
    detail: str
    delivery: str  # local, forwarded, sent, "" (ended before routing)


@dataclass
class Tracer:
    """Walks one packet (:meth:`trace`) through ``ruleset``; one tracer per packet."""

    ruleset: Ruleset
    locality: Locality
    packet: Packet = field(init=False)
    from_node: bool = False  # the packet starts at the output hook
    # None: no session-affinity set was looked up; else those that remembered the client
    remembered: list[str] | None = None

    # --- the hooks ------------------------------------------------------------------------

    def trace(self, packet: Packet) -> list[Walk]:
        """Every way a new connection of ``packet`` can go, with its probability."""
        self.packet = packet
        start = Flow(packet.src, packet.dst, packet.protocol, packet.port)
        from_node = self.locality.is_local(packet.src, False)
        self.from_node = from_node
        walks: list[Walk] = []
        if from_node:
            start = start.add(Hop("route", "", f"{packet.src} is this node's: it sends the packet"))
            flows = self._stage("output", [start], walks)
            flows = self._stage("postrouting", flows, walks)
            for flow in flows:
                if self._is_local(flow):
                    routed = flow.add(Hop("route", "", f"{flow.daddr} is this node's: looped back"))
                    for done in self._stage("input", [routed], walks):
                        walks.append(Walk(done, "accept", "", "local"))
                else:
                    walks.append(Walk(flow, "accept", "", "sent"))
        else:
            for flow in self._stage("prerouting", [start], walks):
                if self._is_local(flow):
                    routed = flow.add(Hop("route", "", f"{flow.daddr} is this node's: input"))
                    for done in self._stage("input", [routed], walks):
                        walks.append(Walk(done, "accept", "", "local"))
                else:
                    routed = flow.add(Hop("route", "", f"{flow.daddr} is not this node's: forward"))
                    forwarded = self._stage("forward", [routed], walks)
                    for done in self._stage("postrouting", forwarded, walks):
                        walks.append(Walk(done, "accept", "", "forwarded"))
        return walks

    def _is_local(self, flow: Flow) -> bool:
        """Whether the packet's destination now is this node's; when that is not known, the
        destination asked about is taken for the node's own (a NodePort on it answers),
        unless it is a service's address, and any other (an endpoint) for another host's."""
        original = flow.dnat is None and flow.daddr == self.packet.dst
        guess = original and not self.locality.is_service(flow.daddr)
        return self.locality.is_local(flow.daddr, guess)

    def _stage(self, hook: str, flows: list[Flow], walks: list[Walk]) -> list[Flow]:
        """Run the base chains of ``hook``; returns the flows they accept, adds the others'
        ends to ``walks``."""
        for chain in self.ruleset.hook_chains(hook):
            accepted = []
            for flow in flows:
                entry = Hop(
                    "hook", chain.label, f"{hook}: {chain.label}", f"priority {chain.priority}"
                )
                for result in self._walk(flow.add(entry), (Frame(chain, 0, len(flow.hops) + 1),)):
                    if result.verdict == "accept":
                        accepted.append(result.flow)
                    else:
                        walks.append(Walk(result.flow, result.verdict, result.detail, ""))
            flows = accepted
        return flows

    # --- chains and rules -----------------------------------------------------------------

    def _walk(self, flow: Flow, stack: tuple[Frame, ...]) -> list[Result]:
        results: list[Result] = []
        while True:
            if len(flow.hops) > MAX_DEPTH or len(stack) > MAX_STACK:
                return [*results, Result(flow, "unknown", "cannot evaluate: the path does not end")]
            frame = stack[-1]
            chain = frame.chain
            if frame.index >= len(chain.rules):
                if len(flow.hops) == frame.hops_at_entry and chain.rules:
                    count = len(chain.rules)
                    flow = flow.add(Hop("miss", chain.label, f"no rule matched ({count} rules)"))
                if len(stack) == 1:
                    end = Hop("end", chain.label, f"policy {chain.policy}")
                    return [*results, Result(flow.add(end), chain.policy)]
                stack = stack[:-1]
                continue
            rule = chain.rules[frame.index]
            stack = (*stack[:-1], replace(frame, index=frame.index + 1))
            if rule.error is not None:
                return [*results, self._cannot(flow, chain, rule, rule.error)]
            try:
                chance = self._match(rule, flow)
            except _Unknown as error:
                return [*results, self._cannot(flow, chain, rule, str(error))]
            if chance == 0:
                continue
            note = ""
            if chance != 1:
                skipped = replace(flow, probability=flow.probability * (1 - chance))
                skipped = skipped.add(
                    Hop("skip", chain.label, rule.text, f"not taken: {percent(1 - chance)}")
                )
                results += self._walk(skipped, stack)
                flow = replace(flow, probability=flow.probability * chance)
                note = f"taken: {percent(chance)}"
            return [*results, *self._execute(flow, chain, rule, note, stack)]

    def _cannot(self, flow: Flow, chain: Chain, rule: Rule, why: str) -> Result:
        hop = Hop("rule", chain.label, rule.text, f"cannot evaluate: {why}")
        return Result(flow.add(hop), "unknown", f"cannot evaluate: {rule.text}")

    def _execute(
        self, flow: Flow, chain: Chain, rule: Rule, note: str, stack: tuple[Frame, ...]
    ) -> list[Result]:
        hop = Hop("rule", chain.label, rule.text, note)
        if not any(isinstance(s, VerdictMap) for s in rule.statements):
            flow = flow.add(hop)
        for index, statement in enumerate(rule.statements):
            if isinstance(statement, SetMark):
                mark = (flow.mark & ~statement.clear & 0xFFFFFFFF) ^ statement.xor
                marked = flow.marked_by
                if mark & ~flow.mark:
                    marked = (*marked, self._mark_reason(flow, chain, hop))
                flow = replace(flow, mark=mark, marked_by=marked)
                continue
            if isinstance(statement, Remember):
                continue  # the client is remembered for its next connections, not this one
            if isinstance(statement, VerdictMap):
                try:
                    branches = self._lookup(statement, flow)
                except _Unknown as error:
                    return [self._cannot(flow, chain, rule, str(error))]
                results: list[Result] = []
                rest = rule.statements[index + 1 :]
                for chance, element, key in branches:
                    branch = replace(flow, probability=flow.probability * chance)
                    where = statement.map_name or "an inline map"
                    if element is None:
                        miss = Hop("miss", chain.label, rule.text, f"@{where}: no element {key}")
                        results += self._walk(branch.add(miss), stack)
                        continue
                    found = replace(hop, note=f"@{where}: {element.text}")
                    branch = branch.add(found)
                    assert element.verdict is not None
                    results += self._statements(
                        branch, chain, rule, (element.verdict, *rest), stack
                    )
                return results
            return self._statements(flow, chain, rule, rule.statements[index:], stack)
        return self._walk(flow, stack)

    def _statements(
        self,
        flow: Flow,
        chain: Chain,
        rule: Rule,
        statements: tuple[Statement, ...],
        stack: tuple[Frame, ...],
    ) -> list[Result]:
        """Run a rule's terminal statement (a verdict, NAT, reject)."""
        statement = statements[0]
        if isinstance(statement, Verdict):
            return self._verdict(flow, chain, rule, statement, stack)
        if isinstance(statement, Dnat):
            port = statement.port if statement.port is not None else flow.dport
            flow = replace(
                flow, daddr=statement.address, dport=port, dnat=(statement.address, port)
            )
            return [Result(flow, "accept")]
        if isinstance(statement, Masquerade):
            return [Result(replace(flow, masquerade=True), "accept")]
        if isinstance(statement, Reject):
            return [Result(flow, "reject", statement.how)]
        return [self._cannot(flow, chain, rule, f"a second map or mark after {statement}")]

    def _verdict(
        self, flow: Flow, chain: Chain, rule: Rule, verdict: Verdict, stack: tuple[Frame, ...]
    ) -> list[Result]:
        if verdict.kind in ("accept", "drop"):
            return [Result(flow, verdict.kind)]
        if verdict.kind == "continue":
            return self._walk(flow, stack)
        if verdict.kind == "return":
            if len(stack) == 1:
                end = Hop("end", chain.label, f"policy {stack[0].chain.policy}")
                return [Result(flow.add(end), stack[0].chain.policy)]
            return self._walk(flow, stack[:-1])
        assert verdict.target is not None
        target = self.ruleset.chain(chain.table, verdict.target)
        if target is None:
            return [self._cannot(flow, chain, rule, f"no chain {verdict.target} in the rules")]
        frame = Frame(target, 0, len(flow.hops))
        if verdict.kind == "jump":
            return self._walk(flow, (*stack, frame))
        return self._walk(flow, (*stack[:-1], frame))  # goto: the caller's frame stays

    def _mark_reason(self, flow: Flow, chain: Chain, hop: Hop) -> Hop:
        """The rule that decided to set the mark: the jump into the marking chain, if the
        mark is set by a chain the path jumped to (``mark-for-masquerade``)."""
        for previous in reversed(flow.hops[:-1]):
            if previous.kind == "rule" and previous.chain != chain.label:
                return previous
            if previous.kind in ("hook", "route"):
                break
        return hop

    # --- matches --------------------------------------------------------------------------

    def _values(self, selector: Selector, flow: Flow) -> list[tuple[Fraction, object]]:
        name = selector.field
        if name == "saddr":
            return [(Fraction(1), flow.saddr)]
        if name == "daddr":
            return [(Fraction(1), flow.daddr)]
        if name == "l4proto":
            return [(Fraction(1), flow.l4proto)]
        if name == "dport":
            return [(Fraction(1), flow.dport)]
        if name == "mark":
            mask = 0xFFFFFFFF if selector.mask is None else selector.mask
            return [(Fraction(1), flow.mark & mask)]
        if name == "ct_state":
            return [(Fraction(1), frozenset({"new"}))]
        if name == "ct_status":
            return [(Fraction(1), frozenset({"dnat"} if flow.dnat else set()))]
        if name in ("fib_daddr", "fib_saddr"):
            address = flow.daddr if name == "fib_daddr" else flow.saddr
            if name == "fib_daddr":
                local = self._is_local(flow)
            else:
                local = self.locality.is_local(address, False)
            return [(Fraction(1), "local" if local else "unicast")]
        if name == "numgen" and selector.modulus:
            share = Fraction(1, selector.modulus)
            return [(share, n) for n in range(selector.modulus)]
        raise _Unknown(f"the packet's {name} is not known to explain")

    def _keys(
        self, key: tuple[Selector, ...], flow: Flow
    ) -> list[tuple[Fraction, tuple[object, ...]]]:
        options = [self._values(s, flow) for s in key]
        keys = []
        for combination in itertools.product(*options):
            chance = Fraction(1)
            for part, _ in combination:
                chance *= part
            keys.append((chance, tuple(value for _, value in combination)))
        return keys

    def _set(self, name: str | None, anonymous: ElementSet | None) -> ElementSet:
        if anonymous is not None:
            return anonymous
        assert name is not None
        found = self.ruleset.sets.get(name)
        if found is None:
            raise _Unknown(f"no set or map @{name} in the rules")
        return found

    def _match(self, rule: Rule, flow: Flow) -> Fraction:
        """The chance that all of the rule's matches hold."""
        chance = Fraction(1)
        for match in rule.matches:
            if isinstance(match, Chance):
                chance *= match.probability
                continue
            chance *= self._match_one(match, flow)
            if chance == 0:
                return chance
        return chance

    def _match_one(self, match: Match, flow: Flow) -> Fraction:
        holds = Fraction(0)
        for chance, values in self._keys(match.key, flow):
            if match.patterns is not None:
                found = all(
                    pattern_matches(p, v) for p, v in zip(match.patterns, values, strict=True)
                )
            else:
                looked_in = self._set(match.set_name, match.anonymous)
                found = looked_in.lookup(values) is not None
                if looked_in.dynamic:
                    self._dynamic(looked_in.name, found)
            if found != match.negate:
                holds += chance
        return holds

    def _dynamic(self, name: str, found: bool) -> None:
        """A lookup in a set the packets fill (session affinity): noted."""
        if self.remembered is None:
            self.remembered = []
        if found and name not in self.remembered:
            self.remembered.append(name)

    @property
    def notes(self) -> list[str]:
        """What the walk could not know from the rules alone."""
        if self.remembered is None:
            return []
        client = self.packet.src
        if self.remembered:
            listed = ", ".join(self.remembered)
            return [
                f"session affinity: {client} is remembered ({listed}): it goes back to "
                "the endpoint it went to before"
            ]
        if self.ruleset.origin == "rendered":
            return [
                f"session affinity: a first connection of {client} is shown; one within "
                "the affinity timeout of an earlier one goes back to that endpoint "
                "(--live reads what the kernel remembers)"
            ]
        return [f"session affinity: the kernel remembers no earlier connection of {client}"]

    def _lookup(
        self, statement: VerdictMap, flow: Flow
    ) -> list[tuple[Fraction, Element | None, str]]:
        table = self._set(statement.map_name, statement.anonymous)
        found: dict[int, tuple[Fraction, Element | None, str]] = {}
        for chance, values in self._keys(statement.key, flow):
            element = table.lookup(values)
            index = -1 if element is None else id(element)
            before = found.get(index, (Fraction(0), element, _show_key(statement.key, values)))
            found[index] = (before[0] + chance, element, before[2])
        return list(found.values())


def _show_key(key: tuple[Selector, ...], values: tuple[object, ...]) -> str:
    parts = []
    for selector, value in zip(key, values, strict=True):
        if selector.field == "l4proto" and isinstance(value, int):
            parts.append(PROTOCOL_NAMES.get(value, str(value)))
        elif isinstance(value, frozenset):
            parts.append(",".join(sorted(value)))
        else:
            parts.append(str(value))
    return " . ".join(parts)
