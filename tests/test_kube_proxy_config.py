"""kube-proxy's configuration, verbatim (issue 14): every KubeProxyConfiguration field and every
kube-proxy flag honoured or noted once; the configurations distributions really write
(tests/data/kube-proxy-config/) read and honoured; the `kube-proxy` entry point; the conntrack
sysctls written in a network namespace."""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import kpgen.cli.kube_proxy as kube_proxy_cli
from kpgen.controller.daemon import RunSettings
from kpgen.core import kubeproxy
from kpgen.core.kubeproxy import (
    FIELDS,
    FLAG_FIELDS,
    FLAG_ONLY,
    HONOURED,
    Conntrack,
    FlagError,
    parse_flags,
    read_config,
)
from kpgen.core.model import ClusterState, IPFamily, Node
from kpgen.core.node import ConfigError, DetectLocal, LocalInterface, NodeFlags, ProxyMode
from kpgen.core.plan import build_plan
from kpgen.dataplane import sysctl
from kpgen.inputs.config import node_settings, read_kube_proxy_config
from tests.kernel import kernel, netns, tool

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "tests" / "data" / "kube-proxy-config"
HEADER = {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration"}
net = ipaddress.ip_network


def args_file(name: str) -> list[str]:
    lines = (DATA / name).read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def settings(config: kubeproxy.KubeProxyConfig, mode: ProxyMode) -> RunSettings:
    return RunSettings.parse(
        source="api",
        kubeconfig=None,
        master=None,
        min_sync_period=None,
        sync_period=None,
        healthz_bind_address=None,
        metrics_bind_address=None,
        iptables_backend="auto",
        config=config,
        mode=mode.value,
    )


def ignored_notes(notes: tuple[str, ...] | list[str], field: str) -> list[str]:
    return [n for n in notes if f": {field}: " in n or n.startswith(f"{field}: ")]


# --- the distributions' configurations --------------------------------------------------------


def test_kubeadm_configuration_is_read_whole_and_quietly() -> None:
    path = str(DATA / "kubeadm-1.31.yaml")
    config = read_kube_proxy_config(path)
    node = node_settings(NodeFlags(hostname="k8s-worker01"), path, config)
    # mode "": the default, nftables; every empty field kube-proxy's default
    assert node.mode is ProxyMode.NFTABLES
    assert node.cluster_cidrs == (net("192.168.0.0/16"),)
    assert node.detect_local is DetectLocal.CLUSTER_CIDR
    assert (node.masquerade_all, node.masquerade_bit, node.node_ips) == (False, 14, ())
    run = settings(config, node.mode)
    assert run.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    assert run.healthz == ("0.0.0.0", 10256) and run.metrics == ("127.0.0.1", 10249)
    assert (run.timing.sync_period, run.timing.min_sync_period) == (30.0, 1.0)
    # null conntrack values: kpgen leaves the kernel's (docs/config.md says why)
    assert config.conntrack.sysctls(2) == {}
    # every field is there, empty: nothing is worth a note
    assert config.notes == ()


def test_kubeadm_configuration_has_every_field_kpgen_knows_of_v1alpha1() -> None:
    doc = yaml.safe_load((DATA / "kubeadm-1.31.yaml").read_text(encoding="utf-8"))
    leaves: dict[str, Any] = {}
    unknown: list[str] = []
    kubeproxy._walk(doc, "", leaves, unknown)
    newer = {p for p in FIELDS if p.split(".")[0] in ("linux", "windows", "syncPeriod")}
    newer |= {"minSyncPeriod", "windowsRunAsService", "logging.format", "logging.vmodule"}
    newer |= {"featureGates"}
    assert unknown == []
    assert set(FIELDS) - set(leaves) == newer


def test_eks_configuration_is_iptables_with_its_conntrack_sizing_and_notes() -> None:
    path = str(DATA / "eks.yaml")
    config = read_kube_proxy_config(path)
    node = node_settings(NodeFlags(hostname="ip-10-0-1-23.ec2.internal"), path, config)
    assert node.mode is ProxyMode.IPTABLES
    assert node.cluster_cidrs == () and node.masquerade_all is False
    assert node.masquerade_bit == 14
    run = settings(config, node.mode)
    assert run.kubeconfig == "/var/lib/kube-proxy/kubeconfig"
    assert run.metrics == ("0.0.0.0", 10249) and run.healthz == ("0.0.0.0", 10256)
    assert run.timing.sync_period == 30.0
    assert config.conntrack.sysctls(2) == {
        "nf_conntrack_max": 131072,  # max(32768 x 2, 131072)
        "nf_conntrack_tcp_timeout_established": 86400,
        "nf_conntrack_tcp_timeout_close_wait": 3600,
    }
    assert config.conntrack.sysctls(8)["nf_conntrack_max"] == 262144
    ignored = [
        "clientConnection.burst",
        "clientConnection.contentType",
        "clientConnection.qps",
        "configSyncPeriod",
        "ipvs.syncPeriod",
        "oomScoreAdj",
        "udpIdleTimeout",
    ]
    for field in ignored:
        assert len(ignored_notes(config.notes, field)) == 1, field
    assert len(config.notes) == len(ignored)
    assert "no client-side rate limiter" in ignored_notes(config.notes, "clientConnection.qps")[0]


def test_rke2_configuration_nodecidr_conntrack_timeouts_and_nftables_periods() -> None:
    path = str(DATA / "rke2.yaml")
    config = read_kube_proxy_config(path)
    node = node_settings(NodeFlags(hostname="rke2-agent-1"), path, config)
    assert node.mode is ProxyMode.NFTABLES and node.masquerade_bit == 12
    assert node.masquerade_mark == 0x1000
    assert node.detect_local is DetectLocal.NODE_CIDR
    run = settings(config, node.mode)
    assert (run.timing.sync_period, run.timing.min_sync_period) == (60.0, 2.0)
    assert run.healthz == ("127.0.0.1", 10256)
    assert config.conntrack.sysctls(4) == {
        "nf_conntrack_tcp_timeout_established": 7200,
        "nf_conntrack_tcp_timeout_close_wait": 1800,
        "nf_conntrack_udp_timeout": 45,
        "nf_conntrack_udp_timeout_stream": 180,
        "nf_conntrack_tcp_be_liberal": 1,
    }  # maxPerCore 0: nf_conntrack_max left alone
    (note,) = config.notes
    assert note.endswith("kpgen has no feature gates: it behaves as kube-proxy does with the "
                         "defaults of its release")  # fmt: skip
    # NodeCIDR: the Node's podCIDRs are local, not the clusterCIDR
    worker = Node("rke2-agent-1", pod_cidrs=(net("10.42.3.0/24"), net("2001:cafe:42:3::/64")))
    state = ClusterState(nodes=(worker,))
    assert build_plan(state, node, IPFamily.V4).cluster_cidrs == (net("10.42.3.0/24"),)
    assert build_plan(state, node, IPFamily.V6).cluster_cidrs == (net("2001:cafe:42:3::/64"),)
    # no Node (yet), or one without podCIDRs: nothing is local by address
    assert build_plan(ClusterState(), node, IPFamily.V4).cluster_cidrs == ()


def test_k3s_flags_without_a_file() -> None:
    flags = parse_flags(args_file("k3s.args"))
    assert flags.notes == [] and flags.config is None
    config = read_kube_proxy_config(None, flags)
    node = node_settings(NodeFlags(), None, config)
    assert node.hostname == "k3s-agent-1" and node.mode is ProxyMode.IPTABLES
    assert node.cluster_cidrs == (net("10.42.0.0/16"),)
    run = settings(config, node.mode)
    assert run.healthz == ("127.0.0.1", 10256)  # an address alone: kube-proxy's port added
    assert run.kubeconfig == "/var/lib/rancher/k3s/agent/kubeproxy.kubeconfig"
    # --conntrack-max-per-core=0 and 0s timeouts: leave the kernel's values
    assert config.conntrack.sysctls(4) == {}
    assert config.notes == ()


def test_kops_flags_master_legacy_log_flags_and_oom_score() -> None:
    flags = parse_flags(args_file("kops.args"))
    assert flags.master == "https://api.internal.example.k8s.local"
    assert [n.split(":")[0] for n in flags.notes] == ["--logtostderr", "--alsologtostderr",
                                                       "--log-file"]  # fmt: skip
    config = read_kube_proxy_config(None, flags)
    assert config.notes == (
        "--oom-score-adj: -998 ignored: kpgen leaves its OOM score to kubelet, which gives a "
        "system-node-critical pod -997 already",
    )
    assert config.verbosity == 2
    assert config.conntrack.sysctls(2) == {"nf_conntrack_max": 262144}


# --- every field and flag ---------------------------------------------------------------------


def _set_value(path: str) -> Any:
    """A value kube-proxy accepts for the field at ``path`` that is not its zero value."""
    name = path.rsplit(".", 1)[-1]
    if name in ("featureGates", "options"):
        return {"SomeGate": True}
    if name.endswith("Period") or name.endswith("Timeout") or name == "flushFrequency":
        return "5s"
    if name in ("excludeCIDRs",):
        return ["10.0.0.0/8"]
    if name in ("qps", "burst", "oomScoreAdj", "verbosity"):
        return 3
    if name in ("maxPerCore", "min"):
        return 1000
    if name == "masqueradeBit":
        return 13
    if name in (
        "bindAddressHardFail",
        "enableProfiling",
        "localhostNodePorts",
        "strictARP",
        "enableDSR",
        "forwardHealthCheckVip",
        "runAsService",
        "windowsRunAsService",
        "tcpBeLiberal",
        "masqueradeAll",
    ):
        return True
    return "x"


@pytest.mark.parametrize("path", sorted(p for p, r in FIELDS.items() if r != HONOURED))
def test_every_ignored_field_set_is_noted_once_with_why(path: str) -> None:
    doc: dict[str, Any] = dict(HEADER)
    kubeproxy._set(doc, path, _set_value(path))
    config = read_config(doc, "config.conf")
    (note,) = config.notes
    assert note.startswith(f"config.conf: {path}: ") and FIELDS[path] in note


@pytest.mark.parametrize("path", sorted(p for p, r in FIELDS.items() if r != HONOURED))
def test_every_ignored_field_left_empty_says_nothing(path: str) -> None:
    doc: dict[str, Any] = dict(HEADER)
    kubeproxy._set(doc, path, None)
    assert read_config(doc, "config.conf").notes == ()


def test_unknown_fields_are_noted_not_fatal() -> None:
    doc = {**HEADER, "udpIdleTimeout": "250ms", "iptables": {"someday": 1}}
    notes = read_config(doc, "c").notes
    assert notes == (
        "c: udpIdleTimeout: not a KubeProxyConfiguration field kpgen knows; ignored",
        "c: iptables.someday: not a KubeProxyConfiguration field kpgen knows; ignored",
    )


@pytest.mark.parametrize("flag", sorted(FLAG_FIELDS))
def test_every_flag_sets_its_field_and_is_honoured_or_noted_once(flag: str) -> None:
    path = FLAG_FIELDS[flag]
    if flag in kubeproxy.BOOLEAN_FLAGS:
        argv = [f"--{flag}"]
    else:
        value = {
            "bind-address": "10.0.0.5",
            "cluster-cidr": "10.0.0.0/8",
            "detect-local-mode": "ClusterCIDR",
            "healthz-bind-address": "0.0.0.0:10256",
            "metrics-bind-address": "127.0.0.1:10249",
            "hostname-override": "node-1",
            "logging-format": "json",
            "nodeport-addresses": "10.0.0.0/8",
            "proxy-mode": "iptables",
            "iptables-masquerade-bit": "13",
            "pod-bridge-interface": "cbr0",
            "pod-interface-name-prefix": "veth",
            "feature-gates": "A=true",
            "ipvs-exclude-cidrs": "10.0.0.0/8",
            "kube-api-qps": "5",
        }.get(flag)
        if value is None:
            value = "3" if flag in kubeproxy.INTEGER_FLAGS else "5s"
        argv = [f"--{flag}", value]
    flags = parse_flags(argv)
    config = read_kube_proxy_config(None, flags)
    notes = [*flags.notes, *config.notes]
    if path == "logging.options" or FIELDS[path] != HONOURED:
        (note,) = notes
        assert note.startswith(f"--{flag}: ") and "ignored" in note
    else:
        assert notes == [], notes
        node_settings(NodeFlags(hostname="n"), None, config)  # and it is valid


@pytest.mark.parametrize("flag", sorted(f for f, r in FLAG_ONLY.items() if r != "special"))
def test_every_flag_kpgen_has_no_use_for_is_noted_once(flag: str) -> None:
    argv = [f"--{flag}"] if flag in kubeproxy.BOOLEAN_FLAGS else [f"--{flag}=x"]
    (note,) = parse_flags(argv).notes
    assert note.startswith(f"--{flag}: ignored: ")


def test_flag_forms_as_pflag_reads_them() -> None:
    flags = parse_flags(
        ["--config=/c", "--hostname-override", "n1", "-v", "4", "--masquerade-all=false",
         "-master=https://api", "--log_flush_frequency=5s", "--masquerade-all"]
    )  # fmt: skip
    assert flags.config == "/c" and flags.master == "https://api"
    assert flags.patch["hostnameOverride"] == "n1"
    assert flags.patch["logging"]["verbosity"] == 4
    assert flags.patch["linux"]["masqueradeAll"] is True  # the last one wins
    assert flags.origin["logging.flushFrequency"] == "--log-flush-frequency"


def test_unknown_flags_are_noted_with_their_value_and_never_fatal() -> None:
    flags = parse_flags(["--resource-container", "/kube-proxy", "--foo=1", "--bar", "stray"])
    assert flags.notes == [
        "--resource-container /kube-proxy: not a kube-proxy flag kpgen knows; ignored",
        "--foo=1: not a kube-proxy flag kpgen knows; ignored",
        "--bar stray: not a kube-proxy flag kpgen knows; ignored",
    ]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--conntrack-min=lots"], '--conntrack-min: "lots" is not an integer'),
        (["--masquerade-all=yes"], '--masquerade-all: "yes" is not true or false'),
        (["--config"], "--config: needs a value"),
    ],
)
def test_bad_flag_values_name_the_flag(argv: list[str], message: str) -> None:
    with pytest.raises(FlagError, match=message):
        parse_flags(argv)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"nftables": {"syncPeriod": "abc"}}, 'config.conf: nftables.syncPeriod: "abc" is not a '),
        ({"iptables": {"masqueradeBit": 32}}, "config.conf: iptables.masqueradeBit: 32 is out of"),
        ({"conntrack": {"maxPerCore": -1}}, "config.conf: conntrack.maxPerCore: -1 is out of"),
        ({"conntrack": {"tcpBeLiberal": "yes"}}, "config.conf: conntrack.tcpBeLiberal: "),
        ({"healthzBindAddress": "nowhere:1"}, "config.conf: healthzBindAddress: "),
        ({"bindAddress": "::x"}, 'config.conf: bindAddress: "::x" is not an IP address'),
        ({"logging": {"format": "xml"}}, 'config.conf: logging.format: "xml" is not text or json'),
        ({"nftables": {"syncPeriod": "0s"}, "syncPeriod": "-1s"}, "config.conf: syncPeriod: "),
    ],
)
def test_bad_values_name_the_field(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        read_config({**HEADER, **body}, "config.conf")
    assert str(caught.value).startswith(message)


def test_bad_flag_value_going_through_the_configuration_names_the_flag() -> None:
    flags = parse_flags(["--iptables-sync-period=soon"])
    with pytest.raises(ConfigError, match=r'^--iptables-sync-period: "soon" is not a duration'):
        read_kube_proxy_config(None, flags)
    flags = parse_flags(["--detect-local-mode=Magic"])
    config = read_kube_proxy_config(None, flags)
    with pytest.raises(ConfigError, match=r'^--detect-local-mode: "Magic" is not one of'):
        node_settings(NodeFlags(hostname="n"), None, config)


def test_ipvs_and_kernelspace_modes_are_accepted_with_a_note() -> None:
    config = read_config({**HEADER, "mode": "ipvs"}, "c")
    assert config.node.mode == "iptables"
    assert config.notes == ("c: mode: kpgen has no IPVS mode; it uses its iptables mode",)
    assert read_config({**HEADER, "mode": "kernelspace"}, "c").node.mode is None


def test_sync_periods_follow_the_mode_in_use() -> None:
    doc = {**HEADER, "iptables": {"syncPeriod": "10s", "minSyncPeriod": "0s"},
           "nftables": {"syncPeriod": "20s", "minSyncPeriod": "3s"}}  # fmt: skip
    config = read_config(doc, "c")
    assert settings(config, ProxyMode.IPTABLES).timing.sync_period == 10.0
    assert settings(config, ProxyMode.IPTABLES).timing.min_sync_period == 1.0
    assert settings(config, ProxyMode.NFTABLES).timing.sync_period == 20.0
    assert settings(config, ProxyMode.NFTABLES).timing.min_sync_period == 3.0
    # the newer top-level names, for any mode
    config = read_config({**HEADER, "syncPeriod": "1m", "minSyncPeriod": "500ms"}, "c")
    timing = settings(config, ProxyMode.NFTABLES).timing
    assert (timing.sync_period, timing.min_sync_period) == (60.0, 0.5)


def test_masquerade_bit_follows_the_mode() -> None:
    doc = {**HEADER, "iptables": {"masqueradeBit": 5}, "nftables": {"masqueradeBit": 7}}
    for mode, bit in (("iptables", 5), ("nftables", 7)):
        config = read_config({**doc, "mode": mode}, "c")
        assert node_settings(NodeFlags(hostname="n"), None, config).masquerade_bit == bit


def test_bind_address_is_the_node_ip_when_specific_and_picks_the_default_family() -> None:
    config = read_config({**HEADER, "bindAddress": "10.0.0.7",
                          "nodePortAddresses": ["primary"]}, "c")  # fmt: skip
    node = node_settings(NodeFlags(hostname="n"), None, config)
    assert node.node_ips == (ipaddress.ip_address("10.0.0.7"),)
    assert node.nodeport_networks(IPFamily.V4) == (net("10.0.0.7/32"),)
    # --node-ip wins over it
    node = node_settings(NodeFlags(hostname="n", node_ips=["10.9.9.9"]), None, config)
    assert node.node_ips == (ipaddress.ip_address("10.9.9.9"),)
    assert read_config({**HEADER, "bindAddress": "0.0.0.0"}, "c").node.node_ips == ()
    ipv6 = settings(read_config({**HEADER, "bindAddress": "::"}, "c"), ProxyMode.NFTABLES)
    assert (ipv6.healthz, ipv6.metrics) == (("::", 10256), ("::1", 10249))


def test_run_flags_override_the_configuration() -> None:
    config = read_config({**HEADER, "healthzBindAddress": "127.0.0.1:1",
                          "nftables": {"syncPeriod": "5s"}}, "c")  # fmt: skip
    run = RunSettings.parse(source="api", kubeconfig="/k", master=None, min_sync_period=None,
                            sync_period="7s", healthz_bind_address="", metrics_bind_address=None,
                            iptables_backend="auto", config=config)  # fmt: skip
    assert run.healthz is None and run.timing.sync_period == 7.0 and run.kubeconfig == "/k"


@pytest.mark.parametrize(
    ("mode", "body", "expected"),
    [
        ("BridgeInterface", {"bridgeInterface": "cbr0"}, LocalInterface("cbr0")),
        ("InterfaceNamePrefix", {"interfaceNamePrefix": "veth"}, LocalInterface("veth", True)),
    ],
)
def test_interface_local_detection_is_planned(
    mode: str, body: dict[str, str], expected: LocalInterface
) -> None:
    doc = {**HEADER, "clusterCIDR": "10.0.0.0/8", "detectLocalMode": mode, "detectLocal": body}
    node = node_settings(NodeFlags(hostname="n"), None, read_config(doc, "c"))
    assert node.local_interface == expected
    plan = build_plan(ClusterState(), node, IPFamily.V4)
    assert plan.local_interface == expected and plan.cluster_cidrs == ()


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"detectLocalMode": "BridgeInterface"},
         "c: detectLocal.bridgeInterface: must be set for detectLocalMode BridgeInterface"),
        ({"detectLocalMode": "InterfaceNamePrefix", "detectLocal": {"interfaceNamePrefix": 'a"b'}},
         'c: detectLocal.interfaceNamePrefix: "a"b" is not an interface name'),
        ({"detectLocalMode": "BridgeInterface", "detectLocal": {"bridgeInterface": "x" * 16}},
         "c: detectLocal.bridgeInterface: "),
    ],
)  # fmt: skip
def test_interface_local_detection_needs_a_safe_interface_name(
    body: dict[str, Any], message: str
) -> None:
    config = read_config({**HEADER, **body}, "c")
    with pytest.raises(ConfigError) as caught:
        node_config_from(config)
    assert str(caught.value).startswith(message)


