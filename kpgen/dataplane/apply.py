"""Loading rendered rules into the current network namespace, atomically, and removing them.

This module and the watcher are the only ones that touch the world. Every load is one kernel
transaction: nftables replaces the whole ``kpgen`` table in one ``nft`` transaction (through
libnftables in-process, or ``nft -f`` when the binding cannot be imported); iptables rewrites
all of kpgen's chains in one ``iptables-restore --noflush``. A rejected load leaves the previous
rules as they were and raises :class:`ApplyError` with the kernel's message and the offending
lines.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from kpgen.core.model import IPFamily
from kpgen.core.names import AFFINITY_PREFIX, IPT_PREFIX, NFT_TABLE, is_ipt_chain
from kpgen.core.node import ProxyMode
from kpgen.core.plan import FamilyPlan
from kpgen.render.delta import iptables_delta, nft_delta
from kpgen.render.text import IPTABLES_JUMPS, IptablesJump, render_plan

IPTABLES_VARIANTS = ("nft", "legacy")
IPTABLES_TABLES = ("nat", "filter")
# Chains that kubelet makes in whichever iptables the node uses (kube-proxy's wrapper reads them).
KUBELET_HINTS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
CONTEXT_LINES = 2
_NFT_OBJECT = re.compile(r"^\t(chain|set|map) (\S+) \{$", re.M)


class ApplyError(Exception):
    """The kernel (or a tool) refused the rules; the previous rules are untouched."""


def require_root() -> None:
    if os.geteuid() != 0:
        raise ApplyError("changing the node's rules needs root (CAP_NET_ADMIN)")


def _run(argv: Sequence[str], text: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a netfilter tool; a missing tool is an ApplyError, not a traceback."""
    try:
        return subprocess.run(argv, input=text, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise ApplyError(f"{argv[0]} is not installed (make setup installs it)") from None


def with_context(message: str, text: str) -> str:
    """The tool's message, then each line it names (``file:LINE:...``) with its neighbours."""
    lines = text.splitlines()
    shown = []
    for number in dict.fromkeys(int(n) for n in re.findall(r"^\S*?:(\d+):", message, re.M)):
        if not 1 <= number <= len(lines):
            continue
        first, last = max(1, number - CONTEXT_LINES), min(len(lines), number + CONTEXT_LINES)
        for n in range(first, last + 1):
            shown.append(f"{'>' if n == number else ' '} {n:5d} | {lines[n - 1]}")
    return "\n".join([message.rstrip(), *shown])


@contextmanager
def _rules_file(text: str, suffix: str) -> Iterator[str]:
    """The rules in a temporary file, so that error messages carry line numbers."""
    with tempfile.NamedTemporaryFile("w", suffix=suffix, prefix="kpgen-") as handle:
        handle.write(text)
        handle.flush()
        yield handle.name


# --- nftables ---------------------------------------------------------------------------


class Nftables:
    """kpgen's tables: ``ip kpgen`` (and ``ip6 kpgen``), replaced whole in one transaction."""

    def __init__(self, use_binding: bool = True) -> None:
        self._binding = None
        if use_binding:
            try:
                import nftables  # type: ignore[import-untyped]  # Debian's python3-nftables

                self._binding = nftables.Nftables()
            except (ImportError, OSError):
                self._binding = None

    @property
    def via(self) -> str:
        return "libnftables" if self._binding is not None else "nft"

    def run(self, text: str, *, check: bool = False, terse: bool = False) -> str:
        """Run an nft script as one transaction; ``check``: validate only (``nft -c``);
        ``terse``: list without set elements."""
        with _rules_file(text, ".nft") as path:
            if self._binding is not None:
                self._binding.set_dry_run(check)
                self._binding.set_terse_output(terse)
                rc, output, error = self._binding.cmd_from_file(path)
                self._binding.set_dry_run(False)
            else:
                flags = [*(["-c"] if check else []), *(["-t"] if terse else [])]
                result = _run(["nft", *flags, "-f", path])
                rc, output, error = result.returncode, result.stdout, result.stderr
        if rc != 0:
            raise ApplyError(with_context(error.replace(path, "rules"), text))
        return str(output)

    def tables(self) -> set[str]:
        """kpgen's tables that exist now, as ``family name``."""
        listing = self.run("list tables\n")
        found = {line.split(" ", 1)[1].strip() for line in listing.splitlines() if " " in line}
        return {t for t in found if t.split()[-1] == NFT_TABLE}

    def objects(self, family: IPFamily) -> dict[str, str]:
        """The chains, sets and maps in kpgen's table of ``family`` now: name -> kind."""
        found: dict[str, str] = {}
        header = f"table {family.nft_family} {NFT_TABLE} {{"
        for kind in ("chains", "sets", "maps"):
            ours = False
            for line in self.run(f"list {kind} {family.nft_family}\n", terse=True).splitlines():
                if line.startswith("table "):
                    ours = line == header
                match = _NFT_OBJECT.match(line)
                if ours and match:
                    found[match.group(2)] = match.group(1)
        return found

    def apply(self, tables: dict[IPFamily, str], *, check: bool = False) -> None:
        """Replace the contents of kpgen's table of each family with ``tables[family]``, all
        in one transaction.

        The table and its base chains stay: they are flushed and filled again, and only the
        objects the new rules no longer have are deleted. (Deleting and re-creating the table
        lets a packet that arrives during the commit miss both the old and the new base
        chains: the e2e suite saw new connections go untranslated that way.)
        """
        script = []
        for family, text in tables.items():
            name = f"{family.nft_family} {NFT_TABLE}"
            existing = self.objects(family)
            wanted = {m.group(2) for m in _NFT_OBJECT.finditer(text)}
            script.append(f"add table {name}\nflush table {name}\n")
            # sets and maps are refilled; the affinity sets hold what clients did (dynamic
            # entries), not rules, and keep it
            script += [
                f"flush {kind} {name} {obj}\n"
                for obj, kind in existing.items()
                if kind != "chain" and not obj.startswith(AFFINITY_PREFIX)
            ]
            script.append(text)
            stale = [(kind, obj) for obj, kind in existing.items() if obj not in wanted]
            script += [f"delete {kind} {name} {obj}\n" for kind, obj in stale]
        self.run("".join(script), check=check)

    def cleanup(self) -> list[str]:
        """Delete kpgen's tables; nothing else. Returns what was deleted."""
        existing = sorted(self.tables())
        if existing:
            self.run("".join(f"delete table {name}\n" for name in existing))
        return existing


# --- iptables ---------------------------------------------------------------------------


def _tool(variant: str, family: IPFamily, suffix: str = "") -> str:
    prefix = "iptables" if family is IPFamily.V4 else "ip6tables"
    return f"{prefix}-{variant}{suffix}"


def iptables_variants() -> tuple[str, ...]:
    """The iptables variants installed here."""
    return tuple(v for v in IPTABLES_VARIANTS if shutil.which(_tool(v, IPFamily.V4, "-save")))


def _legacy_in_use(family: IPFamily) -> bool:
    """Whether this network namespace has legacy iptables tables. Asked of /proc, because
    running iptables-legacy-save would create them."""
    names = "ip_tables_names" if family is IPFamily.V4 else "ip6_tables_names"
    try:
        with open(f"/proc/net/{names}", encoding="ascii") as stream:
            return bool(stream.read().strip())
    except OSError:
        return False


def _in_use(variant: str, family: IPFamily) -> bool:
    return variant != "legacy" or _legacy_in_use(family)


def _save(variant: str, family: IPFamily, table: str | None = None) -> str:
    argv = [_tool(variant, family, "-save"), *(["-t", table] if table else [])]
    result = _run(argv)
    if result.returncode != 0:
        raise ApplyError(f"{argv[0]}: {result.stderr.strip()}")
    return result.stdout


def detect_iptables_variant(family: IPFamily = IPFamily.V4) -> str:
    """The variant that already holds the node's rules, as kube-proxy's iptables wrapper
    decides: the one with kpgen's chains, else with kubelet's hint chains, else with more
    rules; nft when nothing tells."""
    installed = iptables_variants()
    if not installed:
        raise ApplyError("neither iptables-nft nor iptables-legacy is installed")
    saves = {v: _save(v, family) if _in_use(v, family) else "" for v in installed}
    for marker in (f":{IPT_PREFIX}", *(f":{hint} " for hint in KUBELET_HINTS)):
        holders = [v for v in installed if marker in saves[v]]
        if len(holders) == 1:
            return holders[0]
    counts = {v: saves[v].count("\n-A ") for v in installed}
    best = max(installed, key=lambda v: (counts[v], v == "nft"))
    return best


@dataclass
class Iptables:
    """kpgen's ``KPGEN-`` chains in one iptables variant (``nft`` or ``legacy``)."""

    variant: str
    family: IPFamily = IPFamily.V4

    def our_chains(self) -> dict[str, tuple[str, ...]]:
        """kpgen's chains that exist now, per table."""
        chains: dict[str, tuple[str, ...]] = {t: () for t in IPTABLES_TABLES}
        if not _in_use(self.variant, self.family):
            return chains
        for table in IPTABLES_TABLES:
            names = re.findall(r"^:(\S+) ", _save(self.variant, self.family, table), re.M)
            chains[table] = tuple(n for n in names if is_ipt_chain(n))
        return chains

    def _has_jump(self, jump: IptablesJump) -> bool:
        argv = [_tool(self.variant, self.family), "-w", "5", "-t", jump.table, "-C", jump.chain]
        return _run([*argv, *_split_spec(jump.spec)]).returncode == 0

    def restore(self, text: str, *, check: bool = False) -> None:
        """One ``iptables-restore --noflush``; ``check``: load it into a throwaway network
        namespace instead, where a reference to a missing chain fails as it would here."""
        argv = [_tool(self.variant, self.family, "-restore"), "-w", "5", "--noflush"]
        if check:
            argv = ["unshare", "--net", *argv]
        with _rules_file(text, ".rules") as path:
            result = _run([*argv, path])
        if result.returncode != 0:
            raise ApplyError(with_context(result.stderr.replace(path, "rules"), text))

    def apply(self, plan: FamilyPlan, *, check: bool = False) -> None:
        """Rewrite every chain of ours, delete our stale ones, ensure the jumps: at once."""
        if check:
            self.restore(render_plan(plan, ProxyMode.IPTABLES), check=True)
            return
        wanted = set(re.findall(r"^:(\S+) ", render_plan(plan, ProxyMode.IPTABLES), re.M))
        stale = {t: tuple(c for c in cs if c not in wanted) for t, cs in self.our_chains().items()}
        missing = tuple(j for j in IPTABLES_JUMPS if not self._has_jump(j))
        text = render_plan(plan, ProxyMode.IPTABLES, insert_jumps=missing, delete_chains=stale)
        self.restore(text)

    def cleanup(self) -> list[str]:
        """Remove the jumps to kpgen's chains and the chains; nothing else."""
        chains = self.our_chains()
        if not any(chains.values()):
            return []
        for jump in IPTABLES_JUMPS:
            while self._has_jump(jump):
                argv = [_tool(self.variant, self.family), "-w", "5", "-t", jump.table]
                _run([*argv, "-D", jump.chain, *_split_spec(jump.spec)])
        lines = []
        for table, names in chains.items():
            lines += [f"*{table}", *(f":{n} - [0:0]" for n in names)]
            lines += [*(f"-X {n}" for n in names), "COMMIT"]
        self.restore("\n".join(lines) + "\n")
        counts = ", ".join(f"{len(names)} {table}" for table, names in chains.items() if names)
        return [f"{_tool(self.variant, self.family)} chains ({counts}) and the jumps to them"]


def _split_spec(spec: str) -> list[str]:
    """Split a jump's spec into argv; comments are the only quoted words in it."""
    return [part.strip('"') for part in re.findall(r'"[^"]*"|\S+', spec)]


# --- both -------------------------------------------------------------------------------


def cleanup(modes: Sequence[ProxyMode], families: Sequence[IPFamily]) -> list[str]:
    """Remove everything kpgen created in ``modes``; returns what was removed."""
    require_root()
    removed = []
    if ProxyMode.NFTABLES in modes and shutil.which("nft"):
        removed += [f"nft table {t}" for t in Nftables().cleanup()]
    if ProxyMode.IPTABLES in modes:
        for variant in iptables_variants():
            for family in families:
                if shutil.which(_tool(variant, family, "-save")):
                    removed += Iptables(variant, family).cleanup()
    return removed


def apply_plans(
    plans: Sequence[FamilyPlan],
    mode: ProxyMode,
    *,
    check: bool = False,
    iptables_variant: str = "auto",
) -> str:
    """Load the plans' rules in ``mode`` and remove the other mode's; returns a summary."""
    require_root()
    families = [plan.family for plan in plans]
    if mode is ProxyMode.NFTABLES:
        nft = Nftables()
        nft.apply({p.family: render_plan(p, mode) for p in plans}, check=check)
        done = f"nftables via {nft.via}"
    else:
        variant = detect_iptables_variant() if iptables_variant == "auto" else iptables_variant
        for plan in plans:
            Iptables(variant, plan.family).apply(plan, check=check)
            if not check:  # the other variant's hooks would see the packets too
                for stale in iptables_variants():
                    if stale != variant:
                        Iptables(stale, plan.family).cleanup()
        done = f"iptables-{variant}"
    if check:
        return f"{done}: the kernel accepts the rules (nothing was changed)"
    other_mode = ProxyMode.IPTABLES if mode is ProxyMode.NFTABLES else ProxyMode.NFTABLES
    removed = cleanup([other_mode], families)
    note = f"; removed the {other_mode.value} rules" if removed else ""
    services = sum(len(p.ports) for p in plans)
    return f"{done}: loaded rules for {services} service ports{note}"


class RuleLoader:
    """Loads a node's rules again and again, as the controller does: it keeps what it loaded
    last, so that the next load can be partial (only what changed, kpgen.render.delta)."""

    def __init__(self, mode: ProxyMode, iptables_variant: str = "auto") -> None:
        self.mode = mode
        self.iptables_variant = iptables_variant
        self.loaded: dict[IPFamily, str] | None = None
        self._nft: Nftables | None = None

    def _texts(self, plans: Sequence[FamilyPlan]) -> dict[IPFamily, str]:
        if self.mode is ProxyMode.NFTABLES:
            return {p.family: render_plan(p, self.mode) for p in plans}
        return {p.family: render_plan(p, self.mode, insert_jumps=()) for p in plans}

    def full(self, plans: Sequence[FamilyPlan]) -> str:
        """Load everything (and remove the other mode's rules); returns a summary."""
        self.loaded = None  # if this fails, the kernel's state is unknown: the next is full
        summary = apply_plans(plans, self.mode, iptables_variant=self.iptables_variant)
        if self.mode is ProxyMode.IPTABLES and self.iptables_variant == "auto":
            self.iptables_variant = summary.split(":", 1)[0].removeprefix("iptables-")
        self.loaded = self._texts(plans)
        return summary

    def partial(self, plans: Sequence[FamilyPlan]) -> int | None:
        """Load only what changed since the last load: the number of commands written (0:
        nothing changed), or None when the change needs a full load."""
        if self.loaded is None or set(self.loaded) != {p.family for p in plans}:
            return None
        wanted = self._texts(plans)
        scripts: dict[IPFamily, str] = {}
        for family, text in wanted.items():
            if self.mode is ProxyMode.NFTABLES:
                delta = nft_delta(self.loaded[family], text)
                if delta is None:
                    return None
            else:
                delta = iptables_delta(self.loaded[family], text)
            scripts[family] = delta
        written = sum(script.count("\n") for script in scripts.values())
        if written:
            self.loaded = None
            if self.mode is ProxyMode.NFTABLES:
                self._nft = self._nft or Nftables()  # one libnftables context: its cache
                self._nft.run("".join(scripts.values()))
            else:
                for family, script in scripts.items():
                    if script:
                        Iptables(self.iptables_variant, family).restore(script)
        self.loaded = wanted
        return written
