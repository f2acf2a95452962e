"""Partial syncs (kpgen.render.delta): what they write, and that the kernel ends up where a full
load of the new rules would have put it.

The unit tests read the delta text. The kernel tests load full(A) into a throwaway network
namespace, apply the delta to B there, and compare the result with a second namespace that
loaded full(B) directly; RuleLoader is also driven end to end inside a namespace.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import sys
import textwrap
import weakref
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import kernel
import pytest
import yaml
from builders import endpoint, endpoint_slice, service
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_property import clusters, node_flags

from kpgen.core.names import ipt_chain, nft_shard, nft_shard_table
from kpgen.core.node import NodeFlags, ProxyMode, node_config
from kpgen.core.parse import parse_documents
from kpgen.core.plan import FamilyPlan, build_plans
from kpgen.render.delta import NftLoaded, iptables_chains, iptables_change, parse_iptables
from kpgen.render.text import (
    NftPort,
    ipt_port_renderer,
    nft_port_renderer,
    render_ipt_port,
    render_ipt_rules,
    render_nft_port,
    render_nft_table,
    render_plan,
)

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "examples" / "seed-cluster.yaml"
NODE = NodeFlags(hostname="node-a", cluster_cidrs=("10.244.0.0/16",))
NFT, IPT = ProxyMode.NFTABLES, ProxyMode.IPTABLES
WHERE = "ip kpgen"  # the node-wide table


def shard_of(service: str) -> str:
    """The shard table of a service of the default namespace (``ip kpgen-00``)."""
    return f"ip {nft_shard_table(nft_shard(f'default/{service}'))}"


WEB = shard_of("web")


# --- helpers ------------------------------------------------------------------------------


def plan_of(documents: list[dict[str, Any]], flags: NodeFlags = NODE) -> FamilyPlan:
    result = parse_documents(documents)
    (plan,) = build_plans(result.state, node_config(flags))
    return plan


def nft_text(documents: list[dict[str, Any]], flags: NodeFlags = NODE) -> str:
    return render_plan(plan_of(documents, flags), NFT)


def ipt_text(documents: list[dict[str, Any]], flags: NodeFlags = NODE) -> str:
    """iptables rules as RuleLoader keeps them: without the jumps from built-in chains."""
    return render_plan(plan_of(documents, flags), IPT, insert_jumps=())


def cluster() -> list[dict[str, Any]]:
    """web (NodePort, 2 endpoints), db (1 endpoint), api (externalIP, 1 endpoint)."""
    return [
        service(
            "web", cluster_ip="10.96.0.10", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]
        ),
        endpoint_slice(
            "web-1", service_name="web", endpoints=[endpoint("10.244.1.1"), endpoint("10.244.2.2")]
        ),
        service("db", cluster_ip="10.96.0.20"),
        endpoint_slice("db-1", service_name="db", endpoints=[endpoint("10.244.3.3")]),
        service("api", cluster_ip="10.96.0.30", externalIPs=["198.18.0.1"]),
        endpoint_slice("api-1", service_name="api", endpoints=[endpoint("10.244.4.4")]),
    ]


def without(documents: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    """The documents without service ``name`` and its slices."""
    return [
        d
        for d in documents
        if d["metadata"]["name"] != name
        and d["metadata"].get("labels", {}).get("kubernetes.io/service-name") != name
    ]


def slice_of(documents: list[dict[str, Any]], name: str) -> dict[str, Any]:
    return next(
        d for d in documents if d["kind"] == "EndpointSlice" and d["metadata"]["name"] == name
    )


def chains_named(delta: str) -> set[str]:
    """The chains an nft delta touches (flush/add/delete chain or a chain block)."""
    return set(re.findall(r"(?:chain ip kpgen(?:-\d+)? |\tchain )(\S+)", delta))


# --- nftables: transactions of service ports' shares (NftLoaded) -------------------------


def shares(
    documents: list[dict[str, Any]], flags: NodeFlags = NODE
) -> tuple[FamilyPlan, dict[str, NftPort], Any]:
    """The plan, each service port's share of the table, and the port renderer."""
    plan = plan_of(documents, flags)
    renderer = nft_port_renderer(plan)
    return plan, {p.key: render_nft_port(renderer, p) for p in plan.ports}, renderer


