"""``kpgen run --source manifests:DIR`` as a real process inside a throwaway network namespace:
the rules follow the directory's files, bad files are survived, /healthz and /metrics answer,
and SIGTERM ends it with the rules left in place."""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kernel
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "examples" / "seed-cluster.yaml"
HEALTHZ, METRICS = 10256, 10249
WAIT = 10.0
T = TypeVar("T")

pytestmark = pytest.mark.kernel


def eventually(probe: Callable[[], T | None], what: str, timeout: float = WAIT) -> T:
    """``probe()``'s first true value, polled until ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


# GET a URL from inside the namespace; prints {"code": ..., "body": ...}.
GET = textwrap.dedent(
    """
    import json, sys, urllib.error, urllib.request
    try:
        with urllib.request.urlopen(sys.argv[1], timeout=5) as response:
            code, body = response.status, response.read()
    except urllib.error.HTTPError as error:
        code, body = error.code, error.read()
    print(json.dumps({"code": code, "body": body.decode()}))
    """
)


@dataclass
class Running:
    namespace: str
    directory: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def ns(self, *argv: str) -> subprocess.CompletedProcess[str]:
        assert self.namespace.startswith(kernel.PREFIX)
        return subprocess.run(
            ["ip", "netns", "exec", self.namespace, *argv],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def table(self) -> str:
        """``nft list ruleset ip``: kpgen's tables, the namespace's only ones."""
        result = self.ns("nft", "list", "ruleset", "ip")
        return result.stdout if result.returncode == 0 else ""

    def get(self, port: int, path: str) -> tuple[int, str]:
        result = self.ns(sys.executable, "-c", GET, f"http://127.0.0.1:{port}{path}")
        assert result.returncode == 0, result.stderr
        answer: dict[str, Any] = json.loads(result.stdout)
        return answer["code"], answer["body"]

    def sync_lines(self) -> list[str]:
        return [line for line in self.log.splitlines() if " sync: " in line]

    def wait_synced(self, count: int = 1) -> list[str]:
        return eventually(lambda: len(self.sync_lines()) >= count and self.sync_lines(),
                          f"{count} sync lines in the log:\n{self.log}")  # fmt: skip


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """Starts ``kpgen run`` on a copy of the seed cluster in a fresh namespace."""
    started: list[tuple[Running, Any]] = []

    def run(*extra: str) -> Running:
        context = kernel.netns()
        namespace = context.__enter__()
        directory = tmp_path / "manifests"
        directory.mkdir()
        shutil.copy(SEED, directory / "seed.yaml")
        up = subprocess.run(["ip", "-n", namespace, "link", "set", "lo", "up"], check=False)
        assert up.returncode == 0
        log_path = tmp_path / "kpgen.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", namespace, sys.executable, "-m", "kpgen", "run",
                 "--source", f"manifests:{directory}",
                 "--hostname-override", "k8s-worker01", "--cluster-cidr", "192.168.0.0/16",
                 "--healthz-bind-address", f"127.0.0.1:{HEALTHZ}",
                 "--metrics-bind-address", f"127.0.0.1:{METRICS}",
                 "--min-sync-period", "100ms", *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
            )  # fmt: skip
        running = Running(namespace, directory, process, log_path)
        started.append((running, context))
        return running

    yield run
    for running, context in started:
        if running.process.poll() is None:
            running.process.kill()  # not SIGTERM: that can take a sync period (a known bug)
            running.process.wait(WAIT)
        context.__exit__(None, None, None)


def edit_seed(directory: Path, *addresses: str) -> None:
    """Add endpoints to the node-port service's slice in the manifest file."""
    path = directory / "seed.yaml"
    cluster = yaml.safe_load(path.read_text())
    slice_ = next(i for i in cluster["items"] if i["metadata"]["name"] == "node-port-x8p2w")
    slice_["endpoints"] += [{"addresses": [a], "conditions": {"ready": True}} for a in addresses]
    path.write_text(yaml.safe_dump(cluster))


