"""Partial syncs: the smallest kernel transaction that turns loaded rules into new ones.

Both functions compare two renderings of the same templates (what is loaded, what should be)
and return the commands that change only what differs: the chains of the service ports that
changed and their map elements. They work on the rendered text rather than on the model, so
a partial sync can never say anything the full rendering would not.

A result of ``None`` means the change is not confined to service ports (a base chain, a set's
type, a node setting changed): the caller makes a full sync. An empty string means the rules
are the same: nothing is written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from kpgen.core.names import NFT_TABLE

# nftables chains that belong to one service port, as templates/nftables.nft.j2 names them.
NFT_SERVICE_CHAIN = re.compile(r"^(service|local|external|firewall)-")
_BLOCK = re.compile(r"^\t(chain|set|map) (\S+) \{$")


@dataclass
class NftTable:
    """A rendered nft table taken apart: what a partial sync may change, and the rest."""

    family: str = ""
    head: list[str] = field(default_factory=list)
    chains: dict[str, list[str]] = field(default_factory=dict)
    elements: dict[str, list[str]] = field(default_factory=dict)


def parse_nft(text: str) -> NftTable:
    """Take a table rendered by templates/nftables.nft.j2 apart (one element a line)."""
    table = NftTable()
    lines = text.splitlines()
    header = re.match(rf"^table (\S+) {NFT_TABLE} \{{$", lines[0]) if lines else None
    if header is None:
        raise ValueError("not a kpgen nft table")
    table.family = header.group(1)
    block: tuple[str, str] | None = None
    in_elements = False
    for line in lines[1:]:
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments and spacing carry no rules
        if block is None:
            match = _BLOCK.match(line)
            if match:
                block = (match.group(1), match.group(2))
                if block[0] == "chain" and NFT_SERVICE_CHAIN.match(block[1]):
                    table.chains[block[1]] = []
                else:
                    table.head.append(line)
                    if block[0] != "chain":
                        table.elements[block[1]] = []
            elif line != "}":
                table.head.append(line)
            continue
        name = block[1]
        if line == "\t}":
            block, in_elements = None, False
            if name not in table.chains:
                table.head.append(line)
        elif name in table.chains:
            table.chains[name].append(stripped)
        elif stripped == "elements = {":
            in_elements = True
        elif in_elements and stripped == "}":
            in_elements = False
        elif in_elements:
            table.elements[name].append(stripped.rstrip(","))
        else:
            table.head.append(line)
    return table


def _key(element: str) -> str:
    """The key of a map element (``k : verdict``); a set element is its own key."""
    return element.split(" : ", 1)[0]


def nft_delta(loaded: str, wanted: str) -> str | None:
    """The nft commands that turn the table ``loaded`` into ``wanted``, in one transaction."""
    old, new = parse_nft(loaded), parse_nft(wanted)
    if old.family != new.family or old.head != new.head:
        return None
    where = f"{new.family} {NFT_TABLE}"
    added = [c for c in new.chains if c not in old.chains]
    removed = [c for c in old.chains if c not in new.chains]
    changed = [c for c in new.chains if c in old.chains and old.chains[c] != new.chains[c]]
    commands = [f"add chain {where} {name}" for name in added]
    for name in (*added, *changed):
        body = "".join(f"\t\t{rule}\n" for rule in new.chains[name])
        commands.append(f"flush chain {where} {name}")
        commands.append(f"table {where} {{\n\tchain {name} {{\n{body}\t}}\n}}")
    deletions, additions = [], []
    for container in new.elements:
        before, after = set(old.elements[container]), set(new.elements[container])
        gone = sorted(e for e in before - after)
        came = sorted(e for e in after - before)
        if gone:
            keys = ", ".join(dict.fromkeys(_key(e) for e in gone))
            deletions.append(f"delete element {where} {container} {{ {keys} }}")
        if came:
            additions.append(f"add element {where} {container} {{ {', '.join(came)} }}")
    commands += deletions + additions
    # Flushed first, so that no chain being deleted is still the target of another's goto.
    commands += [f"flush chain {where} {name}" for name in removed]
    commands += [f"delete chain {where} {name}" for name in removed]
    return "".join(f"{command}\n" for command in commands)


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
