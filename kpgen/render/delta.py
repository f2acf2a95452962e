"""Partial syncs: the smallest kernel transaction that turns loaded rules into new ones.

nftables: :class:`NftLoaded` keeps what a change needs to know of kpgen's tables of one family
(the node-wide table and the shard tables): counts of the elements several ports share, the
deletions that wait, the ports of each shard table. :meth:`NftLoaded.change` writes the
transaction that replaces some ports' shares (kpgen.render.text.NftPort, rendered by the same
templates as the whole tables) by new ones. Its commands are chosen so that
libnftables needs no copy of the kernel's tables to resolve them (nft 1.0.6 lists every chain
of the node before an ``add element`` or an ``add rule``: 15 ms at 20,000 chains, see
docs/performance.md): elements are added with ``add map NAME { type ...; elements = ... }``,
a chain's rules with ``add chain NAME { ... }``. Deletions cannot be phrased so; deleting an
endpoint's hairpin element, which nothing else needs, waits until a transaction pays for
that copy anyway (or the next full sync). The ports' chains are in shard tables
(kpgen.core.names.NFT_SHARDS): a change makes the kernel check only the tables it touches.

iptables: :func:`iptables_change` rewrites the chains of the changed ports' shares
(kpgen.render.text.IptPort) and, where a port's lines in them changed, the shared chains.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kpgen.core.names import NFT_TABLE, nft_shard_table
from kpgen.render.text import NFT_SHARD_CONTAINERS, NFT_SHARED, IptPort, NftPort

# elements whose deletion may wait: an endpoint's hairpin element (nothing else needs it gone),
# and a dispatch element of a port that is gone (its chain is flushed at once: a packet that
# finds the element finds an empty chain, as if there were none). Deleting would make
# libnftables 1.0.6 copy every table first (11-15 ms a command at 10,000 services, 80-100 at
# 50,000); a transaction that deletes anyway takes them along, so does a periodic full sync.
_DEFERRABLE = frozenset({"hairpin-endpoints", *NFT_SHARD_CONTAINERS})
# at most this many wait: then the next transaction deletes them (so does a full sync)
STALE_LIMIT = 1000
Element = tuple[str, str, str]  # (table, set or map, element)
Block = tuple[str, tuple[str, ...]]  # (chain or set, its lines)


def blocks(objects: str) -> dict[str, Block]:
    """A port's sets and chains (:attr:`NftPort.objects`): name -> (kind, body lines)."""
    found: dict[str, Block] = {}
    name, kind, body = "", "", list[str]()
    for line in objects.splitlines():
        if not name:
            if line.startswith(("\tchain ", "\tset ")) and line.endswith(" {"):
                kind, name = line[1:-2].split(" ", 1)
                body = []
        elif line == "\t}":
            found[name] = (kind, tuple(body))
            name = ""
        else:
            body.append(line.strip())
    return found


def _key(element: str) -> str:
    """The key of a map element (``k : verdict``); a set element is its own key."""
    return element.split(" : ", 1)[0]


def _elements(port: NftPort | None) -> Iterable[Element]:
    """A port's elements, each with the table it is in."""
    if port is None:
        return ()
    shard = nft_shard_table(port.shard)
    return (
        (shard if container in NFT_SHARD_CONTAINERS else NFT_TABLE, container, element)
        for container, element in port.elements
    )


