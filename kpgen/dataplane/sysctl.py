"""kube-proxy's conntrack settings, written to the node's sysctls as kube-proxy writes them.

:func:`set_conntrack` takes the values :meth:`kpgen.core.kubeproxy.Conntrack.sysctls` decided
(``net.netfilter.nf_conntrack_*`` name -> integer) and writes each that differs from the
kernel's. Like kube-proxy it also raises the conntrack hash table's size
(/sys/module/nf_conntrack/parameters/hashsize) to a quarter of nf_conntrack_max when it is
smaller.

Each setting's outcome is reported, never raised: the timeouts are per network namespace and
writable by root in any; ``nf_conntrack_max`` and the hash size only from the host's initial
network namespace (elsewhere the kernel shows them read-only); and a container that is not
privileged has /proc/sys mounted read-only. A value that cannot be written stays as it is and
the proxy goes on (its rules do not depend on it).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from dataclasses import dataclass

PROC_SYS = "/proc/sys/net/netfilter"
HASHSIZE = "/sys/module/nf_conntrack/parameters/hashsize"


@dataclass(frozen=True)
class Outcome:
    """What became of one setting."""

    name: str
    wanted: int
    before: int | None
    done: bool
    problem: str = ""

    def __str__(self) -> str:
        if self.done and self.before == self.wanted:
            return f"{self.name} is {self.wanted} already"
        if self.done:
            return f"{self.name} set to {self.wanted} (was {self.before})"
        return f"{self.name} not set to {self.wanted}: {self.problem}"


def _read(path: str) -> int | None:
    try:
        with open(path, encoding="ascii") as stream:
            return int(stream.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _why(error: OSError, name: str, before: int | None) -> str:
    stays = f"it stays {before}" if before is not None else "it stays as it is"
    if error.errno == errno.EROFS:
        return (
            f"/proc/sys or /sys is read-only here (a container that is not privileged: "
            f"kube-proxy's DaemonSet runs privileged); {stays}"
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        if name in ("nf_conntrack_max", "hashsize"):
            return (
                f"the kernel lets only the host's initial network namespace set it, and this is "
                f"another one (or kpgen is not root); {stays}"
            )
        return f"permission denied (kpgen must run as root); {stays}"
    return f"{error.strerror or error}; {stays}"


def _write(path: str, name: str, value: int) -> Outcome:
    before = _read(path)
    if not os.path.exists(path):
        return Outcome(
            name,
            value,
            None,
            False,
            "the kernel has no such setting here: nf_conntrack is not "
            "loaded yet (the first rules load it)",
        )
    if before == value:
        return Outcome(name, value, before, True)
    try:
        with open(path, "w", encoding="ascii") as stream:
            stream.write(f"{value}\n")
    except OSError as error:
        return Outcome(name, value, before, False, _why(error, name, before))
    return Outcome(name, value, before, True)


def set_conntrack(
    wanted: Mapping[str, int], *, proc_sys: str = PROC_SYS, hashsize: str = HASHSIZE
) -> list[Outcome]:
    """Write ``wanted`` (sysctl name under net.netfilter -> value), and the hash size as
    kube-proxy does when nf_conntrack_max is set; every outcome, in order."""
    outcomes = []
    for name, value in wanted.items():
        outcomes.append(_write(os.path.join(proc_sys, name), name, value))
        if name == "nf_conntrack_max" and outcomes[-1].done:
            size = _read(hashsize)
            if size is not None and size < value // 4:
                outcomes.append(_write(hashsize, "hashsize", value // 4))
    return outcomes


def missing_module(outcomes: list[Outcome]) -> bool:
    """Whether some setting failed only because nf_conntrack is not loaded yet."""
    return any(not o.done and o.before is None and "not loaded" in o.problem for o in outcomes)
