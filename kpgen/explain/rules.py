"""Rules read for ``kpgen explain``: nftables and iptables rulesets as chains of rules.

One model (:class:`Ruleset` of :class:`Chain` of :class:`Rule`, sets and maps as
:class:`ElementSet`) for one IP family's rules, and the readers that fill it:

- nftables rule text, as kpgen renders it (what ``apply`` loads; ``nft list`` spellings such
  as ``meta mark set meta mark | 0x00004000`` are read too). The kernel's rules are read as
  libnftables JSON instead (kpgen/explain/nft_json.py): ``nft list`` text changes between nft
  versions;
- iptables-restore input (rendered) and ``iptables-save`` output (from the kernel), split into
  tables, chains and rule specs by :func:`kpgen.dataplane.kernel.read_iptables_save`; each
  spec is read here (``-d 10.0.0.1/32``, ``--probability 0.50000000000``, matches reordered,
  ``MARK --set-xmark`` are the kernel's spellings).

A rule becomes a list of matches and a list of statements over a few packet fields. Only the
constructs kpgen's templates produce are understood; any other rule is kept with an ``error``,
so that the tracer can say "cannot evaluate: <rule>" when a packet reaches it instead of
guessing.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from typing import Any

from kpgen.core.model import IPAddress, IPFamily, IPNetwork
from kpgen.core.names import IPT_PREFIX, NFT_TABLE, is_nft_table
from kpgen.dataplane.kernel import read_iptables_save

PROTOCOLS = {"icmp": 1, "tcp": 6, "udp": 17, "sctp": 132}
PROTOCOL_NAMES = {number: name for name, number in PROTOCOLS.items()}
# nft's named priorities (ip family)
PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50,
              "srcnat": 100}  # fmt: skip
HOOKS = ("prerouting", "input", "forward", "output", "postrouting")


class RuleSyntaxError(Exception):
    """Rule text that cannot be read at all (not one rule: the structure around it)."""


class Unknown(Exception):
    """A construct in a rule that kpgen's templates do not make: the rule cannot be
    evaluated (its ``error``)."""


# --- what a rule is made of -----------------------------------------------------------------

# The packet fields a match can look at. Address fields hold an IPAddress, ``l4proto`` and
# ports ints, ``mark`` an int (masked), ``ct_state``/``ct_status`` sets of flag names,
# ``fib_daddr``/``fib_saddr`` an address type ("local" or "unicast"), ``numgen`` a random
# number below ``modulus``.
ADDRESS_FIELDS = ("saddr", "daddr")
FLAG_FIELDS = ("ct_state", "ct_status")


@dataclass(frozen=True)
class Selector:
    """One packet field, as a match or a map key reads it."""

    field: str
    mask: int | None = None  # meta mark & MASK
    modulus: int | None = None  # numgen random mod MODULUS

    @property
    def kind(self) -> str:
        """How values of this field are written: addr, proto, port, int, flags, str."""
        if self.field in ADDRESS_FIELDS:
            return "addr"
        if self.field == "l4proto":
            return "proto"
        if self.field in ("dport", "sport"):
            return "port"
        if self.field in ("mark", "numgen"):
            return "int"
        if self.field in FLAG_FIELDS:
            return "flags"
        return "str"


# A value a field is compared with: one address or network, a range, a number, a name.
Pattern = IPNetwork | tuple[str, object, object] | int | str
NETWORKS = (ipaddress.IPv4Network, ipaddress.IPv6Network)


def parse_pattern(text: str, kind: str) -> Pattern:
    """``text`` (one component of a value or set element) for a field of ``kind``."""
    text = text.strip()
    if kind == "addr":
        if "-" in text and "/" not in text:
            low, high = (ipaddress.ip_address(part.strip()) for part in text.split("-", 1))
            return ("range", low, high)
        return ipaddress.ip_network(text, strict=False)
    if kind == "proto":
        lowered = text.lower()
        return PROTOCOLS[lowered] if lowered in PROTOCOLS else int(lowered, 0)
    if kind in ("port", "int"):
        for separator in ("-", ":"):
            if separator in text.lstrip("-"):
                low_text, high_text = text.split(separator, 1)
                return ("range", int(low_text, 0), int(high_text, 0))
        return int(text, 0)
    return text.lower()


def pattern_matches(pattern: Pattern, value: object) -> bool:
    """Whether a packet's field ``value`` is matched by ``pattern``."""
    if isinstance(pattern, NETWORKS):
        return value in pattern  # False for another family's address
    if isinstance(pattern, tuple):
        _, low, high = pattern
        try:
            return bool(low <= value <= high)  # type: ignore[operator]
        except TypeError:  # another family's address
            return False
    if isinstance(value, frozenset):
        return pattern in value
    return pattern == value


def exact_key(pattern: Pattern) -> object | None:
    """The hashable value that alone matches ``pattern``, or None (a network, a range)."""
    if isinstance(pattern, NETWORKS):
        return pattern.network_address if pattern.prefixlen == pattern.max_prefixlen else None
    if isinstance(pattern, tuple):
        return None
    return pattern


