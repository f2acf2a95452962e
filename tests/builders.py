"""Builders of API objects (as decoded manifests) shared by the unit tests.

Each builder returns a plain dict, spelled as the API spells it, that a test may change
before use. ``manifest`` turns such dicts into multi-document YAML text.
"""

from __future__ import annotations

import re
from typing import Any

import yaml

SERVICE_NAME_LABEL = "kubernetes.io/service-name"


def service(
    name: str,
    *,
    namespace: str = "default",
    cluster_ip: str | None = "10.96.0.10",
    ports: list[dict[str, Any]] | None = None,
    created: str | None = None,
    labels: dict[str, str] | None = None,
    status: dict[str, Any] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """A v1 Service; ``ports`` defaults to one unnamed TCP port 80. ``cluster_ip=None`` leaves
    spec.clusterIP out. Other keyword arguments are spec fields (``type="NodePort"``)."""
    metadata: dict[str, Any] = {"name": name, "namespace": namespace}
    if created is not None:
        metadata["creationTimestamp"] = created
    if labels is not None:
        metadata["labels"] = labels
    body: dict[str, Any] = {}
    if cluster_ip is not None:
        body["clusterIP"] = cluster_ip
    body["ports"] = [{"port": 80}] if ports is None else ports
    body.update(spec)
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": body,
    }
    if status is not None:
        doc["status"] = status
    return doc


def endpoint(address: str, **fields: Any) -> dict[str, Any]:
    """One entry of an EndpointSlice's endpoints (``conditions={"ready": True}``, ...)."""
    return {"addresses": [address], **fields}


def endpoint_slice(
    name: str,
    *,
    service_name: str | None,
    namespace: str = "default",
    address_type: str = "IPv4",
    ports: list[dict[str, Any]] | None = None,
    endpoints: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A discovery.k8s.io/v1 EndpointSlice of ``service_name`` (None: no service-name label);
    ``ports`` defaults to one unnamed TCP port 80."""
    labels = {} if service_name is None else {SERVICE_NAME_LABEL: service_name}
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "addressType": address_type,
        "ports": [{"port": 80}] if ports is None else ports,
        "endpoints": [] if endpoints is None else endpoints,
    }


def manifest(*docs: dict[str, Any]) -> str:
    """The documents as multi-document YAML, in the order given."""
    return yaml.safe_dump_all(list(docs), sort_keys=False)


def nft_elements(text: str, name: str) -> list[str]:
    """The element lines of the nft set or map ``name`` in rendered rules: of every table that
    has one (each of kpgen's shard tables has its own dispatch maps; rules without a served
    port have no shard table)."""
    blocks = re.findall(rf"\n\t(?:map|set) {name} {{\n(.*?)\n\t}}\n", text, re.S)
    found = []
    for block in blocks:
        elements = re.search(r"elements = \{\n(.*?)\n\t\t\}", block, re.S)
        found += [e.strip().rstrip(",") for e in elements.group(1).splitlines()] if elements else []
    return found
