"""kpgen.core.node: node settings from flags and a KubeProxyConfiguration file."""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from pathlib import Path

import pytest

from kpgen.core.model import IPFamily
from kpgen.core.node import ConfigError, NodeConfig, NodeFlags, ProxyMode, node_config
from kpgen.inputs.config import node_settings, read_config_file

net = ipaddress.ip_network


def config_file(tmp_path: Path, body: str, *, kind: str = "KubeProxyConfiguration") -> str:
    """A KubeProxyConfiguration file (apiVersion kubeproxy.config.k8s.io/v1alpha1) with ``body``."""
    path = tmp_path / "kube-proxy.yaml"
    path.write_text(
        f"apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: {kind}\n{body}", encoding="utf-8"
    )
    return str(path)


def config_error(flags: NodeFlags, path: str | None = None) -> str:
    with pytest.raises(ConfigError) as caught:
        node_settings(flags, path)
    return str(caught.value)


FULL_FILE = """\
mode: iptables
hostnameOverride: Worker-01
clusterCIDR: "10.244.0.0/16,fd00:10:244::/56"
nodePortAddresses: ["10.20.30.0/24", "fd00:20::/64"]
iptables:
  masqueradeAll: true
nftables:
  masqueradeAll: false
"""


# --- flags ------------------------------------------------------------------------------------


def test_defaults_are_nftables_and_the_lower_cased_host_name(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "Build-Host")
    assert node_settings(NodeFlags()) == NodeConfig(
        hostname="build-host",
        mode=ProxyMode.NFTABLES,
        cluster_cidrs=(),
        masquerade_all=False,
        nodeport_cidrs=(),
        nodeport_primary=False,
        node_ips=(),
        service_cidrs=(),
        masquerade_bit=14,
    )


def test_default_node_answers_node_ports_on_every_local_address_and_marks_bit_14():
    node = node_config(NodeFlags(hostname="worker-1"))
    assert node.nodeport_networks(IPFamily.V4) is None
    assert node.nodeport_networks(IPFamily.V6) is None
    assert node.masquerade_mark == 0x4000


def test_hostname_override_is_lower_cased_and_stripped():
    assert node_config(NodeFlags(hostname="  K8S-Worker01 ")).hostname == "k8s-worker01"


def test_hostname_that_is_not_a_dns_subdomain_names_the_flag():
    assert config_error(NodeFlags(hostname="worker_1")) == (
        '--hostname-override: "worker_1" is not an RFC 1123 subdomain (lower case, at most 253)'
    )


def test_unknown_proxy_mode_names_the_flag():
    assert config_error(NodeFlags(hostname="w", mode="ipvs")) == (
        '--proxy-mode: "ipvs" is not nftables or iptables'
    )


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (
            NodeFlags(cluster_cidrs=["nonsense"]),
            '--cluster-cidr: "nonsense" is not a CIDR (address/prefix-length)',
        ),
        (
            NodeFlags(cluster_cidrs=["10.0.0.0/33"]),
            '--cluster-cidr: "10.0.0.0/33" is not a CIDR (address/prefix-length)',
        ),
        (
            NodeFlags(cluster_cidrs=["10.0.0.0"]),
            '--cluster-cidr: "10.0.0.0" is not a CIDR (address/prefix-length)',
        ),
        (
            NodeFlags(cluster_cidrs=["10.244.0.0/16,10.0.0.0/+8"]),
            '--cluster-cidr: "10.0.0.0/+8" is not a CIDR (address/prefix-length)',
        ),
        (
            NodeFlags(service_cidrs=["10.96.0.0"]),
            '--service-cidr: "10.96.0.0" is not a CIDR (address/prefix-length)',
        ),
        (
            NodeFlags(nodeport_addresses=["10.20.30.0/24,bogus"]),
            '--nodeport-addresses: "bogus" is not a CIDR (address/prefix-length)',
        ),
        (NodeFlags(node_ips=["10.20.30"]), '--node-ip: "10.20.30" is not an IP address'),
        (
            NodeFlags(node_ips=["10.20.30.11/24"]),
            '--node-ip: "10.20.30.11/24" is not an IP address',
        ),
        (
            NodeFlags(node_ips=["fe80::1%eth0"]),
            '--node-ip: "fe80::1%eth0" has a zone; a service address may not',
        ),
    ],
    ids=[
        "cluster-cidr-word",
        "cluster-cidr-prefix-33",
        "cluster-cidr-no-prefix",
        "cluster-cidr-second-of-list",
        "service-cidr-no-prefix",
        "nodeport-addresses-word",
        "node-ip-short",
        "node-ip-with-prefix",
        "node-ip-with-zone",
    ],
)
def test_invalid_address_flag_is_a_config_error_naming_the_flag(flags, expected):
    assert config_error(dataclasses.replace(flags, hostname="worker-1")) == expected


