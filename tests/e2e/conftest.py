"""End-to-end fixtures: the seed article's cluster in network namespaces (kpgen/lab/lab.py), with
kpgen's rules loaded on both workers, once per proxy mode.

The lab of a test run has its namespaces' names prefixed with ``e2e<pid>-``, so that it never
meets a lab brought up by hand (``kpgen lab up``) or another test run; inside, the machines
still know each other by the article's names. It is brought down after the module, also when a
test fails; a lab left behind by a test run that was killed is removed at the next run.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kpgen.lab.lab import MODES, Lab
from kpgen.lab.topology import SEED, WORKERS

E2E = Path(__file__).resolve().parent
if str(E2E) not in sys.path:
    sys.path.insert(0, str(E2E))  # traffic.py, labs.py, under every pytest import mode

import labs  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "e2e: real packets through the namespace lab (needs root; slow-ish)"
    )


@pytest.fixture(scope="module", params=MODES)
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    """The lab, up with kpgen's rules in one proxy mode; brought down afterwards, always."""
    labs.remove_labs_of_dead_runs()
    instance = Lab(labs.prefix())
    try:
        instance.up(request.param)
        yield instance
    finally:
        instance.down()
    leftovers = labs.namespaces(instance.prefix)
    assert not leftovers, f"lab down left namespaces behind: {leftovers}"


@pytest.fixture
def spare_lab() -> Iterator[Lab]:
    """A second lab, not up: for tests of bringing labs up and down. Down afterwards."""
    labs.remove_labs_of_dead_runs()
    instance = Lab(labs.prefix("b"))
    try:
        yield instance
    finally:
        instance.down()


@pytest.fixture
def scratch(lab: Lab) -> Iterator[Lab]:
    """The lab, for a test that adds pods or loads other rules: afterwards the added pods are
    removed and both workers get the seed cluster's rules again."""
    before = {pod.name for pod in lab.status().pods}
    yield lab
    for pod in lab.status().pods:
        if pod.name not in before:
            lab.remove_pod(pod.name)
    for worker in WORKERS:
        lab.apply(worker, [SEED])