@dataclass(eq=False)
class NftLoaded:
    """kpgen's tables of one family as loaded, as far as a change needs: how many ports need
    each element that several may share (an endpoint's hairpin element, a ClusterIP),
    elements still loaded that no port needs (deletions that wait), and how many ports each
    shard table holds. The ports' shares themselves are not kept: a change gives each port's
    old share and its new one (rendered again from the old plan)."""

    family: str  # "ip", "ip6"
    renderer: Any  # templates/nftables.port.j2's macros (kpgen.render.text.nft_port_renderer)
    counts: Counter[Element] = field(default_factory=Counter)
    stale: set[Element] = field(default_factory=set)
    stale_chains: set[tuple[str, str]] = field(default_factory=set)  # ("ip kpgen-07", chain)
    shards: Counter[int] = field(default_factory=Counter)
    # sets the port chains may name, declared in a transaction before its chains
    referenced_sets: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        family: str,
        renderer: Any,
        ports: Iterable[NftPort],
        referenced_sets: tuple[str, ...],
    ) -> NftLoaded:
        """What a full load of ``ports`` leaves loaded."""
        loaded = cls(family, renderer, referenced_sets=referenced_sets)
        for port in ports:
            loaded.counts.update(e for e in _elements(port) if e[1] in NFT_SHARED)
            loaded.shards[port.shard] += port.in_shard
        return loaded

    def change(
        self, changed: Mapping[str, tuple[NftPort | None, NftPort | None]]
    ) -> tuple[str, bool]:
        """The transaction that puts the ``changed`` ports' new shares in place of their old
        ones (``key: (old, new)``; None: the port is not there), and whether it needs
        libnftables' copy of the tables (deletions); this object then describes the tables
        as they will be once the transaction is committed (on a failure, the caller loads
        everything again). A shard table is created with its first port and deleted with its
        last."""
        f = self.family
        gone_elements: Counter[Element] = Counter()
        new_elements: Counter[Element] = Counter()
        flush: list[tuple[str, str]] = []
        delete_chains: list[tuple[str, str]] = []
        delete_sets: list[tuple[str, str]] = []
        add_sets: list[str] = []
        add_chains: list[str] = []
        shards_before = +self.shards
        touched: set[str] = set()  # shard tables that get chains
        for old, new in changed.values():
            for port, step in ((old, -1), (new, 1)):
                if port is not None and port.in_shard:
                    self.shards[port.shard] += step
            either = new or old
            assert either is not None
            t = f"{f} {nft_shard_table(either.shard)}"
            before = blocks(old.objects) if old else {}
            after = blocks(new.objects) if new else {}
            for name, (kind, body) in after.items():
                was = before.get(name)
                if was == (kind, body):
                    continue
                text = "".join(f"\t{line}\n" for line in body)
                if kind == "set":
                    if was is not None:  # a set's definition changed (its timeout)
                        delete_sets.append((t, name))
                    add_sets.append(f"add set {t} {name} {{\n{text}}}\n")
                else:
                    if was is not None:
                        flush.append((t, name))
                    add_chains.append(f"add chain {t} {name} {{\n{text}}}\n")
                    touched.add(t)
                    self.stale_chains.discard((t, name))  # flushed before: filled again
            for name, (kind, _) in before.items():
                if name not in after:
                    if kind == "chain":  # flushed now, deleted with the deferred elements
                        flush.append((t, name))
                        self.stale_chains.add((t, name))
                    else:
                        delete_sets.append((t, name))
            gone_elements.update(_elements(old))
            new_elements.update(_elements(new))
        removed: list[Element] = []
        added: list[Element] = []
        for element in gone_elements.keys() | new_elements.keys():
            if element[1] not in NFT_SHARED:  # one port's own: gone or new with that port
                net = new_elements[element] - gone_elements[element]
                (removed if net < 0 else added if net > 0 else []).append(element)
                continue
            count = self.counts[element]
            after_count = count - gone_elements[element] + new_elements[element]
            if after_count > 0:
                self.counts[element] = after_count
                if count == 0 and element not in self.stale:
                    added.append(element)
                self.stale.discard(element)
            else:
                self.counts.pop(element, None)
                if count > 0:
                    removed.append(element)
        self.shards = +self.shards
        created = [n for n in self.shards if n not in shards_before]
        dropped = {nft_shard_table(n) for n in shards_before if n not in self.shards}

        def stays(command: tuple[str, str]) -> bool:
            """Whether the table of a (table, name) command stays (a dropped table is deleted
            whole)."""
            return command[0].rsplit(" ", 1)[-1] not in dropped

        deletions = [e for e in removed if e[1] not in _DEFERRABLE and e[0] not in dropped]
        self.stale.update(e for e in removed if e[1] in _DEFERRABLE and e[0] not in dropped)
        self.stale = {e for e in self.stale if e[0] not in dropped}
        self.stale_chains = {c for c in self.stale_chains if stays(c)}
        # a key added again: the same element is there already; another one (a changed
        # verdict) must go first
        for new_element in list(added):
            key = (new_element[0], new_element[1], _key(new_element[2]))
            for waiting in [e for e in self.stale if (e[0], e[1], _key(e[2])) == key]:
                self.stale.discard(waiting)
                if waiting == new_element:
                    added.remove(new_element)
                else:
                    deletions.append(waiting)
        flush, delete_chains, delete_sets = (
            [c for c in commands if stays(c)] for commands in (flush, delete_chains, delete_sets)
        )
        costly = bool(deletions or delete_chains or delete_sets)
        if costly or len(self.stale) + len(self.stale_chains) > STALE_LIMIT:
            deletions += sorted(self.stale)
            delete_chains += sorted(self.stale_chains)
            self.stale.clear()
            self.stale_chains.clear()
        script = [
            str(self.renderer.shard(nft_shard_table(n), {}, [])).lstrip("\n")
            for n in sorted(created)
        ]
        script += [
            f"add set {t} {n} {{\n{self.renderer.declaration(n)}\n}}\n"
            for t in sorted(touched)
            for n in self.referenced_sets
        ]
        script += [f"flush chain {t} {name}\n" for t, name in flush]
        script += _grouped(f"delete element {f}", deletions, key=_key)
        script += [f"delete chain {t} {name}\n" for t, name in delete_chains]
        script += [f"delete set {t} {name}\n" for t, name in delete_sets]
        script += add_sets + add_chains
        for (table, container), elements in _by_container(added).items():
            what = "set" if container in NFT_SHARED else "map"
            listed = ",\n".join(elements)
            script.append(
                f"add {what} {f} {table} {container} {{\n{self.renderer.declaration(container)}\n"
                f"elements = {{\n{listed}\n}}\n}}\n"
            )
        script += [f"delete table {f} {table}\n" for table in sorted(dropped)]
        return "".join(script), costly

    def delete_stale(self) -> str:
        """The transaction that deletes the elements and chains whose deletion waited (empty:
        none)."""
        script = _grouped(f"delete element {self.family}", self.stale, key=_key)
        script += [f"delete chain {t} {name}\n" for t, name in sorted(self.stale_chains)]
        self.stale.clear()
        self.stale_chains.clear()
        return "".join(script)


