"""Partial syncs (kpgen.render.delta): what they write, and that the kernel ends up where a full
load of the new rules would have put it.

The unit tests read the delta text. The kernel tests load full(A) into a throwaway network
namespace, apply the delta to B there, and compare the result with a second namespace that
loaded full(B) directly; RuleLoader is also driven end to end inside a namespace.
"""

from __future__ import annotations

import copy
import json
import re
import sys
import textwrap
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

from kpgen.core.names import ipt_chain
from kpgen.core.node import NodeFlags, ProxyMode, node_config
from kpgen.core.parse import parse_documents
from kpgen.core.plan import FamilyPlan, build_plans
from kpgen.render.delta import iptables_delta, nft_delta, parse_iptables
from kpgen.render.text import render_plan

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "examples" / "seed-cluster.yaml"
NODE = NodeFlags(hostname="node-a", cluster_cidrs=("10.244.0.0/16",))
NFT, IPT = ProxyMode.NFTABLES, ProxyMode.IPTABLES
WHERE = "ip kpgen"


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
    return set(re.findall(r"(?:chain ip kpgen |\tchain )(\S+)", delta))


# --- nft_delta ----------------------------------------------------------------------------


def test_nft_delta_of_identical_renderings_is_empty() -> None:
    text = nft_text(cluster())
    assert nft_delta(text, text) == ""


@pytest.mark.parametrize(
    "changed",
    [
        NodeFlags(hostname="node-a"),  # --cluster-cidr removed: the set goes
        replace(NODE, service_cidrs=("10.96.0.0/12",)),  # --service-cidr added
        replace(NODE, nodeport_addresses=("10.20.30.0/24",)),  # --nodeport-addresses
    ],
    ids=["cluster-cidr-removed", "service-cidr-added", "nodeport-addresses-added"],
)
def test_nft_delta_asks_for_a_full_sync_when_a_node_setting_changes_the_head(
    changed: NodeFlags,
) -> None:
    old, new = nft_text(cluster()), nft_text(cluster(), changed)
    assert nft_delta(old, new) is None
    assert nft_delta(new, old) is None


def test_nft_delta_of_another_cluster_cidr_only_changes_the_set_elements() -> None:
    other = replace(NODE, cluster_cidrs=("10.244.0.0/16", "172.16.0.0/12"))
    delta = nft_delta(nft_text(cluster()), nft_text(cluster(), other))
    assert delta == f"add element {WHERE} cluster-cidrs {{ 172.16.0.0/12 }}\n"


def test_nft_delta_of_an_endpoint_change_rewrites_only_that_chain_and_its_elements() -> None:
    after = cluster()
    slice_of(after, "web-1")["endpoints"].append(endpoint("10.244.9.9"))
    delta = nft_delta(nft_text(cluster()), nft_text(after))
    assert delta is not None
    assert chains_named(delta) == {"service-default/web/tcp/80"}
    commands = [line for line in delta.splitlines() if not line.startswith("\t")]
    assert commands == [
        f"flush chain {WHERE} service-default/web/tcp/80",
        f"table {WHERE} {{",
        "}",
        f"add element {WHERE} hairpin-endpoints {{ 10.244.9.9 . 10.244.9.9 }}",
    ]
    assert "dnat to 10.244.9.9:80" in delta
    assert "db" not in delta and "api" not in delta


def test_nft_delta_of_a_removed_service_deletes_its_elements_then_flushes_then_deletes() -> None:
    delta = nft_delta(nft_text(cluster()), nft_text(without(cluster(), "web")))
    assert delta is not None
    lines = delta.splitlines()
    deletes = [i for i, ln in enumerate(lines) if ln.startswith("delete element")]
    flushes = [i for i, ln in enumerate(lines) if ln.startswith("flush chain")]
    chain_deletes = [i for i, ln in enumerate(lines) if ln.startswith("delete chain")]
    assert deletes and flushes and chain_deletes
    assert max(deletes) < min(flushes) <= max(flushes) < min(chain_deletes)
    gone = {"service-default/web/tcp/80", "external-default/web/tcp/80"}
    assert {ln.rsplit(" ", 1)[1] for ln in lines if ln.startswith("flush chain")} == gone
    assert {ln.rsplit(" ", 1)[1] for ln in lines if ln.startswith("delete chain")} == gone
    assert f"delete element {WHERE} service-ips {{ 10.96.0.10 . tcp . 80 }}" in lines
    assert f"delete element {WHERE} service-nodeports {{ tcp . 30080 }}" in lines
    hairpin = f"delete element {WHERE} hairpin-endpoints "
    assert hairpin + "{ 10.244.1.1 . 10.244.1.1, 10.244.2.2 . 10.244.2.2 }" in lines
    assert not any(ln.startswith("add ") for ln in lines)


