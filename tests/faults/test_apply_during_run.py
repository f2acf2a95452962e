"""``kpgen apply`` while ``kpgen run`` syncs on the same node, in each proxy mode: the writer lock
serializes them; no duplicated jump, no failed transaction (docs/reliability.md).

Two ``kpgen apply`` at once are tests/test_writers.py's (both modes, both iptables variants);
this adds the daemon as the other writer. In a throwaway network namespace, ``kpgen run`` reads
a manifest directory whose node-port endpoints change every 0.3 s (a sync each time, and a full
one every second), while ``kpgen apply`` loads the same directory again and again, one at a
time and two at once.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import kernel
import pytest
import yaml

pytestmark = [pytest.mark.kernel, pytest.mark.faults]

ROOT = Path(__file__).resolve().parents[2]
SEED = ROOT / "examples" / "seed-cluster.yaml"
NODE_FLAGS = ["--hostname-override", "k8s-worker01", "--cluster-cidr", "192.168.0.0/16"]
APPLIES = 10


@pytest.fixture
def ns() -> Iterator[str]:
    with kernel.netns() as name:
        yield name


def seed_variant(flip: bool) -> str:
    """The seed cluster, with the node-port service's endpoints in one of two orders and
    readiness states (each a different rule set)."""
    cluster = yaml.safe_load(SEED.read_text())
    for item in cluster["items"]:
        if item["kind"] == "EndpointSlice" and item["metadata"]["name"].startswith("node-port"):
            item["endpoints"][-1]["conditions"] = {"ready": not flip}
    return yaml.safe_dump(cluster)


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_apply_while_run_syncs_is_serialized(ns: str, tmp_path: Path, mode: str) -> None:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    (manifests / "cluster.yaml").write_text(seed_variant(False))
    env = {**os.environ, "KPGEN_LOCK_FILE": str(tmp_path / "kpgen.lock")}
    common = ["--proxy-mode", mode, "--iptables-backend", "nft", *NODE_FLAGS]
    log_path = tmp_path / "run.log"
    stop = threading.Event()

    def change_manifests() -> None:
        flip = False
        while not stop.wait(0.3):
            flip = not flip
            staged = tmp_path / "staged.yaml"
            staged.write_text(seed_variant(flip))
            shutil.move(staged, manifests / "cluster.yaml")  # atomic: never half a file

    def apply() -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "kpgen", "apply", *common,
             "-f", str(manifests)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        )  # fmt: skip

    with open(log_path, "wb") as log:
        run = subprocess.Popen(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "kpgen", "run", *common,
             "--source", f"manifests:{manifests}", "--min-sync-period", "100ms",
             "--sync-period", "1s", "--healthz-bind-address", "", "--metrics-bind-address", ""],
            stdout=log, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    changer = threading.Thread(target=change_manifests, daemon=True)
    try:
        deadline = time.monotonic() + 30
        while "sync: full" not in log_path.read_text():
            assert run.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        changer.start()
        results = []
        for round_ in range(APPLIES):
            batch = [apply(), apply()] if round_ % 3 == 2 else [apply()]  # two at once too
            results += [(p.wait(120), p.stderr.read() if p.stderr else "") for p in batch]
            if mode == "iptables":
                saved = kernel.output_of(ns, ["iptables-nft-save"])
                counts = kernel.jump_counts(saved)
                assert set(counts.values()) == {1}, counts
        stop.set()
        changer.join(5)
        time.sleep(1.5)  # a sync or two after the last apply
        assert run.poll() is None, log_path.read_text()
    finally:
        stop.set()
        run.kill()
        run.wait(10)
    assert [code for code, _ in results] == [0] * len(results), results
    log = log_path.read_text()
    syncs = len(re.findall(r"sync: (full|partial)", log))
    assert syncs >= 5, log
    assert "sync failed" not in log, log
    assert "Traceback" not in log, log