def node_config_from(config: kubeproxy.KubeProxyConfig) -> Any:
    from kpgen.core.node import node_config

    return node_config(NodeFlags(hostname="n"), base=config.node, base_source="c")


@given(
    per_core=st.integers(0, 2**20),
    floor=st.none() | st.integers(0, 2**22),
    cpus=st.integers(1, 512),
)
def test_conntrack_max_is_kube_proxys(per_core: int, floor: int | None, cpus: int) -> None:
    wanted = Conntrack(max_per_core=per_core, min=floor).sysctls(cpus)
    if per_core == 0:
        assert "nf_conntrack_max" not in wanted
    else:
        assert wanted["nf_conntrack_max"] == max(per_core * cpus, floor or 0)


# --- the sysctls ------------------------------------------------------------------------------


def test_sysctls_are_written_when_they_differ_and_reported(tmp_path: Path) -> None:
    proc = tmp_path / "netfilter"
    proc.mkdir()
    (proc / "nf_conntrack_max").write_text("65536\n")
    (proc / "nf_conntrack_tcp_timeout_established").write_text("86400\n")
    hashsize = tmp_path / "hashsize"
    hashsize.write_text("16384\n")
    wanted = {"nf_conntrack_max": 131072, "nf_conntrack_tcp_timeout_established": 86400,
              "nf_conntrack_udp_timeout": 30}  # fmt: skip
    outcomes = sysctl.set_conntrack(wanted, proc_sys=str(proc), hashsize=str(hashsize))
    assert [str(o) for o in outcomes] == [
        "nf_conntrack_max set to 131072 (was 65536)",
        "hashsize set to 32768 (was 16384)",
        "nf_conntrack_tcp_timeout_established is 86400 already",
        "nf_conntrack_udp_timeout not set to 30: the kernel has no such setting here: "
        "nf_conntrack is not loaded yet (the first rules load it)",
    ]
    assert (proc / "nf_conntrack_max").read_text() == "131072\n"
    assert sysctl.missing_module(outcomes)


