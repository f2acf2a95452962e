"""kube-proxy's own configuration, verbatim: every KubeProxyConfiguration field and every
kube-proxy flag, honoured or accepted with one note saying why kpgen ignores it.

:func:`read_config` reads a decoded KubeProxyConfiguration (as kubeadm, EKS, kops or RKE2 write
it: every field present, most empty) into :class:`KubeProxyConfig`: the node's settings
(:class:`~kpgen.core.node.NodeFlags`), ``kpgen run``'s (kubeconfig, healthz and metrics
addresses, sync periods, logging), the conntrack sysctls to set, and the notes. An empty, zero or
null field means kube-proxy's default. A bad value of a field kpgen uses raises
:class:`~kpgen.core.node.ConfigError` naming the file and field (or the flag it came from); a
field kpgen does not use is never validated, only noted when set.

:func:`parse_flags` reads kube-proxy's command line (``--flag=value``, ``--flag value``, ``-v 2``)
into a patch of the same configuration, so that a flag and its field are one setting.

Values only: reading files and the number of CPUs is the caller's business.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kpgen.core.fields import Field, Invalid, parse_bind_address, parse_duration, parse_ip, show
from kpgen.core.node import CONFIG_API, ConfigError, NodeFlags

HEALTHZ_PORT = 10256
METRICS_PORT = 10249
SYNC_PERIOD = "30s"
MIN_SYNC_PERIOD = "1s"
INT32_MAX = 2**31 - 1

HONOURED = "honoured"
_IPVS = "kpgen has no IPVS mode"
_WINDOWS = "kpgen runs on Linux only"
_LOGS = "kpgen writes each log line at once, to stderr"

# Every field kube-proxy reads (v1alpha1 as Kubernetes 1.31-1.33 write it; the `linux`,
# `windows`, top-level `syncPeriod`/`minSyncPeriod` names of the newer internal layout too):
# HONOURED, or why kpgen ignores it. docs/config.md is this table, explained.
FIELDS: dict[str, str] = {
    "bindAddress": HONOURED,
    "bindAddressHardFail": "kpgen always exits when it cannot listen on its healthz or metrics "
    "address (as with bindAddressHardFail: true)",
    "clientConnection.acceptContentTypes": "kpgen's client asks for JSON only",
    "clientConnection.burst": "the Python Kubernetes client has no client-side rate limiter to "
    "set; kpgen makes one list and one watch per kind (three), far below any limit",
    "clientConnection.contentType": "kpgen's client speaks JSON only (no protobuf)",
    "clientConnection.kubeconfig": HONOURED,
    "clientConnection.qps": "the Python Kubernetes client has no client-side rate limiter to "
    "set; kpgen makes one list and one watch per kind (three), far below any limit",
    "clusterCIDR": HONOURED,
    "configSyncPeriod": "kpgen's watches do not re-deliver everything on a timer; a full sync "
    "every syncPeriod covers what that was for",
    "conntrack.maxPerCore": HONOURED,
    "conntrack.min": HONOURED,
    "conntrack.tcpBeLiberal": HONOURED,
    "conntrack.tcpCloseWaitTimeout": HONOURED,
    "conntrack.tcpEstablishedTimeout": HONOURED,
    "conntrack.udpStreamTimeout": HONOURED,
    "conntrack.udpTimeout": HONOURED,
    "detectLocal.bridgeInterface": HONOURED,
    "detectLocal.interfaceNamePrefix": HONOURED,
    "detectLocalMode": HONOURED,
    "enableProfiling": "kpgen serves no /debug/pprof",
    "featureGates": "kpgen has no feature gates: it behaves as kube-proxy does with the "
    "defaults of its release",
    "healthzBindAddress": HONOURED,
    "hostnameOverride": HONOURED,
    "iptables.localhostNodePorts": "kpgen never answers NodePorts on 127.0.0.0/8 (as "
    "localhostNodePorts: false, and as kube-proxy's nftables mode)",
    "iptables.masqueradeAll": HONOURED,
    "iptables.masqueradeBit": HONOURED,
    "iptables.minSyncPeriod": HONOURED,
    "iptables.syncPeriod": HONOURED,
    "ipvs.excludeCIDRs": _IPVS,
    "ipvs.minSyncPeriod": _IPVS,
    "ipvs.scheduler": _IPVS,
    "ipvs.strictARP": _IPVS,
    "ipvs.syncPeriod": _IPVS,
    "ipvs.tcpFinTimeout": _IPVS,
    "ipvs.tcpTimeout": _IPVS,
    "ipvs.udpTimeout": _IPVS,
    "linux.conntrack.maxPerCore": HONOURED,
    "linux.conntrack.min": HONOURED,
    "linux.conntrack.tcpBeLiberal": HONOURED,
    "linux.conntrack.tcpCloseWaitTimeout": HONOURED,
    "linux.conntrack.tcpEstablishedTimeout": HONOURED,
    "linux.conntrack.udpStreamTimeout": HONOURED,
    "linux.conntrack.udpTimeout": HONOURED,
    "linux.masqueradeAll": HONOURED,
    "linux.oomScoreAdj": "kpgen leaves its OOM score to kubelet, which gives a "
    "system-node-critical pod -997 already",
    "logging.flushFrequency": _LOGS,
    "logging.format": HONOURED,
    "logging.options": _LOGS,
    "logging.verbosity": HONOURED,
    "logging.vmodule": "kpgen's log detail is one level for the whole program (-v)",
    "metricsBindAddress": HONOURED,
    "minSyncPeriod": HONOURED,
    "mode": HONOURED,
    "nftables.masqueradeAll": HONOURED,
    "nftables.masqueradeBit": HONOURED,
    "nftables.minSyncPeriod": HONOURED,
    "nftables.syncPeriod": HONOURED,
    "nodePortAddresses": HONOURED,
    "oomScoreAdj": "kpgen leaves its OOM score to kubelet, which gives a system-node-critical "
    "pod -997 already",
    "portRange": "kpgen opens no ports for services (the removed userspace mode's range)",
    "showHiddenMetricsForVersion": "kpgen's metrics have no hidden (deprecated) metrics",
    "syncPeriod": HONOURED,
    "windows.runAsService": _WINDOWS,
    "windowsRunAsService": _WINDOWS,
    "winkernel.enableDSR": _WINDOWS,
    "winkernel.forwardHealthCheckVip": _WINDOWS,
    "winkernel.networkName": _WINDOWS,
    "winkernel.rootHnsEndpointName": _WINDOWS,
    "winkernel.sourceVip": _WINDOWS,
}
# Fields whose value is itself a free-form mapping or list: one field, not sections.
_LEAF_MAPPINGS = {"featureGates", "logging.options"}
_SECTIONS = {path.rsplit(".", 1)[0] for path in FIELDS if "." in path} | {"linux"}

# kube-proxy's flags (1.31-1.33, and the klog flags older ones had). Each flag sets a config
# field (its value goes through the same reader), is handled by the command itself (SPECIAL),
# or is ignored with the reason given.
SPECIAL = "special"
FLAG_FIELDS: dict[str, str] = {
    "bind-address": "bindAddress",
    "bind-address-hard-fail": "bindAddressHardFail",
    "cluster-cidr": "clusterCIDR",
    "config-sync-period": "configSyncPeriod",
    "conntrack-max-per-core": "conntrack.maxPerCore",
    "conntrack-min": "conntrack.min",
    "conntrack-tcp-be-liberal": "conntrack.tcpBeLiberal",
    "conntrack-tcp-timeout-close-wait": "conntrack.tcpCloseWaitTimeout",
    "conntrack-tcp-timeout-established": "conntrack.tcpEstablishedTimeout",
    "conntrack-udp-timeout": "conntrack.udpTimeout",
    "conntrack-udp-timeout-stream": "conntrack.udpStreamTimeout",
    "detect-local-mode": "detectLocalMode",
    "feature-gates": "featureGates",
    "healthz-bind-address": "healthzBindAddress",
    "hostname-override": "hostnameOverride",
    "iptables-localhost-nodeports": "iptables.localhostNodePorts",
    "iptables-masquerade-bit": "iptables.masqueradeBit",
    "iptables-min-sync-period": "iptables.minSyncPeriod",
    "iptables-sync-period": "iptables.syncPeriod",
    "ipvs-exclude-cidrs": "ipvs.excludeCIDRs",
    "ipvs-min-sync-period": "ipvs.minSyncPeriod",
    "ipvs-scheduler": "ipvs.scheduler",
    "ipvs-strict-arp": "ipvs.strictARP",
    "ipvs-sync-period": "ipvs.syncPeriod",
    "ipvs-tcp-timeout": "ipvs.tcpTimeout",
    "ipvs-tcpfin-timeout": "ipvs.tcpFinTimeout",
    "ipvs-udp-timeout": "ipvs.udpTimeout",
    "kube-api-burst": "clientConnection.burst",
    "kube-api-content-type": "clientConnection.contentType",
    "kube-api-qps": "clientConnection.qps",
    "kubeconfig": "clientConnection.kubeconfig",
    "log-flush-frequency": "logging.flushFrequency",
    "log-json-info-buffer-size": "logging.options",
    "log-json-split-stream": "logging.options",
    "log-text-info-buffer-size": "logging.options",
    "log-text-split-stream": "logging.options",
    "logging-format": "logging.format",
    "masquerade-all": "linux.masqueradeAll",
    "metrics-bind-address": "metricsBindAddress",
    "min-sync-period": "minSyncPeriod",
    "nodeport-addresses": "nodePortAddresses",
    "oom-score-adj": "oomScoreAdj",
    "pod-bridge-interface": "detectLocal.bridgeInterface",
    "pod-interface-name-prefix": "detectLocal.interfaceNamePrefix",
    "profiling": "enableProfiling",
    "proxy-mode": "mode",
    "proxy-port-range": "portRange",
    "show-hidden-metrics-for-version": "showHiddenMetricsForVersion",
    "sync-period": "syncPeriod",
    "v": "logging.verbosity",
    "vmodule": "logging.vmodule",
    "windows-service": "windowsRunAsService",
}
_KLOG = "kpgen writes its log to stderr only, each line at once"
FLAG_ONLY: dict[str, str] = {
    "cleanup": SPECIAL,
    "config": SPECIAL,
    "help": SPECIAL,
    "init-only": SPECIAL,
    "master": SPECIAL,
    "version": SPECIAL,
    "write-config-to": SPECIAL,
    "boot-id-file": "kpgen does not read the node's boot ID",
    "machine-id-file": "kpgen does not read the node's machine ID",
    # klog's flags, removed in Kubernetes 1.26 but still in older DaemonSets
    "add-dir-header": _KLOG,
    "alsologtostderr": _KLOG,
    "log-backtrace-at": _KLOG,
    "log-dir": _KLOG,
    "log-file": _KLOG,
    "log-file-max-size": _KLOG,
    "logtostderr": _KLOG,
    "one-output": _KLOG,
    "skip-headers": _KLOG,
    "skip-log-headers": _KLOG,
    "stderrthreshold": _KLOG,
}
# Flags that take no separate value (pflag's booleans: `--flag` or `--flag=false`).
BOOLEAN_FLAGS = frozenset({
    "bind-address-hard-fail", "cleanup", "conntrack-tcp-be-liberal", "help", "init-only",
    "iptables-localhost-nodeports", "ipvs-strict-arp", "log-json-split-stream",
    "log-text-split-stream", "masquerade-all", "profiling", "version", "windows-service",
    "add-dir-header", "alsologtostderr", "logtostderr", "one-output", "skip-headers",
    "skip-log-headers",
})  # fmt: skip
INTEGER_FLAGS = frozenset({
    "conntrack-max-per-core", "conntrack-min", "iptables-masquerade-bit", "kube-api-burst",
    "oom-score-adj", "v",
})  # fmt: skip
LIST_FLAGS = frozenset({"nodeport-addresses", "ipvs-exclude-cidrs"})
KNOWN_FLAGS = frozenset(FLAG_FIELDS) | frozenset(FLAG_ONLY)


@dataclass(frozen=True)
class Conntrack:
    """kube-proxy's conntrack settings; None or 0: leave the kernel's value."""

    max_per_core: int | None = None
    min: int | None = None
    tcp_established_timeout: float | None = None
    tcp_close_wait_timeout: float | None = None
    tcp_be_liberal: bool = False
    udp_timeout: float | None = None
    udp_stream_timeout: float | None = None

    def conntrack_max(self, cpus: int) -> int:
        """nf_conntrack_max as kube-proxy computes it: maxPerCore x CPUs, at least min; 0 (leave
        it) when maxPerCore is 0 or unset."""
        if not self.max_per_core:
            return 0
        return max(self.max_per_core * cpus, self.min or 0)

    def sysctls(self, cpus: int) -> dict[str, int]:
        """The net.netfilter sysctls to set, as kube-proxy sets them (zero or unset: leave)."""
        wanted: dict[str, int] = {}
        if maximum := self.conntrack_max(cpus):
            wanted["nf_conntrack_max"] = maximum
        for name, seconds in (
            ("nf_conntrack_tcp_timeout_established", self.tcp_established_timeout),
            ("nf_conntrack_tcp_timeout_close_wait", self.tcp_close_wait_timeout),
            ("nf_conntrack_udp_timeout", self.udp_timeout),
            ("nf_conntrack_udp_timeout_stream", self.udp_stream_timeout),
        ):
            if seconds and int(seconds) > 0:
                wanted[name] = int(seconds)
        if self.tcp_be_liberal:
            wanted["nf_conntrack_tcp_be_liberal"] = 1
        return wanted


@dataclass(frozen=True)
class KubeProxyConfig:
    """What a KubeProxyConfiguration (with kube-proxy's flags over it) gives kpgen."""

    node: NodeFlags
    kubeconfig: str | None = None
    healthz_bind_address: str | None = None  # None: not given (kpgen's default)
    metrics_bind_address: str | None = None
    sync_period: Mapping[str, str] = field(default_factory=dict)  # by mode; "" key: any mode
    min_sync_period: Mapping[str, str] = field(default_factory=dict)
    conntrack: Conntrack = Conntrack()
    log_format: str | None = None
    verbosity: int | None = None
    notes: tuple[str, ...] = ()
    origin: Mapping[str, str] = field(default_factory=dict)  # field path -> the flag it came from

    def periods(self, mode: str) -> tuple[str | None, str | None]:
        """(syncPeriod, minSyncPeriod) for ``mode``: its section's, else the top-level one."""
        return (
            self.sync_period.get(mode) or self.sync_period.get("") or None,
            self.min_sync_period.get(mode) or self.min_sync_period.get("") or None,
        )


def _is_set(value: Any) -> bool:
    """kube-proxy reads an empty, zero, false or null value as its default."""
    if isinstance(value, dict):
        return any(_is_set(v) for v in value.values())
    return value not in (None, "", 0, False, [], "0s", "0")


def _walk(value: Any, path: str, leaves: dict[str, Any], unknown: list[str]) -> None:
    for key, child in value.items():
        child_path = f"{path}.{key}" if path else str(key)
        if child_path in FIELDS:
            leaves[child_path] = child
        elif child_path in _SECTIONS and isinstance(child, dict):
            _walk(child, child_path, leaves, unknown)
        elif child_path in _SECTIONS and child is None:
            continue
        elif child_path not in ("apiVersion", "kind"):
            unknown.append(child_path)


def _duration(item: Field | None) -> float | None:
    """A metav1.Duration (``30s``, ``1m0s``); None when absent or empty."""
    if item is None or item.value == "":
        return None
    if not isinstance(item.value, str):
        raise item.invalid(f"{show(item.value)} is not a duration (like 1s, 500ms, 1m30s)")
    try:
        return parse_duration(item.value)
    except ValueError as error:
        raise item.invalid(str(error)) from None


def _count(item: Field | None) -> int | None:
    return None if item is None else item.integer(0, INT32_MAX)


def _text(item: Field | None) -> str | None:
    return (item.string() or None) if item is not None else None


def _bind(item: Field | None, port: int) -> str | None:
    """healthzBindAddress/metricsBindAddress: IP:PORT, or an IP alone (kube-proxy adds the
    port); empty: kube-proxy's default."""
    text = _text(item)
    if text is None:
        return None
    assert item is not None
    try:
        parse_ip(text.strip("[]"))
        host = text.strip("[]")
        text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    except ValueError:
        pass
    try:
        parse_bind_address(text)
    except ValueError as error:
        raise item.invalid(str(error)) from None
    return text


def _conntrack(root: Field) -> Conntrack:
    linux = root.get("linux")
    section = (linux.get("conntrack") if linux else None) or root.get("conntrack")
    if section is None:
        return Conntrack()
    section.mapping()
    liberal = section.get("tcpBeLiberal")
    return Conntrack(
        max_per_core=_count(section.get("maxPerCore")),
        min=_count(section.get("min")),
        tcp_established_timeout=_duration(section.get("tcpEstablishedTimeout")),
        tcp_close_wait_timeout=_duration(section.get("tcpCloseWaitTimeout")),
        tcp_be_liberal=liberal.boolean() if liberal else False,
        udp_timeout=_duration(section.get("udpTimeout")),
        udp_stream_timeout=_duration(section.get("udpStreamTimeout")),
    )


def read_config(
    doc: Any,
    source: str,
    *,
    origin: Mapping[str, str] | None = None,
    header: bool = True,
) -> KubeProxyConfig:
    """Read a decoded KubeProxyConfiguration; ``source`` names it in messages (``--config:
    FILE``). ``origin`` maps the fields that kube-proxy flags set to those flags (they are named
    in messages and noted even when empty). ``header``: apiVersion and kind must be there."""
    origin = origin or {}
    root = Field(doc)
    try:
        root.mapping()
        for key, expected in zip(("apiVersion", "kind"), CONFIG_API, strict=True):
            value = root.get(key)
            if header and (value is None or value.value != expected):
                got = show(value.value) if value else "nothing"
                raise Invalid(key, f"expected {expected}, got {got}")
        return _read(root, source, origin)
    except Invalid as error:
        if error.field in origin:
            raise ConfigError(f"{origin[error.field]}: {error.problem}") from None
        raise ConfigError(f"{source}: {error}") from None


def _read(root: Field, source: str, origin: Mapping[str, str]) -> KubeProxyConfig:
    leaves: dict[str, Any] = {}
    unknown: list[str] = []
    _walk(root.mapping(), "", leaves, unknown)
    notes = []

    def named(path: str) -> str:
        return origin.get(path) or f"{source}: {path}"

    for path, value in sorted(leaves.items()):
        reason = FIELDS[path]
        if reason != HONOURED and (_is_set(value) or path in origin):
            notes.append(f"{named(path)}: {show(value)} ignored: {reason}")
    for path in unknown:
        notes.append(f"{named(path)}: not a KubeProxyConfiguration field kpgen knows; ignored")

    mode_field = root.get("mode")
    mode = _text(mode_field)
    if mode == "ipvs":
        notes.append(f"{named('mode')}: kpgen has no IPVS mode; it uses its iptables mode")
        mode = "iptables"
    elif mode == "kernelspace":
        notes.append(f"{named('mode')}: kernelspace is Windows'; kpgen uses its nftables mode")
        mode = None

    by_mode: dict[str, bool] = {}
    bits: dict[str, int] = {}
    syncs: dict[str, str] = {}
    min_syncs: dict[str, str] = {}
    for section_name in ("iptables", "nftables", ""):
        section = root.get(section_name) if section_name else root
        if section is None:
            continue
        section.mapping()
        if section_name:
            masquerade = section.get("masqueradeAll")
            if masquerade is not None:
                by_mode[section_name] = masquerade.boolean()
            bit = section.get("masqueradeBit")
            if bit is not None:
                bits[section_name] = bit.integer(0, 31)
        for key, into in (("syncPeriod", syncs), ("minSyncPeriod", min_syncs)):
            item = section.get(key)
            seconds = _duration(item)
            if seconds:
                assert item is not None
                into[section_name] = item.value
    for mode_name, period in syncs.items():
        if parse_duration(period) <= 0:
            where = f"{mode_name}.syncPeriod" if mode_name else "syncPeriod"
            raise Invalid(where, "must be more than 0")

    linux = root.get("linux")
    linux_masquerade = linux.get("masqueradeAll") if linux else None
    bind = root.get("bindAddress")
    bind_address = bind.ip() if bind is not None and bind.value != "" else None
    node_ips = (
        (str(bind_address),) if bind_address is not None and not bind_address.is_unspecified else ()
    )
    ipv6 = bind_address is not None and bind_address.version == 6
    hostname = root.get("hostnameOverride")
    cidrs = root.get("clusterCIDR")
    nodeports = root.get("nodePortAddresses")
    detect = root.get("detectLocal")
    client = root.get("clientConnection")
    logging = root.get("logging")
    log_format = _text(logging.get("format")) if logging else None
    if log_format not in (None, "text", "json"):
        raise Invalid("logging.format", f"{show(log_format)} is not text or json")
    verbosity = logging.get("verbosity") if logging else None
    node = NodeFlags(
        mode=mode,
        hostname=_text(hostname),
        cluster_cidrs=[cidrs.string()] if cidrs else (),
        masquerade_all=linux_masquerade.boolean() or None if linux_masquerade else None,
        nodeport_addresses=[f.string() for f in nodeports.items()] if nodeports else (),
        node_ips=node_ips,
        masquerade_all_by_mode=by_mode,
        masquerade_bit_by_mode=bits,
        detect_local_mode=_text(root.get("detectLocalMode")),
        bridge_interface=_text(detect.get("bridgeInterface")) if detect else None,
        interface_prefix=_text(detect.get("interfaceNamePrefix")) if detect else None,
    )
    return KubeProxyConfig(
        node=node,
        kubeconfig=_text(client.get("kubeconfig")) if client else None,
        healthz_bind_address=_bind(root.get("healthzBindAddress"), HEALTHZ_PORT)
        or (default_bind_addresses(str(bind_address))[0] if ipv6 else None),
        metrics_bind_address=_bind(root.get("metricsBindAddress"), METRICS_PORT)
        or (default_bind_addresses(str(bind_address))[1] if ipv6 else None),
        sync_period=syncs,
        min_sync_period=min_syncs,
        conntrack=_conntrack(root),
        log_format=log_format,
        verbosity=verbosity.integer(0, INT32_MAX) if verbosity is not None else None,
        notes=tuple(notes),
        origin=dict(origin),
    )


def default_bind_addresses(bind_address: str | None) -> tuple[str, str]:
    """kube-proxy's default healthz and metrics addresses for its bindAddress."""
    try:
        ipv6 = bind_address is not None and parse_ip(bind_address).version == 6
    except ValueError:
        ipv6 = False
    if ipv6:
        return f"[::]:{HEALTHZ_PORT}", f"[::1]:{METRICS_PORT}"
    return f"0.0.0.0:{HEALTHZ_PORT}", f"127.0.0.1:{METRICS_PORT}"


# --- kube-proxy's command line ---------------------------------------------------------------


class FlagError(ValueError):
    """A kube-proxy command line that kube-proxy itself would refuse; the message names the
    flag."""


@dataclass
class Flags:
    """kube-proxy's command line, read: the configuration patch its flags make, and what the
    command itself handles."""

    patch: dict[str, Any] = field(default_factory=dict)
    origin: dict[str, str] = field(default_factory=dict)  # field path -> --flag
    config: str | None = None
    master: str | None = None
    cleanup: bool = False
    init_only: bool = False
    version: bool = False
    help: bool = False
    write_config_to: str | None = None
    notes: list[str] = field(default_factory=list)


_TRUE = {"1", "t", "T", "TRUE", "true", "True"}
_FALSE = {"0", "f", "F", "FALSE", "false", "False"}


def _boolean(flag: str, text: str) -> bool:
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise FlagError(f"--{flag}: {show(text)} is not true or false")


def _set(patch: dict[str, Any], path: str, value: Any) -> None:
    *sections, key = path.split(".")
    for section in sections:
        patch = patch.setdefault(section, {})
    patch[key] = value


def _flag_value(flag: str, text: str) -> Any:
    if flag in BOOLEAN_FLAGS:
        return _boolean(flag, text)
    if flag in INTEGER_FLAGS:
        try:
            return int(text)
        except ValueError:
            raise FlagError(f"--{flag}: {show(text)} is not an integer") from None
    if flag == "kube-api-qps":
        try:
            return float(text)
        except ValueError:
            raise FlagError(f"--{flag}: {show(text)} is not a number") from None
    if flag in LIST_FLAGS:
        return [part.strip() for part in text.split(",") if part.strip()]
    if flag == "feature-gates":
        return dict(part.partition("=")[::2] for part in text.split(",") if part)
    return text


def parse_flags(argv: Sequence[str]) -> Flags:
    """kube-proxy's command line as kube-proxy (pflag) reads it: ``--flag=value``, ``--flag
    value``, ``-flag``, ``-v 2``; booleans only as ``--flag`` or ``--flag=false``; ``_`` as
    ``-`` in names. A flag kube-proxy does not know is noted and skipped (with the value that
    follows it, if it does not look like a flag). Raises :class:`FlagError` for a value
    kube-proxy would refuse."""
    flags = Flags()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            flags.notes.extend(f"{a}: kpgen takes no arguments; ignored" for a in args[i:])
            break
        if not arg.startswith("-") or arg == "-":
            flags.notes.append(f"{arg}: kube-proxy takes no arguments; ignored")
            continue
        name, has_value, value = arg.lstrip("-").partition("=")
        name = name.replace("_", "-")
        if name == "h":
            name = "help"
        if name not in KNOWN_FLAGS:
            if not has_value and i < len(args) and not args[i].startswith("-"):
                value, i = args[i], i + 1
                arg = f"{arg} {value}"
            flags.notes.append(f"{arg}: not a kube-proxy flag kpgen knows; ignored")
            continue
        if not has_value:
            if name in BOOLEAN_FLAGS:
                value = "true"
            elif i < len(args):
                value, i = args[i], i + 1
            else:
                raise FlagError(f"--{name}: needs a value")
        parsed = _flag_value(name, value)
        if name in FLAG_FIELDS:
            path = FLAG_FIELDS[name]
            if path == "logging.options":
                flags.notes.append(f"--{name}: ignored: {_LOGS}")
                continue
            _set(flags.patch, path, parsed)
            flags.origin[path] = f"--{name}"
        elif FLAG_ONLY[name] != SPECIAL:
            flags.notes.append(f"--{name}: ignored: {FLAG_ONLY[name]}")
        elif name in ("config", "master", "write-config-to"):
            setattr(flags, name.replace("-", "_"), value)
        else:
            setattr(flags, name.replace("-", "_"), bool(parsed))
    return flags


def merged(base: Any, patch: Mapping[str, Any]) -> Any:
    """``base`` (a decoded configuration) with ``patch``'s fields set over it."""
    result = copy.deepcopy(base) if isinstance(base, dict) else {}
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict) and key != "featureGates":
            result[key] = merged(result[key], value)
        else:
            result[key] = value
    return result


def flags_only_config() -> dict[str, Any]:
    """The configuration kube-proxy starts from without --config: its header only."""
    return {"apiVersion": CONFIG_API[0], "kind": CONFIG_API[1]}