# the ports' shares each NftLoaded of these tests stands for (it keeps counts, not shares)
SHARES: weakref.WeakKeyDictionary[NftLoaded, dict[str, NftPort]] = weakref.WeakKeyDictionary()


def loaded_of(documents: list[dict[str, Any]], flags: NodeFlags = NODE) -> NftLoaded:
    """What a full load of ``documents`` leaves loaded."""
    plan, pieces, renderer = shares(documents, flags)
    referenced = ("cluster-cidrs",) if plan.cluster_cidrs else ()
    loaded = NftLoaded.of("ip", renderer, pieces.values(), referenced)
    SHARES[loaded] = pieces
    return loaded


def change_to(
    loaded: NftLoaded, documents: list[dict[str, Any]], flags: NodeFlags = NODE
) -> tuple[str, bool]:
    """The transaction from ``loaded`` to the ports of ``documents``, as the controller makes
    it: only the ports whose share differs, each with its old share."""
    _, new, _ = shares(documents, flags)
    old = SHARES[loaded]
    changed = {
        key: (old.get(key), new.get(key))
        for key in old.keys() | new.keys()
        if old.get(key) != new.get(key)
    }
    SHARES[loaded] = new
    return loaded.change(changed)


def twin_of_web() -> list[dict[str, Any]]:
    """A service with one endpoint whose name hashes to web's table, and its slice."""
    name = next(f"web-twin-{i}" for i in itertools.count() if shard_of(f"web-twin-{i}") == WEB)
    return [
        service(name, cluster_ip="10.96.0.40"),
        endpoint_slice(f"{name}-1", service_name=name, endpoints=[endpoint("10.244.5.5")]),
    ]


def commands(script: str) -> list[str]:
    """The script's commands: its lines that do not stand inside a block."""
    out, depth = [], 0
    for line in script.splitlines():
        if depth == 0:
            out.append(line)
        depth += line.count("{") - line.count("}")
    return out


# nft 1.0.6 copies every chain of the node before resolving these: a partial sync without a
# deletion must not use them (docs/performance.md)
NEEDS_CACHE = re.compile(r"^(add|delete) (element|rule) |^table |^delete chain ")


def test_nothing_changed_is_an_empty_transaction() -> None:
    loaded = loaded_of(cluster())
    assert change_to(loaded, cluster()) == ("", False)


def test_an_endpoint_added_rewrites_that_chain_and_adds_its_hairpin_element_cheaply() -> None:
    after = cluster()
    slice_of(after, "web-1")["endpoints"].append(endpoint("10.244.9.9"))
    script, costly = change_to(loaded_of(cluster()), after)
    assert not costly
    assert not [c for c in commands(script) if NEEDS_CACHE.match(c)]
    assert commands(script) == [
        f"add set {WEB} cluster-cidrs {{",  # declared: the chain's rules name it
        f"flush chain {WEB} service-default/web/tcp/80",
        f"add chain {WEB} service-default/web/tcp/80 {{",
        f"add set {WHERE} hairpin-endpoints {{",
    ]
    assert "dnat to 10.244.9.9:80" in script and "10.244.9.9 . 10.244.9.9" in script
    assert "db" not in script and "api" not in script


