"""The labs of e2e test runs: their names, and the removal of labs a killed run left behind.

Every e2e module brings up its own lab under ``e2e<pid><letter>-`` (conftest's ``lab`` has no
letter), so that modules and test runs never meet; this is the one place that knows that
naming.
"""

from __future__ import annotations

import os
import re

from kpgen.lab.lab import Lab
from kpgen.lab.state import STATE_ROOT, start_time

_STATE_NAME = re.compile(r"^e2e(\d+)[a-z]*$")  # a test lab's state directory, by its run's pid


def prefix(letter: str = "") -> str:
    """The start of the namespace names of this test run's lab ``letter``."""
    return f"e2e{os.getpid()}{letter}-"


def namespaces(starting: str = "") -> list[str]:
    """Network namespaces whose names start with ``starting``."""
    try:
        return sorted(n for n in os.listdir("/run/netns") if n.startswith(starting))
    except FileNotFoundError:
        return []


def remove_labs_of_dead_runs() -> None:
    """Labs whose test run was killed before it could bring them down."""
    try:
        names = os.listdir(STATE_ROOT)
    except FileNotFoundError:
        return
    for name in names:
        match = _STATE_NAME.match(name)
        if match and start_time(int(match.group(1))) is None:
            Lab(f"{name}-").down()
