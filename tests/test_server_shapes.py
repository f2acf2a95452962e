"""Generated objects as an API server writes them always parse, and mean what they meant.

A user writes ``ports: [{port: 80}]``; the API server stores and returns the same Service with
its defaults filled in and its metadata added, and the EndpointSlice controller writes the
unnamed port as ``name: ""``. This module takes the generated valid clusters of
test_property.py, rewrites each object the way the server would (``served``, below, after the
API's defaulting functions and the JSON encoder's omitempty rules), and checks that kpgen
parses the result without a word and renders exactly the rules of the original: defaulting
never changes what a Service means. The last tests keep validation strict about what no server
could write.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from test_property import QUICK, Cluster, clusters, node_flags, render_mode

from kpgen.core.node import NodeFlags
from kpgen.core.parse import parse_documents

Doc = dict[str, Any]
# omitempty fields a server leaves out, or a client that decodes into typed objects and back
# (the Python client's sanitize, client-go's json) may write as null: both must read the same.
ABSENT = st.sampled_from(["absent", "null"])


def _omitted(draw: st.DrawFn, target: Doc, key: str) -> None:
    """``key`` left out, or written as null."""
    if draw(ABSENT) == "null":
        target[key] = None
    else:
        target.pop(key, None)


def _metadata(draw: st.DrawFn, meta: Doc, index: int, kind: str) -> None:
    meta["uid"] = f"00000000-0000-4000-8000-{index:012d}"
    meta["resourceVersion"] = str(1000 + index)
    meta["creationTimestamp"] = "2026-01-01T00:00:00Z"
    meta["managedFields"] = [
        {
            "apiVersion": "v1" if kind == "Service" else "discovery.k8s.io/v1",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:labels": {".": {}}}, "f:spec": {}},
            "manager": "kubectl-client-side-apply"
            if kind == "Service"
            else "kube-controller-manager",
            "operation": "Update",
            "time": "2026-01-01T00:00:00Z",
        }
    ]
    if draw(st.booleans()):
        meta["annotations"] = {"kubectl.kubernetes.io/last-applied-configuration": "{}\n"}
    if kind == "EndpointSlice":
        meta["generateName"] = meta["labels"]["kubernetes.io/service-name"] + "-"
        meta["labels"]["endpointslice.kubernetes.io/managed-by"] = "endpointslice-controller.k8s.io"
        meta["ownerReferences"] = [
            {
                "apiVersion": "v1",
                "kind": "Service",
                "name": meta["labels"]["kubernetes.io/service-name"],
                "uid": "00000000-0000-4000-8000-000000000000",
                "blockOwnerDeletion": True,
                "controller": True,
            }
        ]


def _served_service(draw: st.DrawFn, doc: Doc) -> None:
    spec = doc["spec"]
    service_type = spec.setdefault("type", "ClusterIP")
    spec.setdefault("sessionAffinity", "None")
    cluster_ip = spec.get("clusterIP") or spec["clusterIPs"][0]
    spec["clusterIP"], spec["clusterIPs"] = cluster_ip, [cluster_ip]
    spec["ipFamilies"] = ["IPv4"]
    spec["ipFamilyPolicy"] = "SingleStack"
    spec["internalTrafficPolicy"] = "Cluster"
    if service_type != "ClusterIP":
        spec["externalTrafficPolicy"] = "Cluster"
    if service_type == "LoadBalancer":
        spec["allocateLoadBalancerNodePorts"] = True
    spec["selector"] = {"app": doc["metadata"]["name"]}
    for port in spec["ports"]:
        port.setdefault("protocol", "TCP")
        if "name" not in port and draw(st.booleans()):
            port["name"] = ""  # as a client that writes every field does
        if draw(st.booleans()):
            port["appProtocol"] = "http"
    status = doc.setdefault("status", {"loadBalancer": {}})
    ingress = status["loadBalancer"].get("ingress")
    if ingress:
        for entry in ingress:
            if "ip" in entry:
                entry["ipMode"] = "VIP"
        if draw(st.booleans()):
            ingress.append({})  # what some cloud controllers leave behind
    if draw(st.booleans()):
        spec["publishNotReadyAddresses"] = False
    for key in ("externalIPs", "loadBalancerSourceRanges", "sessionAffinityConfig"):
        if key not in spec:
            _omitted(draw, spec, key)


def _served_slice(draw: st.DrawFn, doc: Doc) -> None:
    for port in doc["ports"]:
        port.setdefault("name", "")  # the EndpointSlice controller's unnamed port
        port.setdefault("protocol", "TCP")
    if not doc["endpoints"]:
        doc["endpoints"] = None  # as the server writes an empty slice
    for index, endpoint in enumerate(doc["endpoints"] or ()):
        conditions = endpoint.setdefault("conditions", {})
        if "ready" in conditions:
            # the controller writes all three once it writes one
            conditions.setdefault("serving", conditions["ready"])
            conditions.setdefault("terminating", False)
        endpoint["targetRef"] = {
            "kind": "Pod",
            "namespace": doc["metadata"]["namespace"],
            "name": f"pod-{index}",
            "uid": f"00000000-0000-4000-9000-{index:012d}",
        }
        if draw(st.booleans()):
            endpoint["hostname"] = f"pod-{index}"  # a StatefulSet's pods
        if "nodeName" not in endpoint:
            _omitted(draw, endpoint, "nodeName")


@st.composite
def served(draw: st.DrawFn, cluster: Cluster) -> list[Doc]:
    """``cluster``'s objects as a server returns them (deep copies)."""
    documents = copy.deepcopy(cluster.documents)
    for index, doc in enumerate(documents):
        _metadata(draw, doc["metadata"], index, doc["kind"])
        if doc["kind"] == "Service":
            _served_service(draw, doc)
        else:
            _served_slice(draw, doc)
    return documents