def test_deletions_that_can_wait_wait_until_a_transaction_deletes_anyway() -> None:
    twin = twin_of_web()
    twin_name = twin[0]["metadata"]["name"]
    base = cluster() + twin
    slice_of(base, "db-1")["endpoints"] = []  # db rejects: its reject elements are in place
    loaded = loaded_of(base)
    fewer = copy.deepcopy(base)
    slice_of(fewer, "web-1")["endpoints"].pop()
    script, costly = change_to(loaded, fewer)
    assert not costly and "delete" not in script
    assert loaded.stale == {("kpgen", "hairpin-endpoints", "10.244.2.2 . 10.244.2.2")}
    # the twin goes: its chain is flushed at once, its elements and the chain wait
    script, costly = change_to(loaded, without(fewer, twin_name))
    assert not costly and "delete" not in script
    twin_chain = f"service-default/{twin_name}/tcp/80"
    assert commands(script) == [f"flush chain {WEB} {twin_chain}"]
    assert ("kpgen-00", "service-ips", f"10.96.0.40 . tcp . 80 : goto {twin_chain}") in {
        (t.split()[-1], c, e) for t, c, e in loaded.stale
    }
    assert loaded.stale_chains == {(WEB, twin_chain)}
    # db gets an endpoint: its reject elements must go now, and what waited goes with them
    served = without(fewer, twin_name)
    slice_of(served, "db-1")["endpoints"] = [endpoint("10.244.3.3")]
    script, costly = change_to(loaded, served)
    assert costly
    lines = commands(script)
    hairpins = f"delete element {WHERE} hairpin-endpoints {{ "
    assert hairpins + "10.244.2.2 . 10.244.2.2, 10.244.5.5 . 10.244.5.5 }" in lines
    assert f"delete element {WEB} service-ips {{ 10.96.0.40 . tcp . 80 }}" in lines
    assert lines.index(f"delete chain {WEB} {twin_chain}") > max(
        i for i, ln in enumerate(lines) if ln.startswith("delete element")
    )
    assert loaded.stale == set() and loaded.stale_chains == set()


def test_a_removed_service_is_flushed_at_once_and_deleted_later_elements_first() -> None:
    loaded = loaded_of(cluster() + twin_of_web())
    script, costly = change_to(loaded, without(cluster(), "web") + twin_of_web())
    assert not costly  # web goes; its twin keeps the table
    lines = commands(script)
    gone = {"service-default/web/tcp/80", "external-default/web/tcp/80"}
    assert {ln.rsplit(" ", 1)[1] for ln in lines if ln.startswith("flush chain")} == gone
    assert not any(ln.startswith(("delete ", "add ")) for ln in lines)
    lines = commands(loaded.delete_stale())  # a periodic full sync
    deletes = [i for i, ln in enumerate(lines) if ln.startswith("delete element")]
    chain_deletes = [i for i, ln in enumerate(lines) if ln.startswith("delete chain")]
    assert deletes and chain_deletes and max(deletes) < min(chain_deletes)
    assert {ln.rsplit(" ", 1)[1] for ln in lines if ln.startswith("delete chain")} == gone
    assert f"delete element {WEB} service-ips {{ 10.96.0.10 . tcp . 80 }}" in lines
    assert f"delete element {WEB} service-nodeports {{ tcp . 30080 }}" in lines


def test_a_waiting_key_used_again_is_kept_or_deleted_first() -> None:
    web_gone = without(cluster(), "web") + twin_of_web()
    loaded = loaded_of(cluster() + twin_of_web())
    change_to(loaded, web_gone)  # web's keys and chains wait
    script, _ = change_to(loaded, cluster() + twin_of_web())  # the very same web again
    assert not [ln for ln in commands(script) if "service-ips" in ln or "delete" in ln]
    assert loaded.stale_chains == set()
    assert [e for e in loaded.stale if e[1] != "hairpin-endpoints"] == []
    change_to(loaded, web_gone)  # web's keys wait again
    taken = copy.deepcopy(web_gone)
    taken[-2]["spec"]["clusterIP"] = "10.96.0.10"  # the twin (web's table) takes web's address
    script, costly = change_to(loaded, taken)
    assert costly  # that key leads elsewhere now: the waiting element goes first
    lines = commands(script)
    (deleted,) = [ln for ln in lines if ln.startswith(f"delete element {WEB} service-ips ")]
    assert "10.96.0.10 . tcp . 80" in deleted
    assert lines.index(deleted) < lines.index(f"add map {WEB} service-ips {{")
    script, costly = change_to(loaded, web_gone)
    assert not costly  # the twin back on its own address: its element for web's waits


def test_a_service_alone_in_its_table_goes_with_the_table() -> None:
    script, _ = change_to(loaded_of(cluster()), without(cluster(), "web"))
    lines = commands(script)
    assert f"delete table {WEB}" in lines
    assert not [ln for ln in lines if f" {WEB} " in ln]  # nothing else of its table is written
    assert not any(ln.startswith("add ") for ln in lines)
    script, _ = change_to(loaded_of(without(cluster(), "web")), cluster())  # and back
    assert commands(script)[0] == f"table {WEB} {{"


