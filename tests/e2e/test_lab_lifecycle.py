"""Bringing the namespace lab up and down (kpgen/lab/lab.py): it removes everything it made, also
after a failed ``up``, and never touches a namespace it did not make."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from kpgen.cli.main import main
from kpgen.lab import lab as lab_module
from kpgen.lab.lab import Lab, LabError

pytestmark = [pytest.mark.kernel, pytest.mark.e2e]


def _namespaces(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(prefix))
    except FileNotFoundError:
        return []


def _hosts_dirs(prefix: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(lab_module.ETC_NETNS) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def _running(pids: list[int]) -> list[int]:
    return [pid for pid in pids if os.path.exists(f"/proc/{pid}")]


def test_down_removes_every_namespace_process_and_hosts_file(spare_lab: Lab) -> None:
    lab = spare_lab
    lab.up("nftables")
    lab.add_pod("pod9", "k8s-worker02", "192.168.79.109")
    status = lab.status()
    assert status.up and status.mode == "nftables"
    pids = [pod.pid for pod in status.pods if pod.pid is not None]
    assert len(pids) == 3 and not set(pids) - set(_running(pids))
    assert len(_namespaces(lab.prefix)) == 9  # the bridge's, 4 machines, 4 pods
    assert len(_hosts_dirs(lab.prefix)) == 9

    lab.down()
    assert _namespaces(lab.prefix) == []
    assert _hosts_dirs(lab.prefix) == []
    assert _running(pids) == []
    assert not lab.state_dir.exists()
    assert not lab.status().up


def test_up_again_rebuilds_the_lab_it_left_up(spare_lab: Lab) -> None:
    lab = spare_lab
    lab.up("nftables")
    lab.add_pod("pod9", "k8s-worker02", "192.168.79.109")
    first = [pod.pid for pod in lab.status().pods if pod.pid is not None]
    lab.up("iptables")
    status = lab.status()
    assert status.up and status.mode == "iptables"
    assert "pod9" not in {pod.name for pod in status.pods}, "the old lab's pod survived"
    assert _namespaces(lab.prefix) == sorted(status.namespaces)
    assert _running(first) == [], "the old lab's servers survived"


def test_up_refuses_a_namespace_it_did_not_make_and_leaves_it_alone(spare_lab: Lab) -> None:
    lab = spare_lab
    foreign = lab.ns("k8s-worker02")
    subprocess.run(["ip", "netns", "add", foreign], check=True)
    try:
        inode = os.stat(f"/run/netns/{foreign}").st_ino
        with pytest.raises(LabError, match=f"{foreign} exists and was not made by kpgen lab"):
            lab.up("nftables")
        assert _namespaces(lab.prefix) == [foreign]
        assert os.stat(f"/run/netns/{foreign}").st_ino == inode
        lab.down()
        assert _namespaces(lab.prefix) == [foreign]
    finally:
        subprocess.run(["ip", "netns", "delete", foreign], check=True)


def test_failed_up_leaves_nothing_behind(
    spare_lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lab = spare_lab
    broken = tmp_path / "broken.yaml"
    broken.write_text("items: [\n")  # kpgen apply refuses it, after everything else is built
    monkeypatch.setattr(lab_module, "SEED", broken)
    with pytest.raises(LabError, match="kpgen apply on k8s-worker01 failed"):
        lab.up("nftables")
    assert _namespaces(lab.prefix) == []
    assert _hosts_dirs(lab.prefix) == []
    assert not lab.state_dir.exists()
    leftover = subprocess.run(
        ["pgrep", "-f", str(lab.state_dir)], capture_output=True, text=True, check=False
    )
    assert leftover.stdout == "", "a pod's HTTP server outlived the failed up"


def test_lab_up_without_root_says_it_needs_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    result = CliRunner().invoke(main, ["lab", "up"])
    assert result.exit_code == 1
    assert "the lab needs root" in result.output
