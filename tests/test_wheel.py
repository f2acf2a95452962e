"""kpgen as a user gets it: a wheel built from this tree, installed (not editable) in a fresh
virtualenv, brings the namespace lab up, carries traffic, and takes it down again.

That needs everything the lab uses to be in the wheel: the seed cluster (package data) and the
pods' HTTP server (a module, run by path on Debian's python3), nothing read from the source
tree; the installed kpgen runs from a directory outside it. The virtualenv is made from
Debian's /usr/bin/python3 with its system packages (the libnftables binding is a Debian
package, python3-nftables), as docs/lab.md says. Its dependencies come from the package index,
through pip's cache. The lab has a name prefix of its own (tests/e2e/labs.py), and is brought
down whatever happens.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import kernel
import pytest

from kpgen.lab.demo import DEMO_LOOPS
from kpgen.lab.lab import ETC_NETNS, Lab
from kpgen.lab.state import start_time

ROOT = Path(__file__).resolve().parent.parent
E2E = ROOT / "tests" / "e2e"
if str(E2E) not in sys.path:
    sys.path.insert(0, str(E2E))

import labs  # noqa: E402

pytestmark = [kernel.kernel]

DEBIAN_PYTHON = "/usr/bin/python3"
STEP_TIMEOUT = 600  # seconds: the install may download its dependencies
# what the wheel must carry for the lab, beside the code
LAB_FILES = ("kpgen/lab/seed-cluster.yaml", "kpgen/lab/podserver.py")
# not part of the source: what a build would not see in a fresh clone either
NOT_SOURCE = (
    ".venv",
    ".git",
    "*_cache",
    ".hypothesis",
    "build",
    "dist",
    "*.egg-info",
    "__pycache__",
)


class Steps:
    """Commands run one after the other, each timed; a failure shows the command's output."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.seconds: dict[str, float] = {}

    def run(self, what: str, argv: Sequence[str | Path]) -> subprocess.CompletedProcess[str]:
        started = time.monotonic()
        result = subprocess.run(
            [str(a) for a in argv],
            cwd=self.cwd,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=STEP_TIMEOUT,
            check=False,
        )
        self.seconds[what] = time.monotonic() - started
        assert result.returncode == 0, f"{what} failed:\n{result.stdout}\n{result.stderr}"
        return result

    def report(self) -> str:
        return ", ".join(f"{what} {seconds:.1f} s" for what, seconds in self.seconds.items())


@pytest.fixture
def steps(tmp_path: Path) -> Iterator[Steps]:
    """Steps run in a directory outside the source tree, without PYTHONPATH. Afterwards the
    copy of the tree, the wheel and the virtualenv are removed (some 100 MB)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    work = tmp_path / "work"
    work.mkdir()
    steps = Steps(work, env)
    try:
        yield steps
    finally:
        print(f"\ntest_wheel: {steps.report()}")
        for made in tmp_path.iterdir():
            shutil.rmtree(made)


def test_an_installed_wheel_brings_the_lab_up_and_down(tmp_path: Path, steps: Steps) -> None:
    # build from a copy of the tree, so that the build leaves nothing in the checkout (and no
    # stale build/ of it reaches the wheel)
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, symlinks=True, ignore=shutil.ignore_patterns(*NOT_SOURCE))
    pip = [sys.executable, "-m", "pip"]  # this test's
    steps.run("build", [*pip, "wheel", "-q", "--no-deps", source, "-w", tmp_path / "wheels"])
    (wheel,) = (tmp_path / "wheels").glob("kpgen-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        assert set(LAB_FILES) <= set(archive.namelist())

    venv = tmp_path / "venv"
    python = venv / "bin" / "python"
    steps.run(
        "venv", [DEBIAN_PYTHON, "-m", "venv", "--system-site-packages", "--without-pip", venv]
    )
    # into the new virtualenv (which has no pip of its own: faster to make); --no-compile: the
    # modules are compiled when first imported
    steps.run("install", [*pip, "--python", python, "install", "-q", "--no-compile", wheel])
    imported = steps.run("import", [python, "-c", "import kpgen; print(kpgen.__file__)"])
    assert imported.stdout.startswith(str(venv)), imported.stdout

    labs.remove_labs_of_dead_runs()
    prefix = labs.prefix("w")
    lab = Lab(prefix)  # this checkout's view of the same lab: to look at it, and to clean up
    kpgen_lab = [venv / "bin" / "kpgen", "lab", "--prefix", prefix]
    try:
        steps.run("lab up", [*kpgen_lab, "up"])
        servers = [pod.pid for pod in lab.status().pods if pod.pid is not None]
        assert len(servers) == 2
        for pid in servers:
            argv = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
            assert argv[2].startswith(str(venv)), f"a pod's server is not the wheel's: {argv}"

        started = time.monotonic()
        for loop in DEMO_LOOPS:
            answer = lab.exec_in(loop.where, ["curl", "-s", "-m", "5", loop.url], timeout=30)
            assert answer.returncode == 0 and answer.stdout in ("pod1\n", "pod2\n"), (loop, answer)
        steps.seconds["curls"] = time.monotonic() - started

        steps.run("lab down", [*kpgen_lab, "down"])
        assert labs.namespaces(prefix) == []
        assert not [d for d in ETC_NETNS.glob(f"{prefix}*")]
        assert not lab.state_dir.exists()
        assert [start_time(pid) for pid in servers] == [None, None]  # gone (or zombies)
    finally:
        lab.down()  # nothing left to do when the wheel's down did its work
