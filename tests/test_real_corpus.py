"""Objects as real API servers wrote them (tests/data/real/, sources in its README).

Each file, or directory, of the corpus is one cluster. For every one:

- it renders with no warning about an object a server made (the only warnings allowed are
  those the README lists for values a support-bundle redactor replaced);
- every ready endpoint of every selector Service with a ClusterIP is a DNAT target of the rules
  the kernel holds after ``kpgen apply``, in both modes (read back from the kernel: nftables as
  JSON, iptables with iptables-save). The expected targets are worked out here from the raw
  objects, by kube-proxy's rules, not by kpgen's parser.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kernel
import pytest
from click.testing import CliRunner

from kpgen.cli.main import main
from kpgen.inputs.manifests import load_documents

REAL = Path(__file__).resolve().parent / "data" / "real"
CLUSTERS = sorted(p for p in REAL.iterdir() if p.is_dir() or p.suffix in (".yaml", ".json"))
# Warnings about values a support-bundle redactor wrote in place of the server's (README).
REDACTED = {
    "a-kurl-bundle-services-projectcontour-redacted.json": [
        'projectcontour/contour: spec.clusterIPs[0]: "***HIDDEN***" is not an IP address',
        'projectcontour/envoy: spec.clusterIPs[0]: "***HIDDEN***" is not an IP address',
    ],
}
NODE = "kpgen-test-node"


def ids(path: Path) -> str:
    return path.name


def warnings(stderr: str) -> list[str]:
    return [
        line.removeprefix("kpgen: warning: ").removesuffix(" (Service skipped)")
        for line in stderr.splitlines()
        if line.startswith("kpgen: warning: ")
    ]


def test_the_corpus_is_there_and_every_file_has_a_source() -> None:
    readme = (REAL / "README.md").read_text(encoding="utf-8")
    files = [p for c in CLUSTERS for p in ([c] if c.is_file() else sorted(c.iterdir()))]
    assert len(files) >= 10
    missing = [p.name for p in files if f"| {p.name} |" not in readme]
    assert missing == [], "files without a source in tests/data/real/README.md"


@pytest.mark.parametrize("cluster", CLUSTERS, ids=ids)
@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_real_objects_render_without_a_warning(cluster: Path, mode: str) -> None:
    result = CliRunner().invoke(
        main, ["render", "-f", str(cluster), "--proxy-mode", mode, "--hostname-override", NODE]
    )
    assert result.exit_code == 0, result.output
    assert warnings(result.stderr) == REDACTED.get(cluster.name, [])


# --- what kube-proxy would DNAT to, from the raw objects -----------------------------------


def _unnamed(name: Any) -> str:
    return name or ""


def expected_targets(documents: list[dict[str, Any]]) -> set[str]:
    """``address:port`` of every ready endpoint of every selector Service with a ClusterIP."""
    services = {}
    for doc in documents:
        if doc.get("kind") != "Service":
            continue
        spec, meta = doc.get("spec") or {}, doc["metadata"]
        cluster_ip = spec.get("clusterIP")
        if not spec.get("selector") or cluster_ip in (None, "", "None"):
            continue
        if spec.get("type") == "ExternalName" or "HIDDEN" in cluster_ip:
            continue
        ports = {(_unnamed(p.get("name")), p.get("protocol") or "TCP") for p in spec["ports"]}
        services[(meta.get("namespace") or "default", meta["name"])] = ports
    targets = set()
    for doc in documents:
        if doc.get("kind") != "EndpointSlice" or doc.get("addressType") != "IPv4":
            continue
        meta = doc["metadata"]
        owner = (meta.get("namespace") or "default", meta["labels"]["kubernetes.io/service-name"])
        for port in doc.get("ports") or ():
            key = (_unnamed(port.get("name")), port.get("protocol") or "TCP")
            if owner not in services or key not in services[owner]:
                continue
            for endpoint in doc.get("endpoints") or ():
                if (endpoint.get("conditions") or {}).get("ready") is False:
                    continue
                targets.add(f"{endpoint['addresses'][0]}:{port['port']}")
    return targets


# --- what the kernel holds --------------------------------------------------------------------


def _dnat_targets_of_json(value: Any) -> Iterator[str]:
    """Every ``dnat`` statement's address:port in libnftables' JSON ruleset."""
    if isinstance(value, dict):
        dnat = value.get("dnat")
        if isinstance(dnat, dict) and "addr" in dnat and "port" in dnat:
            yield f"{dnat['addr']}:{dnat['port']}"
        for item in value.values():
            yield from _dnat_targets_of_json(item)
    elif isinstance(value, list):
        for item in value:
            yield from _dnat_targets_of_json(item)


def loaded_targets(ns: str, mode: str) -> set[str]:
    if mode == "nftables":
        listing = kernel.output_of(ns, ["nft", "-j", "list", "ruleset"])
        return set(_dnat_targets_of_json(json.loads(listing)))
    listing = kernel.output_of(ns, ["iptables-nft-save", "-t", "nat"])
    return set(re.findall(r"-j DNAT --to-destination (\S+)", listing))


@kernel.kernel
@pytest.mark.parametrize("cluster", CLUSTERS, ids=ids)
def test_every_ready_endpoint_is_a_dnat_target_in_the_kernel_in_both_modes(cluster: Path) -> None:
    expected = expected_targets(load_documents([str(cluster)]))
    for mode in ("nftables", "iptables"):
        with kernel.netns() as ns:
            applied = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "kpgen", "apply",
                 "-f", str(cluster), "--proxy-mode", mode, "--iptables-backend", "nft",
                 "--hostname-override", NODE],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert applied.returncode == 0, applied.stderr
            loaded = loaded_targets(ns, mode)
        assert expected - loaded == set(), f"{mode}: ready endpoints with no DNAT rule"


def test_the_corpus_has_endpoints_to_check() -> None:
    """The kernel test above checks something: the corpus holds ready endpoints of selector
    services, also behind unnamed ports written as ``name: ""``."""
    total = sum(len(expected_targets(load_documents([str(c)]))) for c in CLUSTERS)
    assert total >= 5
    unnamed = [
        port
        for c in CLUSTERS
        for doc in load_documents([str(c)])
        if doc.get("kind") == "EndpointSlice"
        for port in doc.get("ports") or ()
        if port.get("name") == ""
    ]
    assert unnamed
