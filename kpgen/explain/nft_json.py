"""The kernel's nftables rules, read from libnftables JSON (libnftables-json(5)) into the rule
model of kpgen/explain/rules.py.

``nft list`` text changes between nft versions (upstream kube-proxy broke on a host whose nft
was newer than its own); the JSON has a schema. What kpgen's templates make maps like this:

=========================================  ===================================================
JSON                                       model
=========================================  ===================================================
``chain`` with ``hook``, ``prio``,         a base chain (:class:`Chain` ``hook``, ``priority``,
``policy``, ``type``                       ``policy``, ``kind``)
``set`` / ``map`` (``type`` a name or a    :class:`ElementSet`: ``kinds`` from the types, a map
list of them, ``map: verdict``)            of verdicts; elements ``"10.0.0.1"``, ``80``,
                                           ``{"prefix"}``, ``{"range"}``, ``{"concat"}``,
                                           ``{"elem": {"val", "timeout", "expires"}}``
``match`` ``==`` / ``!=`` / ``in``         :class:`Match` of one :class:`Selector` or a
                                           concatenation, against a value, ``@set`` or an
                                           inline ``{"set"}``
``payload`` ip/ip6 saddr/daddr, th/tcp/    ``saddr``, ``daddr``, ``dport``, ``sport`` (``tcp
udp/sctp dport/sport``; ``meta l4proto``,  dport`` implies ``l4proto tcp``), ``l4proto``,
``meta mark``, ``{"&": [meta mark, M]}``   ``mark`` (masked)
``ct state`` / ``ct status``               ``ct_state``, ``ct_status`` (flags)
``fib`` ``type`` of daddr/saddr            ``fib_daddr``, ``fib_saddr``
``numgen random mod K offset 0``           ``numgen`` (K branches)
``vmap`` (``@map`` or ``{"set"}``)         :class:`VerdictMap`
``jump``/``goto``/``return``/``accept``/   :class:`Verdict`
``drop``/``continue``
``mangle`` meta mark (a value, or ``|``,   :class:`SetMark`
``^``, ``&`` of the mark)
``dnat`` ``addr``, ``port``                :class:`Dnat`
``masquerade`` ``flags``                   :class:`Masquerade`
``reject`` ``tcp reset`` / ICMP            :class:`Reject` (a TCP reset implies ``l4proto
port-unreachable                           tcp``, which nft leaves out of its listing)
``set`` ``update``/``add`` ``@set``        :class:`Remember`; the set is dynamic (libnftables
``{ ip saddr }``                           1.0.6 leaves the ``dynamic`` flag out of its JSON)
``counter``                                nothing
=========================================  ===================================================

Anything else makes the rule unknown (``error``), as in the text reader. Each rule also gets a
text for the explanation's path, spelled as kpgen's templates spell it (``meta mark set meta
mark or 0x4000``); a piece this module does not know is shown as its JSON.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from kpgen.core.model import IPFamily, hostport
from kpgen.core.names import NFT_TABLE, is_nft_table
from kpgen.explain.rules import (
    MARK_OPS,
    PRIORITIES,
    SET_TYPES,
    VERDICT_WORDS,
    Chain,
    Chance,
    Dnat,
    Element,
    ElementSet,
    Masquerade,
    Match,
    Remember,
    Rule,
    Ruleset,
    RuleSyntaxError,
    Selector,
    Statement,
    Unknown,
    Verdict,
    VerdictMap,
    mark_statement,
    parse_pattern,
    protocol_match,
    reject_statement,
)

_MARK_WORDS = {symbol: word for word, symbol in MARK_OPS.items() if word.isalpha()}


def read_nft_json(items: list[dict[str, Any]], family: IPFamily) -> Ruleset:
    """kpgen's ``family`` tables in a JSON listing (:meth:`kpgen.dataplane.kernel.Nft.listing`)
    as one table (:meth:`Ruleset.add_table`): its chains (their rules read when a packet
    first enters them), sets and maps."""
    ruleset = Ruleset("nftables", "kernel", family)
    name = f"{family.nft_family} {NFT_TABLE}"
    chains: dict[tuple[str, str], Chain] = {}
    sets: dict[str, list[ElementSet]] = {}
    updated: set[str] = set()
    for item in items:
        if len(item) != 1:
            raise RuleSyntaxError(f"not an object of libnftables-json(5): {_show(item)}")
        ((kind, obj),) = item.items()
        if not isinstance(obj, dict) or kind not in ("chain", "set", "map", "rule"):
            continue  # metainfo, the table itself, objects kpgen does not make
        table = str(obj.get("table"))
        if obj.get("family") != family.nft_family or not is_nft_table(table):
            continue
        try:
            if kind == "chain":
                chains[table, obj["name"]] = _chain(obj, name)
            elif kind in ("set", "map"):
                sets.setdefault(table, []).append(_set(obj, kind == "map"))
            else:
                key = (table, obj["chain"])
                chain = chains.setdefault(key, Chain(obj["chain"], name, reader=read_rule))
                chain.sources.append(obj)
                updated |= _updated_sets(obj.get("expr", []))
        except (KeyError, TypeError, ValueError):
            raise RuleSyntaxError(f"cannot read the {kind} {_show(obj)}") from None
    for table in sorted({t for t, _ in chains} | sets.keys(), key=lambda t: t != NFT_TABLE):
        ruleset.add_table(
            name,
            (chain for (t, _), chain in chains.items() if t == table),
            sets.get(table, ()),
            same=lambda rule: rule.get("expr"),
        )
    for set_name in updated & ruleset.sets.keys():
        ruleset.sets[set_name].dynamic = True
    return ruleset


def _chain(obj: dict[str, Any], table: str) -> Chain:
    chain = Chain(obj["name"], table, reader=read_rule)
    if "hook" in obj:
        chain.hook, chain.kind = obj["hook"], obj.get("type")
        chain.policy = obj.get("policy", "accept")
        priority = obj.get("prio", 0)
        chain.priority = PRIORITIES[priority] if priority in PRIORITIES else int(priority)
    return chain


def _set(obj: dict[str, Any], is_map: bool) -> ElementSet:
    types = obj["type"] if isinstance(obj["type"], list) else [obj["type"]]
    element_set = ElementSet(
        obj["name"],
        tuple(SET_TYPES.get(t, "str") for t in types),
        is_map=is_map,
        dynamic="dynamic" in _flags(obj),
        reader=_element,
    )
    element_set.pending = list(obj.get("elem", []))
    return element_set


def _updated_sets(expr: list[Any]) -> set[str]:
    """The sets the rule's ``update``/``add`` statements fill from the packets."""
    found = set()
    for statement in expr:
        target = statement.get("set") if isinstance(statement, dict) else None
        if isinstance(target, dict) and str(target.get("set", "")).startswith("@"):
            found.add(target["set"][1:])
    return found


