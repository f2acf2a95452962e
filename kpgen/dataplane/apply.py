"""Loading rendered rules into the current network namespace, atomically, and removing them.

This module and the watcher are the only ones that touch the world. Every load replaces
kpgen's rules in one kernel transaction: nftables replaces its tables in one ``nft``
transaction (through libnftables in-process, or ``nft -f`` when the binding cannot be
imported); iptables rewrites all of kpgen's chains in one ``iptables-restore --noflush``. A
rejected load leaves the previous rules as they were and raises :class:`ApplyError` with the
kernel's message and the offending lines. The one exception is a node's first nftables load,
where there is nothing to replace: its tables are filled side by side (Nftables._create), and
a refusal deletes them all again.
"""

from __future__ import annotations

import ctypes
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from kpgen.core.model import IPFamily
from kpgen.core.names import AFFINITY_PREFIX
from kpgen.core.node import ProxyMode
from kpgen.core.plan import FamilyPlan
from kpgen.dataplane.kernel import (
    Generation,
    KernelError,
    NfNetlink,
    Nft,
    detect_iptables_variant,
    iptables_save,
    iptables_tool,
    iptables_variants,
    kpgen_chains,
    read_iptables_save,
    with_context,
)
from kpgen.dataplane.lock import writer_lock
from kpgen.dataplane.run import LOAD_TIMEOUT, DataplaneError, failure, run, which
from kpgen.render.text import IPTABLES_JUMPS, IptablesJump, render_plan

log = logging.getLogger("kpgen.dataplane")
IPTABLES_TABLES = ("nat", "filter")
# a table's first lines in rendered text: its family and name, and its comment if it has one
_NFT_TABLE_HEAD = re.compile(r'^table (\S+ \S+) \{\n(?:\tcomment "[^"\n]*"\n)?', re.M)
_NFT_OBJECT = re.compile(r"^(?:table \S+ (\S+)|\t(?:chain|set|map) (\S+)) \{$", re.M)

# What a failed load or cleanup raises: the kernel refused, a tool was missing or hung, or
# another writer held the lock too long. The rules loaded before are untouched in every case.
ApplyError = DataplaneError


def require_root() -> None:
    if os.geteuid() != 0:
        raise ApplyError("changing the node's rules needs root (CAP_NET_ADMIN)")


# --- nftables ---------------------------------------------------------------------------

# libnftables contexts that create a node's tables at once (Nftables._create): two keep both
# libnftables and the kernel busy (10,000 services: 1.9 s one after another, 1.0-1.1 s with
# two, 1.1 s with three on this project's 2-core machines)
CREATORS = 2