SET_IN_NETNS = """
import json, sys
from kpgen.dataplane import sysctl
wanted = json.loads(sys.argv[1])
print(json.dumps([[o.name, o.done, o.before, str(o)] for o in sysctl.set_conntrack(wanted)]))
"""


@kernel
def test_sysctls_in_a_network_namespace_timeouts_set_max_refused_clearly() -> None:
    if not os.path.exists("/proc/sys/net/netfilter/nf_conntrack_max"):
        pytest.skip("nf_conntrack is not loaded on this machine")
    wanted = {"nf_conntrack_max": 300000, "nf_conntrack_tcp_timeout_established": 7201,
              "nf_conntrack_tcp_be_liberal": 1, "nf_conntrack_udp_timeout": 31}  # fmt: skip
    with open("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established") as stream:
        host_before = stream.read()
    with netns() as name:
        ip = tool("ip")
        assert ip is not None
        result = subprocess.run(
            [ip, "netns", "exec", name, sys.executable, "-c", SET_IN_NETNS, json.dumps(wanted)],
            capture_output=True, text=True, check=True, cwd=ROOT,
        )  # fmt: skip
        outcomes = {o[0]: o for o in json.loads(result.stdout)}
        read = subprocess.run(
            [ip, "netns", "exec", name, "cat",
             "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established",
             "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal",
             "/proc/sys/net/netfilter/nf_conntrack_udp_timeout"],
            capture_output=True, text=True, check=True,
        ).stdout.split()  # fmt: skip
    assert read == ["7201", "1", "31"]
    for name in ("nf_conntrack_tcp_timeout_established", "nf_conntrack_tcp_be_liberal",
                 "nf_conntrack_udp_timeout"):  # fmt: skip
        assert outcomes[name][1] is True, outcomes[name]
    # the host's own value did not change: the timeouts are per network namespace
    with open("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_established") as stream:
        assert stream.read() == host_before
    _, done, _, text = outcomes["nf_conntrack_max"]
    if not done:  # Linux shows it read-only outside the initial network namespace
        assert "only the host's initial network namespace" in text


