"""Two cores, the same rules: what a forked child and kpgen make of half the services each is
the text one process makes of them all, with the same problems in the same order; and where
it could not be, kpgen makes the rules in one process instead (kpgen/cli/halves.py)."""

from __future__ import annotations

import copy
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kernel
import pytest
from builders import endpoint, endpoint_slice, service
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from test_property import QUICK, Cluster, clusters, conflicting_clusters, node_flags

import kpgen.cli.halves as halves
from kpgen.cli.halves import SPLIT_MIN_BYTES, render_halves
from kpgen.cli.main import main
from kpgen.core.names import nft_shard
from kpgen.core.node import NodeConfig, NodeFlags, node_config
from kpgen.core.parse import parse_documents
from kpgen.core.plan import build_plans
from kpgen.render.text import render

NODE = node_config(NodeFlags(hostname="node-a", cluster_cidrs=("10.244.0.0/16",)))

# documents that parse to a problem, a skip or an ignored kind, and a Node (both halves
# parse it; one reports it)
ODD_DOCUMENTS = [
    {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}},
    service("bad-port", ports=[{"port": 70000}]),
    service("external", cluster_ip=None, type="ExternalName", externalName="example.org"),
    endpoint_slice("orphan", service_name=None),
    {"apiVersion": "v1", "kind": "Service", "metadata": "not a mapping"},
    "not an object",
    {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "z1"}},
        "status": {"addresses": [{"type": "InternalIP", "address": "10.20.30.11"}]},
    },
    {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "BAD NAME"}},
]


def whole(documents: list[Any], node: NodeConfig) -> tuple[str, list[str], list[str], dict]:
    result = parse_documents(documents)
    return (
        render(result.state, node),
        [str(p) for p in result.problems],
        [str(s) for s in result.skipped],
        dict(result.ignored),
    )


def split(documents: list[Any], node: NodeConfig) -> halves.Rendered | None:
    rendered, returned = render_halves(lambda: documents, node, many=True)
    assert returned == documents
    return rendered


def assert_same(rendered: halves.Rendered | None, documents: list[Any], node: NodeConfig) -> None:
    assert rendered is not None, "the documents were not split"
    text, problems, skipped, ignored = whole(documents, node)
    assert rendered.text == text
    assert [str(p) for p in rendered.result.problems] == problems
    assert [str(s) for s in rendered.result.skipped] == skipped
    assert dict(rendered.result.ignored) == ignored
    plans = build_plans(parse_documents(documents).state, node)
    assert [p.family for p in rendered.plans] == [p.family for p in plans]
    assert rendered.ports == sum(len(p.ports) for p in plans)


def cluster_of(count: int, first: int = 0) -> list[dict[str, Any]]:
    """``count`` services in three namespaces, each with an EndpointSlice of two endpoints
    (none for every fifth: its port is rejected), every third a NodePort."""
    documents = []
    for i in range(first, first + count):
        name, namespace = f"svc-{i}", f"ns-{i % 3}"
        extra = {"type": "NodePort"} if i % 3 == 0 else {}
        ports = [{"port": 80, "nodePort": 30000 + i}] if extra else None
        documents.append(
            service(
                name, namespace=namespace, cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}",
                ports=ports, **extra,
            )
        )  # fmt: skip
        addresses = [] if i % 5 == 4 else [f"10.244.{i // 250}.{i % 250 + 1}", "10.244.250.1"]
        endpoints = [endpoint(a, conditions={"ready": True}, nodeName="node-a") for a in addresses]
        documents.append(
            endpoint_slice(f"{name}-x", service_name=name, namespace=namespace, endpoints=endpoints)
        )
    return documents


@pytest.fixture(autouse=True)
def _one_thread() -> None:
    # kpgen splits only in a process with no other thread (a lock held in another thread
    # would stay held in the child): no test may have left one running
    assert threading.active_count() == 1, threading.enumerate()


# --- The halves are the whole ------------------------------------------------------------


@QUICK
@given(
    clusters(max_services=25),
    node_flags(),
    st.lists(st.sampled_from(range(len(ODD_DOCUMENTS))), max_size=6),
    st.randoms(use_true_random=False),
)
def test_the_halves_of_a_generated_cluster_are_its_whole_rules(
    cluster: Cluster, flags: NodeFlags, odd: list[int], rnd: random.Random
) -> None:
    documents = list(cluster.documents)
    for index in odd:  # odd documents in odd places: notes come in document order
        documents.insert(rnd.randrange(len(documents) + 1), copy.deepcopy(ODD_DOCUMENTS[index]))
    node = node_config(flags)
    assert_same(split(documents, node), documents, node)


def test_each_half_holds_services_of_both_shard_parities_and_the_whole_has_all() -> None:
    documents = cluster_of(60) + ODD_DOCUMENTS
    mine, theirs, shared = halves.split(documents)
    services = [d for d in cluster_of(60) if d["kind"] == "Service"]
    refs = [f"{d['metadata']['namespace']}/{d['metadata']['name']}" for d in services]
    assert {nft_shard(ref) & 1 for ref in refs} == {0, 1}
    assert set(mine) & set(theirs) == set(shared) == {len(documents) - 2, len(documents) - 1}
    assert set(mine) | set(theirs) == set(range(len(documents)))
    assert_same(split(documents, NODE), documents, NODE)