class Nftables(Nft):
    """kpgen's tables: ``ip kpgen`` and its shard tables ``ip kpgen-NN`` (and the ``ip6``
    ones), replaced whole in one transaction."""

    def apply(self, tables: dict[IPFamily, str], *, check: bool = False) -> None:
        """Replace the contents of kpgen's tables of each family with ``tables[family]`` (the
        node-wide table and the shard tables, as rendered), all in one transaction.

        A table that stays is flushed and filled again, and only the objects the new rules no
        longer have are deleted. (Deleting and re-creating a table lets a packet that arrives
        during the commit miss both the old and the new base chains: the e2e suite saw new
        connections go untranslated that way.) Shard tables the rules no longer have are
        deleted.

        Where none of kpgen's tables exists (a node's first load), nothing is replaced: the
        tables are created each in a transaction of its own, by :data:`CREATORS` libnftables
        contexts at once (see :meth:`_create`).
        """
        existing_tables = self.tables()
        if not existing_tables and not check:
            split = [_nft_tables(text) for text in tables.values()]
            if all(split):
                self._create([table for texts in split for table in texts])
                return
        script, after = [], []
        for family, text in tables.items():
            existing = self.objects(family, existing_tables)
            for table, wanted in _nft_objects(text).items():
                name = f"{family.nft_family} {table}"
                there = existing.pop(table, None)
                if there is None:  # made by the text itself, with its comment
                    continue
                script.append(f"flush table {name}\n")
                # sets and maps are refilled; the affinity sets hold what clients did (dynamic
                # entries), not rules, and keep it
                script += [
                    f"flush {kind} {name} {obj}\n"
                    for obj, kind in there.items()
                    if kind != "chain" and not obj.startswith(AFFINITY_PREFIX)
                ]
                after += [
                    f"delete {kind} {name} {obj}\n"
                    for obj, kind in there.items()
                    if obj not in wanted
                ]
            after += [f"delete table {family.nft_family} {table}\n" for table in existing]
            script.append(text)
        self.run("".join(script + after), check=check)

    def _create(self, tables: Sequence[tuple[re.Match[str], str]]) -> None:
        """Create the tables of rendered text ``tables`` (:func:`_nft_tables`), none of which
        exists: first all of them empty, in their order, in one transaction; then each filled
        in a transaction of its own, :data:`CREATORS` at a time. libnftables turns one table's
        text into netlink messages while the kernel commits another's (the binding releases
        the GIL), which nearly halves a first load (10,000 services: 1.9 s in one transaction,
        1.0-1.1 s so). Nothing was there to replace, so no packet meets old rules mixed with
        new ones; while it runs, a service answers once its table is filled. All or nothing
        still: if a table is refused, all of them are deleted again and the first refusal is
        raised."""
        self.run("".join(f"{head[0]}}}\n" for head, _ in tables))
        pending = [text for _, text in reversed(tables)]
        failures: list[BaseException] = []
        lock = threading.Lock()

        def fill(nft: Nft) -> None:
            while True:
                with lock:
                    if failures or not pending:
                        return
                    text = pending.pop()
                try:
                    nft.run(text)
                except BaseException as error:  # any (a refusal, a full disk): all go again
                    with lock:
                        failures.append(error)
                    return

        binding = self.via == "libnftables"
        others = [Nft(use_binding=binding) for _ in range(CREATORS - 1)]
        threads = [threading.Thread(target=fill, args=(nft,)) for nft in others]
        for thread in threads:
            thread.start()
        try:
            fill(self)
        finally:
            for thread in threads:
                thread.join()
        if failures:
            try:
                self.run("".join(f"delete table {head[1]}\n" for head, _ in tables))
            finally:  # the refusal, not a failed clean-up (which it then carries as context)
                raise failures[0]

    def cleanup(self) -> list[str]:
        """Delete kpgen's tables; nothing else. Returns what was deleted."""
        existing = sorted(self.tables())
        if existing:
            self.run("".join(f"delete table {name}\n" for name in existing))
        return existing


def _nft_tables(text: str) -> list[tuple[re.Match[str], str]]:
    """The tables of rendered nft text: each table's head (:data:`_NFT_TABLE_HEAD`) and its
    text; none if the text holds anything before its first table (it is then loaded as it
    is, in one transaction)."""
    heads = list(_NFT_TABLE_HEAD.finditer(text))
    if not heads or text[: heads[0].start()].strip():
        return []
    ends = [head.start() for head in heads[1:]] + [len(text)]
    return [(head, text[head.start() : end]) for head, end in zip(heads, ends, strict=True)]


def _nft_objects(text: str) -> dict[str, set[str]]:
    """The tables of rendered nft text, with the chains, sets and maps of each."""
    found: dict[str, set[str]] = {}
    objects: set[str] = set()
    for table, obj in _NFT_OBJECT.findall(text):
        if table:
            objects = found.setdefault(table, set())
        else:
            objects.add(obj)
    return found


# --- iptables ---------------------------------------------------------------------------


@dataclass
class Iptables:
    """kpgen's ``KPGEN-`` chains in one iptables variant (``nft`` or ``legacy``)."""

    variant: str
    family: IPFamily = IPFamily.V4

    def our_chains(self) -> dict[str, tuple[str, ...]]:
        """kpgen's chains that exist now, per table."""
        chains: dict[str, tuple[str, ...]] = dict.fromkeys(IPTABLES_TABLES, ())
        for table in IPTABLES_TABLES:
            saved = read_iptables_save(iptables_save(self.variant, self.family, table))
            chains[table] = kpgen_chains(saved).get(table, ())
        return chains

    def _tool(self, suffix: str = "") -> str:
        return iptables_tool(self.variant, self.family, suffix)

    def _has_jump(self, jump: IptablesJump) -> bool:
        argv = [self._tool(), "-w", "5", "-t", jump.table, "-C", jump.chain]
        return run([*argv, *_split_spec(jump.spec)]).returncode == 0

    def restore(self, text: str, *, check: bool = False) -> None:
        """One ``iptables-restore --noflush``; ``check``: load it into a throwaway network
        namespace instead, where a reference to a missing chain fails as it would here."""
        argv = [self._tool("-restore"), "-w", "5", "--noflush"]
        if check:
            argv = ["unshare", "--net", *argv]
        with tempfile.NamedTemporaryFile("w", suffix=".rules", prefix="kpgen-") as handle:
            handle.write(text)  # from a file, so that errors carry line numbers
            handle.flush()
            result = run([*argv, handle.name], timeout=LOAD_TIMEOUT)
            if result.returncode != 0:
                raise KernelError(with_context(result.stderr.replace(handle.name, "rules"), text))

    def apply(self, plan: FamilyPlan, *, check: bool = False) -> None:
        """Rewrite every chain of ours, delete our stale ones, ensure the jumps: at once."""
        if check:
            self.restore(render_plan(plan, ProxyMode.IPTABLES), check=True)
            return
        rendered = read_iptables_save(render_plan(plan, ProxyMode.IPTABLES))
        wanted = {chain for table in rendered.values() for chain in table.chains}
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
                argv = [self._tool(), "-w", "5", "-t", jump.table, "-D", jump.chain]
                deleted = run([*argv, *_split_spec(jump.spec)])
                if deleted.returncode != 0:
                    raise KernelError(failure(argv, deleted))
        lines = []
        for table, names in chains.items():
            lines += [f"*{table}", *(f":{n} - [0:0]" for n in names)]
            lines += [*(f"-X {n}" for n in names), "COMMIT"]
        self.restore("\n".join(lines) + "\n")
        counts = ", ".join(f"{len(names)} {table}" for table, names in chains.items() if names)
        return [f"{self._tool()} chains ({counts}) and the jumps to them"]