# --- elements and values ----------------------------------------------------------------------


def _element(element_set: ElementSet, item: Any) -> Element:
    """One element of a set (its key) or a map (``[key, verdict]``)."""
    try:
        key, value = item if element_set.is_map else (item, None)
        components = _components(key)
        verdict = _verdict(value) if element_set.is_map else None
    except (Unknown, TypeError, ValueError, KeyError):
        raise RuleSyntaxError(f"cannot read the element {_show(item)}") from None
    if len(components) != len(element_set.kinds):
        raise RuleSyntaxError(f"element {_show(item)} does not fit the type of its set")
    text = " . ".join(components)
    if verdict is not None:
        text += f" : {_spell_verdict(verdict)}"
    return Element(text, components, element_set.kinds, verdict)


def _components(value: Any) -> tuple[str, ...]:
    """A key's components as the text reader sees them (``10.0.0.0/8``, ``tcp``, ``80``)."""
    if isinstance(value, dict) and "elem" in value:
        value = value["elem"]["val"]  # an element with a timeout or an expiry
    if isinstance(value, dict) and "concat" in value:
        return tuple(_component(part) for part in value["concat"])
    return (_component(value),)


def _component(value: Any) -> str:
    if isinstance(value, (str, int)) and not isinstance(value, bool):
        return str(value)
    if isinstance(value, dict) and "prefix" in value:
        return f"{value['prefix']['addr']}/{value['prefix']['len']}"
    if isinstance(value, dict) and "range" in value:
        low, high = value["range"]
        return f"{_component(low)}-{_component(high)}"
    raise Unknown(f"the value {_show(value)}")


