"""The kernel accepts every golden ruleset, and the checkers that say so can say no.

nftables rules are checked with ``nft -c -f`` and iptables rules loaded with a real
``iptables-restore --noflush``, each in a throwaway network namespace (tests/kernel.py).
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Any

import kernel
import pytest
from golden.cases import CASES, golden_path

from kpgen.core.node import NodeFlags, node_config
from kpgen.core.parse import parse_documents
from kpgen.inputs.manifests import load_documents
from kpgen.render.text import render

pytestmark = pytest.mark.kernel


def _golden(name: str, mode: str) -> str:
    path = golden_path(name, mode)
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make golden`", pytrace=False)
    return path.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_accepts_golden_nftables_rules(name: str, check_namespace: str) -> None:
    ok, stderr = kernel.nft_check(_golden(name, "nftables"), check_namespace)
    assert ok, f"nft -c rejected {golden_path(name, 'nftables').name}:\n{stderr}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_accepts_golden_iptables_rules(name: str) -> None:
    ok, stderr = kernel.iptables_load(_golden(name, "iptables"))
    assert ok, f"iptables-restore rejected {golden_path(name, 'iptables').name}:\n{stderr}"


def test_iptables_load_really_installs_the_rules() -> None:
    with kernel.netns() as namespace:
        ok, stderr = kernel.iptables_load(_golden("seed", "iptables"), namespace)
        assert ok, stderr
        saved = kernel.iptables_save(namespace)
    assert '-A PREROUTING -m comment --comment "kpgen service portals" -j KPGEN-SERVICES' in saved
    assert "--dport 30001 -j KPGEN-EXT-" in saved
    assert "-j DNAT --to-destination 192.168.69.246:80" in saved


# --- Negative controls: the checkers reject what the kernel would not take ---------------

UNDEFINED_NFT = """table ip kpgen-negative {
	chain start {
		type nat hook prerouting priority dstnat; policy accept;
		jump no-such-chain
	}
}
"""

UNDEFINED_IPTABLES = """*nat
:KPGEN-START - [0:0]
-A KPGEN-START -j KPGEN-NO-SUCH-CHAIN
COMMIT
"""


def test_nft_check_rejects_a_jump_to_an_undefined_chain(check_namespace: str) -> None:
    ok, stderr = kernel.nft_check(UNDEFINED_NFT, check_namespace)
    assert not ok
    assert "no-such-chain" in stderr


def test_iptables_load_rejects_a_jump_to_an_undefined_chain() -> None:
    ok, stderr = kernel.iptables_load(UNDEFINED_IPTABLES)
    assert not ok
    assert "KPGEN-NO-SUCH-CHAIN" in stderr


def test_nft_check_rejects_golden_rules_missing_one_chain(check_namespace: str) -> None:
    text = _golden("seed", "nftables")
    broken = re.sub(r"\tchain mark-for-masquerade \{\n.*?\n\t\}\n", "", text, count=1, flags=re.S)
    assert broken != text
    ok, stderr = kernel.nft_check(broken, check_namespace)
    assert not ok
    assert "mark-for-masquerade" in stderr


def test_iptables_load_rejects_golden_rules_missing_one_chain() -> None:
    text = _golden("seed", "iptables")
    broken = text.replace(":KPGEN-MARK-MASQ - [0:0]\n", "", 1)
    assert broken != text
    ok, stderr = kernel.iptables_load(broken)
    assert not ok
    # "line N failed: No chain/target/match by that name." (or a message naming the chain)
    failed = re.search(r"line:? (\d+)", stderr)
    assert failed, stderr
    assert "KPGEN-MARK-MASQ" in broken.splitlines()[int(failed.group(1)) - 1], stderr


# --- The throwaway namespaces ------------------------------------------------------------


def test_throwaway_namespace_is_deleted_even_when_the_body_fails() -> None:
    with pytest.raises(RuntimeError, match="boom"), kernel.netns() as namespace:
        assert kernel.namespace_exists(namespace)
        assert namespace.startswith(f"{kernel.PREFIX}")
        raise RuntimeError("boom")
    assert not kernel.namespace_exists(namespace)


def test_throwaway_namespaces_have_unique_names() -> None:
    with kernel.netns() as first, kernel.netns() as second:
        assert first != second
    assert not kernel.namespace_exists(first) and not kernel.namespace_exists(second)


def test_commands_only_run_in_namespaces_made_for_tests() -> None:
    with pytest.raises(ValueError, match="not a namespace made by netns"):
        kernel.exec_in("default", ["true"])


# --- Known bugs: rules that kpgen renders and the kernel refuses --------------------------


def _render(documents: list[dict[str, Any]], flags: NodeFlags, mode: str = "nftables") -> str:
    result = parse_documents(documents)
    return render(result.state, node_config(replace(flags, mode=mode)))


def _seed_documents() -> list[dict[str, Any]]:
    return list(load_documents([str(CASES["seed"].input)]))


def test_overlapping_cluster_cidrs_render_loadable_nftables_rules(check_namespace: str) -> None:
    flags = NodeFlags(hostname="k8s-worker01", cluster_cidrs=("192.168.0.0/16", "192.168.69.0/24"))
    ok, stderr = kernel.nft_check(_render(_seed_documents(), flags), check_namespace)
    assert ok, stderr


def test_overlapping_nodeport_addresses_render_loadable_nftables_rules(
    check_namespace: str,
) -> None:
    flags = NodeFlags(hostname="k8s-worker01", nodeport_addresses=("10.0.0.0/8", "10.20.30.0/24"))
    ok, stderr = kernel.nft_check(_render(_seed_documents(), flags), check_namespace)
    assert ok, stderr


def test_overlapping_service_cidrs_render_loadable_nftables_rules(check_namespace: str) -> None:
    flags = NodeFlags(hostname="k8s-worker01", service_cidrs=("10.96.0.0/12", "10.96.0.0/16"))
    ok, stderr = kernel.nft_check(_render(_seed_documents(), flags), check_namespace)
    assert ok, stderr


def test_overlapping_cidrs_load_in_iptables_mode() -> None:
    """The same flags work in iptables mode (one rule per CIDR), so only nftables is broken."""
    flags = NodeFlags(
        hostname="k8s-worker01",
        cluster_cidrs=("192.168.0.0/16", "192.168.69.0/24"),
        nodeport_addresses=("10.0.0.0/8", "10.20.30.0/24"),
        service_cidrs=("10.96.0.0/12", "10.96.0.0/16"),
    )
    ok, stderr = kernel.iptables_load(_render(_seed_documents(), flags, "iptables"))
    assert ok, stderr


DUPLICATE_NODE_PORT: list[dict[str, Any]] = [
    {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "default"},
        "spec": {
            "type": "NodePort",
            "clusterIP": "10.96.0.20",
            "ports": [
                {"name": "http", "protocol": "TCP", "port": 80, "nodePort": 30080},
                {"name": "https", "protocol": "TCP", "port": 443, "nodePort": 30080},
            ],
        },
    },
    {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-a",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "ports": [
            {"name": "http", "protocol": "TCP", "port": 8080},
            {"name": "https", "protocol": "TCP", "port": 8443},
        ],
        "endpoints": [{"addresses": ["10.244.1.5"]}],
    },
]


def test_service_reusing_a_nodeport_on_two_ports_renders_loadable_nftables_rules(
    check_namespace: str,
) -> None:
    ok, stderr = kernel.nft_check(
        _render(DUPLICATE_NODE_PORT, NodeFlags(hostname="node-a")), check_namespace
    )
    assert ok, stderr
