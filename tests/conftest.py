"""Shared test setup: the ``--update-golden`` option and the ``kernel`` marker's skip.

Tests marked ``@pytest.mark.kernel`` load rules into throwaway network namespaces
(tests/kernel.py). They are skipped, with the reason, when this machine cannot run them (not
root, or nft/iptables-restore/ip missing); set ``KPGEN_REQUIRE_KERNEL=1`` to make that an
error instead (for CI, which runs as root and must not skip them silently).

Under ``KPGEN_REQUIRE_KERNEL=1`` (CI) hypothesis runs derandomized: the same examples on every
run, so that whether a change lands never depends on the draw; run the suite without it (as
`pytest` does by default) to explore new examples, and add what they find as explicit cases.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
if str(TESTS) not in sys.path:
    # helpers (kernel.py, golden/cases.py) import the same way under every pytest import mode
    sys.path.insert(0, str(TESTS))

import kernel  # noqa: E402
from hypothesis import settings  # noqa: E402

settings.register_profile("ci", derandomize=True)
if os.environ.get("KPGEN_REQUIRE_KERNEL") == "1":
    settings.load_profile("ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--update-golden",
        action="store_true",
        default=False,
        help="Rewrite tests/golden/ from tests/golden/cases.py instead of comparing with it.",
    )


def pytest_configure(config: pytest.Config) -> None:
    # also declared in pyproject.toml; repeated so the marker is known under any ini file
    config.addinivalue_line(
        "markers", "kernel: loads rules into a throwaway network namespace (needs root)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = kernel.unavailable_reason()
    if reason is None:
        return
    if os.environ.get("KPGEN_REQUIRE_KERNEL") == "1":
        raise pytest.UsageError(f"KPGEN_REQUIRE_KERNEL=1 but the kernel tests cannot run: {reason}")
    skip = pytest.mark.skip(reason=f"kernel test: {reason}")
    for item in items:
        if "kernel" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def update_golden(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--update-golden"))


@pytest.fixture(scope="session")
def check_namespace() -> Iterator[str]:
    """One throwaway namespace for ``nft -c`` checks (they commit nothing, so it stays empty)."""
    with kernel.netns() as name:
        yield name


@pytest.fixture(scope="session", autouse=True)
def _no_namespace_left_behind() -> Iterator[None]:
    """Delete any namespace of this test run that a crashed test left (never another's)."""
    yield
    if kernel.unavailable_reason() is None:
        kernel.cleanup_leftovers()