def _verdict(value: Any) -> Verdict:
    if isinstance(value, dict) and len(value) == 1:
        ((kind, target),) = value.items()
        if kind in ("jump", "goto") and isinstance(target, dict):
            return Verdict(kind, target["target"])
        if kind in VERDICT_WORDS[2:]:
            return Verdict(kind)
    raise Unknown(f"a value that is not a verdict: {_show(value)}")


# --- rules --------------------------------------------------------------------------------------


def read_rule(chain: str, obj: dict[str, Any]) -> Rule:
    """One rule object; a construct kpgen does not make gives a rule with ``error``."""
    expr = obj.get("expr", [])
    comment = obj.get("comment")
    text = spell(expr) + (f' comment "{comment}"' if comment else "")
    reader = _RuleReader()
    try:
        for statement in expr:
            reader.statement(statement)
    except Unknown as error:
        return Rule(chain, text, error=str(error))
    except (KeyError, TypeError, ValueError, AttributeError):
        return Rule(chain, text, error=f"cannot read {_show(expr)}")
    return Rule(chain, text, tuple(reader.matches), tuple(reader.statements), comment=comment)


class _RuleReader:
    """One rule's statements, read in order into matches and statements."""

    def __init__(self) -> None:
        self.matches: list[Match | Chance] = []
        self.statements: list[Statement] = []

    def statement(self, statement: dict[str, Any]) -> None:
        ((kind, value),) = statement.items()
        if kind == "match":
            self.match(value["op"], value["left"], value["right"])
        elif kind in VERDICT_WORDS:
            self.statements.append(_verdict(statement))
        elif kind == "vmap":
            key, data = self.key(value["key"]), value["data"]
            if isinstance(data, str) and data.startswith("@"):
                self.statements.append(VerdictMap(key, map_name=data[1:]))
            else:
                self.statements.append(VerdictMap(key, anonymous=self.inline(key, data, True)))
        elif kind == "mangle" and value["key"] == {"meta": {"key": "mark"}}:
            self.statements.append(self.set_mark(value["value"]))
        elif kind == "dnat" and isinstance(value.get("addr"), str):
            if set(value) - {"addr", "port", "family"}:
                raise Unknown(f"dnat {_show(value)}")
            self.statements.append(Dnat(ipaddress.ip_address(value["addr"]), value.get("port")))
        elif kind == "masquerade":
            self.statements.append(Masquerade(" ".join(_flags(value))))
        elif kind == "reject":
            how = "icmp port-unreachable" if not value else value.get("type", "icmp")
            if value and how != "tcp reset":
                how = f"{how} {value.get('expr', 'port-unreachable')}"
            self.statements.append(reject_statement(how, self.matches))
        elif kind == "set" and value["op"] in ("update", "add"):
            self.remember(value)
        elif kind != "counter":
            raise Unknown(spell([statement]))

    def match(self, op: str, left: Any, right: Any) -> None:
        key = self.key(left)
        if op not in ("==", "!=", "in"):
            raise Unknown(f"the comparison {op}")
        negate = op == "!="
        if isinstance(right, str) and right.startswith("@"):
            self.matches.append(Match(key, set_name=right[1:], negate=negate))
        elif isinstance(right, dict) and "set" in right:
            self.matches.append(Match(key, anonymous=self.inline(key, right, False), negate=negate))
        elif isinstance(right, list):  # flags: ct state established,related
            flags = {"set": right}
            self.matches.append(Match(key, anonymous=self.inline(key, flags, False), negate=negate))
        else:
            components = _components(right)
            if len(components) != len(key):
                raise Unknown(f"{spell_expression(left)} compared with {_show(right)}")
            patterns = tuple(parse_pattern(c, s.kind) for c, s in zip(components, key, strict=True))
            self.matches.append(Match(key, patterns, negate=negate))

    def key(self, expr: Any) -> tuple[Selector, ...]:
        """The fields a match or a map reads (one, or a concatenation)."""
        parts = expr["concat"] if isinstance(expr, dict) and "concat" in expr else [expr]
        return tuple(self.selector(part) for part in parts)

    def selector(self, expr: dict[str, Any]) -> Selector:
        ((kind, value),) = expr.items()
        if kind == "payload":
            protocol, field = value["protocol"], value["field"]
            if protocol in ("ip", "ip6") and field in ("saddr", "daddr"):
                return Selector(field)
            if protocol in ("th", "tcp", "udp", "sctp") and field in ("dport", "sport"):
                if protocol != "th":
                    self.matches.append(protocol_match(protocol))
                return Selector(field)
        elif kind == "meta" and value["key"] in ("l4proto", "mark"):
            return Selector(value["key"])
        elif kind == "ct" and value["key"] in ("state", "status") and "dir" not in value:
            return Selector(f"ct_{value['key']}")
        elif kind == "numgen" and value["mode"] == "random" and not value.get("offset"):
            return Selector("numgen", modulus=int(value["mod"]))
        elif (
            kind == "fib" and value["result"] == "type" and _flags(value) in (["daddr"], ["saddr"])
        ):
            return Selector(f"fib_{_flags(value)[0]}")
        elif kind == "&" and value[0] == {"meta": {"key": "mark"}} and isinstance(value[1], int):
            return Selector("mark", mask=value[1])
        raise Unknown(f"the packet's {spell_expression(expr)}")

    def inline(self, key: tuple[Selector, ...], data: Any, is_map: bool) -> ElementSet:
        """An inline set or map (``{ a, b }``), read now: a bad element makes the rule unknown."""
        element_set = ElementSet("{…}", tuple(s.kind for s in key), is_map=is_map, reader=_element)
        element_set.pending = list(data["set"])
        element_set.elements  # noqa: B018
        if element_set.errors:
            raise Unknown(element_set.errors[0])
        return element_set

    def set_mark(self, value: Any) -> Statement:
        if isinstance(value, int):
            return mark_statement(None, value)
        ((op, (mark, operand)),) = value.items()
        if mark != {"meta": {"key": "mark"}} or not isinstance(operand, int):
            raise Unknown(f"meta mark set {spell_expression(value)}")
        return mark_statement(op, operand)

    def remember(self, value: dict[str, Any]) -> None:
        element = value["elem"]
        if isinstance(element, dict) and "elem" in element:
            element = element["elem"]["val"]  # { ip saddr timeout 600s }
        if element not in ({"payload": {"protocol": p, "field": "saddr"}} for p in ("ip", "ip6")):
            raise Unknown(spell([{"set": value}]))
        self.statements.append(Remember(value["set"].removeprefix("@")))