def test_cluster_cidr_takes_comma_separated_lists_and_repeats_without_duplicates():
    node = node_config(
        NodeFlags(
            hostname="w",
            cluster_cidrs=["10.244.0.0/16, fd00:10::/56", "10.244.0.0/16", "192.168.0.0/16"],
        )
    )
    assert node.cluster_cidrs == (net("10.244.0.0/16"), net("192.168.0.0/16"), net("fd00:10::/56"))


def test_overlapping_cidrs_are_merged_so_nft_interval_sets_accept_them():
    node = node_config(
        NodeFlags(
            hostname="w",
            cluster_cidrs=["192.168.0.0/16", "192.168.69.0/24"],
            nodeport_addresses=["10.0.0.0/8,10.20.30.0/24"],
            service_cidrs=["10.96.0.0/12", "10.96.0.0/16"],
        )
    )
    assert node.cluster_cidrs == (net("192.168.0.0/16"),)
    assert node.nodeport_cidrs == (net("10.0.0.0/8"),)
    assert node.service_cidrs == (net("10.96.0.0/12"),)


def test_cidr_host_bits_are_cleared_as_go_does():
    node = node_config(NodeFlags(hostname="w", cluster_cidrs=["10.244.1.7/16"]))
    assert node.cluster_cidrs == (net("10.244.0.0/16"),)


def test_nodeport_addresses_cidrs_are_split_by_family():
    node = node_config(NodeFlags(hostname="w", nodeport_addresses=["10.20.30.0/24,fd00:20::/64"]))
    assert node.nodeport_primary is False
    assert node.nodeport_networks(IPFamily.V4) == (net("10.20.30.0/24"),)
    assert node.nodeport_networks(IPFamily.V6) == (net("fd00:20::/64"),)


def test_nodeport_addresses_primary_without_node_ip_is_an_error():
    assert config_error(NodeFlags(hostname="w", nodeport_addresses=["primary"])) == (
        "--nodeport-addresses: primary needs the node's address (--node-ip)"
    )


@pytest.mark.parametrize(
    "values",
    [["primary,10.20.30.0/24"], ["10.20.30.0/24", "primary"]],
    ids=["comma-separated", "repeated-flag"],
)
def test_nodeport_addresses_primary_mixed_with_cidrs_is_an_error(values):
    flags = NodeFlags(hostname="w", nodeport_addresses=values, node_ips=["10.20.30.11"])
    assert config_error(flags) == "--nodeport-addresses: 'primary' cannot be combined with CIDRs"


def test_nodeport_addresses_primary_answers_on_the_node_ip_only():
    node = node_config(
        NodeFlags(hostname="w", nodeport_addresses=["primary"], node_ips=["10.20.30.11"])
    )
    assert node.nodeport_primary is True
    assert node.nodeport_cidrs == ()
    assert node.nodeport_networks(IPFamily.V4) == (net("10.20.30.11/32"),)
    assert node.nodeport_networks(IPFamily.V6) == ()


def test_nodeport_addresses_primary_with_dual_stack_node_ips():
    node = node_config(
        NodeFlags(
            hostname="w", nodeport_addresses=["primary"], node_ips=["10.20.30.11", "fd00:20::11"]
        )
    )
    assert node.nodeport_networks(IPFamily.V4) == (net("10.20.30.11/32"),)
    assert node.nodeport_networks(IPFamily.V6) == (net("fd00:20::11/128"),)


def test_masquerade_all_flag_false_is_kept_as_given():
    assert node_config(NodeFlags(hostname="w", masquerade_all=True)).masquerade_all is True
    assert node_config(NodeFlags(hostname="w", masquerade_all=False)).masquerade_all is False


# --- the KubeProxyConfiguration file ---------------------------------------------------------


def test_config_file_gives_mode_hostname_cluster_cidrs_nodeport_addresses_and_masquerade_all(
    tmp_path,
):
    flags = read_config_file(config_file(tmp_path, FULL_FILE))
    assert flags == NodeFlags(
        mode="iptables",
        hostname="Worker-01",
        cluster_cidrs=["10.244.0.0/16,fd00:10:244::/56"],
        nodeport_addresses=["10.20.30.0/24", "fd00:20::/64"],
        masquerade_all_by_mode={"iptables": True, "nftables": False},
    )


def test_node_config_from_a_file_alone(tmp_path):
    node = node_settings(NodeFlags(), config_file(tmp_path, FULL_FILE))
    assert node == NodeConfig(
        hostname="worker-01",
        mode=ProxyMode.IPTABLES,
        cluster_cidrs=(net("10.244.0.0/16"), net("fd00:10:244::/56")),
        masquerade_all=True,
        nodeport_cidrs=(net("10.20.30.0/24"), net("fd00:20::/64")),
    )


