"""What a lab made, kept on disk so that ``down`` (in another process, later) removes exactly
that: its namespaces with their inodes, its processes with their start times, its
``/etc/netns`` directories, its added pods. One directory per lab under ``/run/kpgen-lab/``
(``default`` for the lab of ``kpgen lab``), with the pod servers' logs beside the state.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STATE_ROOT = Path("/run/kpgen-lab")


@dataclass
class Process:
    pid: int
    start: str  # /proc/PID/stat start time: tells a reused PID from ours
    namespace: str
    what: str


@dataclass
class State:
    prefix: str
    mode: str | None = None
    namespaces: dict[str, int] = field(default_factory=dict)  # name: inode
    hosts_dirs: list[str] = field(default_factory=list)
    pods: dict[str, dict[str, Any]] = field(default_factory=dict)  # name: asdict(Pod)
    processes: list[Process] = field(default_factory=list)

    @classmethod
    def from_json(cls, text: str) -> State:
        data = json.loads(text)
        data["processes"] = [Process(**p) for p in data.get("processes", [])]
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


def start_time(pid: int) -> str | None:
    """When process ``pid`` started (ticks since boot, from /proc), which tells it from a later
    process with the same PID; None when no such process runs (a zombie does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as stream:
            stat = stream.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return fields[19]


class StateDir:
    """The state directory of the lab whose namespaces' names start with ``prefix``."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.path = STATE_ROOT / (prefix.rstrip("-") or "default")

    @property
    def _file(self) -> Path:
        return self.path / "state.json"

    def load(self) -> State:
        try:
            return State.from_json(self._file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return State(prefix=self.prefix)

    def save(self, state: State) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        temporary = self._file.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
        temporary.replace(self._file)

    @contextlib.contextmanager
    def locked(self) -> Iterator[State]:
        """The state, under a lock (on /run/kpgen-lab itself) that keeps two processes from
        changing labs at once. :meth:`remove` removes the directory when it is empty, so a lock
        taken on a directory that was removed meanwhile is taken again on the new one."""
        while True:
            STATE_ROOT.mkdir(parents=True, exist_ok=True)
            handle = os.open(STATE_ROOT, os.O_RDONLY | os.O_DIRECTORY)
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
                try:
                    current = os.stat(STATE_ROOT).st_ino == os.fstat(handle).st_ino
                except FileNotFoundError:
                    current = False
                if current:
                    yield self.load()
                    return
            finally:
                os.close(handle)

    def remove(self) -> None:
        """The lab's directory, and /run/kpgen-lab too once no other lab has one there."""
        shutil.rmtree(self.path, ignore_errors=True)
        with contextlib.suppress(OSError):
            STATE_ROOT.rmdir()
