"""Kernel faults under ``kpgen run``, in each proxy mode, with a client loop to an unchanged
service (docs/reliability.md).

Each test makes kpgen's next sync fail, then asks for one (the canary service changes):

- a transaction the kernel itself refuses: in nftables (through libnftables, in-process), a
  base chain someone else made under the name of the chain kpgen is about to create for a new
  service (nftables refuses a ``goto`` to a base chain); in iptables, someone else's rule
  jumping to a chain kpgen is about to delete (the kernel refuses to delete a chain in use);
- the loader missing (hidden with a bind mount of /dev/null in kpgen's own mount namespace,
  which ``ip netns exec`` gave it): ``iptables-nft-restore``, or ``nft`` with the libnftables
  binding turned off (``KPGEN_NFT_BINDING=0``);
- the loader hanging (a wrapper first on PATH that sleeps instead of loading): the runner's
  timeout (``KPGEN_LOAD_TIMEOUT=2`` here, 300 s by default) kills it;
- the writer lock held by another process for longer than kpgen waits
  (``KPGEN_LOCK_WAIT=1`` here, 30 s by default).

Expected every time: the old rules stay (the canary is still answered by its old pod, the
client loop loses nothing), the failure is counted in /metrics, the sync after the fault is a
full one, and ``kpgen run`` is still running; for the kernel's refusal also /healthz turning
503 while the sync is owed for longer than 2 x --sync-period, and 200 once it succeeded.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from faultkit import (
    NODE_PORT,
    WORKER,
    Cluster,
    Kpgen,
    kpgen_rules,
    lab_cluster,
    service_like_node_port,
    wait_until,
)
from traffic import BackgroundRequests, curl

from kpgen.lab.lab import MODES

pytestmark = [pytest.mark.kernel, pytest.mark.faults]

CANARY2_PORT = 30003
REAL = {"nft": "/usr/sbin/nft", "iptables-nft-restore": "/usr/sbin/iptables-nft-restore"}
WRAPPER = """#!/bin/sh
# a loader that hangs while {flag} exists (loads only: listings go through)
case " $* " in
  *" -f "*|*rules*) [ -e {flag} ] && exec sleep 3600 ;;
esac
exec {real} "$@"
"""


@pytest.fixture(scope="module", params=MODES)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp(f"kernel-faults-{request.param}")
    with lab_cluster(request.param, logs, "k") as instance:
        yield instance


@pytest.fixture(scope="module")
def tools(cluster: Cluster) -> Path:
    """A directory of loader wrappers, first on kpgen's PATH."""
    directory = cluster.logs / "bin"
    directory.mkdir(exist_ok=True)
    for name, real in REAL.items():
        wrapper = directory / name
        wrapper.write_text(WRAPPER.format(flag=cluster.logs / "hang", real=real))
        wrapper.chmod(0o755)
    return directory


@pytest.fixture
def kpgen(cluster: Cluster, tools: Path) -> Iterator[Kpgen]:
    """kpgen run with short timeouts and the wrappers first on its PATH (one at a time on the
    worker: each test has its own)."""
    env = {
        "PATH": f"{tools}:/usr/local/bin:/usr/bin:/bin",
        "KPGEN_LOAD_TIMEOUT": "2",
        "KPGEN_LOCK_WAIT": "1",
        "KPGEN_LOCK_FILE": str(cluster.logs / "kpgen.lock"),
    }
    if cluster.mode == "nftables":
        env["KPGEN_NFT_BINDING"] = "0"  # nft -f, so that the tool can go missing or hang
    instance = cluster.kpgen("--iptables-backend", "nft", env=env).start()
    yield instance
    instance.kill()


@pytest.fixture
def binding_kpgen(cluster: Cluster) -> Iterator[Kpgen]:
    """kpgen run as deployed: libnftables in-process (nftables mode)."""
    instance = cluster.kpgen("--iptables-backend", "nft", name="-binding").start()
    yield instance
    instance.kill()


def in_worker(cluster: Cluster, *argv: str) -> str:
    result = cluster.lab.exec_in(WORKER, list(argv))
    assert result.returncode == 0, f"{argv}: {result.stderr}"
    return result.stdout


def sync_kinds_after(lines: list[str]) -> list[str]:
    return re.findall(r"sync: (full|partial)", "\n".join(lines))


