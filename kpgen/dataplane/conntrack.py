"""Stale UDP conntrack entries: which to delete after a sync, and deleting them.

UDP has no connection to close: the kernel keeps a conntrack entry for as long as datagrams
keep coming (30 s after the last one, 120 s once it has seen both directions), and every datagram
of an entry follows the entry's NAT, not the rules. A DNS client that reuses its source port
would keep sending to an endpoint that is gone, or, if it started while its service had no rules
(kpgen not yet running, the service not yet known), keep sending un-NATed packets nowhere. So,
as kube-proxy does after a sync (kube-proxy-reference row 26), kpgen deletes the UDP entries a
sync made stale:

* an endpoint that no longer serves a destination (ClusterIP, externalIP or LB IP and port, or
  NodePort): its entries to that destination (reply source = the endpoint);
* a destination that lost all its endpoints, or whose service port is gone: every entry to it;
* a destination that had no endpoints (or was unknown: the first sync) and now has some: every
  entry to it that was not DNATed to one of its endpoints (un-NATed ones, made while it had no
  rules; a rejected datagram leaves no entry: it is dropped before its entry is confirmed).

:func:`stale_udp_flows` decides that from the plans before and after the sync (a pure function);
:func:`delete` runs ``conntrack -D`` for each :class:`Flow`, listing the UDP entries first when
a flow keeps some of them (``conntrack -D`` cannot say "except"). Every argument comes from a
:class:`Flow`, whose addresses are ``ipaddress`` objects and ports ints in range.
"""

from __future__ import annotations

import ipaddress
import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from kpgen.core.model import IPAddress, IPFamily, Protocol
from kpgen.core.plan import FamilyPlan
from kpgen.dataplane.run import DataplaneError, ToolError, run

_CONNTRACK_FAMILY = {IPFamily.V4: "ipv4", IPFamily.V6: "ipv6"}
_NOTHING_DELETED = re.compile(r"\b0 flow entries have been deleted")
_DELETED = re.compile(r"\b(\d+) flow entries have been deleted")
_FIELD = re.compile(r"\b(src|dst|sport|dport)=(\S+)")


class ConntrackError(DataplaneError):
    """The conntrack tool failed; the message says which deletion and why."""


@dataclass(frozen=True, order=True)
class Target:
    """Where DNAT sent an entry: an endpoint's address and port, the entry's reply source."""

    address: IPAddress
    port: int

    def __post_init__(self) -> None:
        _check(self.address, self.port)

    def __str__(self) -> str:
        return _host_port(self.address, self.port)


@dataclass(frozen=True)
class Flow:
    """UDP entries to delete: those whose original destination is ``address`` (None: any
    address, a NodePort) and ``port``; only those answered by ``reply`` when it is given; none
    answered by one of ``keep`` (the destination's serving endpoints)."""

    family: IPFamily
    address: IPAddress | None
    port: int
    reply: Target | None = None
    keep: frozenset[Target] = frozenset()

    def __post_init__(self) -> None:
        if not isinstance(self.family, IPFamily):
            raise TypeError(f"family must be an IPFamily, not {self.family!r}")
        _check(self.address, self.port, self.family)
        for target in (self.reply, *self.keep):
            if target is not None and IPFamily.of(target.address) is not self.family:
                raise ValueError(f"{target} is not an {self.family.value} endpoint")
        if self.reply is not None and self.keep:
            raise ValueError("a flow names the endpoint it deletes or those it keeps, not both")

    @property
    def sort_key(self) -> tuple[str, int, int, int, int, int]:
        reply = self.reply
        return (
            self.family.value,
            -1 if self.address is None else int(self.address),
            self.port,
            -1 if reply is None else int(reply.address),
            -1 if reply is None else reply.port,
            len(self.keep),
        )

    def argv(self) -> list[str]:
        """The ``conntrack`` arguments that delete this flow's entries (not for ``keep``
        flows: :func:`delete` turns them into one flow per stale entry first)."""
        if self.keep:
            raise ValueError("a flow that keeps some entries is deleted entry by entry")
        argv = ["-D", "-f", _CONNTRACK_FAMILY[self.family], "-p", "udp"]
        if self.address is not None:
            argv += ["--orig-dst", str(self.address)]
        argv += ["--orig-port-dst", str(self.port)]
        if self.reply is not None:
            argv += ["--reply-src", str(self.reply.address)]
            argv += ["--reply-port-src", str(self.reply.port)]
        return argv

    def matches(self, entry: Entry) -> bool:
        return (
            entry.family is self.family
            and (self.address is None or entry.address == self.address)
            and entry.port == self.port
            and (self.reply is None or entry.reply == self.reply)
            and entry.reply not in self.keep
        )

    def __str__(self) -> str:
        where = f"*:{self.port}" if self.address is None else _host_port(self.address, self.port)
        if self.reply is not None:
            return f"{where} answered by {self.reply}"
        if self.keep:
            kept = ", ".join(str(t) for t in sorted(self.keep))
            return f"{where} not answered by {kept}"
        return where