def _split_spec(spec: str) -> list[str]:
    """Split a jump's spec into argv; comments are the only quoted words in it."""
    return [part.strip('"') for part in re.findall(r'"[^"]*"|\S+', spec)]


# --- both -------------------------------------------------------------------------------


def cleanup(modes: Sequence[ProxyMode], families: Sequence[IPFamily]) -> list[str]:
    """Remove everything kpgen created in ``modes``; returns what was removed."""
    require_root()
    with writer_lock():
        return _cleanup(modes, families)


def _cleanup(modes: Sequence[ProxyMode], families: Sequence[IPFamily]) -> list[str]:
    removed = []
    if ProxyMode.NFTABLES in modes and which("nft"):
        removed += [f"nft table {t}" for t in Nftables().cleanup()]
    if ProxyMode.IPTABLES in modes:
        for variant in iptables_variants():
            for family in families:
                if which(iptables_tool(variant, family, "-save")):
                    removed += Iptables(variant, family).cleanup()
    return removed


@dataclass(frozen=True)
class Applied:
    """What a load did: the summary for the user, the iptables variant it loaded into (None
    in nftables mode), and advice when the load was slow for a reason the user can change."""

    summary: str
    iptables_variant: str | None = None
    advice: str | None = None


# iptables-nft-restore of kpgen's rules grows with their square (a fresh namespace here:
# 1,000 service ports 1.5 s, 2,000 7.6 s, 4,000 33 s; iptables-legacy-restore 0.15, 0.29,
# 0.65 s), as it does for kube-proxy's; a load slower than this gets advice
SLOW_IPTABLES_NFT = 5.0


def slow_load_advice(variant: str, seconds: float, ports: int) -> str | None:
    """What to tell the user of an iptables load of ``ports`` service ports that took
    ``seconds`` in ``variant``, if it was slow because of the variant."""
    if variant != "nft" or seconds < SLOW_IPTABLES_NFT:
        return None
    return (
        f"iptables-nft took {seconds:.0f} s to load the rules of {ports} service ports, and "
        "its load time grows with the square of the rules (4,000 service ports: about 30 s; "
        "10,000: minutes); --proxy-mode nftables loads 10,000 in about 1 s, and "
        "--iptables-backend legacy in about 2 s"
    )


def apply_plans(
    plans: Sequence[FamilyPlan],
    mode: ProxyMode,
    *,
    check: bool = False,
    iptables_variant: str = "auto",
    nft_tables: Mapping[IPFamily, str] | None = None,
    ports: int | None = None,
) -> Applied:
    """Load the plans' rules in ``mode`` and remove the other mode's, holding the writer lock
    from the first read of the kernel's state to the last write. ``nft_tables``: the plans'
    nftables tables, rendered already; ``ports``: how many service ports they hold, when the
    plans do not hold them (:mod:`kpgen.cli.halves`)."""
    require_root()
    with writer_lock():
        return _apply_plans(plans, mode, check, iptables_variant, nft_tables, ports)