def test_a_family_only_one_half_has_is_rendered_with_the_node_wide_settings() -> None:
    documents = cluster_of(20)
    v6 = service("only-v6", namespace="ns-6", cluster_ip="fd00:10:96::10", ipFamilies=["IPv6"])
    v6_slice = endpoint_slice(
        "only-v6-x", service_name="only-v6", namespace="ns-6", address_type="IPv6",
        endpoints=[endpoint("fd00:10:244::5", conditions={"ready": True})],
    )  # fmt: skip
    documents += [v6, v6_slice]
    rendered = split(documents, NODE)
    assert_same(rendered, documents, NODE)
    assert rendered is not None and len(rendered.tables) == 2


@settings(max_examples=30, deadline=None)
@given(conflicting_clusters())
def test_services_that_claim_one_address_are_rendered_in_one_process(cluster: Cluster) -> None:
    # which service keeps the address depends on both: neither half may decide it
    assert parse_documents(cluster.documents).problems
    assert split(cluster.documents, NODE) is None


def test_two_endpoint_slices_of_one_name_in_both_halves_are_rendered_in_one_process() -> None:
    documents = cluster_of(40)
    parity = {nft_shard(f"ns-0/svc-{i}") & 1: f"svc-{i}" for i in range(0, 40, 3)}
    assert len(parity) == 2  # a service of ns-0 in each half
    for name in parity.values():  # one slice name, two services: the later slice wins
        documents.append(
            endpoint_slice("same-name", service_name=name, namespace="ns-0",
                           endpoints=[endpoint("10.244.99.1")])
        )  # fmt: skip
    assert split(documents, NODE) is None
    assert split(documents[:-1], NODE) is not None


# --- Where splitting would not give the whole --------------------------------------------


def test_a_child_that_fails_leaves_the_rules_to_one_process_and_no_child_behind() -> None:
    documents = cluster_of(30)
    parent = os.getpid()

    def load() -> list[Any]:
        if os.getpid() != parent:
            raise RuntimeError("the child fails")
        return documents

    rendered, returned = render_halves(load, NODE, many=True)
    assert rendered is None and returned == documents
    with pytest.raises(ChildProcessError):
        os.waitpid(-1, os.WNOHANG)  # no child left, not even a zombie


def test_a_fork_the_system_refuses_leaves_the_rules_to_one_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    documents = cluster_of(30)

    def refused() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    monkeypatch.setattr(os, "fork", refused)
    assert render_halves(lambda: documents, NODE, many=True) == (None, documents)


def test_a_port_in_the_other_halfs_shard_tables_leaves_the_rules_to_one_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    documents = cluster_of(30)
    right = halves.split

    def swapped(documents: list[Any]) -> tuple[list[int], list[int], frozenset[int]]:
        mine, theirs, shared = right(documents)
        return theirs, mine, shared

    monkeypatch.setattr(halves, "split", swapped)
    assert split(documents, NODE) is None


def test_few_documents_another_thread_or_iptables_mode_are_not_split() -> None:
    documents = cluster_of(10)
    assert render_halves(lambda: documents, NODE, many=False) == (None, documents)
    iptables = node_config(NodeFlags(hostname="node-a", mode="iptables"))
    assert render_halves(lambda: documents, iptables, many=True) == (None, documents)
    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    try:
        assert render_halves(lambda: documents, NODE, many=True) == (None, documents)
    finally:
        stop.set()
        worker.join()


# --- The commands ------------------------------------------------------------------------


@pytest.fixture
def large(tmp_path: Path) -> Iterator[Path]:
    """A manifest file large enough to be split: services with problems among them."""
    documents: list[Any] = cluster_of(2500)
    documents[100:100] = ODD_DOCUMENTS
    path = tmp_path / "large.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": documents}))
    assert path.stat().st_size >= SPLIT_MIN_BYTES
    yield path


def test_render_of_a_large_manifest_prints_the_whole_rules_and_problems(large: Path) -> None:
    args = ["render", "-f", str(large), "--hostname-override", "node-a"]
    args += ["--cluster-cidr", "10.244.0.0/16"]
    done = CliRunner().invoke(main, args)
    assert done.exit_code == 0, done.output
    documents = json.loads(large.read_text())["items"]
    text, problems, _, ignored = whole(documents, NODE)
    assert done.stdout == text
    assert done.stderr.splitlines() == [f"kpgen: warning: {p}" for p in problems] + [
        f"kpgen: note: ignored {n} object(s) of kind {k}" for k, n in sorted(ignored.items())
    ]


@kernel.kernel
def test_apply_of_a_large_manifest_loads_what_render_prints(large: Path) -> None:
    flags = ["--hostname-override", "node-a", "--cluster-cidr", "10.244.0.0/16"]
    printed = subprocess.run(
        [sys.executable, "-m", "kpgen", "render", "-f", str(large), *flags],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    rulesets = []
    for load in (["kpgen", "apply", "-f", str(large), *flags], ["nft", "-f", "-"]):
        with kernel.netns() as ns:
            argv = [sys.executable, "-m", *load] if load[0] == "kpgen" else load
            done = subprocess.run(
                ["ip", "netns", "exec", ns, *argv], input=printed, capture_output=True,
                text=True, check=False, timeout=120,
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            if load[0] == "kpgen":
                assert "loaded rules for 2500 service ports" in done.stderr
            listed = subprocess.run(
                ["ip", "netns", "exec", ns, "nft", "list", "ruleset"],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            rulesets.append(listed.stdout)
    assert rulesets[0] == rulesets[1]