@dataclass(frozen=True)
class Element:
    """A set or map element: the key's components (their text, read into patterns when
    needed), and for a map its value (a verdict)."""

    text: str
    components: tuple[str, ...]
    kinds: tuple[str, ...]
    verdict: Statement | None = None

    @cached_property
    def key(self) -> tuple[Pattern, ...]:
        return tuple(parse_pattern(c, k) for c, k in zip(self.components, self.kinds, strict=True))


def _exact_text(component: str, kind: str) -> str | None:
    """How a packet's value of ``kind`` is spelled when ``component`` alone matches it (an
    address, a protocol, a number); None for a network or a range."""
    if kind == "addr":
        if "/" in component or "-" in component:
            return None
        # an IPv6 address is spelled in more than one way: as Python prints it
        return str(ipaddress.ip_address(component)) if ":" in component else component
    if kind == "proto":
        lowered = component.lower()
        return PROTOCOL_NAMES.get(int(lowered), lowered) if lowered.isdigit() else lowered
    if kind in ("port", "int"):
        if "-" in component.lstrip("-") or ":" in component:
            return None
        return str(int(component, 0))
    return None if kind == "flags" else component.lower()


def value_text(value: object, kind: str) -> str:
    """A packet's value spelled as :func:`_exact_text` spells a component."""
    if kind == "proto" and isinstance(value, int):
        return PROTOCOL_NAMES.get(value, str(value))
    return str(value)


@dataclass
class ElementSet:
    """A named or anonymous set or map.

    The elements of a named set are read when it is first looked into (``pending`` holds their
    text, or their libnftables JSON, until then; ``reader`` reads one), and those that are one
    value are indexed by their text: a walk reads only the sets it needs, and a lookup among
    100,000 IPv4 elements costs no address parsing. An element that cannot be read is kept in
    ``errors``."""

    name: str
    kinds: tuple[str, ...]
    is_map: bool = False
    dynamic: bool = False  # filled by the packets (session affinity), not by the rules
    pending: list[Any] = field(default_factory=list, repr=False)
    reader: Callable[[ElementSet, Any], Element] | None = field(default=None, repr=False)
    errors: list[str] = field(default_factory=list)
    _elements: list[Element] = field(default_factory=list, repr=False)
    _exact: dict[tuple[str, ...], Element] = field(default_factory=dict, repr=False)
    _other: list[Element] = field(default_factory=list, repr=False)

    @property
    def elements(self) -> list[Element]:
        self._load()
        return self._elements

    def _load(self) -> None:
        pending, self.pending = self.pending, []
        read = self.reader or _text_element
        for item in pending:
            try:
                element = read(self, item)
            except RuleSyntaxError as error:
                self.errors.append(str(error))
                continue
            try:
                self.add(element)
            except (ValueError, KeyError):
                self.errors.append(f"cannot read the element {element.text!r}")

    def add(self, element: Element) -> None:
        """Add ``element``; ValueError or KeyError (not added) when it cannot be read."""
        try:
            spelled = [
                _exact_text(c, k) for c, k in zip(element.components, self.kinds, strict=True)
            ]
        except ValueError:
            spelled = [None]
        if None in spelled:
            element.key  # noqa: B018  (a network or range: read now, looked at on every lookup)
            self._other.append(element)
        else:
            self._exact.setdefault(tuple(s for s in spelled if s is not None), element)
        self._elements.append(element)

    def lookup(self, values: tuple[object, ...]) -> Element | None:
        """The element matching a packet's ``values`` (the first, as the kernel's)."""
        self._load()
        flags = any(isinstance(v, frozenset) for v in values)
        if not flags and len(values) == len(self.kinds):
            spelled = tuple(value_text(v, k) for v, k in zip(values, self.kinds, strict=True))
            found = self._exact.get(spelled)
            if found is not None:
                return found
        for element in self._other if not flags else self._elements:
            if len(element.key) == len(values) and all(
                pattern_matches(p, v) for p, v in zip(element.key, values, strict=True)
            ):
                return element
        return None


@dataclass(frozen=True)
class Match:
    """``key`` (one or more fields, concatenated) compared with a value or looked up in a
    set; ``negate``: the comparison must fail."""

    key: tuple[Selector, ...]
    patterns: tuple[Pattern, ...] | None = None  # a literal value (one component per field)
    set_name: str | None = None  # a named set (``@name``)
    anonymous: ElementSet | None = None  # an inline set (``{ a, b }``)
    negate: bool = False


@dataclass(frozen=True)
class Chance:
    """iptables' ``-m statistic --mode random --probability P``."""

    probability: Fraction


@dataclass(frozen=True)
class Verdict:
    kind: str  # jump goto return accept drop continue
    target: str | None = None


@dataclass(frozen=True)
class VerdictMap:
    """``KEY vmap @map`` (or an inline map): the verdict of the element the key finds."""

    key: tuple[Selector, ...]
    map_name: str | None = None
    anonymous: ElementSet | None = None


@dataclass(frozen=True)
class SetMark:
    """mark = (mark & ~clear) ^ xor: iptables' --set-xmark; covers or, xor, and, set."""

    xor: int
    clear: int


@dataclass(frozen=True)
class Dnat:
    address: IPAddress
    port: int | None


@dataclass(frozen=True)
class Masquerade:
    flags: str = ""


@dataclass(frozen=True)
class Reject:
    how: str  # "tcp reset" or "icmp port-unreachable" (...)


