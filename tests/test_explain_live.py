"""``kpgen explain --live`` answers as ``kpgen explain -f`` does: every golden case loaded into a
throwaway network namespace with ``kpgen apply``, in both modes, and asked about packets and
services of both IP families, read back from the kernel (nftables as libnftables JSON,
iptables as iptables-save prints it); and the JSON reader on what nft really prints.

Both are given the manifests, so that both name the same things (--live without them names
what the rules name: tests/test_explain.py); --live then also says that the rendered rules
give its answer.

The live questions of a case run in one process inside the namespace (``python -c`` with
click's runner: the command line's own code, without a process start per question).
"""

from __future__ import annotations

import ipaddress
import json
import sys
from dataclasses import replace
from typing import Any

import kernel
import pytest
from click.testing import CliRunner
from golden.cases import CASES
from test_explain import (
    NODE_IPS,
    OUTSIDE,
    _case_packets,
    _in,
    _node,
    _read_back,
    _sources,
    _state,
    _with_node_ip,
)

from kpgen.cli.main import main
from kpgen.core.model import IPFamily, hostport
from kpgen.core.names import nft_shard, nft_shard_table
from kpgen.core.node import SETTING_NAMES, NodeFlags
from kpgen.core.plan import build_plans
from kpgen.explain import answers as ex
from kpgen.explain.trace import Locality

MODES = ("nftables", "iptables")
SAME = "the rules rendered from the manifests give the same answer"
AFFINITY = "session affinity: "
QUESTIONS = 12  # packets asked about per case and family, spread over all the case gives
ASK = """
import json, sys
from click.testing import CliRunner
from kpgen.cli.main import main

answers = []
for args in json.load(sys.stdin):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, (args, result.stderr)
    answers.append(json.loads(result.stdout))
json.dump(answers, sys.stdout)
"""


def _node_args(flags: NodeFlags) -> list[str]:
    """The command-line flags that give ``flags``."""
    args: list[str] = []
    for name, (flag, _) in SETTING_NAMES.items():
        value = getattr(flags, name)
        if isinstance(value, bool):
            args += [flag] if value else []
        elif isinstance(value, str):
            args += [flag, value]
        elif value is not None:
            args += [part for item in value for part in (flag, item)]
    return args


def _with_addresses(namespace: str, addresses: tuple[str, ...] = tuple(NODE_IPS.values())) -> None:
    """An interface of the namespace holding the node's ``addresses`` and no others: the
    kernel's ``fib daddr type local`` must see the node that the explain flags describe."""
    links = _in(namespace, "ip", "-o", "link", "show")
    if " eth0@" not in links:
        _in(namespace, "ip", "link", "set", "lo", "up")
        _in(namespace, "ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth1")
        _in(namespace, "ip", "link", "set", "eth0", "up")
        _in(namespace, "ip", "link", "set", "eth1", "up")
    _in(namespace, "ip", "addr", "flush", "dev", "eth0")
    for address in addresses:
        v4 = IPFamily.of(ipaddress.ip_address(address)) is IPFamily.V4
        options = ["/24"] if v4 else ["/64", "nodad"]
        _in(namespace, "ip", "addr", "add", address + options[0], "dev", "eth0", *options[1:])