def through_kernel_fault(
    cluster: Cluster,
    kpgen: Kpgen,
    inject: Callable[[], None],
    change: Callable[[], None],
    unchanged: Callable[[], bool],
    heal: Callable[[], None],
    changed: Callable[[], bool],
    *,
    health: bool = False,
) -> None:
    """Inject, make a change, see the sync fail and the old rules stay; heal, see the change
    applied by a full sync; all under a client loop that must lose nothing."""
    kpgen.wait_synced()
    assert kpgen.running, kpgen.tail()
    failures = kpgen.sync_failures()
    with BackgroundRequests(cluster.lab, "gateway", WORKER, NODE_PORT, minimum=50) as loop:
        inject()
        mark = len(kpgen.log())
        change()
        wait_until(
            "a failed sync counted in /metrics", lambda: kpgen.sync_failures() > failures, 20
        )
        for _ in range(3):
            assert unchanged(), "the old rules did not stay"
        if health:  # the sync is owed: after 2 x --sync-period, /healthz says so
            wait_until("/healthz says 503", lambda: kpgen.healthz() == 503, 15)
        assert kpgen.running, f"kpgen exited:\n{kpgen.tail()}"
        failed_at = len(kpgen.log())
        heal()
        wait_until("the change applied once the fault is gone", changed, 20)
        if health:
            wait_until("/healthz says 200 again", lambda: kpgen.healthz() == 200, 10)
        tally = loop.finish()
    assert tally.failed == 0, f"{tally.failed} of {tally.count}: {tally.failures[:3]}"

    def after_last_failure() -> list[str]:
        lines = kpgen.lines_since(mark)
        last_failure = max(i for i, line in enumerate(lines) if "sync failed" in line)
        return sync_kinds_after(lines[last_failure:])

    assert any("sync failed, the previous rules stay" in ln for ln in kpgen.lines_since(mark))
    # the rules are in the kernel before the sync's log line is written: wait for the line
    wait_until("the sync after the failure logged", after_last_failure, 10)
    assert after_last_failure()[:1] == ["full"], kpgen.lines_since(failed_at)
    assert kpgen.running


def canary_is(cluster: Cluster, pod: str) -> Callable[[], bool]:
    return lambda: cluster.canary_answer() == pod


def canary2_answers(cluster: Cluster) -> bool:
    answer = curl(cluster.lab, "gateway", f"http://{WORKER}:{CANARY2_PORT}/whoami", max_time=2)
    return answer.exit_code == 0 and answer.body.startswith("pod")


def canary2_objects() -> list[dict[str, object]]:
    return service_like_node_port("canary2", CANARY2_PORT, "10.101.179.203")


