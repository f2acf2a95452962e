"""kpgen: a kube-proxy written in Python."""

import sys

SETUP = "make setup (as root, in the checkout), then .venv/bin/kpgen"


def missing_module(error: ModuleNotFoundError) -> str:
    """What to tell a user whose Python lacks one of kpgen's dependencies (a checkout run
    with a Python that kpgen was not installed into)."""
    return (
        f"kpgen: cannot run: the Python module {error.name or error} is missing from "
        f"{sys.executable}, which kpgen is not installed into; run {SETUP}"
        " (or: pip install . into the Python you use)"
    )