@dataclass(frozen=True)
class Remember:
    """``update @set { ip saddr }`` (iptables: ``-m recent --set``): the client is added to a
    dynamic set (session affinity); it changes nothing for this packet."""

    set_name: str


Statement = Verdict | VerdictMap | SetMark | Dnat | Masquerade | Reject | Remember

MARK_BITS = 0xFFFFFFFF
MARK_OPS = {"or": "|", "|": "|", "xor": "^", "^": "^", "and": "&", "&": "&"}  # word -> symbol


def protocol_match(name: str) -> Match:
    """``meta l4proto NAME``: what ``tcp dport`` or ``reject with tcp reset`` imply."""
    return Match((Selector("l4proto"),), (PROTOCOLS[name],))


def mark_statement(op: str | None, value: int) -> SetMark:
    """``meta mark set meta mark OP VALUE`` (``or``/``|``, ``xor``/``^``, ``and``/``&``), or
    with ``op`` None ``meta mark set VALUE``."""
    if op is None:
        return SetMark(value, MARK_BITS)
    symbol = MARK_OPS.get(op)
    if symbol == "|":
        return SetMark(value, value)
    if symbol == "^":
        return SetMark(value, 0)
    if symbol == "&":
        return SetMark(0, ~value & MARK_BITS)
    raise Unknown(f"meta mark set with the operator {op}")


def reject_statement(how: str, matches: list[Match | Chance]) -> Reject:
    """``reject with HOW``: ``tcp reset``, or a port unreachable (``icmp port-unreachable``,
    ``icmpv6 ...``, ``icmpx ...``, the default of a plain ``reject``). A TCP reset only
    applies to TCP: nft adds the dependency ``meta l4proto tcp`` and lists the rule without
    it, so the match is added to ``matches`` when it is not there."""
    if how == "tcp reset":
        tcp = protocol_match("tcp")
        if tcp not in matches:
            matches.append(tcp)
        return Reject("tcp reset")
    family, _, code = how.partition(" ")
    if family in ("icmp", "icmpv6", "icmpx") and code == "port-unreachable":
        return Reject("icmp port-unreachable")
    raise Unknown(f"reject with {how}")


@dataclass(frozen=True)
class Rule:
    """One rule: all of ``matches`` must hold, then ``statements`` run in order."""

    chain: str
    text: str
    matches: tuple[Match | Chance, ...] = ()
    statements: tuple[Statement, ...] = ()
    error: str | None = None  # why it cannot be evaluated
    comment: str | None = None


@dataclass
class Chain:
    """A chain: its rules as written (text, or libnftables JSON), read into :class:`Rule`
    when a packet first enters it (``reader``), so that a walk reads only the chains it goes
    through."""

    name: str
    table: str  # nft: "ip kpgen"; iptables: "nat", "filter"
    sources: list[Any] = field(default_factory=list)  # each rule's text, or its nft JSON
    hook: str | None = None
    priority: int = 0
    policy: str = "accept"
    kind: str | None = None  # base chains: nat, filter
    reader: Callable[[str, Any], Rule] | None = None
    _rules: list[Rule] | None = field(default=None, repr=False)

    @property
    def rules(self) -> list[Rule]:
        if self._rules is None:
            read = self.reader or parse_nft_rule
            self._rules = [read(self.name, text) for text in self.sources]
        return self._rules

    @property
    def key(self) -> str:
        return chain_key(self.table, self.name)

    @property
    def label(self) -> str:
        """How the explanation names it: nft chains by name, iptables' with their table."""
        return self.name if self.table.startswith("ip") else f"{self.table} {self.name}"


def chain_key(table: str, name: str) -> str:
    return f"{table}\0{name}"


@dataclass
class Ruleset:
    """One IP family's rules, either mode: chains, sets and maps, and the base chains of each
    hook (an IPv4 packet meets the ``ip`` table or iptables, an IPv6 one ``ip6`` or
    ip6tables)."""

    mode: str  # nftables, iptables
    origin: str  # rendered, kernel
    family: IPFamily
    chains: dict[str, Chain] = field(default_factory=dict)
    sets: dict[str, ElementSet] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what was left out, and why

    def add_table(
        self,
        table: str,
        chains: Iterable[Chain],
        sets: Iterable[ElementSet],
        same: Callable[[Any], Any] = lambda source: source,
    ) -> None:
        """Add a table's chains and sets (``table``: the name they are kept under). kpgen's
        shard tables (kpgen.core.names.NFT_SHARDS) are read as one table with the node-wide
        one: each repeats the same NAT hooks, ``services`` chain and node-wide sets, holds
        its own service ports' elements of the dispatch maps and its ports' chains, and no
        two hold the same key. So the first copy of a repeated chain is walked (a copy that
        differs, compared by ``same`` of each rule, is noted) and the maps' elements are
        joined: the walk is the one a packet takes through the tables, one after another."""
        for chain in chains:
            chain.table = table
            kept = self.chains.setdefault(chain.key, chain)
            if kept is not chain and [same(s) for s in kept.sources] != [
                same(s) for s in chain.sources
            ]:
                self.notes.append(f"chain {chain.name} differs between kpgen's tables")
        for element_set in sets:
            kept_set = self.sets.setdefault(element_set.name, element_set)
            if kept_set is not element_set:
                kept_set.pending += element_set.pending

    def hook_chains(self, hook: str) -> list[Chain]:
        """The base chains at ``hook``, in the order the kernel runs them (priority)."""
        chains = [c for c in self.chains.values() if c.hook == hook]
        return sorted(chains, key=lambda c: c.priority)

    def chain(self, table: str, name: str) -> Chain | None:
        return self.chains.get(chain_key(table, name))

    @property
    def text_name(self) -> str:
        return "nftables" if self.mode == "nftables" else "iptables"


