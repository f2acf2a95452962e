"""What the fault tests share: the seed lab with an API server on k8s-master and ``kpgen run``
on k8s-worker01 with its /healthz and /metrics, a canary service whose changes show in the
traffic, and readers of kpgen's log, health and metrics.

    gateway 10.20.30.1 ──┬── k8s-worker01 10.20.30.11  kpgen run ── pod1 192.168.69.246
                         ├── k8s-worker02 10.20.30.12             ── pod2 192.168.79.106
                         └── k8s-master   10.20.30.10  the API server (tests/apiserver.py)

The client loops run from the gateway to worker01's NodePort 30001 (the seed's ``node-port``
service, never changed by a test: "unchanged services"). Changes go to ``canary`` (NodePort
30002), whose one endpoint is flipped between pod1 and pod2: which pod answers on 30002 says
whether kpgen has applied the change. Every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

E2E = Path(__file__).resolve().parent.parent / "e2e"
if str(E2E) not in sys.path:
    sys.path.insert(0, str(E2E))

import labs  # noqa: E402
from apiserver import ApiServer  # noqa: E402
from lab_api import (  # noqa: E402
    API_PORT,
    MASTER,
    KpgenRun,
    kpgen_rules,  # noqa: F401  (the fault tests' way to it)
    listen_in,
    node,
    seed_object,
    wait_until,
)
from traffic import curl  # noqa: E402

from kpgen.lab.lab import WORKERS, Lab  # noqa: E402
from kpgen.lab.topology import NODE_BY_NAME  # noqa: E402

Obj = dict[str, Any]
WORKER = "k8s-worker01"
NODE_PORT = 30001  # the stable service's
CANARY_PORT = 30002
HEALTHZ = "127.0.0.1:10256"
METRICS = "127.0.0.1:10249"
SYNC_PERIOD = 2.0  # seconds: /healthz fails when a sync has been owed for 2 x this
PATHS = {
    "Service": "/api/v1/services",
    "EndpointSlice": "/apis/discovery.k8s.io/v1/endpointslices",
    "Node": "/api/v1/nodes",
}

PODS = {
    "pod1": ("192.168.69.246", "k8s-worker01"),
    "pod2": ("192.168.79.106", "k8s-worker02"),
}


def endpoint(pod: str) -> Obj:
    address, node_name = PODS[pod]
    return {
        "addresses": [address],
        "conditions": {"ready": True, "serving": True, "terminating": False},
        "nodeName": node_name,
        "targetRef": {"kind": "Pod", "namespace": "default", "name": pod},
    }


def service_like_node_port(name: str, node_port: int, cluster_ip: str) -> list[Obj]:
    """A copy of the seed's node-port service and its slice under another name."""
    svc = seed_object("Service", "node-port")
    svc["metadata"] = {"name": name, "namespace": "default"}
    svc["spec"]["clusterIP"] = cluster_ip
    svc["spec"]["clusterIPs"] = [cluster_ip]
    svc["spec"]["ports"][0]["nodePort"] = node_port
    sl = seed_object("EndpointSlice", "node-port-x8p2w")
    sl["metadata"] = {
        "name": f"{name}-1",
        "namespace": "default",
        "labels": {"kubernetes.io/service-name": name},
    }
    sl["endpoints"] = [endpoint("pod1")]
    return [svc, sl]


BASE = [
    seed_object("Service", "kubernetes"),
    seed_object("EndpointSlice", "kubernetes"),
    *(node(name) for name in ("k8s-master", *WORKERS)),
    seed_object("Service", "node-port"),
    seed_object("EndpointSlice", "node-port-x8p2w"),
    *service_like_node_port("canary", CANARY_PORT, "10.101.179.201"),
]


# --- kpgen run, with its endpoints ------------------------------------------------------------


class Kpgen(KpgenRun):
    """``kpgen run`` on a worker with /healthz and /metrics on the worker's loopback, an
    environment of the test's choosing, and readers for both."""

    def __init__(
        self,
        lab: Lab,
        worker: str,
        kubeconfig: Path,
        mode: str,
        log: Path,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(
            lab,
            worker,
            kubeconfig,
            mode,
            log,
            "--sync-period", f"{SYNC_PERIOD:g}s",
            "--healthz-bind-address", HEALTHZ,
            "--metrics-bind-address", METRICS,
            *extra,
            env=env,
        )  # fmt: skip

    def restart(self) -> Kpgen:
        self.kill()
        return self.start()

    def kill9(self) -> None:
        assert self.process is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)

    def lines_since(self, mark: int) -> list[str]:
        """This run's log lines from character ``mark`` of :meth:`log` on."""
        return self.log()[mark:].splitlines()

    def http(self, address: str, path: str) -> tuple[int, str]:
        """GET from inside the worker: (status, body); status 0 when nothing answered."""
        result = self.lab.exec_in(
            self.worker,
            ["curl", "-s", "-m", "3", "-w", "\n@@%{http_code}", f"http://{address}{path}"],
            timeout=30,
        )
        body, _, code = result.stdout.rpartition("\n@@")
        return int(code or 0), body

    def healthz(self) -> int:
        return self.http(HEALTHZ, "/healthz")[0]

    def metrics(self) -> dict[str, float]:
        """/metrics as name{labels} -> value."""
        code, body = self.http(METRICS, "/metrics")
        assert code == 200, f"/metrics answered {code}"
        values = {}
        for line in body.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    def sync_failures(self) -> float:
        metrics = self.metrics()
        return sum(
            v
            for k, v in metrics.items()
            if re.fullmatch(r"kubeproxy_sync_proxy_rules_\w+_(sync|restore)_failures_total", k)
        )

    def last_sync(self) -> float:
        return self.metrics().get("kubeproxy_sync_proxy_rules_last_timestamp_seconds", 0.0)

    def wait_synced(self, timeout: float = 20) -> None:
        self.wait_for_log(r"sync: full", timeout=timeout)
        wait_until(f"/healthz of {self.worker} answers 200", lambda: self.healthz() == 200, timeout)


