"""Waiting in tests: poll a condition until it holds, with a bound (shared by the unit, e2e
and fault suites)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    what: str, condition: Callable[[], bool], timeout: float, poll: float = 0.05
) -> float:
    """Poll ``condition`` every ``poll`` seconds until it holds; the seconds it took, or
    AssertionError naming ``what`` after ``timeout`` seconds."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"not after {timeout}s: {what}")
        time.sleep(poll)
    return time.monotonic() - started
