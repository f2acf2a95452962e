"""What the kernel holds, read back: nftables as JSON through libnftables, iptables as
iptables-save text, each through one reader.

nftables: ``nft list`` text changes between nft versions (upstream kube-proxy broke on a host
whose nft was newer than its own); libnftables' JSON output has a schema (libnftables-json(5)).
:class:`Nft` is one libnftables context (Debian's ``python3-nftables``), or ``nft`` when the
binding cannot be imported, for both writing scripts and reading JSON.

iptables: iptables-save's format is the input format of iptables-restore, stable for decades;
:func:`read_iptables_save` splits it into tables, chains and rule specs once, for the applier
and for ``kpgen explain``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import tempfile
from dataclasses import dataclass, field
from typing import Any

from kpgen.core.model import IPFamily
from kpgen.core.names import IPT_PREFIX, is_ipt_chain, is_nft_table
from kpgen.dataplane.run import LOAD_TIMEOUT, QUERY_TIMEOUT, DataplaneError, run, which

IPTABLES_VARIANTS = ("nft", "legacy")
# Chains that kubelet makes in whichever iptables the node uses (kube-proxy's wrapper reads them).
KUBELET_HINTS = ("KUBE-IPTABLES-HINT", "KUBE-KUBELET-CANARY")
CONTEXT_LINES = 2


class KernelError(DataplaneError):
    """The kernel (through nft or iptables-restore) refused a transaction or a listing."""


NEEDS_ROOT = "reading kpgen's rules needs root (CAP_NET_ADMIN): run kpgen as root, e.g. with sudo"
CAP_NET_ADMIN = 12  # linux/capability.h
_REFUSED = ("Operation not permitted", "Permission denied")


class NoPermission(KernelError):
    """The kernel refused to list the rules: the process lacks CAP_NET_ADMIN (not root)."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(NEEDS_ROOT + (f" ({detail})" if detail else ""))


def has_net_admin() -> bool:
    """Whether this process may read and change the rules of its network namespace (its
    effective capabilities hold CAP_NET_ADMIN). Asked of /proc before nft is, because
    libnftables prints its own refusal on stderr."""
    try:
        with open("/proc/self/status", encoding="ascii") as stream:
            for line in stream:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except (OSError, ValueError, IndexError):
        pass
    return True  # cannot tell: let the kernel answer


def _refused(error: str) -> bool:
    return any(word in error for word in _REFUSED)


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


# --- nftables ---------------------------------------------------------------------------------


class Nft:
    """One libnftables context (or the ``nft`` tool): scripts in, JSON listings out."""

    def __init__(self, use_binding: bool | None = None) -> None:
        self._binding: Any = None
        if use_binding is None:  # KPGEN_NFT_BINDING=0: the nft tool even where the binding is
            use_binding = os.environ.get("KPGEN_NFT_BINDING", "1") != "0"
        if use_binding:
            try:
                import nftables  # type: ignore[import-untyped]  # Debian's python3-nftables

                self._binding = nftables.Nftables()
            except (ImportError, OSError):
                self._binding = None

    @property
    def via(self) -> str:
        return "libnftables" if self._binding is not None else "nft"

    def run(self, text: str, *, check: bool = False) -> str:
        """Run an nft script as one transaction; ``check``: validate only (``nft -c``).
        Returns what nft printed (nothing, for a script that only changes rules)."""
        with tempfile.NamedTemporaryFile("w", suffix=".nft", prefix="kpgen-") as handle:
            handle.write(text)  # from a file, so that errors carry line numbers
            handle.flush()
            if self._binding is not None:
                self._binding.set_dry_run(check)
                try:
                    rc, output, error = self._binding.cmd_from_file(handle.name)
                finally:
                    self._binding.set_dry_run(False)
            else:
                argv = ["nft", *(["-c"] if check else []), "-f", handle.name]
                result = run(argv, timeout=LOAD_TIMEOUT)
                rc, output, error = result.returncode, result.stdout, result.stderr
            if rc != 0:
                raise KernelError(with_context(str(error).replace(handle.name, "rules"), text))
        return str(output)

    def json(self, command: str, *, terse: bool = False) -> list[dict[str, Any]]:
        """The ``nftables`` array of libnftables' JSON answer to a list ``command`` (``list
        table ip kpgen``); ``terse``: without set and map elements."""
        if self._binding is not None:
            self._binding.set_json_output(True)
            self._binding.set_terse_output(terse)
            try:
                rc, output, error = self._binding.cmd(command)
            finally:
                self._binding.set_json_output(False)
                self._binding.set_terse_output(False)
        else:
            flags = ["-j", *(["-t"] if terse else [])]
            result = run(["nft", *flags, *shlex.split(command)], timeout=QUERY_TIMEOUT)
            rc, output, error = result.returncode, result.stdout, result.stderr
        if rc != 0:
            if _refused(str(error)):
                raise NoPermission(f"nft {command}: {str(error).strip()}")
            raise KernelError(f"nft {command}: {str(error).strip()}")
        try:
            items = json.loads(output or "{}").get("nftables", [])
        except (json.JSONDecodeError, AttributeError):
            raise KernelError(f"nft -j {command}: not the JSON of libnftables-json(5)") from None
        return [item for item in items if isinstance(item, dict)]

    def tables(self) -> set[str]:
        """kpgen's tables that exist now, as ``family name`` (``ip kpgen``, ``ip kpgen-07``)."""
        link = NfNetlink()
        try:
            found = link.tables()
        finally:
            link.close()
        if found is None:
            found = {
                (item["table"]["family"], item["table"]["name"])
                for item in self.json("list tables")
                if "table" in item
            }
        return {f"{family} {name}" for family, name in found if is_nft_table(name)}

    def objects(
        self, family: IPFamily, tables: set[str] | None = None
    ) -> dict[str, dict[str, str]]:
        """The chains, sets and maps in kpgen's tables of ``family`` now: table -> name ->
        kind (every kpgen table of the family is listed, empty ones too). ``tables``: what
        :meth:`tables` answered, when the caller has asked already."""
        found: dict[str, dict[str, str]] = {
            name.split()[1]: {}
            for name in (self.tables() if tables is None else tables)
            if name.split()[0] == family.nft_family
        }
        for kind in ("chain", "set", "map"):
            for item in self.json(f"list {kind}s {family.nft_family}", terse=True):
                obj = item.get(kind)
                if isinstance(obj, dict) and obj.get("table") in found:
                    found[obj["table"]][obj["name"]] = kind
        return found

    def listing(self, family: IPFamily) -> list[dict[str, Any]]:
        """kpgen's tables of ``family`` as libnftables JSON (``list table`` of each)."""
        items: list[dict[str, Any]] = []
        for name in sorted(self.tables()):
            if name.split()[0] == family.nft_family:
                items += self.json(f"list table {name}")
        return items