def test_nft_delta_of_a_service_losing_its_endpoints_moves_its_keys_to_the_reject_maps() -> None:
    after = cluster()
    slice_of(after, "web-1")["endpoints"] = []
    delta = nft_delta(nft_text(cluster()), nft_text(after))
    assert delta is not None
    lines = delta.splitlines()
    assert f"delete chain {WHERE} service-default/web/tcp/80" in lines
    assert (
        f"add element {WHERE} no-endpoint-services {{ 10.96.0.10 . tcp . 80 : goto reject-chain }}"
        in lines
    )
    assert (
        f"add element {WHERE} no-endpoint-nodeports {{ tcp . 30080 : goto reject-chain }}" in lines
    )


# --- iptables_delta -----------------------------------------------------------------------


def _declared(delta: str) -> set[str]:
    return set(re.findall(r"^:(\S+) ", delta, re.M))


def test_iptables_delta_of_identical_renderings_is_empty() -> None:
    text = ipt_text(cluster())
    assert iptables_delta(text, text) == ""


def test_iptables_delta_rewrites_only_the_chains_whose_rules_changed() -> None:
    after = cluster()
    slice_of(after, "web-1")["endpoints"].append(endpoint("10.244.9.9"))
    plan = plan_of(after)
    web = next(p for p in plan.ports if p.key == "default/web/tcp/80")
    new_sep = next(
        ipt_chain("SEP", web, b) for b in web.endpoints if str(b.address) == "10.244.9.9"
    )
    delta = iptables_delta(ipt_text(cluster()), ipt_text(after))
    assert _declared(delta) == {ipt_chain("SVC", web), new_sep}
    appended = {line.split(" ", 2)[1] for line in delta.splitlines() if line.startswith("-A ")}
    assert appended == {ipt_chain("SVC", web), new_sep}
    assert "*filter" not in delta  # nothing changed there
    assert "-X" not in delta and "-I" not in delta
    # the rewritten chain carries all of its rules, in order: a 1/3, 1/2, rest cascade
    svc_rules = [ln for ln in delta.splitlines() if ln.startswith(f"-A {ipt_chain('SVC', web)} ")]
    assert [("probability" in ln) for ln in svc_rules[-3:]] == [True, True, False]


def test_iptables_delta_deletes_the_chains_of_a_removed_service() -> None:
    plan = plan_of(cluster())
    web = next(p for p in plan.ports if p.key == "default/web/tcp/80")
    gone = {ipt_chain("SVC", web), ipt_chain("EXT", web)}
    gone |= {ipt_chain("SEP", web, b) for b in web.endpoints}
    delta = iptables_delta(ipt_text(cluster()), ipt_text(without(cluster(), "web")))
    assert set(re.findall(r"^-X (\S+)$", delta, re.M)) == gone
    # declared (flushed) in the same input, and the chains that jumped to them rewritten
    assert _declared(delta) == gone | {"KPGEN-SERVICES", "KPGEN-NODEPORTS"}
    assert not any(f"-j {chain}" in delta for chain in gone)
    assert "*filter" not in delta


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
    """``nft -j list table ip kpgen`` without what a correct load may leave different: the
    objects' handles, the order of chains and sets, the order of set elements. Rule order
    within a chain is kept."""
    listing = json.loads(run_in(namespace, "nft", "-j", "list", "table", "ip", "kpgen"))
    table: dict[str, Any] = {}
    objects: dict[str, Any] = {}
    rules: dict[str, list[str]] = defaultdict(list)
    for item in listing["nftables"]:
        ((kind, body),) = item.items()
        body = {k: v for k, v in body.items() if k != "handle"}
        if kind == "table":
            table = body
        elif kind == "rule":
            rules[body["chain"]].append(json.dumps(body, sort_keys=True))
        elif kind in ("chain", "set", "map"):
            if "elem" in body:
                body["elem"] = sorted(json.dumps(e, sort_keys=True) for e in body["elem"])
            objects[f"{kind} {body['name']}"] = body
    return {"table": table, "objects": objects, "rules": dict(rules)}


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
def test_nft_full_a_then_delta_to_b_equals_full_b_in_the_kernel(pair: Pair) -> None:
    plan_a, plan_b = render_pair(pair, NFT)
    a, b = render_plan(plan_a, NFT), render_plan(plan_b, NFT)
    delta = nft_delta(a, b)
    event(f"{pair.how.split()[0]}: {'full' if delta is None else 'partial' if delta else 'empty'}")
    steps = [("full", a)]
    if delta is None:
        steps.append(("full", b))  # what RuleLoader does when the delta says so
    elif delta:
        steps.append(("delta", delta))
    with kernel.netns() as via_delta, kernel.netns() as fresh:
        run_in(via_delta, sys.executable, "-c", NFT_STEPS, stdin=json.dumps(steps))
        run_in(fresh, sys.executable, "-c", NFT_STEPS, stdin=json.dumps([("full", b)]))
        assert nft_canonical(via_delta) == nft_canonical(fresh), pair.how


