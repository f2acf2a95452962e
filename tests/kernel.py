"""Load rendered rules into the real kernel, inside throwaway network namespaces.

Every command here runs as ``ip netns exec NS ...`` in a namespace that :func:`netns` created
and deletes again, also when the body raises: nothing ever touches the root namespace's rules.

* :func:`nft_check` runs ``nft -c -f -``: parsed and validated by the kernel, not committed.
* :func:`iptables_load` runs a real ``iptables-restore --noflush``. Not ``--test``: the
  iptables-nft ``--test`` accepts jumps to chains that do not exist
  (/work/shared/notes/netfilter-facts.md); a real restore into an empty namespace does not.

Tests that use the kernel carry ``@pytest.mark.kernel`` (or :data:`kernel`); ``conftest.py``
skips them with :func:`unavailable_reason` when the machine cannot run them.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

PREFIX = "kpgen-t-"
IP6TABLES_HEADER = "# ip6tables-restore input (IPv6)\n"
TIMEOUT = 120
# root's tools live in sbin, which a non-login PATH may lack
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
_counter = itertools.count()

kernel = pytest.mark.kernel


def tool(name: str) -> str | None:
    """The full path of a command-line tool, or None when it is not installed."""
    return shutil.which(name, path=_SEARCH_PATH)


def unavailable_reason() -> str | None:
    """Why the kernel tests cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, nft, iptables-restore); CI runs them as root"
    missing = [name for name in ("ip", "nft", "iptables-restore") if tool(name) is None]
    if missing:
        return f"needs {', '.join(missing)} (Debian: apt-get install iproute2 nftables iptables)"
    return None


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False
    )


def namespace_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def _delete(name: str) -> None:
    result = _run([tool("ip") or "ip", "netns", "delete", name])
    if result.returncode != 0 and namespace_exists(name):
        raise RuntimeError(f"could not delete network namespace {name}: {result.stderr.strip()}")


@contextmanager
def netns() -> Iterator[str]:
    """A new, empty network namespace (``kpgen-t-PID-N``), deleted again on exit."""
    name = f"{PREFIX}{os.getpid()}-{next(_counter)}"
    result = _run([tool("ip") or "ip", "netns", "add", name])
    if result.returncode != 0:
        raise RuntimeError(f"could not create network namespace {name}: {result.stderr.strip()}")
    try:
        yield name
    finally:
        _delete(name)


def leftover_namespaces() -> list[str]:
    """Namespaces this process made and did not delete (none, if every netns() exited)."""
    mine = f"{PREFIX}{os.getpid()}-"
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(mine))
    except FileNotFoundError:
        return []


def cleanup_leftovers() -> None:
    for name in leftover_namespaces():
        _delete(name)


def _exec(namespace: str, args: list[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
    if not namespace.startswith(PREFIX):
        raise ValueError(f"refusing to run in {namespace!r}: not a namespace made by netns()")
    return _run([tool("ip") or "ip", "netns", "exec", namespace, *args], stdin)


def exec_in(namespace: str, args: list[str], stdin: str | None = None) -> tuple[bool, str]:
    """Run ``args`` inside ``namespace``: (exit status 0, standard error)."""
    result = _exec(namespace, args, stdin)
    return result.returncode == 0, result.stderr


def output_of(namespace: str, args: list[str], stdin: str | None = None) -> str:
    """The standard output of ``args`` run inside ``namespace``; a failure fails the test."""
    result = _exec(namespace, args, stdin)
    assert result.returncode == 0, f"{args[:3]} failed:\n{result.stderr}\n{stdin or ''}"
    return result.stdout


def nft_check(text: str, namespace: str | None = None) -> tuple[bool, str]:
    """``nft -c -f -`` of ``text``: does the kernel accept it? (ok, stderr).

    Check mode commits nothing, so one namespace may serve many checks; without
    ``namespace`` a fresh one is made for this check alone.
    """
    if namespace is not None:
        return exec_in(namespace, [tool("nft") or "nft", "-c", "-f", "-"], text)
    with netns() as fresh:
        return nft_check(text, fresh)


def iptables_load(text: str, namespace: str | None = None) -> tuple[bool, str]:
    """A real ``iptables-restore --noflush`` of ``text`` into a fresh namespace (ok, stderr).

    A given ``namespace`` must be one whose tables are still empty, or the result says
    nothing about ``text`` alone.
    """
    if namespace is not None:
        # kpgen render prints a dual-stack ruleset as IPv4 input, then IPv6 input under this
        # header: each part goes to its own restore
        ipv4, _, ipv6 = text.partition(IP6TABLES_HEADER)
        ok, stderr = exec_in(
            namespace, [tool("iptables-restore") or "iptables-restore", "--noflush"], ipv4
        )
        if ok and ipv6:
            ip6 = tool("ip6tables-restore") or "ip6tables-restore"
            return exec_in(namespace, [ip6, "--noflush"], ipv6)
        return ok, stderr
    with netns() as fresh:
        return iptables_load(text, fresh)


def iptables_save(namespace: str) -> str:
    """What ``iptables-save`` lists in ``namespace`` (to see that a load took effect)."""
    save = tool("iptables-save") or "iptables-save"
    result = _run([tool("ip") or "ip", "netns", "exec", namespace, save])
    if result.returncode != 0:
        raise RuntimeError(f"iptables-save failed: {result.stderr.strip()}")
    return result.stdout


# kpgen's jumps from the built-in iptables chains (table, chain, kpgen's chain): one of each.
KPGEN_JUMPS = (
    ("nat", "PREROUTING", "KPGEN-SERVICES"),
    ("nat", "OUTPUT", "KPGEN-SERVICES"),
    ("nat", "POSTROUTING", "KPGEN-POSTROUTING"),
    ("filter", "INPUT", "KPGEN-EXTERNAL-SERVICES"),
    ("filter", "FORWARD", "KPGEN-SERVICES"),
    ("filter", "FORWARD", "KPGEN-EXTERNAL-SERVICES"),
    ("filter", "OUTPUT", "KPGEN-SERVICES"),
)


def jump_counts(saved: str) -> dict[tuple[str, str, str], int]:
    """How many times iptables-save output ``saved`` holds each of :data:`KPGEN_JUMPS`."""
    tables = {section.split("\n", 1)[0]: section for section in saved.split("\n*")[1:]}
    if saved.startswith("*"):
        first = saved[1:].split("\n", 1)[0]
        tables.setdefault(first, saved.split("\nCOMMIT", 1)[0])
    counts = {}
    for table, chain, target in KPGEN_JUMPS:
        lines = tables.get(table, "").splitlines()
        jumps = [ln for ln in lines if ln.startswith(f"-A {chain} ")]
        counts[(table, chain, target)] = sum(ln.endswith(f"-j {target}") for ln in jumps)
    return counts
