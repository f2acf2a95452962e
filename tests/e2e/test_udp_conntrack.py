"""Stale UDP conntrack entries, with real datagrams through the seed article's cluster
(kpgen/lab/lab.py), in each proxy mode.

    test-pod 192.168.69.200 ── k8s-worker01 (kpgen run --source manifests:DIR) ── pod1
                                     └── k8s-worker02 ── pod2

``kpgen run`` on k8s-worker01 follows a directory of manifests; the tests change its files, as
an API server's changes would come. A client in test-pod sends a datagram to a UDP ClusterIP
every 50 ms from ONE source port, as DNS resolvers reuse theirs: that keeps one conntrack entry
alive on k8s-worker01, and every datagram follows that entry's NAT, not the rules. The pods
answer each datagram with their name. The tests change the service's endpoints and check that
the client is answered by the new endpoint within about one sync (the watcher reads the
directory every second, kpgen syncs 100 ms later), which only holds because kpgen deletes the
stale entry: without it the client keeps its old destination as long as it keeps sending.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import labs
import pytest
from lab_api import kpgen_run_argv

from kpgen.lab.lab import MODES, Lab
from kpgen.lab.podserver import POD_PYTHON
from kpgen.lab.topology import SEED_PODS

pytestmark = [pytest.mark.kernel, pytest.mark.e2e]

DATA = Path(__file__).resolve().parent / "data"
WORKER = "k8s-worker01"  # test-pod's node: its conntrack table holds the client's entry
CLIENT_POD = "test-pod"
REPLACE_IP, GAINS_IP, APPEARS_IP = "10.96.53.10", "10.96.53.11", "10.96.53.12"
DNS_PORT = 53
INTERVAL = 0.05  # seconds between the client's datagrams
FOLLOW = 3.0  # seconds: a change of the manifests shows in the client's answers within this
SETTLE = 10.0  # seconds: the longest wait for a state the test sets up

# A UDP client: from one source port, a datagram every INTERVAL until its stdin closes; one
# JSON line per datagram: when it was sent and the answer (the pod's name and the client
# address it saw), "timeout" or "refused" (ICMP port unreachable).
CLIENT = r"""
import json, socket, sys, threading, time
host, port, source_port, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", source_port))
s.connect((host, port))
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
while not done.is_set():
    s.setblocking(False)
    while True:  # an answer that came too late is not the next datagram's
        try:
            s.recv(512)
        except (BlockingIOError, ConnectionRefusedError):
            break
    s.settimeout(interval)
    sent = time.monotonic()
    try:
        s.send(b"query")
        answer = s.recv(512).decode().strip()
    except TimeoutError:
        answer = "timeout"
    except ConnectionRefusedError:
        answer = "refused"
    print(json.dumps({"t": sent, "answer": answer}), flush=True)
    done.wait(max(0.0, interval - (time.monotonic() - sent)))
"""  # noqa: E501

# One datagram from a fresh source port; prints the answer, "timeout" or "refused".
PROBE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.connect((sys.argv[1], int(sys.argv[2])))
s.settimeout(0.5)
try:
    s.send(b"probe")
    print(s.recv(512).decode().strip())
except TimeoutError:
    print("timeout")
except ConnectionRefusedError:
    print("refused")
"""