# --- nftables ---------------------------------------------------------------------------------

_NFT_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{},;]|[^\s{},;]+')
_BRACE = re.compile(r'"(?:[^"\\]|\\.)*"|[{}]')
VERDICT_WORDS = ("jump", "goto", "return", "accept", "drop", "continue")
SET_TYPES = {"ipv4_addr": "addr", "ipv6_addr": "addr", "inet_proto": "proto",
             "inet_service": "port", "mark": "int", "ct_state": "flags",
             "ct_status": "flags"}  # fmt: skip
_OPENING = re.compile(r"^(table|chain|set|map) (?:(\S+) )?(\S+) \{$")


def _nft_words(text: str) -> list[str]:
    return _NFT_TOKEN.findall(text)


def _depth(text: str) -> int:
    """How many more braces ``text`` opens than it closes (quoted ones do not count)."""
    depth = 0
    for found in _BRACE.finditer(text):
        depth += {"{": 1, "}": -1}.get(found.group(0), 0)
    return depth


def _strip_comment(line: str) -> str:
    """A line without its ``# ...`` comment (a ``#`` inside quotes stays)."""
    if "#" not in line:
        return line
    quoted = False
    for index, char in enumerate(line):
        if char == '"':
            quoted = not quoted
        elif char == "#" and not quoted:
            return line[:index]
    return line


class _NftParser:
    """The structure of an nft ruleset, line by line: tables, chains (their rules' text), sets
    and maps (their elements' text). Rendered text and the kernel's listing differ in layout
    (elements one to a line or several), not in this structure."""

    def __init__(self, text: str, origin: str, family: IPFamily) -> None:
        self.lines = [_strip_comment(line).strip() for line in text.splitlines()]
        self.index = 0
        self.ruleset = Ruleset("nftables", origin, family)

    def line(self) -> str | None:
        """The next non-empty line, and with it the lines its open braces take."""
        while self.index < len(self.lines) and not self.lines[self.index]:
            self.index += 1
        if self.index >= len(self.lines):
            return None
        first = self.index
        text = self.lines[first]
        self.index += 1
        if text.endswith("{") and _OPENING.match(text):
            return text
        depth = _depth(text)
        parts = [text]
        while depth > 0 and self.index < len(self.lines):
            parts.append(self.lines[self.index])
            depth += _depth(self.lines[self.index])
            self.index += 1
        if depth > 0:
            raise RuleSyntaxError(f"line {first + 1}: a brace is not closed")
        return " ".join(parts)

    def body(self, what: str) -> list[str]:
        """The lines of a block up to its closing brace."""
        found: list[str] = []
        while True:
            text = self.line()
            if text is None:
                raise RuleSyntaxError(f"{what} is not closed")
            if text == "}":
                return found
            found.append(text)

    def parse(self) -> Ruleset:
        while (text := self.line()) is not None:
            opening = _OPENING.match(text)
            if opening is None or opening.group(1) != "table" or opening.group(2) is None:
                raise RuleSyntaxError(f"line {self.index}: expected 'table FAMILY NAME {{'")
            family, name = opening.group(2), opening.group(3)
            self.table(family, f"{family} {name}")
        return self.ruleset

    def table(self, family: str, name: str) -> None:
        chains: dict[str, Chain] = {}
        sets: dict[str, ElementSet] = {}
        while (text := self.line()) != "}":
            if text is None:
                raise RuleSyntaxError(f"table {name} is not closed")
            opening = _OPENING.match(text)
            if opening and opening.group(1) == "chain" and opening.group(2) is None:
                chain = self.chain(name, opening.group(3))
                chains[chain.key] = chain
            elif opening and opening.group(1) in ("set", "map") and opening.group(2) is None:
                element_set = self.set(opening.group(3), opening.group(1) == "map")
                sets[element_set.name] = element_set
            elif not text.startswith(("comment ", "flags ")):
                raise RuleSyntaxError(f"line {self.index}: unexpected {text!r} in table {name}")
        wanted = self.ruleset.family
        if family != wanted.nft_family:  # an IPv4 packet never sees an ip6 table, and back
            if name.split()[1] == NFT_TABLE:  # its shard tables go unsaid
                note = f"table {name} was left out: explain walks {wanted.value}"
                self.ruleset.notes.append(note)
            return
        if is_nft_table(name.split()[1]):
            name = f"{family} {NFT_TABLE}"
        self.ruleset.add_table(name, chains.values(), sets.values())

    def chain(self, table: str, name: str) -> Chain:
        chain = Chain(name, table, reader=parse_nft_rule)
        for text in self.body(f"chain {name}"):
            if text.startswith(("type ", "policy ")):
                for statement in text.split(";"):
                    words = statement.split()
                    if words[:1] == ["type"]:
                        self.base_chain(chain, words)
                    elif words[:1] == ["policy"] and len(words) == 2:
                        chain.policy = words[1]
            elif not text.startswith("comment "):
                chain.sources.append(text)
        return chain

    @staticmethod
    def base_chain(chain: Chain, words: list[str]) -> None:
        # type nat hook prerouting priority dstnat [+|- N]
        try:
            chain.kind = words[1]
            chain.hook = words[words.index("hook") + 1]
            spec = words[words.index("priority") + 1 :]
            base = spec[0]
            priority = PRIORITIES[base] if base in PRIORITIES else int(base)
            if len(spec) >= 3 and spec[1] in ("+", "-"):
                priority += int(spec[2]) * (1 if spec[1] == "+" else -1)
        except (ValueError, IndexError):
            raise RuleSyntaxError(f"chain {chain.name}: cannot read {' '.join(words)!r}") from None
        chain.priority = priority

    def set(self, name: str, is_map: bool) -> ElementSet:
        element_set = ElementSet(name, (), is_map=is_map)
        for text in self.body(f"set {name}"):
            for statement in text.split(";") if "{" not in text else [text]:
                words = statement.split()
                if words[:1] == ["type"]:
                    key_types = words[1 : words.index(":")] if ":" in words else words[1:]
                    kinds = tuple(SET_TYPES.get(w, "str") for w in key_types if w != ".")
                    element_set.kinds = kinds
                elif words[:1] == ["flags"]:
                    element_set.dynamic = "dynamic" in "".join(words[1:]).split(",")
                elif words[:1] == ["elements"]:
                    inside = statement[statement.index("{") + 1 : statement.rindex("}")]
                    element_set.pending += _split_top(inside)
        return element_set


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside braces; empty parts left out."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()]