def _by_container(elements: Iterable[Element]) -> dict[tuple[str, str], list[str]]:
    found: dict[tuple[str, str], list[str]] = {}
    for table, container, element in sorted(elements):
        found.setdefault((table, container), []).append(element)
    return found


def _grouped(verb: str, elements: Iterable[Element], key: Callable[[str], str]) -> list[str]:
    return [
        f"{verb} {table} {container} {{ {', '.join(dict.fromkeys(map(key, items)))} }}\n"
        for (table, container), items in _by_container(elements).items()
    ]


# --- iptables ---------------------------------------------------------------------------


def parse_iptables(text: str) -> dict[str, dict[str, list[str]]]:
    """iptables-restore input taken apart: table -> chain -> its rules (``-A`` lines).
    Jumps from built-in chains (``-I``) and deletions (``-X``) are left out: the applier
    ensures those on full syncs."""
    tables: dict[str, dict[str, list[str]]] = {}
    chains: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.startswith("*"):
            chains = tables.setdefault(line[1:], {})
        elif line.startswith(":"):
            chains.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith("-A "):
            chains.setdefault(line.split(" ", 2)[1], []).append(line)
    return tables


def _restore_input(
    rewrite: Mapping[str, Mapping[str, list[str]]], gone: Mapping[str, set[str]]
) -> str:
    """iptables-restore --noflush input that rewrites chains whole (``rewrite``: table ->
    chain -> its rules) and deletes chains (``gone``: table -> chains). Empty: nothing."""
    out = []
    for table in dict.fromkeys([*rewrite, *gone]):  # in the order given: nat, then filter
        written, deleted = rewrite.get(table, {}), sorted(gone.get(table, ()))
        if not written and not deleted:
            continue
        out.append(f"*{table}")
        out += [f":{chain} - [0:0]" for chain in (*written, *deleted)]
        out += [rule for rules in written.values() for rule in rules]
        out += [f"-X {chain}" for chain in deleted]
        out.append("COMMIT")
    return "".join(f"{line}\n" for line in out)


Chains = dict[tuple[str, str], list[str]]  # (table, chain) -> its rules


def iptables_chains(text: str) -> Chains:
    """iptables-restore input's chains (declared or given rules) and their rules, by (table,
    chain): :func:`parse_iptables`, flat."""
    tables = parse_iptables(text)
    return {
        (table, chain): rules for table, chains in tables.items() for chain, rules in chains.items()
    }


def _differing(old: Chains, new: Chains) -> set[tuple[str, str]]:
    return {key for key in old.keys() | new.keys() if old.get(key) != new.get(key)}


def _taken_apart(share: IptPort | None) -> tuple[frozenset[str], Chains]:
    """A port's share of the iptables rules: the (nat) chains it declares, and its rules by
    (table, chain), its own chains' and its lines in the shared ones."""
    if share is None:
        return frozenset(), {}
    own = frozenset(chain for _, chain in iptables_chains(f"*nat\n{share.chains}"))
    return own, iptables_chains("\n".join(("*nat", share.nat, "*filter", share.filter)))


def iptables_change(
    shares: Iterable[tuple[IptPort | None, IptPort | None]],
    rests: tuple[Chains, Chains],
    assemble: Callable[[], str],
) -> str:
    """iptables-restore --noflush input that replaces some ports' shares (before, after; None:
    none) by new ones: it rewrites the ports' own chains that changed, deletes those that are
    gone, and rewrites whole the shared chains (``KPGEN-SERVICES``, ...) where a port's lines
    changed or the rest of the rules did (``rests``: the chains of the rules of no port at all,
    :func:`iptables_chains`, before and after; their rules read from ``assemble()``, the whole
    rules after, only then). Empty when nothing changed. What it costs grows with the change,
    not with the ruleset."""
    rewrite: dict[str, dict[str, list[str]]] = {"nat": {}, "filter": {}}
    gone: dict[str, set[str]] = {"nat": set()}
    shared = _differing(*rests)
    for before, after in shares:
        old_own, old_rules = _taken_apart(before)
        new_own, new_rules = _taken_apart(after)
        for chain in new_own:
            rules = new_rules.get(("nat", chain), [])
            if chain not in old_own or old_rules.get(("nat", chain), []) != rules:
                rewrite["nat"][chain] = rules
        gone["nat"] |= old_own - new_own
        shared |= {k for k in _differing(old_rules, new_rules) if k[1] not in old_own | new_own}
    if shared:
        whole = iptables_chains(assemble())
        for table, chain in shared:
            if (table, chain) in whole:
                rewrite.setdefault(table, {})[chain] = whole[(table, chain)]
            else:  # a chain of the rest that the rules no longer have
                gone.setdefault(table, set()).add(chain)
    return _restore_input(rewrite, gone)