def _questions(flags: NodeFlags, case: str) -> list[list[str]]:
    """Packets of each family the case has rules of (from outside, the node, a pod, an
    endpoint, to everything its rules name), and its first services from an outside client."""
    state = _state(CASES[case].input)
    node = _node(flags.mode or "nftables", flags)
    questions = []
    for plan in build_plans(state, node):
        ruleset = ex.rendered_ruleset(state, node, family=plan.family)
        sources = _sources(node, ruleset)
        picked = list(dict.fromkeys([*sources[0:5:2], sources[-1]]))
        packets = list(_case_packets(ruleset, node, picked))
        for packet in packets[:: -(-len(packets) // QUESTIONS)]:
            dst = hostport(packet.dst, packet.port)
            questions.append(
                ["--src", str(packet.src), "--dst", dst, "--protocol", packet.protocol_name]
            )
        client = OUTSIDE[plan.family][0]
        questions += [["--service", str(s.ref), "--src", client] for s in state.services[:2]]
    return questions


def _comparable(answer: dict[str, Any], mode: str) -> dict[str, Any]:
    """An answer without where its rules came from and what the kernel remembers for session
    affinity; probabilities to 6 decimals (iptables-save prints ``--probability
    0.33333333349`` for the rendered ``0.3333333333``), so outcomes in no particular order;
    each hop as (kind, chain, note): the kernel spells rules its own way. iptables-save
    lists every built-in chain, kpgen's input only those it jumps from: entering and leaving
    chains are left out there."""
    found = {key: value for key, value in answer.items() if key not in ("rules", "where")}
    found["notes"] = [n.split(":")[0] if n.startswith(AFFINITY) else n for n in found["notes"]]
    for outcome in found.get("outcomes", []):
        outcome["path"] = [
            (step["kind"], step["chain"], step["note"])
            for step in outcome["path"]
            if mode == "nftables" or step["kind"] not in ("hook", "end")
        ]
    for outcomes in [found.get("outcomes", []), *(e["outcomes"] for e in found.get("entries", []))]:
        for outcome in outcomes:
            outcome["probability"] = round(outcome["probability"], 6)
        outcomes.sort(key=json.dumps)
    return found


@kernel.kernel
@pytest.mark.parametrize("mode", MODES)
def test_live_explain_answers_as_manifest_mode_for_every_golden_case(mode: str) -> None:
    asked = 0
    with kernel.netns() as namespace:
        for name, case in CASES.items():
            flags = replace(_with_node_ip(case.flags), mode=mode)
            _with_addresses(namespace, flags.node_ips)
            args = ["-f", str(case.input), *_node_args(flags)]
            _in(namespace, "nft", "flush", "ruleset")
            _in(namespace, sys.executable, "-m", "kpgen", "apply", *args)
            questions = _questions(flags, name)
            asks = [["explain", "--live", *args, *q, "-o", "json"] for q in questions]
            live = json.loads(_in(namespace, sys.executable, "-c", ASK, stdin=json.dumps(asks)))
            for question, answer in zip(questions, live, strict=True):
                assert answer["rules"] == "kernel", (name, question)
                offline = CliRunner().invoke(main, ["explain", *args, *question, "-o", "json"])
                assert offline.exit_code == 0, offline.stderr
                want = _comparable(json.loads(offline.stdout), mode)
                if "--service" not in question:  # given -f, --live compares with it
                    want["notes"].append(SAME)
                assert _comparable(answer, mode) == want, (name, question)
                asked += 1
    assert asked >= QUESTIONS * len(CASES)


@kernel.kernel
@pytest.mark.parametrize("mode", MODES)
def test_live_explain_of_an_ipv6_node_port(mode: str) -> None:
    case = CASES["dual-stack"]
    flags = replace(_with_node_ip(case.flags), mode=mode)
    with kernel.netns() as namespace:
        _with_addresses(namespace)
        apply = [sys.executable, "-m", "kpgen", "apply", "-f", str(case.input)]
        _in(namespace, *apply, *_node_args(flags))
        kpgen = [sys.executable, "-m", "kpgen", "explain", "--live", "-o", "json"]
        question = ["--src", OUTSIDE[IPFamily.V6][0], "--dst", "fd00::11:30080"]
        answer = json.loads(_in(namespace, *kpgen, *question))
        service = json.loads(_in(namespace, *kpgen, "--service", "default/web"))
    assert answer["where"] == ("nft table ip6 kpgen" if mode == "nftables" else "ip6tables-nft")
    assert sorted(
        (o["destination"], o["masquerade"], o["probability"]) for o in answer["outcomes"]
    ) == [
        ("[fd00:10:244:1::5]:8080", True, 0.5),
        ("[fd00:10:244:2::6]:8080", True, 0.5),
    ]
    assert answer["service"]["via"] == "NodePort" and answer["assumptions"] == []
    assert service["where"] == ("nft table ip kpgen" if mode == "nftables" else "iptables-nft")
    assert service["notes"] == ["default/web has IPv6 addresses too: trace them with an IPv6 --src"]


@kernel.kernel
def test_a_construct_the_json_reader_does_not_know_is_reported_not_guessed() -> None:
    case = CASES["seed"]
    chain = "external-default/node-port/tcp/8080"  # NodePort traffic goes through it
    with kernel.netns() as namespace:
        apply = [sys.executable, "-m", "kpgen", "apply", "-f", str(case.input)]
        _in(namespace, *apply, *_node_args(case.flags))
        table = nft_shard_table(nft_shard("default/node-port"))
        _in(namespace, "nft", "insert", "rule", "ip", table, chain, 'log prefix "kpgen "')
        ruleset = _read_back(namespace, "nftables", IPFamily.V4)
    (unknown,) = [r for c in ruleset.chains.values() for r in c.rules if r.error]
    assert unknown.text == '{"log":{"prefix":"kpgen "}}'  # shown as nft printed it
    locality = Locality([ipaddress.ip_network("10.20.30.11/32")], "test")

    def outcomes(dst: str) -> set[tuple[str, str | None, bool]]:
        packet = ex.parse_packet("10.20.30.1", dst, "tcp")
        answer = ex.explain_packet(ruleset, packet, locality, "k8s-worker01")
        if answer.outcomes[0].kind == "unknown":
            assert answer.outcomes[0].why == f"cannot evaluate: {unknown.text}"
        return answer.outcome_set()

    assert outcomes("10.20.30.11:30001") == {("unknown", None, False)}
    # a rule the packet never reaches does not matter
    assert {kind for kind, _, _ in outcomes("10.101.179.255:8080")} == {"dnat"}