_ELEMENT_ATTRIBUTES = ("timeout", "expires", "comment")  # each with a value


def _text_element(element_set: ElementSet, text: str) -> Element:
    """One element of an nft set or map, from its text."""
    words = _nft_words(text) if '"' in text else text.split()
    return _element(words, element_set.kinds, element_set.is_map)


def _element(tokens: list[str], kinds: tuple[str, ...], is_map: bool) -> Element:
    words = []
    attributes = iter(tokens)
    for word in attributes:
        if word in _ELEMENT_ATTRIBUTES:
            next(attributes, None)  # the kernel lists dynamic elements with these
        else:
            words.append(word)
    text = " ".join(words)
    verdict: Statement | None = None
    if is_map:
        if ":" not in words:
            raise RuleSyntaxError(f"map element without a value: {text!r}")
        colon = words.index(":")
        words, value = words[:colon], words[colon + 1 :]
        verdict = _verdict(value)
        if verdict is None:
            raise RuleSyntaxError(f"map element with a value that is not a verdict: {text!r}")
    components = tuple(w for i, w in enumerate(words) if i % 2 == 0)
    if any(w != "." for i, w in enumerate(words) if i % 2 == 1) or len(components) != len(kinds):
        raise RuleSyntaxError(f"element {text!r} does not fit the type of its set")
    return Element(text, components, kinds, verdict)


def _verdict(words: list[str]) -> Verdict | None:
    if words and words[0] in ("jump", "goto") and len(words) == 2:
        return Verdict(words[0], words[1])
    if len(words) == 1 and words[0] in VERDICT_WORDS[2:]:
        return Verdict(words[0])
    return None


def dnat_to(target: str) -> Dnat:
    """``ADDRESS``, ``ADDRESS:PORT`` or ``[IPV6-ADDRESS]:PORT``, as nft's ``dnat to`` and
    iptables' ``--to-destination`` write it."""
    address, port = target, ""
    if target.startswith("["):
        address, _, port = target[1:].partition("]")
        port = port.removeprefix(":")
    elif target.count(":") == 1:
        address, _, port = target.partition(":")
    try:
        return Dnat(ipaddress.ip_address(address), int(port) if port else None)
    except ValueError:
        raise Unknown(f"the DNAT target {target}") from None