def canary2_chains(cluster: Cluster) -> list[tuple[str, str]]:
    """The nft chains kpgen renders for canary2, with their table (rendered here, so that
    naming changes in the templates do not break the test)."""
    manifest = cluster.logs / "canary2.json"
    manifest.write_text(
        json.dumps({"apiVersion": "v1", "kind": "List", "items": canary2_objects()})
    )
    rendered = subprocess.run(
        [sys.executable, "-m", "kpgen", "render", "-f", str(manifest),
         "--hostname-override", WORKER, "--cluster-cidr", "192.168.0.0/16"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    found = []
    for table, body in re.findall(r"^table ip (\S+) \{\n(.*?)^\}", rendered, re.M | re.S):
        found += [(table, c) for c in re.findall(r"^\s*chain (\S*canary2\S*) \{", body, re.M)]
    return found


def test_a_transaction_the_kernel_refuses(cluster: Cluster, binding_kpgen: Kpgen) -> None:
    kpgen, server = binding_kpgen, cluster.server
    if cluster.mode == "nftables":
        chains = canary2_chains(cluster)
        assert chains

        def inject() -> None:
            for table, chain in chains:  # its shard table may not exist yet
                in_worker(cluster, "nft", "add", "table", "ip", table)
                in_worker(cluster, "nft", "add", "chain", "ip", table, chain,
                          "{ type filter hook input priority 0 ; policy accept ; }")  # fmt: skip

        def change() -> None:
            for obj in canary2_objects():
                server.create(obj)

        def heal() -> None:
            for table, chain in chains:
                in_worker(cluster, "nft", "delete", "chain", "ip", table, chain)

        try:
            through_kernel_fault(
                cluster, kpgen, inject, change,
                lambda: not canary2_answers(cluster), heal, lambda: canary2_answers(cluster),
                health=True,
            )  # fmt: skip
        finally:
            server.delete("Service", "default", "canary2")
            server.delete("EndpointSlice", "default", "canary2-1")
        wait_until("canary2 gone", lambda: not canary2_answers(cluster), 20)
        return
    # iptables: someone else's rule jumps to canary2's chain, which kpgen must then delete
    for obj in canary2_objects():
        server.create(obj)
    kpgen.wait_synced()
    wait_until("canary2 answers", lambda: canary2_answers(cluster), 20)
    chain = re.findall(r"canary2.*-j (KPGEN-SVC-\w+)", kpgen_rules(cluster.lab, WORKER))[0]

    def inject_ref() -> None:
        in_worker(cluster, "iptables-nft", "-t", "nat", "-N", "FOREIGN-REF")
        in_worker(cluster, "iptables-nft", "-t", "nat", "-A", "FOREIGN-REF", "-j", chain)

    def delete_canary2() -> None:
        server.delete("Service", "default", "canary2")
        server.delete("EndpointSlice", "default", "canary2-1")

    def heal_ref() -> None:
        in_worker(cluster, "iptables-nft", "-t", "nat", "-F", "FOREIGN-REF")
        in_worker(cluster, "iptables-nft", "-t", "nat", "-X", "FOREIGN-REF")

    through_kernel_fault(
        cluster, kpgen, inject_ref, delete_canary2,
        lambda: canary2_answers(cluster), heal_ref, lambda: not canary2_answers(cluster),
        health=True,
    )  # fmt: skip


def test_the_writer_lock_held_by_another_process(cluster: Cluster, kpgen: Kpgen) -> None:
    holder: list[subprocess.Popen[bytes]] = []
    lock = kpgen.env["KPGEN_LOCK_FILE"]
    old = cluster.canary_pod()
    new = "pod2" if old == "pod1" else "pod1"

    def inject() -> None:
        # its own process group: the sleep inherits the locked descriptor
        holder.append(subprocess.Popen(["flock", lock, "sleep", "60"], start_new_session=True))
        wait_until("the lock is held", lambda: subprocess.run(
            ["flock", "-n", lock, "true"], check=False).returncode != 0, 5)  # fmt: skip

    def release(process: subprocess.Popen[bytes]) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)

    def heal() -> None:
        release(holder[0])

    try:
        through_kernel_fault(
            cluster, kpgen, inject, lambda: cluster.canary(new),
            canary_is(cluster, old), heal, canary_is(cluster, new),
        )  # fmt: skip
    finally:
        for process in holder:
            release(process)
    assert any("held" in line and "for more than 1 s" in line for line in kpgen.log().splitlines())


def test_the_loader_hanging(cluster: Cluster, kpgen: Kpgen) -> None:
    flag = cluster.logs / "hang"
    old = cluster.canary_pod()
    new = "pod2" if old == "pod1" else "pod1"
    try:
        through_kernel_fault(
            cluster, kpgen, flag.touch, lambda: cluster.canary(new),
            canary_is(cluster, old), lambda: flag.unlink(), canary_is(cluster, new),
        )  # fmt: skip
    finally:
        flag.unlink(missing_ok=True)
    assert "no answer within 2 s (killed)" in kpgen.log()
    # the killed loader and what it started are gone
    time.sleep(0.2)
    left = subprocess.run(["pgrep", "-f", "sleep 3600"], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout


def test_the_loader_missing(cluster: Cluster, kpgen: Kpgen, tools: Path) -> None:
    name = "nft" if cluster.mode == "nftables" else "iptables-nft-restore"
    hidden = [str(tools / name), str(Path(REAL[name]).resolve())]
    assert kpgen.process is not None
    pid = str(kpgen.process.pid)
    old = cluster.canary_pod()
    new = "pod2" if old == "pod1" else "pod1"

    def mount(*argv: str) -> None:
        # inside kpgen's own mount namespace (ip netns exec made it one): never the host's
        subprocess.run(["nsenter", "-t", pid, "-m", *argv], check=True, timeout=10)

    def inject() -> None:
        for path in hidden:
            mount("mount", "--bind", "/dev/null", path)

    def heal() -> None:
        for path in hidden:
            mount("umount", path)

    through_kernel_fault(
        cluster, kpgen, inject, lambda: cluster.canary(new),
        canary_is(cluster, old), heal, canary_is(cluster, new),
    )  # fmt: skip
    assert "is not installed" in kpgen.log()