def _apply_plans(
    plans: Sequence[FamilyPlan],
    mode: ProxyMode,
    check: bool,
    iptables_variant: str,
    nft_tables: Mapping[IPFamily, str] | None = None,
    ports: int | None = None,
) -> Applied:
    families = [plan.family for plan in plans]
    variant, loading = None, 0.0
    if mode is ProxyMode.NFTABLES:
        nft = Nftables()
        if nft_tables is None:
            nft_tables = {p.family: render_plan(p, mode) for p in plans}
        nft.apply(dict(nft_tables), check=check)
        done = f"nftables via {nft.via}"
    else:
        variant = detect_iptables_variant() if iptables_variant == "auto" else iptables_variant
        started = time.monotonic()
        for plan in plans:
            Iptables(variant, plan.family).apply(plan, check=check)
            if not check:  # the other variant's hooks would see the packets too
                for stale in iptables_variants():
                    if stale != variant:
                        Iptables(stale, plan.family).cleanup()
        loading = time.monotonic() - started
        done = f"iptables-{variant}"
    services = sum(len(p.ports) for p in plans) if ports is None else ports
    advice = None if variant is None else slow_load_advice(variant, loading, services)
    if check:
        summary = f"{done}: the kernel accepts the rules (nothing was changed)"
        return Applied(summary, variant, advice)
    other_mode = ProxyMode.IPTABLES if mode is ProxyMode.NFTABLES else ProxyMode.NFTABLES
    removed = _cleanup([other_mode], families)
    note = f"; removed the {other_mode.value} rules" if removed else ""
    return Applied(f"{done}: loaded rules for {services} service ports{note}", variant, advice)


def trim_memory() -> None:
    """Give the C heap's free memory back to the system: loading a whole table leaves
    libnftables' freed buffers (about 250 MB at 10,000 services) in glibc's heap, where they
    would count as kpgen's resident memory until the next load."""
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


class RuleLoader:
    """Loads a node's rules again and again, as the controller does: whole (:meth:`load_nft`,
    :meth:`full`), or the changes of some service ports (:meth:`change_nft`,
    :meth:`change_ipt`; kpgen.render.delta). It remembers nf_tables' generation after its
    last write, so that a full sync can tell whether anyone wrote since
    (:meth:`changed_since_written`)."""

    def __init__(self, mode: ProxyMode, iptables_variant: str = "auto") -> None:
        self.mode = mode
        self.iptables_variant = iptables_variant
        self._nft: Nftables | None = None
        self.written: Generation | None = None  # nf_tables' generation after the last write
        self._netlink = NfNetlink()

    def _wrote(self) -> None:
        self.written = self._netlink.generation()

    def changed_since_written(self) -> Generation | None:
        """nf_tables' generation if someone committed since kpgen's last write (or it is
        unknown), else None: kpgen's rules are as it left them."""
        if self.mode is ProxyMode.IPTABLES and self.iptables_variant == "legacy":
            return Generation(-1)  # iptables-legacy moves no generation: always unknown
        now = self._netlink.generation()
        if now is None or self.written is None or now.id != self.written.id:
            return now or Generation(-1)
        return None

    def load_nft(self, plans: Sequence[FamilyPlan], tables: Mapping[IPFamily, str]) -> None:
        """Load whole nftables tables (and remove the iptables rules)."""
        self.written = None
        try:
            apply_plans(plans, self.mode, nft_tables=tables)
        finally:
            trim_memory()
        self._wrote()

    def change_nft(self, script: str, *, cached: bool = False) -> None:
        """One transaction of nft commands (kpgen.render.delta). ``cached``: libnftables
        copies the kernel's tables to resolve it (deletions): the context that holds that copy
        is dropped afterwards (it would keep the memory for good: 20 MB at 1,000 services)."""
        self.written = None
        with writer_lock():
            self._nft = self._nft or Nftables()  # one libnftables context
            try:
                self._nft.run(script)
            finally:
                if cached:
                    self._nft = None
            self._wrote()

    def full(self, plans: Sequence[FamilyPlan]) -> str:
        """Load everything (and remove the other mode's rules); returns a summary."""
        self.written = None
        try:
            applied = apply_plans(plans, self.mode, iptables_variant=self.iptables_variant)
        finally:
            trim_memory()
        if applied.iptables_variant is not None:
            self.iptables_variant = applied.iptables_variant
        if applied.advice:
            log.warning("%s", applied.advice)
        self._wrote()
        return applied.summary

    def change_ipt(self, scripts: Mapping[IPFamily, str]) -> int:
        """iptables: restore what a change rewrites (kpgen.render.delta.iptables_change), one
        ``iptables-restore --noflush`` per family; returns the lines written."""
        written = sum(script.count("\n") for script in scripts.values())
        if written:
            self.written = None
            with writer_lock():
                for family, script in scripts.items():
                    if script:
                        Iptables(self.iptables_variant, family).restore(script)
                self._wrote()
        return written