@dataclass
class Cluster:
    """The lab with ``kpgen run`` on k8s-worker01 following ``manifests``."""

    lab: Lab
    mode: str
    manifests: Path
    log_path: Path

    def put(self, name: str, data_file: str | None) -> float:
        """Make ``name``.yaml in the watched directory a copy of ``data_file`` (None: remove
        it), in one rename; returns when (time.monotonic())."""
        path = self.manifests / f"{name}.yaml"
        if data_file is None:
            path.unlink(missing_ok=True)
        else:
            temporary = self.manifests / f".{name}.tmp"  # not a manifest suffix: not read
            shutil.copyfile(DATA / data_file, temporary)
            os.replace(temporary, path)
        return time.monotonic()

    def probe(self, host: str) -> str:
        result = self.lab.exec_in(CLIENT_POD, [POD_PYTHON, "-c", PROBE, host, str(DNS_PORT)])
        assert result.returncode == 0, result.stderr
        return result.stdout.strip()

    def wait_probe(self, host: str, wanted: Callable[[str], bool], what: str) -> None:
        """Probe ``host`` from fresh source ports until ``wanted`` holds for an answer."""
        deadline = time.monotonic() + SETTLE
        answers = []
        while time.monotonic() < deadline:
            answers.append(self.probe(host))
            if wanted(answers[-1]):
                return
            time.sleep(0.1)
        raise AssertionError(f"{host}: never {what}; answers {answers[-5:]}\n{self.log()}")

    def entries(self, host: str, source_port: int) -> list[str]:
        """The reply sources of the UDP conntrack entries on k8s-worker01 from test-pod's
        ``source_port`` to ``host``: the endpoint its datagrams go to (``host`` itself when
        they are not DNATed)."""
        result = self.lab.exec_in(
            WORKER,
            ["conntrack", "-L", "-p", "udp", "--orig-dst", host, "--sport", str(source_port)],
        )
        assert result.returncode == 0, result.stderr
        return [re.findall(r"\bsrc=(\S+)", line)[1] for line in result.stdout.splitlines()]

    def log(self) -> str:
        return f"--- kpgen run ({self.mode}) ---\n{self.log_path.read_text()[-3000:]}"


