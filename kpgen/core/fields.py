"""Typed reads of untrusted manifest data, each failure naming the field it came from.

A :class:`Field` wraps one value of a decoded manifest together with its path
(``spec.ports[0].port``). Its readers either return a validated Python value or raise
:class:`Invalid`, which carries that path, so that a problem can always be reported as
``namespace/name: field: problem``. Command-line flags and the KubeProxyConfiguration file use
the same value parsers (:func:`parse_ip`, :func:`parse_cidr`), so a value is valid or not the
same way wherever it comes from.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import socket
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from kpgen.core.model import IPAddress, IPNetwork

# RFC 1123 label (namespaces, port names) and RFC 1035 label (service names), as the API
# validates them. Only names that pass these ever reach rule text.
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
T = TypeVar("T")
LABEL_MAX = 63
SUBDOMAIN_MAX = 253


class Invalid(ValueError):
    """A value that failed validation, with the path of the field that held it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def printable(text: str, limit: int = 140) -> str:
    """Untrusted text made safe for a one-line message: control characters escaped, cut short."""
    if not text.isprintable():
        text = text.encode("unicode_escape").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def show(value: Any) -> str:
    """A short, safe rendering of a bad value for a message."""
    return printable(f'"{value}"' if isinstance(value, str) else repr(value), 60)


def parse_ip(text: Any) -> IPAddress:
    """An IPv4 or IPv6 address, written as kube-proxy accepts it (no zone, no prefix)."""
    if not isinstance(text, str):
        raise ValueError(f"{show(text)} is not an IP address")
    text = text.strip()
    try:  # the common case first: inet_pton reads IPv4 as ipaddress does (no leading zeros)
        return ipaddress.IPv4Address(socket.inet_pton(socket.AF_INET, text))
    except (OSError, ValueError):
        pass
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ValueError(f"{show(text)} is not an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is not None:
        raise ValueError(f"{show(text)} has a zone; a service address may not")
    return address


def parse_cidr(text: Any) -> IPNetwork:
    """A CIDR (``10.0.0.0/8``); host bits are cleared, as Go's ``net.ParseCIDR`` does."""
    if not isinstance(text, str) or "/" not in text:
        raise ValueError(f"{show(text)} is not a CIDR (address/prefix-length)")
    address, _, prefix = text.strip().partition("/")
    try:
        parse_ip(address)
        if not prefix.isdigit():
            raise ValueError
        return ipaddress.ip_network(f"{address}/{prefix}", strict=False)
    except ValueError:
        raise ValueError(f"{show(text)} is not a CIDR (address/prefix-length)") from None


def parse_port(value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{show(value)} is not a port number")
    if not low <= value <= 65535:
        raise ValueError(f"{value} is out of range {low}-65535")
    return value


def is_name(text: str, pattern: re.Pattern[str] = DNS1123_LABEL, limit: int = LABEL_MAX) -> bool:
    """Whether ``text`` is a Kubernetes name of ``pattern``'s kind, at most ``limit`` long."""
    return len(text) <= limit and pattern.match(text) is not None


class Field:
    """One value of a decoded manifest and the path it was found at (spelled out only for a
    message: a field keeps its parent and its key)."""

    __slots__ = ("_key", "_parent", "value")

    def __init__(self, value: Any, path: str | int = "", parent: Field | None = None) -> None:
        self.value = value
        self._parent = parent
        self._key: str | int = path

    @property
    def path(self) -> str:
        if self._parent is None:
            return str(self._key)
        return self._parent._child_path(self._key)

    def _child_path(self, key: str | int) -> str:
        path = self.path
        if isinstance(key, int):
            return f"{path}[{key}]"
        return f"{path}.{key}" if path else key

    def invalid(self, problem: str) -> Invalid:
        return Invalid(self.path or "(document)", problem)

    def mapping(self) -> dict[str, Any]:
        if not isinstance(self.value, dict):
            raise self.invalid(f"must be a mapping, not {type(self.value).__name__}")
        return self.value

    def get(self, key: str) -> Field | None:
        """The field ``key`` of this mapping, or None when it is absent or null."""
        mapping = self.value
        if not isinstance(mapping, dict):
            raise self.invalid(f"must be a mapping, not {type(mapping).__name__}")
        value = mapping.get(key)
        return None if value is None else Field(value, key, self)

    def __getitem__(self, key: str) -> Field:
        field = self.get(key)
        if field is None:
            raise Invalid(self._child_path(key), "required field is missing")
        return field

    def items(self) -> Iterator[Field]:
        """The entries of this list."""
        if not isinstance(self.value, list):
            raise self.invalid(f"must be a list, not {type(self.value).__name__}")
        return (Field(v, i, self) for i, v in enumerate(self.value))

    def string(self) -> str:
        if not isinstance(self.value, str):
            raise self.invalid(f"{show(self.value)} is not a string")
        return self.value

    def boolean(self) -> bool:
        if not isinstance(self.value, bool):
            raise self.invalid(f"{show(self.value)} is not true or false")
        return self.value

    def integer(self, low: int, high: int) -> int:
        value = self.value
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.invalid(f"{show(value)} is not an integer")
        if not low <= value <= high:
            raise self.invalid(f"{value} is out of range {low}-{high}")
        return value

    def port(self) -> int:
        return self._parsed(parse_port)

    def ip(self) -> IPAddress:
        return self._parsed(parse_ip)

    def cidr(self) -> IPNetwork:
        return self._parsed(parse_cidr)

    def _parsed(self, parser: Callable[[Any], T]) -> T:
        try:
            return parser(self.value)
        except ValueError as error:
            raise self.invalid(str(error)) from None

    def name(self, pattern: re.Pattern[str] = DNS1123_LABEL, limit: int = LABEL_MAX) -> str:
        """A Kubernetes name, checked against ``pattern`` (a DNS label by default)."""
        text = self.string()
        if not is_name(text, pattern, limit):
            kind = {
                DNS1035_LABEL.pattern: "an RFC 1035 label",
                DNS1123_SUBDOMAIN.pattern: "an RFC 1123 subdomain",
            }.get(pattern.pattern, "an RFC 1123 label")
            raise self.invalid(f"{show(text)} is not {kind} (lower case, at most {limit})")
        return text

    def choice(self, enum_type: Any) -> Any:
        """A member of ``enum_type``, by its API spelling."""
        text = self.string()
        try:
            return _member(enum_type, text)
        except ValueError:
            allowed = ", ".join(member.value for member in enum_type)
            raise self.invalid(f"{show(text)} is not one of {allowed}") from None


@functools.cache
def _member(enum_type: Any, text: str) -> Any:
    """``enum_type(text)``, remembered: an enum finds a member by value in Python, and every
    service, port and slice names a few (a refused value raises, and is not remembered)."""
    return enum_type(text)


_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0
}  # fmt: skip


def parse_duration(text: str) -> float:
    """A Go duration as kube-proxy's flags take it (``1s``, ``500ms``, ``1m30s``, ``0``), in
    seconds."""
    if text == "0":
        return 0.0
    parts = _DURATION_PART.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{show(text)} is not a duration (like 1s, 500ms, 1m30s)")
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def parse_bind_address(text: str) -> tuple[str, int] | None:
    """``HOST:PORT`` or ``[IPv6]:PORT`` to listen on; empty: None (off)."""
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    try:
        parse_ip(host)
        if not sep or not port.isdigit():
            raise ValueError
        return host, parse_port(int(port), low=0)
    except ValueError:
        raise ValueError(f"{show(text)} is not an address to listen on (IP:PORT)") from None