@dataclass
class HealthWatch:
    """/healthz asked every ``interval`` seconds in the background: (monotonic time, status)."""

    kpgen: Kpgen
    interval: float = 0.5
    answers: list[tuple[float, int]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> HealthWatch:
        def ask() -> None:
            while not self._stop.is_set():
                self.answers.append((time.monotonic(), self.kpgen.healthz()))
                self._stop.wait(self.interval)

        self._thread = threading.Thread(target=ask, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def codes(self) -> list[int]:
        return [code for _, code in self.answers]


# --- the cluster --------------------------------------------------------------------------------


@dataclass
class Cluster:
    lab: Lab
    server: ApiServer
    kubeconfig: Path
    logs: Path
    mode: str
    kpgens: list[Kpgen] = field(default_factory=list)

    def kpgen(self, *extra: str, env: dict[str, str] | None = None, name: str = "") -> Kpgen:
        """A new ``kpgen run`` on worker01 (not started), stopped at the module's end."""
        log = self.logs / f"{WORKER}{name}.log"
        instance = Kpgen(self.lab, WORKER, self.kubeconfig, self.mode, log, *extra, env=env)
        self.kpgens.append(instance)
        return instance

    def restart_server(self) -> None:
        """The API server again on the same address, with the same state (after stop())."""
        listener = listen_in(self.lab, MASTER, NODE_BY_NAME[MASTER].address, API_PORT)
        self.server.start(listener)

    def canary(self, pod: str) -> None:
        """Point the canary service at ``pod``."""
        self.server.patch("EndpointSlice", "default", "canary-1", {"endpoints": [endpoint(pod)]})

    def canary_answer(self) -> str:
        answer = curl(self.lab, "gateway", f"http://{WORKER}:{CANARY_PORT}/whoami", max_time=2)
        return answer.body.split()[0] if answer.exit_code == 0 and answer.body else ""

    def canary_pod(self, timeout: float = 10.0) -> str:
        """The pod that answers the canary now. A first request can go unanswered (kpgen just
        started): guessing "the other pod" from no answer would point the canary where it
        points already, a change that makes no event."""
        wait_until("the canary answers", lambda: self.canary_answer() != "", timeout)
        return self.canary_answer()

    def wait_canary(self, pod: str, timeout: float) -> float:
        """Until the canary's NodePort on worker01 is answered by ``pod``, three times in a
        row; the seconds until the first of them."""
        started = time.monotonic()
        streak, first = 0, 0.0
        while streak < 3:
            if self.canary_answer() == pod:
                first = first or time.monotonic() - started
                streak += 1
            else:
                streak, first = 0, 0.0
            if time.monotonic() - started > timeout:
                raise AssertionError(f"the canary is not answered by {pod} after {timeout}s")
        return first

    def flip_canary(self, timeout: float) -> float:
        """Move the canary to the other pod; the seconds until the traffic shows it."""
        new = "pod2" if self.canary_pod() == "pod1" else "pod1"
        self.canary(new)
        return self.wait_canary(new, timeout)


@contextlib.contextmanager
def lab_cluster(mode: str, logs: Path, letter: str, **server_options: Any) -> Iterator[Cluster]:
    """The seed lab in ``mode`` without kpgen apply's rules (only kpgen run's from here on),
    with the API server on k8s-master holding :data:`BASE`. Everything is removed afterwards,
    also when a test failed."""
    labs.remove_labs_of_dead_runs()
    lab = Lab(labs.prefix(letter))
    server: ApiServer | None = None
    cluster: Cluster | None = None
    try:
        lab.up(mode)
        for worker in WORKERS:
            cleanup = lab.exec_in(worker, [sys.executable, "-m", "kpgen", "cleanup"])
            assert cleanup.returncode == 0, cleanup.stderr
        listener = listen_in(lab, MASTER, NODE_BY_NAME[MASTER].address, API_PORT)
        server = ApiServer(**server_options).start(listener)
        server.set_objects(BASE)
        kubeconfig = server.kubeconfig(logs / "kubeconfig")
        cluster = Cluster(lab, server, kubeconfig, logs, mode)
        yield cluster
    finally:
        if cluster is not None:
            for kpgen in cluster.kpgens:
                kpgen.kill()
        errors = []
        if server is not None:
            server.stop()
            errors = server.errors
        lab.down()
    leftovers = labs.namespaces(lab.prefix)
    assert not leftovers, f"lab down left namespaces behind: {leftovers}"
    assert errors == [], errors