@st.composite
def clusters_as_served(draw: st.DrawFn) -> tuple[Cluster, list[Doc]]:
    cluster = draw(clusters())
    return cluster, draw(served(cluster))


@QUICK
@given(clusters_as_served())
def test_server_written_objects_parse_without_a_word(pair: tuple[Cluster, list[Doc]]) -> None:
    cluster, documents = pair
    result = parse_documents(documents)
    assert [str(p) for p in result.problems] == []
    assert result.skipped == []
    assert len(result.state.services) == len(cluster.services)


@QUICK
@given(clusters_as_served(), node_flags())
def test_server_defaulting_does_not_change_the_rules(
    pair: tuple[Cluster, list[Doc]], flags: NodeFlags
) -> None:
    cluster, documents = pair
    for mode in ("nftables", "iptables"):
        assert render_mode(documents, flags, mode) == render_mode(cluster.documents, flags, mode)


# --- still strict about what no server writes ------------------------------------------------

# RFC 1123 label, as the API validates port names (written out here, not taken from kpgen)
LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
NOT_A_LABEL = st.one_of(
    st.text(min_size=1, max_size=70),
    st.text("abc-XYZ_.", min_size=1, max_size=8),
    st.just("a" * 64),
).filter(lambda s: not (LABEL.fullmatch(s) and len(s) <= 63))


@QUICK
@given(clusters_as_served(), NOT_A_LABEL, st.data())
def test_a_port_name_that_is_neither_empty_nor_a_label_is_a_problem(
    pair: tuple[Cluster, list[Doc]], name: str, data: st.DataObject
) -> None:
    _, documents = pair
    index = data.draw(st.integers(0, len(documents) - 1))
    doc = documents[index]
    ports = doc["spec"]["ports"] if doc["kind"] == "Service" else doc["ports"]
    if not ports:
        return
    ports[0]["name"] = name
    result = parse_documents(documents)
    meta = doc["metadata"]
    field = "spec.ports[0].name" if doc["kind"] == "Service" else "ports[0].name"
    assert [(p.ref, p.field) for p in result.problems] == [
        (f"{meta['namespace']}/{meta['name']}", field)
    ]
