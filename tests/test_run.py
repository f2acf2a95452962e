"""kpgen.dataplane.run: one PATH rule, a timeout on every call, errors that name the command."""

from __future__ import annotations

import os
import time
from pathlib import Path

import kernel
import pytest

from kpgen.dataplane.run import ToolError, run, spawn, which


def test_a_tool_in_sbin_is_found_when_path_lacks_sbin(monkeypatch: pytest.MonkeyPatch) -> None:
    sbin = next((d for d in ("/usr/sbin", "/sbin") if os.path.exists(f"{d}/nft")), None)
    if sbin is None:
        pytest.skip("nft is not installed in an sbin directory here")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    assert which("nft") == f"{sbin}/nft"


def test_the_callers_path_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    own = tmp_path / "nft"
    own.write_text("#!/bin/sh\necho mine\n")
    own.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:/usr/bin:/bin")
    assert run(["nft"]).stdout == "mine\n"


def test_a_missing_tool_is_one_line_saying_so() -> None:
    with pytest.raises(ToolError) as caught:
        run(["kpgen-no-such-tool", "-x"])
    assert str(caught.value) == "kpgen-no-such-tool is not installed (make setup installs it)"


def test_a_failure_with_check_names_the_command_and_its_stderr() -> None:
    with pytest.raises(ToolError) as caught:
        run(["sh", "-c", "echo 'it went wrong' >&2; exit 3"], check=True)
    assert str(caught.value) == "sh -c echo 'it went wrong' >&2; exit 3: it went wrong"


def test_a_failure_without_check_is_returned_for_the_caller_to_judge() -> None:
    result = run(["sh", "-c", "exit 4"])
    assert result.returncode == 4


def test_a_hung_tool_and_what_it_started_are_killed_when_the_timeout_fires(tmp_path: Path) -> None:
    marker = tmp_path / "child.pid"
    started = time.monotonic()
    with pytest.raises(ToolError) as caught:
        run(["sh", "-c", f"sleep 30 & echo $! > {marker}; wait"], timeout=0.5)
    assert time.monotonic() - started < 10
    assert str(caught.value).endswith("no answer within 0.5 s (killed)")
    assert str(caught.value).startswith("sh -c sleep 30")
    child = int(marker.read_text())
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the tool's own child outlived the timeout"


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_input_reaches_the_tool() -> None:
    assert run(["cat"], input="rules\n").stdout == "rules\n"


def test_spawn_finds_the_tool_by_the_same_rule_and_does_not_wait() -> None:
    process = spawn(["sleep", "0.1"])
    assert process.wait(timeout=5) == 0
    with pytest.raises(ToolError):
        spawn(["kpgen-no-such-tool"])


@kernel.kernel
def test_a_tool_runs_inside_the_named_network_namespace_by_the_same_rules() -> None:
    with kernel.netns() as ns:
        links = run(["ip", "-o", "link", "show"], netns=ns, check=True).stdout
        assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
        with pytest.raises(ToolError) as caught:
            run(["sh", "-c", "echo inside >&2; exit 1"], netns=ns, check=True)
        assert str(caught.value) == f"ip netns exec {ns} sh -c echo inside >&2; exit 1: inside"
        process = spawn(["true"], netns=ns)
        assert process.wait(timeout=10) == 0