@dataclass(frozen=True)
class Entry:
    """A UDP conntrack entry, as far as deciding about it goes: its original destination and
    where its reply comes from."""

    family: IPFamily
    address: IPAddress
    port: int
    reply: Target


def _check(address: object, port: object, family: IPFamily | None = None) -> None:
    if address is not None:
        if not isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise TypeError(f"address must be an ipaddress object, not {address!r}")
        if family is not None and IPFamily.of(address) is not family:
            raise ValueError(f"{address} is not an {family.value} address")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"port must be an int in 1-65535, not {port!r}")


def _host_port(address: IPAddress, port: int) -> str:
    return f"[{address}]:{port}" if address.version == 6 else f"{address}:{port}"


# --- which entries a sync made stale ----------------------------------------------------------

# (family, address or None for a NodePort, port)
Destination = tuple[IPFamily, IPAddress | None, int]
Destinations = dict[Destination, frozenset[tuple[IPAddress, int]]]
# the destinations of the last plans seen: the next sync's previous plans are those
_last: list[tuple[Sequence[FamilyPlan], Destinations]] = []


def _destinations(plans: Sequence[FamilyPlan]) -> Destinations:
    """Every UDP destination of the plans, with the endpoints (address, port) traffic to it may
    be DNATed to."""
    for seen, found in _last:
        if seen is plans:
            return found
    found = {}
    for plan in plans:
        for port in plan.ports:
            if port.port.protocol is not Protocol.UDP:
                continue
            targets = frozenset(
                (b.address, b.port) for b in (*port.cluster_endpoints, *port.local_endpoints)
            )
            keys: list[Destination] = [
                (plan.family, address, port.port.port)
                for address in (port.cluster_ip, *port.external_addresses)
            ]
            if port.port.node_port is not None:
                keys.append((plan.family, None, port.port.node_port))
            for key in keys:
                found[key] = found[key] | targets if key in found else targets
    _last[:] = [*_last[-1:], (plans, found)]
    return found


def stale_udp_flows(
    previous: Sequence[FamilyPlan] | None, current: Sequence[FamilyPlan]
) -> list[Flow]:
    """The UDP conntrack entries that going from the ``previous`` plans (None: nothing known,
    the first sync) to the ``current`` ones made stale; TCP and SCTP are left alone (their
    endpoints end their connections). Sorted, without duplicates."""
    before = None if previous is None else _destinations(previous)
    after = _destinations(current)
    if before == after:
        return []
    flows: list[Flow] = []
    for key in after.keys() | (before or {}).keys():
        family, address, port = key
        old = None if before is None else before.get(key)
        new = after.get(key)
        if new == old:
            continue
        if new and not old:  # gained endpoints (or the first sync): nothing else may stay
            keep = frozenset(Target(*t) for t in new)
            flows.append(Flow(family, address, port, keep=keep))
        elif new and old:  # only the endpoints that no longer serve it
            flows += [Flow(family, address, port, reply=Target(*t)) for t in old - new]
        elif old:  # lost every endpoint, or is gone
            flows.append(Flow(family, address, port))
    return sorted(flows, key=lambda f: f.sort_key)