# --- a rule spelled as kpgen's templates spell it -------------------------------------------------


def spell(expr: list[Any]) -> str:
    """A rule's statements as nft syntax (what the explanation shows)."""
    return " ".join(_spell_statement(statement) for statement in expr)


def _spell_statement(statement: Any) -> str:
    try:
        ((kind, value),) = statement.items()
        if kind == "match":
            left, right, op = value["left"], value["right"], value["op"]
            spelled_left = spell_expression(left)
            if op == "==" and not (isinstance(left, dict) and set(left) & set(_MARK_WORDS)):
                op = ""  # implied, as kpgen writes it (but: meta mark & 0x4000 == 0)
            if op == "in":
                op = ""
            return " ".join(p for p in (spelled_left, op, spell_expression(right)) if p)
        if kind in VERDICT_WORDS:
            return _spell_verdict(_verdict(statement))
        if kind == "vmap":
            return f"{spell_expression(value['key'])} vmap {spell_expression(value['data'])}"
        if kind == "mangle":
            return f"{spell_expression(value['key'])} set {spell_expression(value['value'], True)}"
        if kind == "dnat":
            address, port = value["addr"], value.get("port")
            target = spell_expression(address)
            if port is not None:
                target = hostport(target, port)
            return f"dnat {value['family'] + ' ' if 'family' in value else ''}to {target}"
        if kind == "masquerade":
            return " ".join(["masquerade", *_flags(value)])
        if kind == "reject":
            if not value:
                return "reject"
            how = value.get("type", "icmp")
            code = value.get("expr")
            if how in ("icmp", "icmpv6") and code == "port-unreachable":
                return "reject"  # the default of either family
            return " ".join(p for p in ("reject with", how, code) if p)
        if kind == "set":
            return f"{value['op']} {value['set']} {{ {spell_expression(value['elem'])} }}"
        if kind == "counter":
            return "counter"
    except (KeyError, TypeError, ValueError, AttributeError, Unknown):
        pass
    return _show(statement)