# --- nf_tables' generation (anyone's commit moves it) ---------------------------------------


@dataclass(frozen=True)
class Generation:
    """The ruleset generation of the network namespace's nf_tables: every committed
    transaction (nft, iptables-nft, anyone's) moves it on; and who committed last."""

    id: int
    pid: int | None = None
    process: str | None = None


# nf_tables' address families (linux/netfilter.h, NFPROTO_*) as nft spells them
NFT_FAMILIES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}


class NfNetlink:
    """nf_tables read through one netlink socket (pyroute2), kept open: its generation, its
    tables. Opening and closing a socket per read costs 5-13 ms right after a commit (the
    kernel frees the old rules first), a request on an open one 0.2 ms. The tables are read
    here, not with libnftables: nft 1.0.6 fetches every table's chains, sets and rules for
    ``list tables`` (10 s with 10,000 services loaded; a netlink dump of the tables 1 ms)."""

    def __init__(self) -> None:
        self._socket: Any = None

    def _dump(self, message_type: str) -> list[Any] | None:
        """The kernel's answer to one nf_tables request (``NFT_MSG_GETGEN``, ...) for every
        address family, or None when it cannot be asked."""
        try:
            from pyroute2.netlink.exceptions import NetlinkError  # type: ignore[import-untyped]
            from pyroute2.netlink.nfnetlink import nfgen_msg, nftsocket  # type: ignore[import-untyped]
        except ImportError:
            return None
        for _ in range(2):  # a socket that failed is opened again, once
            try:
                # NFPROTO_UNSPEC: every address family's tables
                self._socket = self._socket or nftsocket.NFTSocket(nfgen_family=0)
                request = getattr(nftsocket, message_type)
                return list(self._socket.request_get(nfgen_msg(), request))
            except (OSError, ValueError, NetlinkError):
                self.close()
        return None

    def generation(self) -> Generation | None:
        """The generation now, or None when it cannot be read."""
        answer = self._dump("NFT_MSG_GETGEN")
        if not answer:
            return None
        found = dict(answer[0]["attrs"])
        return Generation(
            int(found["NFTA_GEN_ID"]),
            found.get("NFTA_GEN_PROC_PID"),
            found.get("NFTA_GEN_PROC_NAME"),
        )

    def tables(self) -> set[tuple[str, str]] | None:
        """Every table of the network namespace as (family, name), or None when they cannot
        be read here (then libnftables is asked, and says why)."""
        answer = self._dump("NFT_MSG_GETTABLE")
        if answer is None:
            return None
        found = set()
        for message in answer:
            family = NFT_FAMILIES.get(message["nfgen_family"])
            name = message.get_attr("NFTA_TABLE_NAME")
            if family and isinstance(name, str):
                found.add((family, name))
        return found

    def close(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):
                self._socket.close()
            self._socket = None


# --- iptables ---------------------------------------------------------------------------------