def resolve(flows: Iterable[Flow], entries: Iterable[Entry]) -> list[Flow]:
    """``flows`` as flows ``conntrack -D`` can delete: one that keeps some entries becomes one
    flow per reply source of the ``entries`` it matches; the others stay as they are."""
    entries = list(entries)
    resolved: dict[Flow, None] = {}
    for flow in flows:
        if not flow.keep:
            resolved[flow] = None
            continue
        for entry in entries:
            if flow.matches(entry):
                resolved[Flow(flow.family, flow.address, flow.port, reply=entry.reply)] = None
    return list(resolved)


# --- the conntrack tool -----------------------------------------------------------------------


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    try:
        return run(argv)
    except ToolError as error:
        raise ConntrackError(str(error)) from None


def parse_entries(text: str, family: IPFamily) -> list[Entry]:
    """``conntrack -L -p udp`` output: its entries. A line without an original destination and
    a reply source is an error (the listing format is not what this reads)."""
    entries = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = _FIELD.findall(line)
        names = [name for name, _ in fields]
        if names[:8] != ["src", "dst", "sport", "dport"] * 2:
            raise ConntrackError(f"cannot read this conntrack entry: {line.strip()}")
        values = [value for _, value in fields[:8]]
        try:
            address = ipaddress.ip_address(values[1])
            port = int(values[3])
            reply = Target(ipaddress.ip_address(values[4]), int(values[6]))
            _check(address, port, family)
        except ValueError as error:
            raise ConntrackError(f"cannot read this conntrack entry: {line.strip()}") from error
        entries.append(Entry(family, address, port, reply))
    return entries


def list_udp(family: IPFamily) -> list[Entry]:
    """The UDP conntrack entries of ``family`` in the current network namespace."""
    result = _run(["conntrack", "-L", "-f", _CONNTRACK_FAMILY[family], "-p", "udp"])
    if result.returncode != 0:
        raise ConntrackError(f"conntrack -L failed: {result.stderr.strip()}")
    return parse_entries(result.stdout, family)


def _delete_one(flow: Flow) -> int:
    """``conntrack -D`` of one flow: how many entries it deleted ("0 flow entries have been
    deleted" exits 1, and is no failure)."""
    result = _run(["conntrack", *flow.argv()])
    message = result.stderr.strip()
    if result.returncode != 0 and not _NOTHING_DELETED.search(message):
        raise ConntrackError(f"deleting UDP entries to {flow}: {message}")
    count = _DELETED.search(message)
    return int(count.group(1)) if count else 0


def delete(flows: Sequence[Flow]) -> int:
    """Delete the entries of ``flows`` in the current network namespace; returns how many were
    deleted. Every flow is tried; failures are raised together afterwards as ConntrackError."""
    if not flows:
        return 0
    failures: list[str] = []
    direct = [f for f in flows if not f.keep]
    kept = [f for f in flows if f.keep]
    if kept:
        entries: list[Entry] = []
        for family in sorted({f.family for f in kept}, key=lambda f: f.value):
            try:
                entries += list_udp(family)
            except ConntrackError as error:
                failures.append(str(error))
        direct += resolve(kept, entries)
    deleted = 0
    for flow in dict.fromkeys(direct):
        try:
            deleted += _delete_one(flow)
        except ConntrackError as error:
            failures.append(str(error))
    if failures:
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        raise ConntrackError(f"{failures[0]}{more}; {deleted} entries were deleted")
    return deleted