@pytest.fixture(scope="module", params=MODES)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    """This module's own lab ("u": never the name of another module's lab) in one proxy mode,
    with ``kpgen run`` on k8s-worker01 following a directory that starts empty. Everything is
    stopped and removed afterwards, also when a test failed."""
    mode = request.param
    labs.remove_labs_of_dead_runs()
    lab = Lab(labs.prefix("u"))
    manifests = tmp_path_factory.mktemp(f"udp-manifests-{mode}")
    log_path = tmp_path_factory.mktemp(f"udp-logs-{mode}") / "kpgen-run.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        lab.up(mode)
        argv = kpgen_run_argv(WORKER, mode, "--source", f"manifests:{manifests}")
        with open(log_path, "wb") as log:
            process = lab.popen_in(
                WORKER,
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        instance = Cluster(lab, mode, manifests, log_path)
        deadline = time.monotonic() + SETTLE
        while "sync: full" not in log_path.read_text():
            assert process.poll() is None, f"kpgen run exited\n{instance.log()}"
            assert time.monotonic() < deadline, f"no first sync\n{instance.log()}"
            time.sleep(0.05)
        yield instance
    finally:
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: kpgen and nothing else
            process.wait()
        lab.down()
    leftovers = labs.namespaces(lab.prefix)
    assert not leftovers, f"lab down left namespaces behind: {leftovers}"


@dataclass
class Result:
    t: float
    answer: str

    @property
    def pod(self) -> str:
        """Who answered: a pod's name, or "timeout"/"refused"."""
        return self.answer.split()[0]


@dataclass
class UdpClient:
    """CLIENT in test-pod, from ``source_port`` to ``host``:53, collecting its results."""

    cluster: Cluster
    host: str
    source_port: int
    results: list[Result] = field(default_factory=list)
    _process: subprocess.Popen[str] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> UdpClient:
        argv = [POD_PYTHON, "-c", CLIENT, self.host, str(DNS_PORT), str(self.source_port)]
        self._process = self.cluster.lab.popen_in(
            CLIENT_POD,
            [*argv, str(INTERVAL)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        return self

    def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            data = json.loads(line)
            with self._lock:
                self.results.append(Result(data["t"], data["answer"]))

    def snapshot(self) -> list[Result]:
        with self._lock:
            return list(self.results)

    def wait(self, done: Callable[[list[Result]], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not done(self.snapshot()):
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.host} from port {self.source_port}: {what} did not happen within "
                    f"{timeout} s; answers: {summary(self.snapshot())}\n{self.cluster.log()}"
                )
            time.sleep(0.02)

    def __exit__(self, *exc_info: object) -> None:
        if self._process is None:
            return
        assert self._process.stdin is not None
        try:
            self._process.stdin.close()
            self._process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        time.sleep(0.05)  # the reader's last lines


def summary(results: list[Result]) -> str:
    """Who answered, run by run: ``pod1 x12, timeout x3, pod2 x20``."""
    runs: list[list[str | int]] = []
    for result in results:
        if runs and runs[-1][0] == result.pod:
            runs[-1][1] = int(runs[-1][1]) + 1
        else:
            runs.append([result.pod, 1])
    return ", ".join(f"{who} x{count}" for who, count in runs) or "none"


def answered_by(pod: str, count: int, since: float = 0.0) -> Callable[[list[Result]], bool]:
    """The last ``count`` results, all after ``since``, were answers of ``pod``."""

    def done(results: list[Result]) -> bool:
        last = results[-count:]
        return len(last) == count and all(r.pod == pod and r.t > since for r in last)

    return done


def assert_follows(client: UdpClient, changed: float, old: str, new: str) -> None:
    """Before the change at ``changed`` the client got ``old`` only; after it, it is answered
    by ``new`` within FOLLOW seconds, and only by it from then on."""
    client.wait(answered_by(new, 10, changed), FOLLOW + 2, f"answers from {new}")
    results = client.snapshot()
    earlier = {r.pod for r in results if r.t < changed}
    assert earlier == {old}, summary(results)
    later = [r for r in results if r.t > changed]
    first = next(i for i, r in enumerate(later) if r.pod == new)
    took = later[first].t - changed
    assert took < FOLLOW, (
        f"{new} answered {took:.2f} s after the change (wanted < {FOLLOW} s): the stale entry "
        f"stayed; answers: {summary(results)}\n{client.cluster.log()}"
    )
    assert {r.pod for r in later[first:]} == {new}, summary(results)
    assert all(r.pod in (old, "timeout", "refused") for r in later[:first]), summary(results)
    answer = later[-1].answer.split()
    assert answer[1] == SEED_PODS[2].address, answer  # not masqueraded: a pod


# --- the tests ----------------------------------------------------------------------------------


def test_a_client_keeping_its_port_follows_its_endpoint_replaced_within_a_sync(
    cluster: Cluster,
) -> None:
    cluster.put("replace", "udp-replace-pod1.yaml")
    cluster.wait_probe(REPLACE_IP, lambda a: a.startswith("pod1 "), "answered by pod1")
    with UdpClient(cluster, REPLACE_IP, 40001) as client:
        client.wait(answered_by("pod1", 5), SETTLE, "answers from pod1")
        # the entry the client's datagrams follow: DNATed to pod1
        assert cluster.entries(REPLACE_IP, 40001) == ["192.168.69.246"]
        changed = cluster.put("replace", "udp-replace-pod2.yaml")
        assert_follows(client, changed, "pod1", "pod2")
    assert cluster.entries(REPLACE_IP, 40001) == ["192.168.79.106"]


def test_a_client_rejected_by_a_service_without_endpoints_reaches_its_first_one_within_a_sync(
    cluster: Cluster,
) -> None:
    """kpgen's reject drops each datagram before its conntrack entry is confirmed, so none is
    left to stick (the entries that do stick are the next test's); this guards the change from
    rejecting to serving, which is where kube-proxy users met black holes."""
    cluster.put("gains", "udp-gains-none.yaml")
    cluster.wait_probe(GAINS_IP, lambda a: a == "refused", "refused")
    with UdpClient(cluster, GAINS_IP, 40002) as client:
        client.wait(answered_by("refused", 5), SETTLE, "ICMP port unreachable")
        assert cluster.entries(GAINS_IP, 40002) == []
        changed = cluster.put("gains", "udp-gains-pod2.yaml")
        assert_follows(client, changed, "refused", "pod2")


def test_a_client_that_sent_before_its_service_existed_reaches_it_within_a_sync(
    cluster: Cluster,
) -> None:
    """DNS clients that start before the proxy knows the service (a node booting, kube-proxy
    #48370): their datagrams leave un-NATed, and that entry would keep them so."""
    cluster.put("appears", None)
    with UdpClient(cluster, APPEARS_IP, 40003) as client:
        client.wait(answered_by("timeout", 5), SETTLE, "unanswered datagrams")
        assert cluster.entries(APPEARS_IP, 40003) == [APPEARS_IP]  # not DNATed
        changed = cluster.put("appears", "udp-appears-pod1.yaml")
        assert_follows(client, changed, "timeout", "pod1")
    assert cluster.entries(APPEARS_IP, 40003) == ["192.168.69.246"]