def spell_expression(expr: Any, mark: bool = False) -> str:
    """An expression as nft syntax; ``mark``: a mark's value (``meta mark or 0x4000``)."""
    if isinstance(expr, bool) or expr is None:
        return _show(expr)
    if isinstance(expr, int):
        return f"{expr:#x}" if mark else str(expr)
    if isinstance(expr, str):
        return expr
    if isinstance(expr, list):  # flags
        return ",".join(spell_expression(part) for part in expr)
    try:
        ((kind, value),) = expr.items()
        if kind == "payload":
            return f"{value['protocol']} {value['field']}"
        if kind in ("meta", "ct"):
            return f"{kind} {value['key']}"
        if kind == "numgen":
            offset = f" offset {value['offset']}" if value.get("offset") else ""
            return f"numgen {value['mode']} mod {value['mod']}{offset}"
        if kind == "fib":
            return f"fib {' . '.join(_flags(value))} {value['result']}"
        if kind == "concat":
            return " . ".join(spell_expression(part) for part in value)
        if kind in ("prefix", "range"):
            return _component(expr)
        if kind in _MARK_WORDS:
            left, right = value
            word = _MARK_WORDS[kind] if mark else kind
            return f"{spell_expression(left)} {word} {spell_expression(right, True)}"
        if kind == "set":
            return "{ " + ", ".join(_spell_element(e) for e in value) + " }"
        if kind == "elem":
            timeout = f" timeout {value['timeout']}s" if "timeout" in value else ""
            return spell_expression(value["val"]) + timeout
        if kind in VERDICT_WORDS:
            return _spell_verdict(_verdict(expr))
    except (KeyError, TypeError, ValueError, AttributeError, Unknown):
        pass
    return _show(expr)


def _spell_element(element: Any) -> str:
    if isinstance(element, list) and len(element) == 2:
        return f"{spell_expression(element[0])} : {spell_expression(element[1])}"
    return spell_expression(element)


def _spell_verdict(verdict: Verdict) -> str:
    return verdict.kind if verdict.target is None else f"{verdict.kind} {verdict.target}"


def _flags(obj: Any) -> list[str]:
    """An object's ``flags``: libnftables writes one flag as a string, more as a list."""
    flags = (obj or {}).get("flags", [])
    return [flags] if isinstance(flags, str) else list(flags)


def _show(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))
