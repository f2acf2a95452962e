"""The controller's incremental view of the cluster (kpgen.core.index): after any sequence of
changes, planning from the index gives exactly what planning all objects at once gives
(kpgen.core.plan.build_plans), conflicts between services included, and a change reports the
services it touched.
"""

from __future__ import annotations

import copy
from typing import Any

from builders import endpoint, endpoint_slice, service
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_property import clusters, node_flags

from kpgen.core.index import ClusterIndex, DocKey
from kpgen.core.model import ObjectRef
from kpgen.core.node import NodeFlags, node_config
from kpgen.core.parse import parse_documents
from kpgen.core.plan import build_plans, family_plan

Doc = dict[str, Any]


def key(doc: Doc) -> DocKey:
    meta = doc["metadata"]
    return (doc["kind"], meta.get("namespace") or "", meta["name"])


def plans_of(index: ClusterIndex) -> list[Any]:
    return [
        family_plan(index.node, f, index.all_port_plans(f), index.node_object)
        for f in index.families
    ]


@st.composite
def histories(draw: st.DrawFn) -> tuple[Any, list[dict[DocKey, Doc | None]]]:
    """Node flags, and a few steps of changes: documents of other drawn clusters written over
    the current ones (so services of two clusters meet and may claim the same NodePort or
    address), some deleted, and sometimes this node's Node object."""
    flags = draw(node_flags())
    current: dict[DocKey, Doc] = {}
    steps = []
    for _ in range(draw(st.integers(1, 4))):
        docs = draw(clusters(max_services=6)).documents
        step: dict[DocKey, Doc | None] = {}
        for doc in docs:
            if draw(st.booleans()) or not current:
                step[key(doc)] = copy.deepcopy(doc)
        for existing in list(current):
            if draw(st.integers(0, 4)) == 0:
                step[existing] = None
        if draw(st.integers(0, 3)) == 0:
            zone = draw(st.sampled_from(["zone-a", "zone-b"]))
            node = {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": flags.hostname,
                    "labels": {"topology.kubernetes.io/zone": zone},
                },
            }
            step[key(node)] = node
        for k, doc in step.items():
            if doc is None:
                current.pop(k, None)
            else:
                current[k] = doc
        steps.append(step)
    return flags, steps


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(history=histories())
def test_planning_from_the_index_equals_planning_everything(history: Any) -> None:
    flags, steps = history
    node = node_config(flags)
    index = ClusterIndex(node)
    current: dict[DocKey, Doc] = {}
    for step in steps:
        before = {ref: [plans for plans in _service_plans(index, ref)] for ref in index.services}
        changes = index.update(step)
        for k, doc in step.items():
            if doc is None:
                current.pop(k, None)
            else:
                current[k] = doc
        everything = build_plans(parse_documents(current.values()).state, node)
        assert plans_of(index) == list(everything)
        if not changes.node_wide:  # every service whose plans changed was reported
            for ref in {*before, *index.services}:
                if before.get(ref, []) != _service_plans(index, ref):
                    assert ref in changes.services, ref


def _service_plans(index: ClusterIndex, ref: ObjectRef) -> list[Any]:
    return [index.port_plans(ref, f) for f in index.families]


def test_the_older_of_two_services_claiming_one_node_port_wins_and_the_other_follows() -> None:
    node = node_config(NodeFlags(hostname="node-a"))
    older = service(
        "a", cluster_ip="10.96.0.1", type="NodePort", ports=[{"port": 80, "nodePort": 30001}]
    )
    older["metadata"]["creationTimestamp"] = "2020-01-01T00:00:00Z"
    newer = service(
        "b", cluster_ip="10.96.0.2", type="NodePort", ports=[{"port": 80, "nodePort": 30001}]
    )
    newer["metadata"]["creationTimestamp"] = "2021-01-01T00:00:00Z"
    slices = [
        endpoint_slice("a-1", service_name="a", endpoints=[endpoint("10.244.0.1")]),
        endpoint_slice("b-1", service_name="b", endpoints=[endpoint("10.244.0.2")]),
    ]
    index = ClusterIndex(node)
    changes = index.update({key(d): d for d in (older, newer, *slices)})
    assert set(index.services) == {ObjectRef("default", "a")}
    assert [str(p) for p in changes.problems] == [
        "default/b: spec.ports[0].nodePort: nodePort 30001/TCP is already used by default/a"
        " (Service skipped)"
    ]
    changes = index.update({key(older): None})  # a goes: b gets its NodePort
    assert set(index.services) == {ObjectRef("default", "b")}
    assert changes.services == {ObjectRef("default", "a"), ObjectRef("default", "b")}
    assert changes.problems == []
