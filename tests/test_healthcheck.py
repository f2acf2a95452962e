"""kube-proxy's service health checks (healthCheckNodePort) as kpgen run serves them."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpgen.controller.healthcheck import ServiceHealthChecks, wanted_checks
from kpgen.core.model import ObjectRef
from kpgen.core.node import NodeFlags, node_config
from kpgen.core.parse import parse_documents
from kpgen.core.plan import FamilyPlan, build_plans
from kpgen.inputs.manifests import load_documents

POLICIES = Path(__file__).resolve().parent / "golden" / "cases" / "policies.yaml"


def plans_for(hostname: str) -> tuple[FamilyPlan, ...]:
    state = parse_documents(load_documents([str(POLICIES)])).state
    return build_plans(state, node_config(NodeFlags(hostname=hostname)))


def etp_local() -> ObjectRef:
    return next(p.service for p in plans_for("node-a")[0].ports if p.service.name == "etp-local")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(port: int) -> tuple[int, dict[str, object], str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
            weight = answer.headers["X-Load-Balancing-Endpoint-Weight"]
            return answer.status, json.loads(answer.read()), weight
    except urllib.error.HTTPError as error:
        weight = error.headers["X-Load-Balancing-Endpoint-Weight"]
        return error.code, json.loads(error.read()), weight


@pytest.fixture
def checks() -> Iterator[ServiceHealthChecks]:
    served = ServiceHealthChecks(host="127.0.0.1")
    yield served
    served.close()


def test_only_external_traffic_policy_local_services_with_a_port_are_checked() -> None:
    wanted = wanted_checks(plans_for("node-a"))
    assert {port: (str(svc), n) for port, (svc, n) in wanted.items()} == {
        31001: ("default/etp-local", 1)
    }
    elsewhere = wanted_checks(plans_for("node-b"))
    assert {port: n for port, (_, n) in elsewhere.items()} == {31001: 1}
    assert {port: n for port, (_, n) in wanted_checks(plans_for("node-z")).items()} == {31001: 0}


def test_a_node_with_local_endpoints_answers_200_with_their_count(
    checks: ServiceHealthChecks, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    monkeypatch.setattr(
        "kpgen.controller.healthcheck.wanted_checks",
        lambda plans: {port: (etp_local(), 2)},
    )
    checks.update(())
    status, body, weight = get(port)
    assert status == 200
    assert body == {
        "service": {"namespace": "default", "name": "etp-local"},
        "localEndpoints": 2,
        "serviceProxyHealthy": True,
    }
    assert weight == "2"


def test_no_local_endpoint_answers_503_and_a_removed_service_stops_answering(
    checks: ServiceHealthChecks, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    service = etp_local()
    wanted = {port: (service, 0)}
    monkeypatch.setattr("kpgen.controller.healthcheck.wanted_checks", lambda plans: dict(wanted))
    checks.update(())
    status, body, weight = get(port)
    assert (status, body["localEndpoints"], weight) == (503, 0, "0")
    wanted[port] = (service, 1)
    checks.update(())
    assert get(port)[0] == 200
    wanted.clear()
    checks.update(())
    with pytest.raises(urllib.error.URLError):
        get(port)


def test_an_unhealthy_proxy_answers_503_even_with_local_endpoints(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    service = etp_local()
    monkeypatch.setattr(
        "kpgen.controller.healthcheck.wanted_checks", lambda plans: {port: (service, 3)}
    )
    checks = ServiceHealthChecks(host="127.0.0.1", proxy_healthy=lambda: False)
    try:
        checks.update(())
        status, body, _ = get(port)
        assert status == 503
        assert body["serviceProxyHealthy"] is False
    finally:
        checks.close()
