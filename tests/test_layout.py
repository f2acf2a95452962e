"""The package's layers, kept: what may import what, who runs processes, and a core with no I/O.

docs/design.md ("The tree") draws the same rules. Each check reads kpgen's source with the
``ast`` module (imports inside functions count too), except the last, which imports the core
in a fresh interpreter whose audit hook refuses everything that reaches outside the process.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "kpgen"
# package -> the kpgen packages its modules may import (besides its own)
MAY_IMPORT = {
    "core": set(),
    "inputs": {"core"},
    "render": {"core"},
    "dataplane": {"core", "render"},
    "controller": {"core", "inputs", "render", "dataplane"},
    "explain": {"core", "render", "dataplane"},
    "lab": {"core", "inputs", "dataplane"},
    "cli": {"core", "inputs", "render", "dataplane", "controller", "explain", "lab"},
}
# What starts processes or runs programs: only kpgen.dataplane may.
PROCESS_MODULES = {"subprocess", "multiprocessing", "pty", "asyncio.subprocess"}
PROCESS_CALLS = {"system", "popen", "execv", "execve", "execvp", "execl", "fork", "forkpty",
                 "posix_spawn", "posix_spawnp", "spawnv", "spawnl", "spawnvp"}  # fmt: skip


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py"))


def package_of(path: Path) -> str | None:
    """The subpackage a module belongs to (None: kpgen/__init__.py, kpgen/__main__.py)."""
    parts = path.relative_to(PACKAGE).parts
    return parts[0] if len(parts) > 1 else None


def imported(path: Path) -> set[str]:
    """Every module name ``path`` imports, at any depth."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def test_every_module_is_in_a_subpackage_of_the_pipeline() -> None:
    loose = [p.name for p in modules() if package_of(p) is None]
    assert sorted(loose) == ["__init__.py", "__main__.py"]
    assert {package_of(p) for p in modules()} - {None} == set(MAY_IMPORT)


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    allowed = MAY_IMPORT[package] | {package}
    wrong = []
    for path in modules():
        if package_of(path) != package:
            continue
        for name in imported(path):
            parts = name.split(".")
            layer = parts[1] if parts[0] == "kpgen" and len(parts) > 1 else None
            if layer in MAY_IMPORT and layer not in allowed:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    assert wrong == []


def test_only_the_dataplane_starts_processes() -> None:
    wrong = []
    for path in modules():
        if package_of(path) == "dataplane":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for name in imported(path):
            if name in PROCESS_MODULES or name.split(".")[0] in PROCESS_MODULES:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and isinstance(node.value, ast.Name)
                and node.value.id == "os"
                and node.attr in PROCESS_CALLS
            ):
                where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
                wrong.append(f"{where} calls os.{node.attr}")
    assert wrong == []


# Run in a fresh interpreter: refuse, through an audit hook, every file that is not code,
# every socket, process and foreign library; then use the core on objects given inline.
PURE_CORE = textwrap.dedent(
    """
    import sys

    CODE = (".py", ".pyc", ".so")
    REFUSED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.fork",
               "os.spawn", "ctypes.", "urllib.", "http.", "os.remove", "os.rename", "os.mkdir",
               "os.chmod", "os.chown", "shutil.", "tempfile.", "time.sleep")

    def outside(event, args):
        if event == "open":
            path, mode = str(args[0]), args[1] or "r"
            if not path.endswith(CODE) or any(m in str(mode) for m in "wax+"):
                raise RuntimeError(f"the core opened {path} ({mode})")
        elif event.startswith(REFUSED):
            raise RuntimeError(f"the core reached outside: {event} {args!r}")

    sys.addaudithook(outside)

    import pkgutil, importlib
    import kpgen.core
    for module in pkgutil.iter_modules(kpgen.core.__path__, "kpgen.core."):
        importlib.import_module(module.name)
    loaded = sorted(m for m in sys.modules if m.startswith("kpgen."))
    assert all(m.startswith("kpgen.core") for m in loaded), loaded
    for foreign in ("yaml_rs", "jinja2", "kubernetes", "nftables", "click"):
        assert foreign not in sys.modules, foreign

    from kpgen.core.names import nft_chain
    from kpgen.core.node import NodeFlags, node_config
    from kpgen.core.parse import parse_documents
    from kpgen.core.plan import build_plans

    documents = [
        {"apiVersion": "v1", "kind": "Service",
         "metadata": {"name": "web", "namespace": "default"},
         "spec": {"clusterIP": "10.96.0.5", "type": "NodePort",
                  "ports": [{"port": 80, "nodePort": 30080}]}},
        {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
         "metadata": {"name": "web-1", "namespace": "default",
                      "labels": {"kubernetes.io/service-name": "web"}},
         "addressType": "IPv4", "ports": [{"name": "", "port": 8080}],
         "endpoints": [{"addresses": ["10.244.1.5"], "conditions": {"ready": True}}]},
    ]
    node = node_config(NodeFlags(hostname="worker-1", cluster_cidrs=["10.244.0.0/16"]))
    (plan,) = build_plans(parse_documents(documents).state, node)
    (port,) = plan.ports
    print(nft_chain("service", port), [str(b.address) for b in port.cluster_endpoints])
    """
)


def test_the_core_works_with_the_outside_world_unavailable() -> None:
    result = subprocess.run(
        [sys.executable, "-I", "-B", "-c", PURE_CORE],  # -B: no bytecode written
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=PACKAGE.parent,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "service-default/web/tcp/80 ['10.244.1.5']\n"