def test_run_loads_the_seed_services_into_the_kernel(start: Callable[..., Running]) -> None:
    run = start()
    table = eventually(run.table, "the kpgen table")
    for chain in (
        "service-default/cluster-ip/tcp/8080",
        "external-default/external-ip/tcp/8080",
        "external-default/node-port/tcp/8080",
        "service-default/kubernetes/tcp/443",
    ):
        assert f"chain {chain} {{" in table
    assert "tcp . 30001 : goto external-default/node-port/tcp/8080" in table
    assert (
        run.wait_synced()[0]
        .split("kpgen.controller: ")[1]
        .startswith(
            "sync: full, 4 service and 4 endpoint changes, 4 service ports, wrote all rules"
        )
    )
    assert run.process.poll() is None


def test_editing_a_manifest_changes_the_rules_with_a_partial_sync(
    start: Callable[..., Running],
) -> None:
    run = start()
    run.wait_synced()
    edit_seed(run.directory, "192.168.70.7")
    eventually(lambda: "dnat to 192.168.70.7:80" in run.table(), "the new endpoint", 5.0)
    second = run.wait_synced(2)[1]
    assert "sync: partial, 0 service and 1 endpoint changes, 4 service ports, wrote " in second
    assert "wrote nothing" not in second and "wrote all rules" not in second
    assert "numgen random mod 3 0 meta l4proto tcp dnat to 192.168.69.246:80" in run.table()


def test_a_bad_manifest_keeps_the_last_good_rules_and_logs_an_error(
    start: Callable[..., Running],
) -> None:
    run = start()
    run.wait_synced()
    before = run.table()
    (run.directory / "broken.yaml").write_text("kind: Service\nmetadata: [unclosed\n")
    error = eventually(
        lambda: [ln for ln in run.log.splitlines() if " ERROR " in ln], "an error in the log"
    )[0]
    assert "broken.yaml" in error and "keeping the last good objects" in error
    edit_seed(run.directory, "192.168.70.7")  # not read while the directory is broken
    time.sleep(1.5)
    assert run.table() == before
    assert run.process.poll() is None
    (run.directory / "broken.yaml").unlink()  # repaired: the edit takes effect
    eventually(lambda: "dnat to 192.168.70.7:80" in run.table(), "the edit after the repair")


def test_healthz_and_metrics_answer_once_synced(start: Callable[..., Running]) -> None:
    run = start()
    run.wait_synced()
    code, body = run.get(HEALTHZ, "/healthz")
    assert code == 200
    status = json.loads(body)
    assert status["healthy"] is True and status["lastUpdated"] and status["currentTime"]
    assert run.get(HEALTHZ, "/livez")[0] == 200
    assert run.get(HEALTHZ, "/nothing")[0] == 404
    code, metrics = run.get(METRICS, "/metrics")
    assert code == 200
    assert "kubeproxy_sync_proxy_rules_duration_seconds_count 1.0" in metrics
    assert "kubeproxy_sync_full_proxy_rules_duration_seconds_count 1.0" in metrics
    assert 'kubeproxy_proxy_healthz_total{code="200"} 1.0' in metrics
    assert "kubeproxy_sync_proxy_rules_nftables_sync_failures_total 0.0" in metrics
    # the collector, off for the command's start (kpgen/__main__.py), runs again after the
    # first sync: at least the full collection that follows it
    full = r'python_gc_collections_total\{generation="2"\} (\d+)'
    eventually(
        lambda: float(re.findall(full, run.get(METRICS, "/metrics")[1])[0]) >= 1,
        "a full collection after the first sync",
    )


def test_sigterm_exits_0_and_leaves_the_rules_in_place(start: Callable[..., Running]) -> None:
    run = start("--sync-period", "1s")
    run.wait_synced()
    table = run.table()
    run.process.send_signal(signal.SIGTERM)
    assert run.process.wait(WAIT) == 0
    assert "exiting; the rules stay in place" in run.log
    assert run.table() == table


def test_sigterm_ends_kpgen_run_promptly(start: Callable[..., Running]) -> None:
    run = start()
    run.wait_synced()
    time.sleep(0.2)
    run.process.send_signal(signal.SIGTERM)
    assert run.process.wait(3) == 0  # raises TimeoutExpired while the bug is there
