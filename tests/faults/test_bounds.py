"""Bounds (docs/reliability.md): the trigger queue, paginated lists, HTTP servers that drop a
client that sends nothing, the conntrack tool's absence said at start, and a liveness probe
that waits out kpgen's own timeouts."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kernel
import pytest
import yaml
from apiserver import ApiServer

from kpgen.controller import health, healthcheck
from kpgen.controller.health import Health, Timing, health_server, metrics_server
from kpgen.controller.metrics import Metrics
from kpgen.dataplane.run import LOAD_TIMEOUT
from kpgen.inputs.api import (
    LIST_PAGE,
    MAX_TRIGGERS,
    NODE,
    SERVICE,
    SLICE,
    Informer,
    Store,
    api_client,
    api_lists,
)

pytestmark = [pytest.mark.faults]

ROOT = Path(__file__).resolve().parents[2]


def slice_doc(i: int) -> dict[str, Any]:
    return {
        "metadata": {"name": f"s{i}", "namespace": "default"},
        "endpoints": [{"addresses": [f"10.1.0.{i % 250}"]}],
    }


def test_the_trigger_queue_is_bounded_while_an_initial_list_never_completes() -> None:
    store = Store((SERVICE, SLICE, NODE))
    store.replace(SERVICE, [])
    store.replace(SLICE, [])  # the Node list never completes (403, say)
    for i in range(5 * MAX_TRIGGERS):
        store.apply(SLICE, "MODIFIED", {**slice_doc(i % 100), "generation": i})
    assert not store.synced
    changes = store.take()
    assert changes.endpoint_changes == 5 * MAX_TRIGGERS  # every change still counted
    assert len(changes.triggers) == MAX_TRIGGERS


def test_lists_are_paginated_with_limit_and_continue(tmp_path: Path) -> None:
    count = 2 * LIST_PAGE + 7
    with ApiServer(bookmark_interval=3600) as server:
        for i in range(count):
            server.create(
                {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {"name": f"s{i:04d}", "namespace": "default"},
                    "spec": {
                        "clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                        "ports": [{"port": 1}],
                    },
                }
            )
        api = api_client(str(server.kubeconfig(tmp_path / "kubeconfig")), None)
        store = Store((SERVICE,))
        stop = threading.Event()
        informer = Informer(store, SERVICE, api_lists(api, "n1")[SERVICE], stop)
        informer.start()
        try:
            assert store.wait(10, lambda: store.synced)
            pages = [r for r in server.requests if r.path == "/api/v1/services" and not r.watch]
            assert [r.query.get("limit") for r in pages] == [str(LIST_PAGE)] * 3
            assert "continue" not in pages[0].query
            assert all(r.query.get("continue") for r in pages[1:])
            assert store.count() == count
        finally:
            stop.set()
            deadline = time.monotonic() + 10
            while informer.is_alive() and time.monotonic() < deadline:
                server.drop_watches()  # also a watch opened after the first drop
                informer.join(0.2)
            api.close()
        assert not informer.is_alive()


@pytest.fixture
def short_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(health, "REQUEST_TIMEOUT", 0.5)
    monkeypatch.setattr(healthcheck, "REQUEST_TIMEOUT", 0.5)
    return 0.5


def silent_client_dropped_after(port: int) -> float:
    """Connect, send nothing: the seconds until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        started = time.monotonic()
        while connection.recv(1024):  # nothing (or an error page), then the server closes
            pass
        return time.monotonic() - started


def get(port: int, path: str) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(f"GET {path} HTTP/1.0\r\n\r\n".encode())
        chunks = []
        while chunk := connection.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_health_and_metrics_servers_drop_a_client_that_sends_nothing(short_timeout: float) -> None:
    metrics = Metrics("nftables")
    servers = [
        health_server(("127.0.0.1", 0), Health(Timing()), metrics),
        metrics_server(("127.0.0.1", 0), metrics),
    ]
    try:
        for server, path in zip(servers, ("/healthz", "/metrics"), strict=True):
            port = server.server_address[1]
            took = silent_client_dropped_after(port)
            assert took < short_timeout + 2, f"{path}: the silent client held on {took:.1f}s"
            assert get(port, path).startswith(b"HTTP/1.0 200"), path
        assert b"kubeproxy_sync_proxy_rules" in get(servers[1].server_address[1], "/metrics")
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()


def test_service_health_check_servers_drop_a_client_that_sends_nothing(
    short_timeout: float,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    checks = healthcheck.ServiceHealthChecks(host="127.0.0.1")
    check = healthcheck._Check(service=None, endpoints=1)  # type: ignore[arg-type]
    checks._start(port, check)
    try:
        assert check.server is not None
        took = silent_client_dropped_after(port)
        assert took < short_timeout + 2, f"the silent client held on {took:.1f}s"
    finally:
        if check.server is not None:
            check.server.shutdown()
            check.server.server_close()


@pytest.fixture
def ns() -> Iterator[str]:
    with kernel.netns() as name:
        yield name


@pytest.mark.kernel
def test_a_missing_conntrack_is_reported_at_start(ns: str, tmp_path: Path) -> None:
    conntrack = kernel.tool("conntrack")
    if conntrack is None:
        pytest.skip("conntrack is not installed here: nothing to hide")
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    # hidden by a bind mount in the mount namespace `ip netns exec` makes: never the host's
    script = f'mount --bind /dev/null {conntrack} && exec "$@"'
    log_path = tmp_path / "run.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            ["ip", "netns", "exec", ns, "sh", "-c", script, "sh",
             sys.executable, "-m", "kpgen", "run", "--source", f"manifests:{manifests}",
             "--hostname-override", "n1", "--healthz-bind-address", "",
             "--metrics-bind-address", ""],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while "conntrack is not installed" not in log_path.read_text():
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
    finally:
        process.kill()
        process.wait(10)
    line = next(ln for ln in log_path.read_text().splitlines() if "conntrack is not" in ln)
    assert "WARNING" in line and "conntrack package" in line, line
    assert subprocess.run([conntrack, "--version"], capture_output=True).returncode == 0


def test_the_liveness_probe_waits_out_kpgens_own_timeouts() -> None:
    """A slow full sync must not get kpgen restarted: /livez fails once a change has waited
    2 x --sync-period, and the probe restarts only after that plus the loader's own timeout
    (after which kpgen gives up on the load by itself, counts it and retries)."""
    docs = list(yaml.safe_load_all((ROOT / "deploy" / "kpgen.yaml").read_text()))
    daemonset = next(d for d in docs if d and d.get("kind") == "DaemonSet")
    container = daemonset["spec"]["template"]["spec"]["containers"][0]
    probe = container["livenessProbe"]
    assert probe["httpGet"]["path"] == "/livez"
    sync_period = 30  # the default --sync-period
    patience = probe["periodSeconds"] * probe["failureThreshold"]
    assert patience >= LOAD_TIMEOUT + 2 * sync_period, probe
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
