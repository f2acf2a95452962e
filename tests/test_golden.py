"""Rendered rules compared byte for byte with reviewed golden files (tests/golden/).

A difference fails with a unified diff. If the change is intended, run ``make golden``
(``pytest tests/test_golden.py --update-golden``), read the diff of tests/golden/ and commit it.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import replace
from pathlib import Path

import pytest
from builders import nft_elements
from golden.cases import CASES, GOLDEN, SUFFIXES, golden_path

from kpgen.core.node import node_config
from kpgen.core.parse import ParseResult, parse_documents
from kpgen.inputs.manifests import load_documents
from kpgen.render.text import render

MODES = tuple(SUFFIXES)
CASE_NAMES = sorted(CASES)


def parse_case(name: str) -> ParseResult:
    return parse_documents(load_documents([str(CASES[name].input)]))


def render_case(name: str, mode: str) -> str:
    node = node_config(replace(CASES[name].flags, mode=mode))
    return render(parse_case(name).state, node)


def _diff(expected: str, actual: str, path: Path) -> str:
    lines = difflib.unified_diff(
        expected.splitlines(keepends=True),
        actual.splitlines(keepends=True),
        fromfile=f"tests/golden/{path.name}",
        tofile="rendered now",
    )
    return "".join(lines)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", CASE_NAMES)
def test_rendered_rules_match_golden_file(name: str, mode: str, update_golden: bool) -> None:
    path = golden_path(name, mode)
    actual = render_case(name, mode).encode("utf-8")
    if update_golden:
        if not path.exists() or path.read_bytes() != actual:
            path.write_bytes(actual)
            pytest.skip(f"rewrote {path.name}: review its diff")
        return
    if not path.exists():
        pytest.fail(f"{path} is missing: run `make golden` and review it", pytrace=False)
    expected = path.read_bytes()
    if actual != expected:
        diff = _diff(expected.decode("utf-8"), actual.decode("utf-8"), path)
        pytest.fail(
            f"{name} ({mode}) differs from {path.name}; if intended, run `make golden`\n"
            f"{diff or '(only bytes that splitlines() cannot show differ, e.g. line ends)'}",
            pytrace=False,
        )


def test_every_golden_file_belongs_to_a_case(update_golden: bool) -> None:
    expected = {golden_path(name, mode) for name in CASES for mode in MODES}
    present = {p for suffix in SUFFIXES.values() for p in GOLDEN.glob(f"*.{suffix}")}
    stale = sorted(p.name for p in present - expected)
    if update_golden:
        for name in stale:
            (GOLDEN / name).unlink()
        return
    assert not stale, f"golden files of no case in cases.py (run `make golden`): {stale}"


@pytest.mark.parametrize("name", CASE_NAMES)
def test_golden_inputs_parse_without_problems(name: str) -> None:
    result = parse_case(name)
    assert [str(p) for p in result.problems] == []
    assert dict(result.ignored) == {}
    assert result.state.services or name == "empty", "a case without services tests little"


def test_case_descriptions_are_one_line() -> None:
    for name, case in CASES.items():
        assert case.description and "\n" not in case.description, name
        assert case.input.is_file(), f"{name}: {case.input} is missing"


# --- What the golden files must say, whatever their exact text -------------------------
# The byte comparison catches every change; these catch a golden file that was updated
# to something wrong.


def test_ports_without_endpoints_are_rejected_on_every_address() -> None:
    nft = render_case("no-endpoints", "nftables")
    rejected = nft_elements(nft, "no-endpoint-services")
    assert all(e.endswith(": goto reject-chain") for e in rejected)
    assert {e.split(" : ")[0] for e in rejected} == {
        "10.100.0.1 . tcp . 80",  # empty slice
        "10.100.0.2 . tcp . 80",  # no slice
        "10.100.0.3 . tcp . 80",
        "10.100.0.4 . tcp . 80",
        "203.0.113.4 . tcp . 80",  # its externalIP too
        "10.100.0.5 . udp . 514",
        "10.100.0.6 . tcp . 80",  # slice port matches no service port
        "10.100.0.7 . tcp . 9000",  # the unserved port of half-served
    }
    assert sorted(nft_elements(nft, "no-endpoint-nodeports")) == [
        "tcp . 30003 : goto reject-chain",
        "tcp . 30004 : goto reject-chain",
        "tcp . 30008 : goto reject-chain",
    ]
    assert nft_elements(nft, "service-nodeports") == [
        "tcp . 30007 : goto external-default/half-served/tcp/80"
    ]

    ipt = render_case("no-endpoints", "iptables")
    filter_table = ipt.split("*filter\n")[1]
    rejects = [line for line in filter_table.splitlines() if "-j REJECT" in line]
    assert len(rejects) == 11  # 8 addresses + 3 NodePorts
    udp = [line for line in rejects if "-p udp" in line]
    assert len(udp) == 1 and "--reject-with" not in udp[0]  # ICMP port unreachable
    assert all("--reject-with tcp-reset" in line for line in rejects if "-p tcp" in line)
    assert "10.100.0.7/32 -p tcp -m tcp --dport 9000 -j REJECT" in filter_table
    assert "--dport 80 -j REJECT" not in ipt.split("10.100.0.7/32")[0].split("*filter")[0]


def test_nodeports_and_external_addresses_go_through_masquerading_external_chains() -> None:
    nft = render_case("external", "nftables")
    assert sorted(nft_elements(nft, "service-nodeports")) == [
        "tcp . 30100 : goto external-edge/np-ext/tcp/80",
        "tcp . 30200 : goto external-edge/lb/tcp/80",
        "udp . 30201 : goto external-edge/lb/udp/443",
    ]
    ips = dict(e.split(" : ") for e in nft_elements(nft, "service-ips"))
    for address in ("203.0.113.10", "203.0.113.11"):
        assert ips[f"{address} . tcp . 80"] == "goto external-edge/np-ext/tcp/80"
    for address in ("198.51.100.20", "198.51.100.21"):
        assert ips[f"{address} . tcp . 80"] == "goto external-edge/lb/tcp/80"
        assert ips[f"{address} . udp . 443"] == "goto external-edge/lb/udp/443"
    assert not any("198.51.100.22" in key for key in ips), "ipMode Proxy must not be short-cut"
    assert ips["10.100.1.3 . tcp . 80"] == "goto service-edge/self-ext/tcp/80"
    assert len(ips) == 10  # 3 ClusterIP ports + 2 + 2*2 external, self-ext once
    for chain in re.findall(r"chain (external-\S+) \{\n(.*?)\n\t\}", nft, re.S):
        assert chain[1].split("\n")[0].strip() == "jump mark-for-masquerade"


@pytest.mark.parametrize(
    ("name", "nft_masq", "ipt_masq"),
    [
        (
            "seed",
            "ip saddr != @cluster-cidrs jump mark-for-masquerade",
            "! -s 192.168.0.0/16 -j KPGEN-MARK-MASQ",
        ),
        ("seed-masquerade-all", "\t\tjump mark-for-masquerade", 'cluster IP" -d 10.'),
        (
            "seed-cluster-cidrs",
            "ip saddr != @cluster-cidrs jump mark-for-masquerade",
            "-j KPGEN-MARK-NONCLUSTER",
        ),
        ("seed-no-cluster-cidr", None, None),
    ],
)
def test_clusterip_masquerade_follows_the_flags(
    name: str, nft_masq: str | None, ipt_masq: str | None
) -> None:
    nft = render_case(name, "nftables")
    service_chains = re.findall(r"chain (service-[^/\s]+/\S+) \{\n(.*?)\n\t\}", nft, re.S)
    assert len(service_chains) == 4
    for _, body in service_chains:
        first = body.split("\n")[0]
        if nft_masq is None:
            assert "masquerade" not in body
        else:
            # only ClusterIP traffic: the rule names the service port's own address and port
            assert first.startswith("\t\tip daddr 10."), first
            assert re.search(r" tcp dport \d+ ", first), first
            assert first.endswith(f" {nft_masq.strip()}"), first
    ipt = render_case(name, "iptables")
    svc_rules = [line for line in ipt.splitlines() if line.startswith("-A KPGEN-SVC-")]
    masq = [line for line in svc_rules if "MARK-MASQ" in line or "MARK-NONCLUSTER" in line]
    if ipt_masq is None:
        assert masq == []
    else:
        assert len(masq) == 4 and all(ipt_masq in line for line in masq)