def test_a_service_losing_its_endpoints_moves_its_keys_to_the_reject_maps() -> None:
    after = cluster()
    slice_of(after, "web-1")["endpoints"] = []
    script, _ = change_to(loaded_of(cluster()), after)
    lines = script.splitlines()
    assert f"delete table {WEB}" in lines  # web's chains and dispatch elements with it
    assert f"add map {WHERE} no-endpoint-services {{" in lines
    assert "10.96.0.10 . tcp . 80 : goto reject-chain" in lines
    assert "tcp . 30080 : goto reject-chain" in lines


def test_the_full_table_is_the_ports_shares_assembled() -> None:
    plan, pieces, _ = shares(cluster())
    assert render_nft_table(plan, [pieces[p.key] for p in plan.ports]) == nft_text(cluster())


# --- iptables_change ----------------------------------------------------------------------


def ipt_change_of(plan_a: FamilyPlan, plan_b: FamilyPlan) -> str:
    """iptables_change from ``plan_a``'s rules to ``plan_b``'s, every port's share paired by
    key as NodeRules pairs the ports it planned again (unchanged ones pair equal shares)."""
    shares = [
        {p.key: render_ipt_port(ipt_port_renderer(plan), p) for p in plan.ports}
        for plan in (plan_a, plan_b)
    ]
    pairs = [(shares[0].get(key), shares[1].get(key)) for key in shares[0].keys() | shares[1]]
    rest_a, rest_b = (
        iptables_chains(render_ipt_rules(plan, [], insert_jumps=())) for plan in (plan_a, plan_b)
    )
    return iptables_change(
        pairs, (rest_a, rest_b), lambda: render_plan(plan_b, IPT, insert_jumps=())
    )


