"""The fault suite (issue 13, docs/reliability.md): kpgen run through API server faults, kernel
faults, kill -9, concurrent writers, a soak, hostile input and its resource bounds. Most tests
bring up the seed lab in network namespaces and send real packets through it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FAULTS = Path(__file__).resolve().parent
for directory in (FAULTS, FAULTS.parent / "e2e"):
    if str(directory) not in sys.path:
        sys.path.insert(0, str(directory))  # faultkit.py; lab_api.py, traffic.py, labs.py


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "faults: the fault suite (tests/faults/)")