def iptables_tool(variant: str, family: IPFamily, suffix: str = "") -> str:
    """``iptables-nft``, ``ip6tables-legacy-save``, ..."""
    prefix = "iptables" if family is IPFamily.V4 else "ip6tables"
    return f"{prefix}-{variant}{suffix}"


def iptables_variants(family: IPFamily = IPFamily.V4) -> tuple[str, ...]:
    """The iptables variants installed here."""
    return tuple(v for v in IPTABLES_VARIANTS if which(iptables_tool(v, family, "-save")))


def legacy_in_use(family: IPFamily) -> bool:
    """Whether this network namespace has legacy iptables tables. Asked of /proc, because
    running iptables-legacy-save would create them."""
    names = "ip_tables_names" if family is IPFamily.V4 else "ip6_tables_names"
    try:
        with open(f"/proc/net/{names}", encoding="ascii") as stream:
            return bool(stream.read().strip())
    except OSError:
        return False


def in_use(variant: str, family: IPFamily) -> bool:
    """Whether reading ``variant`` can find anything (and will not create tables)."""
    return variant != "legacy" or legacy_in_use(family)


@dataclass
class SavedTable:
    """One ``*table`` of iptables-save: its chains in order and each one's rule specs."""

    name: str
    chains: dict[str, list[str]] = field(default_factory=dict)  # chain -> ["-d 10.0.0.1/32 ..."]
    policies: dict[str, str] = field(default_factory=dict)  # built-in chain -> ACCEPT, DROP
    inserted: set[tuple[str, str]] = field(default_factory=set)  # (chain, spec) given as -I


def read_iptables_save(text: str) -> dict[str, SavedTable]:
    """iptables-save output (or iptables-restore input) by table: chains declared with ``:``
    (and the policies of built-in ones), the specs of their ``-A`` rules in order, and where
    restore input has ``-I CHAIN [N] SPEC``, the spec inserted as iptables-restore would."""
    tables: dict[str, SavedTable] = {}
    current: SavedTable | None = None
    for line in text.splitlines():
        if line.startswith("*"):
            current = tables.setdefault(line[1:].strip(), SavedTable(line[1:].strip()))
        elif current is None or not line or line.startswith(("#", "COMMIT")):
            continue
        elif line.startswith(":"):
            name, policy = [*line[1:].split(), "-"][:2]
            current.chains.setdefault(name, [])
            if policy != "-":
                current.policies[name] = policy
        elif line.startswith("-A "):
            chain, _, spec = line[3:].partition(" ")
            current.chains.setdefault(chain, []).append(spec)
        elif line.startswith("-I "):
            chain, _, spec = line[3:].partition(" ")
            position, _, rest = spec.partition(" ")
            index, spec = (int(position) - 1, rest) if position.isdigit() else (0, spec)
            current.chains.setdefault(chain, []).insert(index, spec)
            current.inserted.add((chain, spec))
    return tables


def iptables_save(variant: str, family: IPFamily, table: str | None = None) -> str:
    """What ``variant`` holds now, as iptables-save prints it ("" where reading would create
    legacy tables that are not there)."""
    if not in_use(variant, family):
        return ""
    argv = [iptables_tool(variant, family, "-save"), *(["-t", table] if table else [])]
    result = run(argv, timeout=QUERY_TIMEOUT)
    if result.returncode != 0:
        if _refused(result.stderr):
            raise NoPermission(f"{argv[0]}: {result.stderr.strip()}")
        raise KernelError(f"{argv[0]}: {result.stderr.strip()}")
    return result.stdout


def kpgen_chains(saved: dict[str, SavedTable]) -> dict[str, tuple[str, ...]]:
    """kpgen's chains per table."""
    return {name: tuple(c for c in t.chains if is_ipt_chain(c)) for name, t in saved.items()}


def detect_iptables_variant(family: IPFamily = IPFamily.V4) -> str:
    """The variant that already holds the node's rules, as kube-proxy's iptables wrapper
    decides: the one with kpgen's chains, else with kubelet's hint chains, else with more
    rules; nft when nothing tells."""
    installed = iptables_variants(family)
    if not installed:
        raise KernelError("neither iptables-nft nor iptables-legacy is installed")
    saved = {v: read_iptables_save(iptables_save(v, family)) for v in installed}
    chains = {v: {c for t in saved[v].values() for c in t.chains} for v in installed}
    ours = [v for v in installed if any(c.startswith(IPT_PREFIX) for c in chains[v])]
    if len(ours) == 1:
        return ours[0]
    for hint in KUBELET_HINTS:
        holders = [v for v in installed if hint in chains[v]]
        if len(holders) == 1:
            return holders[0]
    counts = {
        v: sum(len(r) for t in saved[v].values() for r in t.chains.values()) for v in installed
    }
    return max(installed, key=lambda v: (counts[v], v == "nft"))