def ipt_change(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> str:
    return ipt_change_of(plan_of(a), plan_of(b))


def _declared(delta: str) -> set[str]:
    return set(re.findall(r"^:(\S+) ", delta, re.M))


def test_iptables_change_of_identical_shares_is_empty() -> None:
    assert ipt_change(cluster(), cluster()) == ""


def test_iptables_change_rewrites_only_the_chains_whose_rules_changed() -> None:
    after = cluster()
    slice_of(after, "web-1")["endpoints"].append(endpoint("10.244.9.9"))
    plan = plan_of(after)
    web = next(p for p in plan.ports if p.key == "default/web/tcp/80")
    new_sep = next(
        ipt_chain("SEP", web, b) for b in web.endpoints if str(b.address) == "10.244.9.9"
    )
    delta = ipt_change(cluster(), after)
    assert _declared(delta) == {ipt_chain("SVC", web), new_sep}
    appended = {line.split(" ", 2)[1] for line in delta.splitlines() if line.startswith("-A ")}
    assert appended == {ipt_chain("SVC", web), new_sep}
    assert "*filter" not in delta  # nothing changed there
    assert "-X" not in delta and "-I" not in delta
    # the rewritten chain carries all of its rules, in order: a 1/3, 1/2, rest cascade
    svc_rules = [ln for ln in delta.splitlines() if ln.startswith(f"-A {ipt_chain('SVC', web)} ")]
    assert [("probability" in ln) for ln in svc_rules[-3:]] == [True, True, False]


def test_iptables_change_deletes_the_chains_of_a_removed_service() -> None:
    plan = plan_of(cluster())
    web = next(p for p in plan.ports if p.key == "default/web/tcp/80")
    gone = {ipt_chain("SVC", web), ipt_chain("EXT", web)}
    gone |= {ipt_chain("SEP", web, b) for b in web.endpoints}
    delta = ipt_change(cluster(), without(cluster(), "web"))
    assert set(re.findall(r"^-X (\S+)$", delta, re.M)) == gone
    # declared (flushed) in the same input, and the chains that jumped to them rewritten
    assert _declared(delta) == gone | {"KPGEN-SERVICES", "KPGEN-NODEPORTS"}
    assert not any(f"-j {chain}" in delta for chain in gone)
    assert "*filter" not in delta


def test_iptables_change_rewrites_a_shared_chain_of_the_rest_whole() -> None:
    """A ClusterIP that goes leaves the rest of the rules (KPGEN-CLUSTER-IPS, made of every
    ClusterIP under --service-cidr): that chain is rewritten whole, from the new rules."""
    flags = NodeFlags(hostname="node-a", service_cidrs=("10.96.0.0/16",))
    before, after = plan_of(cluster(), flags), plan_of(without(cluster(), "db"), flags)
    delta = ipt_change_of(before, after)
    wanted = parse_iptables(render_plan(after, IPT, insert_jumps=()))["filter"]
    rewritten = parse_iptables(delta)["filter"]
    assert rewritten["KPGEN-CLUSTER-IPS"] == wanted["KPGEN-CLUSTER-IPS"]
    assert "10.96.0.20" not in "".join(rewritten["KPGEN-CLUSTER-IPS"])


# --- in the kernel ------------------------------------------------------------------------


def run_in(namespace: str, *argv: str, stdin: str | None = None) -> str:
    return kernel.output_of(namespace, list(argv), stdin)


# Runs inside a namespace: loads the first text as kpgen apply does, then each later step
# ("delta": an nft script run as one transaction; "full": Nftables.apply again).
NFT_STEPS = textwrap.dedent(
    """
    import json, sys
    from kpgen.dataplane.apply import Nftables
    from kpgen.core.model import IPFamily
    nft = Nftables()
    for kind, text in json.load(sys.stdin):
        if kind == "full":
            nft.apply({IPFamily.V4: text})
        else:
            nft.run(text)
    """
)


def nft_canonical(namespace: str) -> dict[str, Any]:
    """``nft -j list ruleset ip`` (kpgen's tables are the namespace's only ones) without what
    a correct load may leave different: the objects' handles, the order of tables, chains
    and sets, the order of set elements. Rule order within a chain is kept."""
    listing = json.loads(run_in(namespace, "nft", "-j", "list", "ruleset", "ip"))
    tables: dict[str, Any] = {}
    objects: dict[str, Any] = {}
    rules: dict[str, list[str]] = defaultdict(list)
    for item in listing["nftables"]:
        ((kind, body),) = item.items()
        body = {k: v for k, v in body.items() if k != "handle"}
        if kind == "table":
            tables[body["name"]] = body
        elif kind == "rule":
            rules[f"{body['table']} {body['chain']}"].append(json.dumps(body, sort_keys=True))
        elif kind in ("chain", "set", "map"):
            if "elem" in body:
                body["elem"] = sorted(json.dumps(e, sort_keys=True) for e in body["elem"])
            objects[f"{kind} {body['table']} {body['name']}"] = body
    return {"tables": tables, "objects": objects, "rules": dict(rules)}


def ipt_canonical(saved: str) -> dict[str, tuple[list[str], list[str]]]:
    """iptables-save output without comments, counters and chain order (rules keep their
    order within each chain)."""
    tables: dict[str, tuple[list[str], list[str]]] = {}
    declared: list[str] = []
    rules: list[str] = []
    for line in saved.splitlines():
        if line.startswith("*"):
            declared, rules = [], []
            tables[line[1:]] = (declared, rules)
        elif line.startswith(":"):
            declared.append(line.rsplit(" ", 1)[0])  # drop [packets:bytes]
        elif line.startswith("-A "):
            rules.append(line)
    for declared, rules in tables.values():
        declared.sort()
        rules.sort(key=lambda rule: rule.split(" ", 2)[1])  # stable: order within a chain
    return tables


@dataclass
class Pair:
    flags_a: NodeFlags
    flags_b: NodeFlags
    a: list[dict[str, Any]]
    b: list[dict[str, Any]]
    how: str


def _service_refs(documents: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [
        (d["metadata"]["namespace"], d["metadata"]["name"])
        for d in documents
        if d["kind"] == "Service"
    ]


def _remove_service(documents: list[dict[str, Any]], ref: tuple[str, str]) -> list[dict[str, Any]]:
    namespace, name = ref
    return [
        d
        for d in documents
        if d["metadata"]["namespace"] != namespace
        or (
            d["metadata"]["name"] != name
            and d["metadata"].get("labels", {}).get("kubernetes.io/service-name") != name
        )
    ]


@st.composite
def cluster_pairs(draw: st.DrawFn) -> Pair:
    """Cluster A, and B: the same, A with a few edits (services added or removed, endpoints
    or a port changed: a small delta), an unrelated cluster, or A on a node with other
    settings (a head change: the nft delta declines; iptables still rewrites in place)."""
    flags = draw(node_flags())
    a = draw(clusters(max_services=8)).documents
    how = draw(st.sampled_from(["edited", "edited", "edited", "same", "other", "node"]))
    if how == "same":
        return Pair(flags, flags, a, copy.deepcopy(a), how)
    if how == "other":
        return Pair(flags, flags, a, draw(clusters(max_services=8)).documents, how)
    if how == "node":
        return Pair(flags, draw(node_flags()), a, copy.deepcopy(a), how)
    b = copy.deepcopy(a)
    edits = []
    for _ in range(draw(st.integers(1, 3))):
        edit = draw(st.sampled_from(["remove", "add", "endpoints", "endpoints", "port"]))
        refs = _service_refs(b)
        slices = [d for d in b if d["kind"] == "EndpointSlice"]
        if edit == "remove" and refs:
            b = _remove_service(b, draw(st.sampled_from(refs)))
        elif edit == "add":
            extra = draw(clusters(max_services=3)).documents
            for ref in set(_service_refs(extra)) & set(refs):
                extra = _remove_service(extra, ref)
            b += extra
        elif edit == "endpoints" and slices:
            target = draw(st.sampled_from(slices))
            endpoints = target["endpoints"]
            change = draw(st.sampled_from(["add", "drop", "unready"]))
            if change == "add" or not endpoints:
                octets = draw(st.tuples(st.integers(0, 255), st.integers(1, 254)))
                endpoints.append({"addresses": [f"10.244.{octets[0]}.{octets[1]}"]})
            elif change == "drop":
                endpoints.pop(draw(st.integers(0, len(endpoints) - 1)))
            else:
                endpoints[draw(st.integers(0, len(endpoints) - 1))]["conditions"] = {"ready": False}
        elif edit == "port" and refs:
            namespace, name = draw(st.sampled_from(refs))
            target = next(
                d
                for d in b
                if d["kind"] == "Service"
                and d["metadata"] == {"name": name, "namespace": namespace}
            )
            target["spec"]["ports"][0]["port"] = draw(st.integers(1, 65535))
        edits.append(edit)
    return Pair(flags, flags, a, b, f"edited ({', '.join(edits)})")


def render_pair(pair: Pair, mode: ProxyMode) -> tuple[FamilyPlan, FamilyPlan]:
    node_a = node_config(replace(pair.flags_a, mode=mode.value))
    node_b = node_config(replace(pair.flags_b, mode=mode.value))
    (a,) = build_plans(parse_documents(pair.a).state, node_a)
    (b,) = build_plans(parse_documents(pair.b).state, node_b)
    return a, b


KERNEL_PROPERTY = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@pytest.mark.kernel
@KERNEL_PROPERTY
@given(pair=cluster_pairs())
def test_nft_full_a_then_transactions_to_b_equal_full_b_in_the_kernel(pair: Pair) -> None:
    """A, then B's changed ports as one transaction (a node setting change is a full load,
    as the controller does); then back to A and to B again through a second transaction (the
    elements and chains kept for later deletion, then deleted). The kernel then holds what
    a full load of B gives, but for what waits to be deleted (``stale``: hairpin and dispatch
    elements, flushed chains); once the periodic full sync has deleted those, exactly that."""
    node_a = replace(pair.flags_a, mode="nftables")
    node_b = replace(pair.flags_b, mode="nftables")
    a, b = nft_text(pair.a, node_a), nft_text(pair.b, node_b)
    steps = [("full", a)]
    waiting: list[tuple[str, str]] = []  # the periodic full sync's deletions
    stale: set[tuple[str, str, str]] = set()
    stale_chains: set[tuple[str, str]] = set()
    if node_a != node_b:
        steps.append(("full", b))
    else:
        loaded = loaded_of(pair.a, node_a)
        for documents in (pair.b, pair.a, pair.b):
            script, _ = change_to(loaded, documents, node_a)
            steps.append(("delta", script))
        stale, stale_chains = set(loaded.stale), set(loaded.stale_chains)
        deletions = loaded.delete_stale()
        waiting = [("delta", deletions)] if deletions else []
    event(f"{pair.how.split()[0]}: {len(steps) - 1} step(s), {len(stale_chains)} chains wait")
    with kernel.netns() as via_delta, kernel.netns() as fresh:
        run_in(via_delta, sys.executable, "-c", NFT_STEPS, stdin=json.dumps(steps))
        before = nft_canonical(via_delta)
        run_in(via_delta, sys.executable, "-c", NFT_STEPS, stdin=json.dumps(waiting))
        run_in(fresh, sys.executable, "-c", NFT_STEPS, stdin=json.dumps([("full", b)]))
        got, want = nft_canonical(via_delta), nft_canonical(fresh)
    assert got == want, pair.how
    # before the deletions: the hairpin elements and chains that waited, the latter empty
    hairpin = "set kpgen hairpin-endpoints"
    extra = set(before["objects"][hairpin].pop("elem", [])) - set(
        want["objects"][hairpin].get("elem", [])
    )
    waited = {json.dumps(_hairpin_json(e), sort_keys=True) for _, c, e in stale if "hairpin" in c}
    assert extra == waited
    for table, chain in stale_chains:
        assert f"chain {table.split()[1]} {chain}" in before["objects"]
        assert f"{table.split()[1]} {chain}" not in before["rules"]


def _hairpin_json(element: str) -> Any:
    """A hairpin element as libnftables lists it: ``{"concat": [address, address]}``."""
    return {"concat": element.split(" . ")}


@pytest.mark.kernel
@KERNEL_PROPERTY
@given(pair=cluster_pairs())
def test_iptables_full_a_then_change_to_b_equals_full_b_in_the_kernel(pair: Pair) -> None:
    plan_a, plan_b = render_pair(pair, IPT)
    # the first load carries the jumps; the change, as NodeRules makes it, does not touch them
    delta = ipt_change_of(plan_a, plan_b)
    event(f"{pair.how.split()[0]}: {'partial' if delta else 'empty'}")
    restore = ["iptables-restore", "-w", "5", "--noflush"]
    with kernel.netns() as via_delta, kernel.netns() as fresh:
        run_in(via_delta, *restore, stdin=render_plan(plan_a, IPT))
        if delta:
            run_in(via_delta, *restore, stdin=delta)
        run_in(fresh, *restore, stdin=render_plan(plan_b, IPT))
        got = ipt_canonical(kernel.iptables_save(via_delta))
        assert got == ipt_canonical(kernel.iptables_save(fresh)), pair.how
    assert set(parse_iptables(render_plan(plan_b, IPT))) <= set(got)


# RuleLoader inside a namespace: the rules of some documents loaded whole.
LOADER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from kpgen.dataplane.apply import RuleLoader
    from kpgen.core.node import NodeFlags, node_config
    from kpgen.core.parse import parse_documents
    from kpgen.core.plan import build_plans

    job = json.load(sys.stdin)
    node = node_config(NodeFlags(**job["flags"]))
    RuleLoader(node.mode).full(build_plans(parse_documents(job["documents"]).state, node))
    """
)


def load_whole(
    namespace: str, tmp_path: Path, mode: ProxyMode, documents: list[dict[str, Any]]
) -> None:
    script = tmp_path / "loader.py"
    script.write_text(LOADER_SCRIPT)
    flags = {"hostname": SEED_FLAGS.hostname, "cluster_cidrs": list(SEED_FLAGS.cluster_cidrs)}
    job = {"flags": {**flags, "mode": mode.value}, "documents": documents}
    run_in(namespace, sys.executable, str(script), stdin=json.dumps(job))


SEED_FLAGS = NodeFlags(hostname="k8s-worker01", cluster_cidrs=("192.168.0.0/16",))


def seed() -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = yaml.safe_load(SEED.read_text())["items"]
    return items


def seed_changed() -> list[dict[str, Any]]:
    """The seed with a third node-port endpoint, without external-ip, with a new service."""
    documents = without(seed(), "external-ip")
    slice_of(documents, "node-port-x8p2w")["endpoints"].append(
        {"addresses": ["192.168.70.7"], "conditions": {"ready": True}}
    )
    documents += [
        service("extra", cluster_ip="10.100.0.7", ports=[{"port": 53, "protocol": "UDP"}]),
        endpoint_slice(
            "extra-1",
            service_name="extra",
            endpoints=[endpoint("192.168.71.1")],
            ports=[{"port": 5353, "protocol": "UDP"}],
        ),
    ]
    return documents


def listing_of(mode: ProxyMode, namespace: str) -> Any:
    if mode is NFT:
        return nft_canonical(namespace)
    return ipt_canonical(kernel.iptables_save(namespace))


# The controller's nftables path inside a namespace: every object of A loaded whole, then B's
# changes as one transaction; prints the transaction and the listings.
NODE_RULES_SCRIPT = textwrap.dedent(
    """
    import json, subprocess, sys
    from kpgen.controller.rules import NodeRules
    from kpgen.core.node import NodeFlags, node_config
    from kpgen.dataplane.apply import RuleLoader

    job = json.load(sys.stdin)
    node = node_config(NodeFlags(**job["flags"]))

    def keyed(documents):
        return {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
                for d in documents}

    def listing():  # with handles: a rule written again gets a new one
        return subprocess.run(["nft", "-a", "list", "ruleset"], capture_output=True,
                              text=True, check=True).stdout

    rules, loader = NodeRules(node), RuleLoader(node.mode, "nft")
    a, b = keyed(job["a"]), keyed(job["b"])
    rules.update(a)
    rules.rebuild()
    rules.load(loader)
    before = listing()
    changes = rules.update({k: b.get(k) for k in a.keys() | b.keys() if a.get(k) != b.get(k)})
    written = rules.change(changes.services, loader)
    print(json.dumps({"written": written, "before": before, "after": listing(),
                      "intact": loader.changed_since_written() is None}))
    """
)


@pytest.mark.kernel
@pytest.mark.parametrize("mode", [NFT, IPT], ids=["nftables", "iptables"])
@pytest.mark.parametrize("b", ["same", "changed"])
def test_the_controllers_changes_give_the_rules_of_a_full_load(
    mode: ProxyMode, b: str, tmp_path: Path
) -> None:
    script = tmp_path / "rules.py"
    script.write_text(NODE_RULES_SCRIPT)
    flags = {"hostname": "k8s-worker01", "cluster_cidrs": ["192.168.0.0/16"], "mode": mode.value}
    after = seed() if b == "same" else seed_changed()
    job = {"flags": flags, "a": seed(), "b": after}
    with kernel.netns() as partial, kernel.netns() as full:
        out = json.loads(run_in(partial, sys.executable, str(script), stdin=json.dumps(job)))
        load_whole(full, tmp_path, mode, after)
        got, want = listing_of(mode, partial), listing_of(mode, full)
    assert out["intact"]  # the generation it wrote is the namespace's
    if b == "same":
        assert out["written"] == 0 and out["after"] == out["before"]
        return
    assert out["written"]
    if mode is NFT:
        assert "192.168.70.7" in out["after"]
    # external-ip is gone: the transaction deletes its elements, hairpins included
    assert got == want


def test_waiting_deletions_are_bounded_and_done_by_a_full_sync(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fewer = cluster()
    slice_of(fewer, "web-1")["endpoints"].pop()
    loaded = loaded_of(cluster())
    change_to(loaded, fewer)
    assert loaded.delete_stale() == (
        f"delete element {WHERE} hairpin-endpoints {{ 10.244.2.2 . 10.244.2.2 }}\n"
    )
    assert loaded.stale == set() and loaded.delete_stale() == ""
    monkeypatch.setattr("kpgen.render.delta.STALE_LIMIT", 0)
    loaded = loaded_of(cluster())
    script, _ = change_to(loaded, fewer)  # more wait than the limit: deleted at once
    assert f"delete element {WHERE} hairpin-endpoints {{ 10.244.2.2 . 10.244.2.2 }}" in script
    assert loaded.stale == set()
