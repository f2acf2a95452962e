"""Partial syncs: the smallest kernel transaction that turns loaded rules into new ones.

nftables: :class:`NftLoaded` keeps what kpgen's table of one family holds, one service port's
share at a time (kpgen.render.text.NftPort, rendered by the same templates as the whole
table), and :meth:`NftLoaded.change` writes the transaction that replaces some ports' shares
by new ones. Its commands are chosen so that libnftables needs no copy of the kernel's table
to resolve them (nft 1.0.6 lists every chain of the node before an ``add element`` or an
``add rule``: 15 ms at 20,000 chains, see docs/performance.md): elements are added with
``add map NAME { type ...; elements = ... }``, a chain's rules with ``add chain NAME { ...
}``. Deletions cannot be phrased so; deleting an endpoint's hairpin element, which nothing
else needs, waits until a transaction pays for that copy anyway (or the next full sync).

iptables: :func:`iptables_delta` compares two renderings and rewrites the chains that differ.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from kpgen.render.text import NFT_SHARED, NftPort

# elements whose deletion may wait: no verdict, no chain, nothing another rule needs gone
_DEFERRABLE = frozenset({"hairpin-endpoints"})
# at most this many wait: then the next transaction deletes them (so does a full sync)
STALE_LIMIT = 1000
Element = tuple[str, str]  # (set or map, element)
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


@dataclass
class NftLoaded:
    """kpgen's table of one family as loaded: each service port's share (by port key), how
    many ports need each element, and elements still loaded that no port needs (deletions
    that wait)."""

    table: str  # "ip kpgen"
    declaration: Callable[[str], str]  # a shared set's or map's type and flags
    ports: dict[str, NftPort] = field(default_factory=dict)
    counts: Counter[Element] = field(default_factory=Counter)
    stale: set[Element] = field(default_factory=set)
    # sets the port chains may name, declared in a transaction before its chains
    referenced_sets: tuple[str, ...] = ()

    @classmethod
    def of(
        cls,
        table: str,
        declaration: Callable[[str], str],
        ports: Mapping[str, NftPort],
        referenced_sets: tuple[str, ...],
    ) -> NftLoaded:
        """What a full load of ``ports`` leaves loaded."""
        loaded = cls(table, declaration, dict(ports), referenced_sets=referenced_sets)
        for port in ports.values():
            loaded.counts.update(port.elements)
        return loaded

    def change(self, changed: Mapping[str, NftPort | None]) -> tuple[str, bool]:
        """The transaction that puts the ``changed`` ports' new shares in place of their old
        ones (None: the port is gone), and whether it needs libnftables' copy of the table
        (deletions); this object then describes the table as it will be once the transaction
        is committed (on a failure, the caller loads everything again)."""
        t = self.table
        gone_elements: Counter[Element] = Counter()
        new_elements: Counter[Element] = Counter()
        flush, delete_chains, delete_sets, add_sets, add_chains = [], [], [], [], []
        for key, new in changed.items():
            old = self.ports.pop(key, None)
            if new is not None:
                self.ports[key] = new
            before = blocks(old.objects) if old else {}
            after = blocks(new.objects) if new else {}
            for name, (kind, body) in after.items():
                was = before.get(name)
                if was == (kind, body):
                    continue
                text = "".join(f"\t{line}\n" for line in body)
                if kind == "set":
                    if was is not None:  # a set's definition changed (its timeout)
                        delete_sets.append(name)
                    add_sets.append(f"add set {t} {name} {{\n{text}}}\n")
                else:
                    if was is not None:
                        flush.append(name)
                    add_chains.append(f"add chain {t} {name} {{\n{text}}}\n")
            for name, (kind, _) in before.items():
                if name not in after:
                    if kind == "chain":
                        flush.append(name)
                        delete_chains.append(name)
                    else:
                        delete_sets.append(name)
            gone_elements.update(old.elements if old else ())
            new_elements.update(new.elements if new else ())
        removed, added = [], []
        for element in gone_elements.keys() | new_elements.keys():
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
        # a changed verdict is a deletion and an addition of the same key
        deletions = [e for e in removed if e[0] not in _DEFERRABLE]
        self.stale.update(e for e in removed if e[0] in _DEFERRABLE)
        costly = bool(deletions or delete_chains or delete_sets)
        if costly or len(self.stale) > STALE_LIMIT:
            deletions += sorted(self.stale)
            self.stale.clear()
        script = []
        if add_chains:
            script += [
                f"add set {t} {n} {{\n{self.declaration(n)}\n}}\n" for n in self.referenced_sets
            ]
        script += [f"flush chain {t} {name}\n" for name in flush]
        script += _grouped("delete element", t, deletions, key=_key)
        script += [f"delete chain {t} {name}\n" for name in delete_chains]
        script += [f"delete set {t} {name}\n" for name in delete_sets]
        script += add_sets + add_chains
        for container, elements in _by_container(added).items():
            what = "set" if container in NFT_SHARED else "map"
            listed = ",\n".join(elements)
            script.append(
                f"add {what} {t} {container} {{\n{self.declaration(container)}\n"
                f"elements = {{\n{listed}\n}}\n}}\n"
            )
        return "".join(script), costly

    def delete_stale(self) -> str:
        """The transaction that deletes the elements whose deletion waited (empty: none)."""
        script = "".join(_grouped("delete element", self.table, self.stale, key=_key))
        self.stale.clear()
        return script


def _by_container(elements: Iterable[Element]) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for container, element in sorted(elements):
        found.setdefault(container, []).append(element)
    return found


def _grouped(
    verb: str, table: str, elements: Iterable[Element], key: Callable[[str], str]
) -> list[str]:
    return [
        f"{verb} {table} {container} {{ {', '.join(dict.fromkeys(map(key, items)))} }}\n"
        for container, items in _by_container(elements).items()
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


def iptables_delta(loaded: str, wanted: str) -> str:
    """iptables-restore --noflush input that rewrites only the chains whose rules changed and
    deletes the chains that are gone. Empty when nothing changed."""
    old, new = parse_iptables(loaded), parse_iptables(wanted)
    out = []
    for table in new:
        before, after = old.get(table, {}), new[table]
        rewrite = [c for c in after if before.get(c) != after[c] or c not in before]
        gone = [c for c in before if c not in after]
        if not rewrite and not gone:
            continue
        out.append(f"*{table}")
        out += [f":{chain} - [0:0]" for chain in (*rewrite, *gone)]
        out += [rule for chain in rewrite for rule in after[chain]]
        out += [f"-X {chain}" for chain in gone]
        out.append("COMMIT")
    return "".join(f"{line}\n" for line in out)