@pytest.mark.kernel
@KERNEL_PROPERTY
@given(pair=cluster_pairs())
def test_iptables_full_a_then_delta_to_b_equals_full_b_in_the_kernel(pair: Pair) -> None:
    plan_a, plan_b = render_pair(pair, IPT)
    # as RuleLoader: the first load carries the jumps, the delta compares texts without them
    delta = iptables_delta(
        render_plan(plan_a, IPT, insert_jumps=()), render_plan(plan_b, IPT, insert_jumps=())
    )
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


# RuleLoader inside a namespace: full(A), then partial(B); prints what it saw as JSON.
LOADER_SCRIPT = textwrap.dedent(
    """
    import json, subprocess, sys
    from kpgen.dataplane.apply import RuleLoader
    from kpgen.core.node import NodeFlags, node_config
    from kpgen.core.parse import parse_documents
    from kpgen.core.plan import build_plans

    job = json.load(sys.stdin)

    def plans(documents, flags=job["flags"]):
        return build_plans(parse_documents(documents).state, node_config(NodeFlags(**flags)))

    def listing():  # with handles: a rule written again gets a new one
        return subprocess.run(["nft", "-a", "list", "ruleset"], capture_output=True,
                              text=True, check=True).stdout

    loader = RuleLoader(node_config(NodeFlags(**job["flags"])).mode)
    loader.full(plans(job["a"]))
    before = listing()
    written = None
    if job["b"] is not None:
        written = loader.partial(plans(job["b"], job.get("flags_b", job["flags"])))
    print(json.dumps({"written": written, "before": before, "after": listing()}))
    """
)


def run_loader(
    namespace: str,
    tmp_path: Path,
    mode: ProxyMode,
    a: list[dict[str, Any]],
    b: list[dict[str, Any]] | None,
    flags: NodeFlags,
    flags_b: NodeFlags | None = None,
) -> dict[str, Any]:
    script = tmp_path / "loader.py"
    script.write_text(LOADER_SCRIPT)

    def spelled(node: NodeFlags) -> dict[str, Any]:
        return {
            "hostname": node.hostname,
            "cluster_cidrs": list(node.cluster_cidrs),
            "mode": mode.value,
        }

    job = {"flags": spelled(flags), "flags_b": spelled(flags_b or flags), "a": a, "b": b}
    out: dict[str, Any] = json.loads(
        run_in(namespace, sys.executable, str(script), stdin=json.dumps(job))
    )
    return out


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


@pytest.mark.kernel
@pytest.mark.parametrize("mode", [NFT, IPT], ids=["nftables", "iptables"])
def test_rule_loader_partial_of_the_same_plans_writes_nothing(
    mode: ProxyMode, tmp_path: Path
) -> None:
    with kernel.netns() as namespace:
        out = run_loader(namespace, tmp_path, mode, seed(), seed(), SEED_FLAGS)
    assert out["written"] == 0
    assert "192.168.69.246" in out["before"]
    assert out["after"] == out["before"]  # handles included: not a rule was rewritten


@pytest.mark.kernel
@pytest.mark.parametrize("mode", [NFT, IPT], ids=["nftables", "iptables"])
def test_rule_loader_partial_gives_the_rules_of_a_full_load(
    mode: ProxyMode, tmp_path: Path
) -> None:
    with kernel.netns() as partial, kernel.netns() as full:
        out = run_loader(partial, tmp_path, mode, seed(), seed_changed(), SEED_FLAGS)
        run_loader(full, tmp_path, mode, seed_changed(), None, SEED_FLAGS)
        assert out["written"], "a change must write something"
        assert listing_of(mode, partial) == listing_of(mode, full)
        assert "192.168.70.7" in out["after"] and "10.98.225.181" not in out["after"]


@pytest.mark.kernel
@pytest.mark.parametrize("mode", [NFT, IPT], ids=["nftables", "iptables"])
def test_rule_loader_partial_after_a_node_setting_change(mode: ProxyMode, tmp_path: Path) -> None:
    """nftables declines (None: the caller loads in full) and writes nothing; iptables
    rewrites the chains in place."""
    no_cidr = NodeFlags(hostname="k8s-worker01")
    with kernel.netns() as namespace, kernel.netns() as full:
        out = run_loader(namespace, tmp_path, mode, seed(), seed(), SEED_FLAGS, no_cidr)
        if mode is NFT:
            assert out["written"] is None
            assert out["after"] == out["before"]
        else:
            run_loader(full, tmp_path, mode, seed(), None, no_cidr)
            assert out["written"]
            assert listing_of(mode, namespace) == listing_of(mode, full)


def test_rule_loader_partial_needs_a_full_load_first() -> None:
    from kpgen.dataplane.apply import RuleLoader

    assert RuleLoader(NFT).partial([plan_of(cluster())]) is None
    assert RuleLoader(IPT).partial([plan_of(cluster())]) is None