class _RuleReader:
    """One nft rule's words, read left to right into matches and statements."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.pos = 0
        self.matches: list[Match | Chance] = []
        self.statements: list[Statement] = []

    def peek(self, ahead: int = 0) -> str | None:
        index = self.pos + ahead
        return self.words[index] if index < len(self.words) else None

    def take(self) -> str:
        if self.pos >= len(self.words):
            raise Unknown("the rule ends early")
        word = self.words[self.pos]
        self.pos += 1
        return word

    def read(self) -> None:
        while self.pos < len(self.words):
            word = self.peek()
            assert word is not None
            if word in VERDICT_WORDS:
                self.take()
                target = self.take() if word in ("jump", "goto") else None
                self.statements.append(Verdict(word, target))
            elif word == "dnat":
                self.dnat()
            elif word == "masquerade":
                self.take()
                flags = []
                while self.peek() in ("fully-random", "random", "persistent", "random,persistent"):
                    flags.append(self.take())
                self.statements.append(Masquerade(" ".join(flags)))
            elif word == "reject":
                self.reject()
            elif word == "counter":
                self.take()
                while self.peek() in ("packets", "bytes"):
                    self.take()
                    self.take()
            elif word == "comment":
                self.take()
                self.take()
            elif word == "meta" and self.peek(1) == "mark" and self.peek(2) == "set":
                self.set_mark()
            elif word in ("update", "add") and (self.peek(1) or "").startswith("@"):
                self.remember()
            else:
                self.match()

    def dnat(self) -> None:
        self.take()
        if self.peek() in ("ip", "ip6"):
            self.take()
        if self.take() != "to":
            raise Unknown("dnat without 'to'")
        self.statements.append(dnat_to(self.take()))

    def remember(self) -> None:
        self.take()
        name = self.take()[1:]
        if self.take() != "{":
            raise Unknown(f"update @{name} without {{ KEY }}")
        key = []
        while (word := self.take()) != "}":
            key.append(word)
        if key[:2] not in (["ip", "saddr"], ["ip6", "saddr"]) or key[2:3] not in ([], ["timeout"]):
            raise Unknown(f"update @{name} {{ {' '.join(key)} }}")
        self.statements.append(Remember(name))

    def reject(self) -> None:
        self.take()
        if self.peek() != "with":
            self.statements.append(Reject("icmp port-unreachable"))
            return
        self.take()
        how = [self.take()]
        while self.peek() is not None and self.peek() not in VERDICT_WORDS:
            how.append(self.take())
        spelled = " ".join(word for word in how if word != "type")  # icmp type port-unreachable
        self.statements.append(reject_statement(spelled, self.matches))

    def set_mark(self) -> None:
        self.pos += 3  # meta mark set
        op = None
        if self.peek() == "meta" and self.peek(1) == "mark":
            self.pos += 2
            op = self.take()
        self.statements.append(mark_statement(op, _int(self.take())))

    def selector(self) -> tuple[Selector, list[Match]]:
        """One field, and the matches it implies (``tcp dport`` implies protocol tcp)."""
        word = self.take()
        following = self.take()
        if word in ("ip", "ip6") and following in ("saddr", "daddr"):
            return Selector(following), []
        if (word, following) in (("ip", "protocol"), ("meta", "l4proto")):
            return Selector("l4proto"), []
        if word == "th" and following in ("dport", "sport"):
            return Selector(following), []
        if word in ("tcp", "udp", "sctp") and following in ("dport", "sport"):
            return Selector(following), [protocol_match(word)]
        if word == "meta" and following == "mark":
            mask = None
            if self.peek() == "&":
                self.take()
                mask = _int(self.take())
            return Selector("mark", mask=mask), []
        if word == "ct" and following in ("state", "status"):
            return Selector(f"ct_{following}"), []
        if word == "numgen" and following == "random":
            if self.take() != "mod":
                raise Unknown("numgen without mod")
            modulus = _int(self.take())
            if self.peek() == "offset":
                raise Unknown("numgen with an offset")
            return Selector("numgen", modulus=modulus), []
        if word == "fib" and following in ("daddr", "saddr"):
            if self.take() != "type":
                raise Unknown(f"fib {following} other than type")
            return Selector(f"fib_{following}"), []
        raise Unknown(f"{word} {following}")

    def match(self) -> None:
        implied: list[Match] = []
        key: list[Selector] = []
        while True:
            selector, more = self.selector()
            key.append(selector)
            implied += more
            if self.peek() != ".":
                break
            self.take()
        self.matches += implied
        word = self.take()
        if word == "vmap":
            target = self.take()
            if target.startswith("@"):
                self.statements.append(VerdictMap(tuple(key), map_name=target[1:]))
            elif target == "{":
                anonymous = self.anonymous(tuple(key), is_map=True)
                self.statements.append(VerdictMap(tuple(key), anonymous=anonymous))
            else:
                raise Unknown(f"vmap {target}")
            return
        negate = False
        if word in ("!=", "=="):
            negate = word == "!="
            word = self.take()
        if word.startswith("@"):
            self.matches.append(Match(tuple(key), set_name=word[1:], negate=negate))
        elif word == "{":
            anonymous = self.anonymous(tuple(key), is_map=False)
            self.matches.append(Match(tuple(key), anonymous=anonymous, negate=negate))
        else:
            if len(key) != 1:
                raise Unknown("a concatenation compared with a value")
            try:
                pattern = _value(word, key[0])
            except (ValueError, KeyError):
                raise Unknown(f"the value {word}") from None
            self.matches.append(Match(tuple(key), (pattern,), negate=negate))

    def anonymous(self, key: tuple[Selector, ...], is_map: bool) -> ElementSet:
        depth, words = 1, []
        while True:
            word = self.take()
            if word == "{":
                depth += 1
            elif word == "}":
                depth -= 1
                if depth == 0:
                    break
            words.append(word)
        element_set = ElementSet("{…}", tuple(s.kind for s in key), is_map=is_map)
        element_set.pending = _split_top(" ".join(words).replace(" , ", ", "))
        element_set.elements  # noqa: B018  (read now: a bad element makes the rule unknown)
        if element_set.errors:
            raise Unknown(element_set.errors[0])
        return element_set


def _int(word: str) -> int:
    try:
        return int(word, 0)
    except ValueError:
        raise Unknown(f"{word} is not a number") from None


def _value(word: str, selector: Selector) -> Pattern:
    if selector.field in ("fib_daddr", "fib_saddr", *FLAG_FIELDS):
        return word.lower()
    return parse_pattern(word, selector.kind)


def parse_nft_rule(chain: str, text: str) -> Rule:
    """One nft rule; a construct kpgen does not make gives a rule with ``error``."""
    words = _nft_words(text)
    reader = _RuleReader(words)
    try:
        reader.read()
    except Unknown as error:
        return Rule(chain, text, error=str(error))
    comment = None
    if "comment" in words:
        index = words.index("comment")
        comment = words[index + 1].strip('"') if index + 1 < len(words) else None
    return Rule(chain, text, tuple(reader.matches), tuple(reader.statements), comment=comment)


def parse_nft(text: str, origin: str = "rendered", family: IPFamily = IPFamily.V4) -> Ruleset:
    """The ``family`` table of an nft ruleset's text (as rendered, or as ``nft list table``
    prints it)."""
    return _NftParser(text, origin, family).parse()


# --- iptables ---------------------------------------------------------------------------------

# The built-in chains kpgen hooks into: (table, chain) -> (hook, priority)
BUILTIN = {
    ("nat", "PREROUTING"): ("prerouting", -100),
    ("nat", "INPUT"): ("input", 100),
    ("nat", "OUTPUT"): ("output", -100),
    ("nat", "POSTROUTING"): ("postrouting", 100),
    ("filter", "INPUT"): ("input", 0),
    ("filter", "FORWARD"): ("forward", 0),
    ("filter", "OUTPUT"): ("output", 0),
}
TABLES = ("nat", "filter")
_REJECT_WITH = {"tcp-reset": "tcp reset", "icmp-port-unreachable": "icmp port-unreachable",
                "icmp6-port-unreachable": "icmp port-unreachable"}  # fmt: skip
_HOST_MASKS = (IPFamily.V4.host_mask, IPFamily.V6.host_mask)


_IPT_WORD = re.compile(r'"((?:[^"\\]|\\.)*)"|(\S+)')
_IPT_TARGET = re.compile(r"(?:^|\s)-[jg]\s+(\S+)")


def _ipt_words(line: str) -> list[str]:
    """A rule line's words (comments are the only quoted ones): faster than shlex."""
    return [plain or quoted.replace('\\"', '"') for quoted, plain in _IPT_WORD.findall(line)]