# --- the kube-proxy command -------------------------------------------------------------------


def test_kube_proxy_script_is_installed_with_the_package() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert project["project"]["scripts"]["kube-proxy"] == "kpgen.cli.kube_proxy:main"


def test_kube_proxy_command_line_of_kubeadms_daemonset_runs_kpgen_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    seen: dict[str, Any] = {}

    def fake_run(node: Any, settings: Any) -> int:
        seen.update(node=node, settings=settings)
        return 0

    import kpgen.controller.daemon as daemon

    monkeypatch.setattr(daemon, "run", fake_run)
    config = str(DATA / "kubeadm-1.31.yaml")
    with pytest.raises(SystemExit) as exit_:
        kube_proxy_cli.main([f"--config={config}", "--hostname-override=k8s-worker01",
                             "--unknown-flag", "--v=2"])  # fmt: skip
    assert exit_.value.code == 0
    node, run = seen["node"], seen["settings"]
    assert node.hostname == "k8s-worker01" and node.mode is ProxyMode.NFTABLES
    assert node.cluster_cidrs == (net("192.168.0.0/16"),)
    assert run.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    assert run.manifests is None and run.healthz == ("0.0.0.0", 10256)


@pytest.mark.parametrize(
    ("argv", "code", "said"),
    [
        (["--version"], 0, "kpgen "),
        (["-h"], 0, "Usage: kube-proxy"),
        (["--conntrack-min=x"], 2, '--conntrack-min: "x" is not an integer'),
        (["--config=/nonexistent/config.conf"], 2, "--config: cannot read /nonexistent"),
        (["--proxy-mode=userspace", "--hostname-override=n"], 2, "--proxy-mode: "),
    ],
)
def test_kube_proxy_command_exits_with_one_line(
    argv: list[str], code: int, said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        kube_proxy_cli.main(argv)
    assert exit_.value.code == code
    out, err = capsys.readouterr()
    assert said in out + err and "Traceback" not in err


def test_kube_proxy_write_config_to_writes_file_and_flags(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    with pytest.raises(SystemExit) as exit_:
        kube_proxy_cli.main([f"--config={DATA / 'eks.yaml'}", "--cluster-cidr=10.1.0.0/16",
                             f"--write-config-to={target}"])  # fmt: skip
    assert exit_.value.code == 0
    written = json.loads(target.read_text())
    assert written["clusterCIDR"] == "10.1.0.0/16" and written["mode"] == "iptables"


# --- the docs ---------------------------------------------------------------------------------


def test_docs_table_names_every_field_and_flag() -> None:
    text = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    for path in FIELDS:
        assert f"| `{path}` |" in text, path
    for flag in (*FLAG_FIELDS, *FLAG_ONLY):
        assert f"| `--{flag}` |" in text, flag


def test_deploy_readme_patches_are_valid_json() -> None:
    text = (ROOT / "deploy" / "README.md").read_text(encoding="utf-8")
    patches = [
        line.split(" -p ", 1)[1]
        for line in text.splitlines()
        if line.startswith("kubectl -n kube-system patch daemonset kube-proxy -p ")
    ]
    assert len(patches) == 2
    for patch in patches:
        body = json.loads(patch.strip('"').replace('\\"', '"').replace("$OLD", "old:1"))
        spec = body["spec"]["template"]["spec"]
        (init,) = spec["initContainers"]
        assert init["name"] == "cleanup"
        assert spec["containers"][0]["name"] == "kube-proxy"
    first = json.loads(patches[0].strip('"').replace('\\"', '"').replace("$OLD", "old:1"))
    init = first["spec"]["template"]["spec"]["initContainers"][0]
    assert init["command"] == ["/usr/local/bin/kube-proxy", "--cleanup"]
    assert init["image"] == "old:1"


def test_image_puts_kube_proxy_where_kubeadms_daemonset_runs_it() -> None:
    text = (ROOT / "deploy" / "Containerfile").read_text(encoding="utf-8")
    assert "ln -s /opt/kpgen/bin/kube-proxy /usr/local/bin/kube-proxy" in text
