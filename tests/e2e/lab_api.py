"""An API server on the lab's k8s-master, and ``kpgen run`` on its workers, for the
end-to-end tests of the controller (test_run_api.py).

The test API server (tests/apiserver.py) runs in the test process, so that a test changes its
objects and injects faults by calling it, but it listens on a socket made inside k8s-master's
network namespace: a socket belongs to the namespace it was created in, whoever uses it. A
short-lived helper, run with ``ip netns exec <k8s-master>``, creates and binds the socket at
10.20.30.10:6443 (the address the seed's ``kubernetes`` service points at) and hands it over
on a unix socket pair (SCM_RIGHTS). The workers reach it as they would reach a real
kube-apiserver on the master, over the node network; the root namespace is never involved.

``kpgen run`` runs as a real process in each worker's namespace, with a kubeconfig naming
that address, and logs to a file the tests read.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import netsock
from apiserver import ApiServer
from polling import wait_until  # noqa: F401  (lab_api's users wait with it)

from kpgen.core.names import is_nft_table
from kpgen.inputs.manifests import load_documents
from kpgen.lab.lab import SEED, Lab
from kpgen.lab.podserver import POD_PYTHON
from kpgen.lab.topology import CLUSTER_CIDR, NODE_BY_NAME

MASTER = "k8s-master"
API_PORT = 6443


def listen_in(lab: Lab, name: str, address: str, port: int) -> socket.socket:
    """A TCP socket listening on ``address:port`` inside the namespace of ``name``."""
    return netsock.listen_via(
        lambda argv, **options: lab.popen_in(name, argv, **options), POD_PYTHON, address, port
    )


def master_api_server(lab: Lab, **options: float | int | None) -> ApiServer:
    """An API server listening on k8s-master's address, started."""
    listener = listen_in(lab, MASTER, NODE_BY_NAME[MASTER].address, API_PORT)
    return ApiServer(**options).start(listener)  # type: ignore[arg-type]


def kpgen_run_argv(worker: str, mode: str, *flags: str) -> list[str]:
    """``kpgen run`` on a lab worker as the e2e tests run it: syncs 100 ms apart, no HTTP
    endpoints; ``flags`` say where its objects come from (and anything else)."""
    return [
        sys.executable, "-m", "kpgen", "run",
        "--hostname-override", worker,
        "--cluster-cidr", CLUSTER_CIDR,
        "--proxy-mode", mode,
        "--min-sync-period", "100ms",
        "--healthz-bind-address", "",
        "--metrics-bind-address", "",
        *flags,
    ]  # fmt: skip


_SEED = {(d["kind"], d["metadata"]["name"]): d for d in load_documents([str(SEED)])}


def seed_object(kind: str, name: str) -> dict[str, Any]:
    """An object of the seed cluster, a copy to change."""
    return copy.deepcopy(_SEED[(kind, name)])


def node(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}}


class KpgenRun:
    """``kpgen run`` on one worker of the lab, as a real process, logging to a file."""

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
        self.lab, self.worker, self.mode, self.log_path = lab, worker, mode, log
        self.argv = kpgen_run_argv(worker, mode, "--kubeconfig", str(kubeconfig), *extra)
        self.env = dict(env or {})  # on top of this process's environment
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0  # where this run's lines start in the log
        self._terminated = 0.0

    def start(self) -> KpgenRun:
        assert not self.running, f"kpgen already runs on {self.worker}"
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self.started_at = log.tell()
            log.write(f"--- kpgen run on {self.worker} ---\n".encode())
            log.flush()
            # `ip netns exec` execs the command: the PID is kpgen's own
            self.process = self.lab.popen_in(
                self.worker,
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **self.env},
            )
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self) -> str:
        """This run's log lines so far."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(self.started_at)
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 15) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log(), re.M))

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = 15) -> float:
        """Until ``pattern`` has appeared ``count`` times in this run's log; seconds taken."""
        started = time.monotonic()
        while self.count(pattern) < count:
            if not self.running:
                raise AssertionError(f"kpgen on {self.worker} exited:\n{self.tail()}")
            if time.monotonic() - started > timeout:
                raise AssertionError(
                    f"kpgen on {self.worker}: no {pattern!r} x{count} after {timeout}s:\n"
                    f"{self.tail()}"
                )
            time.sleep(0.05)
        return time.monotonic() - started

    def sigterm(self) -> None:
        assert self.process is not None
        self._terminated = time.monotonic()
        self.process.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout: float) -> float | None:
        """The seconds from :meth:`sigterm` until it exited, or None if it still runs
        ``timeout`` seconds from now (it is left running)."""
        assert self.process is not None
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        return time.monotonic() - self._terminated

    def kill(self) -> None:
        """Stop it now, whatever it is doing (the test's cleanup)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(10)


def kpgen_rules(lab: Lab, worker: str) -> str:
    """kpgen's rules on a worker as the kernel lists them: its nft tables (``kpgen`` and the
    shard tables) and its iptables lines (both variants); empty when it has none."""
    listed = lab.exec_in(worker, ["nft", "list", "tables"]).stdout.split()
    tables = [(f, n) for f, n in zip(listed[1::3], listed[2::3], strict=True) if is_nft_table(n)]
    nft = [lab.exec_in(worker, ["nft", "list", "table", f, n]).stdout for f, n in tables]
    ours = []
    for save in ("iptables-nft-save", "iptables-legacy-save"):
        saved = lab.exec_in(worker, [save]).stdout
        ours += [line for line in saved.splitlines() if "KPGEN-" in line]
    return "".join(nft) + "\n".join(ours)