def read_iptables_line(chain: str, line: str) -> Rule:
    """A rule from its ``-A CHAIN SPEC`` (or ``-I CHAIN SPEC``) line."""
    return parse_iptables_rule(chain, _ipt_words(line)[2:], line)


def parse_iptables(
    text: str, origin: str = "rendered", family: IPFamily = IPFamily.V4, prefix: str = IPT_PREFIX
) -> Ruleset:
    """``family``'s iptables-restore input (rendered) or ``iptables-save`` output (from the
    kernel), split by :func:`kpgen.dataplane.kernel.read_iptables_save`.

    Only the ``nat`` and ``filter`` tables and chains named ``prefix…`` are read; in the
    built-in chains only the rules that lead into them (any other is noted as ignored). A
    rule keeps the spelling of its line (``-A CHAIN SPEC``, or ``-I`` where the input inserts
    it); a chain's rules are read when a packet first enters it.
    """
    ruleset = Ruleset("iptables", origin, family)
    ignored: dict[str, int] = {}
    for table, saved in read_iptables_save(text).items():
        if table not in TABLES:
            continue
        for name, specs in saved.chains.items():
            builtin = (table, name) in BUILTIN
            if not name.startswith(prefix) and not builtin:
                continue
            chain = _ipt_chain(ruleset, table, name)
            chain.policy = saved.policies.get(name, "accept").lower()
            for spec in specs:
                target = _IPT_TARGET.search(spec)
                if builtin and not (target and target.group(1).startswith(prefix)):
                    key = f"{table} {name}"
                    ignored[key] = ignored.get(key, 0) + 1
                    continue
                command = "-I" if (name, spec) in saved.inserted else "-A"
                chain.sources.append(f"{command} {name} {spec}")
                if "-m recent" in spec:
                    for recent in re.findall(r"--name (\S+)", spec):
                        key = f"recent:{recent}"
                        ruleset.sets.setdefault(key, ElementSet(key, ("addr",), dynamic=True))
    for key, count in sorted(ignored.items()):
        ruleset.notes.append(f"{count} rule(s) in {key} not made by kpgen were not evaluated")
    return ruleset


def _ipt_chain(ruleset: Ruleset, table: str, name: str) -> Chain:
    key = chain_key(table, name)
    if key not in ruleset.chains:
        chain = Chain(name, table, reader=read_iptables_line)
        if (table, name) in BUILTIN:
            chain.hook, chain.priority = BUILTIN[(table, name)]
            chain.kind = table
        ruleset.chains[key] = chain
    return ruleset.chains[key]


def _split_mask(text: str) -> tuple[int, int | None]:
    value, _, mask = text.partition("/")
    return int(value, 0), int(mask, 0) if mask else None


