"""Hostile input, fuzzed with hypothesis over raw decoded documents (docs/reliability.md).

A valid generated cluster (tests/test_property.py's strategies) has 1-3 of its documents
damaged: any JSON value in any field (huge numbers, NaN, huge strings, control characters,
deep nesting, lists for objects and objects for lists), whole objects replaced. Then:

- parsing never raises: every damaged object is either still valid, or named in a problem, a
  skip or the ignored kinds; the undamaged services are all served (or named: a conflict);
- rendering never raises, and the kernel accepts what it renders (``nft -c`` and a real
  ``iptables-restore`` in throwaway namespaces, for a sample of the examples);
- YAML that a server never writes but a file may hold (duplicate keys, anchors and merge keys,
  alias bombs, deep nesting) is read or refused with one InputError, never a traceback.
"""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any

import kernel
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_property import Cluster, NodeFlags, clusters, node_config, node_flags

from kpgen.core.fields import printable
from kpgen.core.parse import Problem, Skipped, parse_documents
from kpgen.core.plan import build_plans
from kpgen.inputs.manifests import InputError, load_documents
from kpgen.render.text import render

pytestmark = [pytest.mark.faults]

FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
KERNEL_SAMPLE = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(["", "0", "-1", "65536", "1.1.1.1", "::1", "10.0.0.0/8", "TCP", "a" * 300]),
    st.just("x" * 100_000),  # huge strings
    st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=10).map(
        lambda s: f"ok\n\t\x00{s}\u202e"
    ),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)


def deep(depth: int) -> Any:
    value: Any = "bottom"
    for i in range(depth):
        value = [value] if i % 2 else {"a": value}
    return value


hostile = st.one_of(json_values, st.integers(50, 400).map(deep))


def paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a decoded document: dict keys and list indexes."""
    found = [prefix]
    if isinstance(value, dict):
        for key, item in value.items():
            found += paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += paths(item, (*prefix, index))
    return found


def put(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    target = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = value
    return doc


@st.composite
def damaged(draw: st.DrawFn) -> tuple[list[Any], set[int], Cluster]:
    cluster = draw(clusters(max_services=8))
    documents = copy.deepcopy(cluster.documents)
    hits = draw(st.sets(st.integers(0, len(documents) - 1), min_size=1, max_size=3))
    for index in hits:
        for _ in range(draw(st.integers(1, 3))):
            where = draw(st.sampled_from(paths(documents[index])))
            documents[index] = put(documents[index], where, draw(hostile))
    return documents, hits, cluster


def ref_of(doc: Any) -> str | None:
    meta = doc.get("metadata") if isinstance(doc, dict) else None
    if not isinstance(meta, dict):
        return None
    name, namespace = meta.get("name"), meta.get("namespace") or "default"
    return f"{namespace}/{name}" if isinstance(name, str) and isinstance(namespace, str) else None


def check(documents: list[Any], hits: set[int], flags: NodeFlags) -> dict[str, str]:
    result = parse_documents(documents)  # never raises: a traceback fails the test
    named = {p.ref for p in result.problems} | {s.ref for s in result.skipped}
    served = {str(s.ref) for s in result.state.services}
    for index, doc in enumerate(documents):
        is_service = isinstance(doc, dict) and doc.get("kind") == "Service"
        ref = ref_of(doc)
        # messages name an object as they can show it: cut short, control characters escaped
        shown = printable(ref) if ref is not None else None
        if index not in hits and is_service:  # the rest is served (or named: a conflict)
            assert ref in served or shown in named, (ref, [str(p) for p in result.problems])
        if index in hits and is_service and ref is not None and ref not in served:
            # a damaged service that is not served is named (or ignored: its apiVersion)
            assert shown in named or result.ignored, (ref, [str(p) for p in result.problems])
    for problem in result.problems:
        assert isinstance(problem, Problem) and "\n" not in str(problem), str(problem)
        assert len(str(problem)) < 2000, str(problem)[:200]
    for skip in result.skipped:
        assert isinstance(skip, Skipped) and "\n" not in str(skip)
    texts = {}
    for mode in ("nftables", "iptables"):
        config = node_config(flags.__class__(**{**flags.__dict__, "mode": mode}))
        build_plans(result.state, config)
        texts[mode] = render(result.state, config)
    return texts


@FUZZ
@given(case=damaged(), flags=node_flags())
def test_damaged_documents_are_named_and_skipped_and_the_rest_is_served(
    case: tuple[list[Any], set[int], Cluster], flags: NodeFlags
) -> None:
    documents, hits, _ = case
    check(documents, hits, flags)


@pytest.mark.kernel
@KERNEL_SAMPLE
@given(case=damaged(), flags=node_flags())
def test_the_kernel_accepts_what_damaged_input_renders(
    case: tuple[list[Any], set[int], Cluster], flags: NodeFlags, check_namespace: str
) -> None:
    documents, hits, _ = case
    texts = check(documents, hits, flags)
    ok, stderr = kernel.nft_check(texts["nftables"], check_namespace)
    assert ok, f"nft -c refused:\n{stderr}"
    ok, stderr = kernel.iptables_load(texts["iptables"])
    assert ok, f"iptables-restore refused:\n{stderr}"


def test_whole_documents_of_any_json_type_are_ignored_or_named() -> None:
    for doc in [None, 1, "x", [], [1], math.nan, {"kind": None}, {"kind": "Service"},
                {"kind": "Service", "apiVersion": "v1", "metadata": []},
                {"kind": "Service", "apiVersion": "v1", "metadata": {"name": {"a": 1}}},
                {"kind": "EndpointSlice", "apiVersion": "discovery.k8s.io/v1", "endpoints": 7},
                {"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n"}, "status": "x"},
                {"kind": "Service", "apiVersion": "v1", "metadata": {"name": "a"},
                 "spec": deep(900)}]:  # fmt: skip
        result = parse_documents([doc])
        assert not result.state.services


YAML_CASES = {
    "duplicate keys": "apiVersion: v1\nkind: Service\nkind: Service\nmetadata: {name: a}\n"
    "spec: {clusterIP: 10.0.0.1, ports: [{port: 80}], ports: [{port: 81}]}\n",
    "anchors and merge keys": "base: &b {port: 80, protocol: TCP}\n---\napiVersion: v1\n"
    "kind: Service\nmetadata: {name: a}\nspec:\n  clusterIP: 10.0.0.1\n  ports:\n"
    "  - <<: *b\n    name: web\n",
    "a merge key of a scalar": "apiVersion: v1\nkind: Service\nmetadata: {name: a, <<: 3}\n",
    "an unknown alias": "apiVersion: v1\nkind: Service\nmetadata: *nothing\n",
    "alias bomb": "a: &a [x, x, x, x, x, x, x, x, x, x]\n"
    + "".join(
        f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    ),
    "deep nesting": "apiVersion: v1\nkind: Service\nmetadata: " + "[" * 5000 + "]" * 5000,
    "deep JSON": "[" * 100_000 + "]" * 100_000,
    "a huge key": "apiVersion: v1\nkind: Service\n" + "k" * 200_000 + ": 1\n",
    "tabs and NULs": "apiVersion: v1\n\tkind: Service\x00\n",
}


@pytest.mark.parametrize("name", sorted(YAML_CASES))
def test_hostile_yaml_is_read_or_refused_in_one_line(name: str, tmp_path: Path) -> None:
    path = tmp_path / "hostile.yaml"
    path.write_text(YAML_CASES[name])
    started = time.monotonic()
    try:
        documents = load_documents([str(path)])
    except InputError as error:
        assert "\n" not in str(error) and len(str(error)) < 2000, str(error)[:300]
        documents = []
    assert time.monotonic() - started < 10, "reading it took too long"
    parse_documents(documents)  # and parsing what was read never raises