def test_nftables_masquerade_all_applies_when_the_mode_is_nftables_or_absent(tmp_path):
    path = config_file(
        tmp_path, "nftables:\n  masqueradeAll: true\niptables:\n  masqueradeAll: false\n"
    )
    assert read_config_file(path).masquerade_all_by_mode == {"iptables": False, "nftables": True}
    assert node_settings(NodeFlags(hostname="w"), path).masquerade_all is True


def test_iptables_masquerade_all_does_not_apply_in_nftables_mode(tmp_path):
    path = config_file(tmp_path, "mode: nftables\niptables:\n  masqueradeAll: true\n")
    assert read_config_file(path).masquerade_all_by_mode == {"iptables": True}
    assert node_settings(NodeFlags(hostname="w"), path).masquerade_all is False


def test_flags_override_the_file(tmp_path):
    path = config_file(tmp_path, FULL_FILE)
    node = node_settings(
        NodeFlags(
            mode="nftables",
            hostname="Flag-Host",
            cluster_cidrs=["192.168.0.0/16"],
            nodeport_addresses=["primary"],
            node_ips=["10.20.30.11"],
        ),
        path,
    )
    assert node.mode is ProxyMode.NFTABLES
    assert node.hostname == "flag-host"
    assert node.cluster_cidrs == (net("192.168.0.0/16"),)
    assert node.nodeport_primary is True
    assert node.nodeport_networks(IPFamily.V4) == (net("10.20.30.11/32"),)


def test_file_values_stay_where_no_flag_is_given(tmp_path):
    node = node_settings(NodeFlags(hostname="flag-host"), config_file(tmp_path, FULL_FILE))
    assert node.hostname == "flag-host"
    assert node.mode is ProxyMode.IPTABLES
    assert node.cluster_cidrs == (net("10.244.0.0/16"), net("fd00:10:244::/56"))


def test_masquerade_all_flag_false_overrides_the_file(tmp_path):
    node = node_settings(
        NodeFlags(hostname="w", masquerade_all=False), config_file(tmp_path, FULL_FILE)
    )
    assert node.masquerade_all is False


def test_config_file_of_the_wrong_kind_names_the_file(tmp_path):
    path = config_file(tmp_path, "mode: iptables\n", kind="KubeletConfiguration")
    assert config_error(NodeFlags(hostname="w"), path) == (
        f'--config: {path}: kind: expected KubeProxyConfiguration, got "KubeletConfiguration"'
    )


def test_config_file_that_is_not_a_mapping_names_the_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- mode: iptables\n", encoding="utf-8")
    assert config_error(NodeFlags(hostname="w"), str(path)) == (
        f"--config: {path}: (document): must be a mapping, not list"
    )


def test_missing_config_file_names_the_file(tmp_path):
    path = tmp_path / "absent.yaml"
    assert config_error(NodeFlags(hostname="w"), str(path)) == (
        f"--config: cannot read {path}: No such file or directory"
    )


def test_config_file_with_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("mode: [iptables\n", encoding="utf-8")
    assert config_error(NodeFlags(hostname="w"), str(path)).startswith(
        f"--config: {path}: invalid YAML at line 1, column 7: unclosed bracket '['"
    )


def test_config_file_with_a_wrongly_typed_field_names_file_and_field(tmp_path):
    path = config_file(tmp_path, "nodePortAddresses: 10.20.30.0/24\n")
    assert config_error(NodeFlags(hostname="w"), path) == (
        f"--config: {path}: nodePortAddresses: must be a list, not str"
    )


def test_config_file_of_the_wrong_api_version_says_which_api_version_it_has(tmp_path):
    path = tmp_path / "beta.yaml"
    path.write_text(
        "apiVersion: kubeproxy.config.k8s.io/v1beta1\nkind: KubeProxyConfiguration\n",
        encoding="utf-8",
    )
    assert "kubeproxy.config.k8s.io/v1beta1" in config_error(NodeFlags(hostname="w"), str(path))


def test_bad_value_from_the_config_file_names_the_file_and_field(tmp_path):
    path = config_file(tmp_path, 'clusterCIDR: "nonsense"\n')
    message = config_error(NodeFlags(hostname="w"), path)
    assert path in message
    assert "clusterCIDR" in message


def test_masquerade_all_follows_the_section_of_the_mode_given_by_flag(tmp_path):
    path = config_file(
        tmp_path,
        "mode: iptables\niptables:\n  masqueradeAll: true\nnftables:\n  masqueradeAll: false\n",
    )
    assert node_settings(NodeFlags(hostname="w", mode="nftables"), path).masquerade_all is False