def parse_iptables_rule(chain: str, spec: list[str], text: str) -> Rule:
    """The options of one ``-A CHAIN ...`` line; unknown options give a rule with ``error``."""
    matches: list[Match | Chance] = []
    statements: list[Statement] = []
    comment = None
    negate = False
    modules: set[str] = set()
    recent: dict[str, str] = {}  # -m recent: name, and check or set
    words = iter(spec)

    def value() -> str:
        try:
            return next(words)
        except StopIteration:
            raise Unknown("an option without its value") from None

    def add(selector: Selector, pattern: Pattern) -> None:
        nonlocal negate
        matches.append(Match((selector,), (pattern,), negate=negate))
        negate = False

    try:
        for word in words:
            if word == "!":
                negate = True
            elif word in ("-s", "--source", "-d", "--destination"):
                field_name = "saddr" if word in ("-s", "--source") else "daddr"
                add(Selector(field_name), parse_pattern(value(), "addr"))
            elif word in ("-p", "--protocol"):
                add(Selector("l4proto"), parse_pattern(value(), "proto"))
            elif word == "-m":
                modules.add(value())
            elif word in ("--dport", "--destination-port", "--sport", "--source-port"):
                if not modules & {"tcp", "udp", "sctp"}:
                    raise Unknown(f"{word} without -m tcp/udp/sctp")
                port_field = "dport" if word.startswith("--d") else "sport"
                add(Selector(port_field), parse_pattern(value(), "port"))
            elif word == "--comment":
                comment = value()
            elif word in ("--dst-type", "--src-type") and "addrtype" in modules:
                add(Selector("fib_daddr" if word == "--dst-type" else "fib_saddr"), value().lower())
            elif word == "--mode" and "statistic" in modules:
                if value() != "random":
                    raise Unknown("statistic other than --mode random")
            elif word == "--probability" and "statistic" in modules:
                if negate:
                    raise Unknown("a negated statistic match")
                matches.append(Chance(Fraction(value())))
            elif word == "--mark" and "mark" in modules:
                mark, mask = _split_mask(value())
                add(Selector("mark", mask=mask), mark)
            elif word in ("--ctstate", "--state") and modules & {"conntrack", "state"}:
                states = ElementSet("{…}", ("flags",))
                for state in value().lower().split(","):
                    states.add(Element(state, (state,), ("flags",)))
                matches.append(Match((Selector("ct_state"),), anonymous=states, negate=negate))
                negate = False
            elif "recent" in modules and word in _RECENT:
                _recent_option(word, value, recent, negate)
            elif word in ("-j", "--jump", "-g", "--goto"):
                statements.append(_target(value(), words, goto=word in ("-g", "--goto")))
            else:
                raise Unknown(word)
        if recent:
            name = f"recent:{recent.get('name', 'DEFAULT')}"
            if recent.get("check"):
                matches.append(Match((Selector("saddr"),), set_name=name))
            if recent.get("set"):
                statements.insert(0, Remember(name))
    except (Unknown, ValueError, KeyError) as error:
        return Rule(chain, text, error=f"cannot read {error}")
    return Rule(chain, text, tuple(matches), tuple(statements), comment=comment)


# -m recent, as kpgen uses it for session affinity: by source address, one list per endpoint
_RECENT = ("--name", "--mask", "--rsource", "--rcheck", "--update", "--seconds", "--reap",
           "--set")  # fmt: skip


def _recent_option(
    word: str, value: Callable[[], str], recent: dict[str, str], negate: bool
) -> None:
    if negate:
        raise Unknown(f"! {word}")
    if word == "--name":
        recent["name"] = value()
    elif word == "--mask":
        if value() not in _HOST_MASKS:
            raise Unknown("-m recent with a --mask that is not one address")
    elif word == "--seconds":
        value()  # the lists read from the kernel hold the clients of the last timeout
    elif word in ("--rcheck", "--update"):
        recent["check"] = "yes"
    elif word == "--set":
        recent["set"] = "yes"


def _target(name: str, words: Iterator[str], goto: bool) -> Statement:
    options: dict[str, str] = {}
    rest = list(words)
    index = 0
    while index < len(rest):
        option = rest[index]
        if not option.startswith("--"):
            raise Unknown(f"{option} after -j {name}")
        if option in ("--random-fully", "--random", "--persistent"):
            options[option] = ""
            index += 1
        else:
            if index + 1 >= len(rest):
                raise Unknown(f"{option} without a value")
            options[option] = rest[index + 1]
            index += 2
    if name in ("ACCEPT", "DROP", "RETURN"):
        return Verdict({"ACCEPT": "accept", "DROP": "drop", "RETURN": "return"}[name])
    if name == "REJECT":
        how = options.get("--reject-with", "icmp-port-unreachable")
        if how not in _REJECT_WITH:
            raise Unknown(f"REJECT --reject-with {how}")
        return Reject(_REJECT_WITH[how])
    if name == "DNAT":
        return dnat_to(options.get("--to-destination", ""))
    if name == "MASQUERADE":
        return Masquerade(" ".join(o.removeprefix("--") for o in options))
    if name == "MARK":
        for option in ("--set-xmark", "--set-mark"):
            if option in options:
                mark, mask = _split_mask(options[option])
                return SetMark(mark, MARK_BITS if mask is None else mask)
        for option, op in (("--or-mark", "or"), ("--xor-mark", "xor"), ("--and-mark", "and")):
            if option in options:
                return mark_statement(op, int(options[option], 0))
        raise Unknown("MARK without a known option")
    # a chain of ours; a target extension (LOG, SNAT, CT, ...) is not one kpgen uses
    extension = name.isupper() and "-" not in name
    if options or extension or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise Unknown(f"-j {name}")
    return Verdict("goto" if goto else "jump", name)
