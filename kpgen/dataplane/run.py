"""Running the node's tools (nft, iptables-restore, conntrack, ip): one place, one set of rules.

- One PATH rule: the caller's ``PATH``, then the sbin directories where Debian puts netfilter
  tools (a user's shell often lacks ``/usr/sbin``).
- A timeout on every call: a stuck ``iptables-restore`` (a held xtables lock, a wedged kernel)
  must not hang ``kpgen run`` forever. On timeout the tool and everything it started are
  killed, and :class:`ToolError` says so.
- Errors that name the command and carry its standard error, on one line where it has one.
- ``netns=NAME`` runs a tool inside a named network namespace (``ip netns exec``), by the same
  rules (the lab's machines and pods, kpgen/lab/).

- :func:`forked` runs a function in a forked child and hands back what it returned (the
  one-shot commands' second core, kpgen/cli/halves.py).

The only module of kpgen that starts processes (tests/test_layout.py checks it).
"""

from __future__ import annotations

import contextlib
import os
import pickle
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

SBIN = ("/usr/local/sbin", "/usr/sbin", "/sbin")
# Seconds. A load: iptables-nft-restore is the slowest loader (0.9 s at 2,000 services and
# growing faster than linearly, docs/performance.md); nft -f loads 10,000 services in 1.7 s.
LOAD_TIMEOUT = 300.0
QUERY_TIMEOUT = 30.0  # a listing, a single check, a conntrack deletion


def _seconds_from_env(name: str, default: float) -> float:
    """A timeout from the environment (the fault tests make them short), else ``default``."""
    try:
        value = float(os.environ.get(name) or default)
    except ValueError:
        return default
    return value if value > 0 else default


LOAD_TIMEOUT = _seconds_from_env("KPGEN_LOAD_TIMEOUT", LOAD_TIMEOUT)
QUERY_TIMEOUT = _seconds_from_env("KPGEN_QUERY_TIMEOUT", QUERY_TIMEOUT)
# for the callers of run and spawn, who need not import subprocess for these
DEVNULL, PIPE, STDOUT = subprocess.DEVNULL, subprocess.PIPE, subprocess.STDOUT
Completed = subprocess.CompletedProcess  # what run returns
Started = subprocess.Popen  # what spawn returns


class DataplaneError(Exception):
    """A tool or the kernel refused, was missing or hung; what was loaded before stays."""


class ToolError(DataplaneError):
    """A tool could not be run, timed out, or (with ``check``) failed."""


def search_path() -> str:
    """Where tools are looked up: PATH, then the sbin directories."""
    parts = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p]
    return os.pathsep.join([*parts, *(d for d in SBIN if d not in parts)])


def which(name: str) -> str | None:
    """The full path of tool ``name``, or None when it is not installed."""
    return shutil.which(name, path=search_path())


def tool(name: str) -> str:
    """The full path of tool ``name``; :class:`ToolError` when it is not installed."""
    found = which(name)
    if found is None:
        raise ToolError(f"{name} is not installed (make setup installs it)")
    return found


def _describe(argv: Sequence[str]) -> str:
    return " ".join([os.path.basename(argv[0]), *argv[1:]])


def _in_netns(argv: Sequence[str], netns: str | None) -> list[str]:
    """``argv`` as it names itself in errors: with the ``ip netns exec`` that runs it."""
    return list(argv) if netns is None else ["ip", "netns", "exec", netns, *argv]


def _command(argv: Sequence[str], netns: str | None) -> list[str]:
    """What to start: ``argv`` with its tool's full path, inside ``netns`` when given
    (``ip netns exec`` execs the tool: the PID is the tool's own)."""
    command = [tool(argv[0]), *argv[1:]]
    return command if netns is None else [tool("ip"), "netns", "exec", netns, *command]


def run(
    argv: Sequence[str],
    *,
    input: str | None = None,
    timeout: float = QUERY_TIMEOUT,
    check: bool = False,
    netns: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` (its first word looked up with :func:`tool`) and wait, at most
    ``timeout`` seconds; inside the named network namespace ``netns`` when given. A missing
    tool or a timeout is a :class:`ToolError`; so is a failure with ``check``."""
    command = _command(argv, netns)
    named = _in_netns(argv, netns)
    try:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its own process group: a timeout kills all of it
        )
    except OSError as error:
        raise ToolError(f"{_describe(named)}: {error.strerror or error}") from None
    try:
        stdout, stderr = process.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        raise ToolError(f"{_describe(named)}: no answer within {timeout:g} s (killed)") from None
    result = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
    if check and result.returncode != 0:
        raise ToolError(failure(named, result))
    return result


def failure(argv: Sequence[str], result: subprocess.CompletedProcess[str]) -> str:
    """``<command>: <its standard error>`` (or its exit status when it said nothing)."""
    said = result.stderr.strip() or f"exit status {result.returncode}"
    return f"{_describe(argv)}: {said}"


def _kill_group(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.communicate()


def spawn(
    argv: Sequence[str], *, netns: str | None = None, **options: Any
) -> subprocess.Popen[Any]:
    """Start ``argv`` without waiting (the lab's servers and nodes), inside the named network
    namespace ``netns`` when given; ``options`` are :class:`subprocess.Popen`'s. The caller
    owns the process."""
    command = _command(argv, netns)
    try:
        return subprocess.Popen(command, **options)
    except OSError as error:
        raise ToolError(f"{_describe(_in_netns(argv, netns))}: {error.strerror or error}") from None


def can_fork() -> bool:
    """Whether a forked child could run Python code here: a POSIX system, and no other thread
    in this process (a lock another thread holds would stay held in the child for good)."""
    return hasattr(os, "fork") and threading.active_count() == 1


@contextlib.contextmanager
def forked(work: Callable[[], Any]) -> Iterator[Callable[[], Any]]:
    """Run ``work`` in a forked child while the caller goes on (only where :func:`can_fork`).
    Yields a function that waits for what ``work`` returned (pickled through a pipe) and
    returns it, or None when the child failed in any way. The child never returns into the
    caller's code, nor runs its clean-up: it ends with ``os._exit``, its heap never freed
    object by object. Leaving the block reaps the child (killed first unless it sent its
    value: its exit, the kernel freeing its memory, overlaps the caller's work until then).
    A fork the system refuses (no memory, a process limit) is a child that failed."""
    read_end, write_end = os.pipe()
    try:
        pid = os.fork()
    except OSError:
        os.close(read_end)
        os.close(write_end)
        yield lambda: None
        return
    if pid == 0:  # pragma: no cover - the child; what it sends is checked in the parent
        code = 1
        try:
            os.close(read_end)
            value = work()
            with os.fdopen(write_end, "wb") as pipe:
                pickle.dump(value, pipe, protocol=pickle.HIGHEST_PROTOCOL)
            code = 0
        finally:
            os._exit(code)
    os.close(write_end)
    sent = False

    def result() -> Any:
        nonlocal sent
        with os.fdopen(read_end, "rb", closefd=False) as stream:
            data = stream.read()
        try:
            value = pickle.loads(data)  # our own child's bytes, whole only if it sent them all
        except Exception:  # cut short: the child failed before it had written everything
            return None
        sent = True
        return value

    try:
        yield result
    finally:
        os.close(read_end)
        if not sent:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
