"""Two kpgen writers on one node never interleave (kpgen/dataplane/lock.py).

A load reads what the kernel holds (which chains are stale, which jumps from the built-in
chains are missing) and then writes a transaction built from it. Without the writer lock, two
``kpgen apply`` at once both saw the jumps missing and both inserted them (duplicate jumps), or
both deleted the same stale chain (the second transaction failed). These tests run writers at
once, many times, in throwaway network namespaces, and check the outcome.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import kernel
import pytest
import yaml

pytestmark = kernel.kernel

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "examples" / "seed-cluster.yaml"
NODE_FLAGS = ["--hostname-override", "k8s-worker01", "--cluster-cidr", "192.168.0.0/16"]
ROUNDS = 6


@pytest.fixture
def ns() -> Iterator[str]:
    with kernel.netns() as name:
        yield name


@pytest.fixture
def lock_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A lock file of this test's own, so that other tests' writers do not wait on it."""
    path = tmp_path / "kpgen.lock"
    monkeypatch.setenv("KPGEN_LOCK_FILE", str(path))
    return path


def start_apply(ns: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, sys.executable, "-m", "kpgen", "apply", *NODE_FLAGS, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ.copy(),
    )


def finish(process: subprocess.Popen[str]) -> tuple[int, str]:
    _, stderr = process.communicate(timeout=120)
    return process.returncode, stderr


def without_node_port(tmp_path: Path) -> Path:
    cluster = yaml.safe_load(SEED.read_text())
    cluster["items"] = [
        item
        for item in cluster["items"]
        if item["metadata"]["name"] != "node-port"
        and item["metadata"].get("labels", {}).get("kubernetes.io/service-name") != "node-port"
    ]
    path = tmp_path / "fewer.yaml"
    path.write_text(yaml.safe_dump(cluster))
    return path


@pytest.mark.parametrize("variant", ["nft", "legacy"])
def test_two_iptables_applies_at_once_leave_one_jump_each(
    ns: str, lock_file: Path, variant: str
) -> None:
    args = ["--proxy-mode", "iptables", "--iptables-backend", variant, "-f", str(SEED)]
    for _ in range(ROUNDS):
        both = [start_apply(ns, *args), start_apply(ns, *args)]
        results = [finish(p) for p in both]
        assert [code for code, _ in results] == [0, 0], results
        counts = kernel.jump_counts(kernel.output_of(ns, [f"iptables-{variant}-save"]))
        assert set(counts.values()) == {1}, counts
        cleaned = subprocess.run(
            ["ip", "netns", "exec", ns, sys.executable, "-m", "kpgen", "cleanup"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert cleaned.returncode == 0, cleaned.stderr


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_applies_that_remove_a_service_at_once_never_fail(
    ns: str, lock_file: Path, tmp_path: Path, mode: str
) -> None:
    """Each round loads the whole seed, then two writers at once load it without one service:
    both delete the same stale chains, from what each read before writing."""
    fewer = without_node_port(tmp_path)
    common = ["--proxy-mode", mode, "--iptables-backend", "nft"]
    for _ in range(ROUNDS):
        code, stderr = finish(start_apply(ns, *common, "-f", str(SEED)))
        assert code == 0, stderr
        both = [start_apply(ns, *common, "-f", str(fewer)) for _ in range(2)]
        results = [finish(p) for p in both]
        assert [code for code, _ in results] == [0, 0], results


def test_a_writer_waits_for_the_lock_and_then_loads(ns: str, lock_file: Path) -> None:
    holder = subprocess.Popen(["flock", str(lock_file), "sleep", "1.5"])
    try:
        time.sleep(0.3)  # the holder has it
        started = time.monotonic()
        code, stderr = finish(start_apply(ns, "-f", str(SEED)))
        waited = time.monotonic() - started
    finally:
        holder.wait(timeout=10)
    assert code == 0, stderr
    assert waited >= 1.0
    assert "table ip kpgen" in kernel.output_of(ns, ["nft", "list", "ruleset"])
