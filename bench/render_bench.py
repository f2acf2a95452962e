"""kpgen's render benchmark: how long a large cluster takes to parse, plan, render and load.

A synthetic cluster of N Services x E endpoints (one TCP port each, every 4th Service a
NodePort, every 10th with an externalIP, one EndpointSlice per Service) is built as plain API
dicts, as decoded manifests would be. Then, each stage timed separately with
``time.perf_counter`` (best and median of ``--repeat`` runs):

- parse: :func:`kpgen.core.parse.parse_documents` (dicts to the typed model);
- plan: :func:`kpgen.core.plan.build_plan`;
- render: :func:`kpgen.render.text.render_plan` for nftables and iptables;
- model to text: :func:`kpgen.render.text.render` (plan + render), the issue's 1 s target;
- decode: :func:`kpgen.inputs.manifests.load_documents` of the same cluster as a JSON and a
  YAML file;
- end to end: ``kpgen render -f FILE`` as a subprocess (start-up, decode, parse, render, write).

``--kernel`` also loads the rendered rules into throwaway network namespaces (``ip netns add``,
deleted afterwards; never the caller's namespace) and times ``nft -f``,
``iptables-legacy-restore`` and ``iptables-nft-restore``, at each of ``--sizes``, to show how
load time grows with the number of services.

    .venv/bin/python bench/render_bench.py                      # render part, 10,000 x 5
    .venv/bin/python bench/render_bench.py --kernel --sizes 1000,2000,4000,10000
    .venv/bin/python bench/render_bench.py --json > result.json
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import hashlib
import importlib.metadata
import ipaddress
import itertools
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import jinja2
import yaml

from kpgen.cli.main import iptables_text
from kpgen.core.model import ClusterState, IPFamily
from kpgen.core.node import NodeConfig, NodeFlags, ProxyMode, node_config
from kpgen.core.parse import parse_documents
from kpgen.core.plan import build_plan
from kpgen.inputs.manifests import load_documents
from kpgen.render.text import render, render_plan

ROOT = Path(__file__).resolve().parent.parent
TARGET_SECONDS = 1.0  # the issue's target: model to text of 10,000 x 5 under 1 s

# The synthetic cluster's address plan. Pods get one address each out of POD_CIDR.
SERVICE_CIDR = ipaddress.IPv4Network("10.96.0.0/12")
EXTERNAL_CIDR = ipaddress.IPv4Network("172.16.0.0/12")
POD_CIDR = ipaddress.IPv4Network("100.64.0.0/10")
NAMESPACES = 100
NODES = 100
HOSTNAME = "node-0"  # the node the rules are rendered for: endpoints on it are local
NODEPORT_BASE = 30000
NODEPORT_EVERY = 4
EXTERNAL_IP_EVERY = 10

T = TypeVar("T")


# --- the synthetic cluster ----------------------------------------------------------------


def synthetic_cluster(services: int, endpoints: int) -> list[dict[str, Any]]:
    """``services`` Services with one EndpointSlice of ``endpoints`` ready endpoints each."""
    if services + 1 > SERVICE_CIDR.num_addresses - 2:
        raise SystemExit(f"render_bench: at most {SERVICE_CIDR.num_addresses - 3} services")
    if services * endpoints > POD_CIDR.num_addresses - 2:
        raise SystemExit(f"render_bench: at most {POD_CIDR.num_addresses - 2} endpoints in all")
    if NODEPORT_BASE + services // NODEPORT_EVERY > 65535:
        raise SystemExit("render_bench: too many NodePort services for the port range")
    service_base = int(SERVICE_CIDR.network_address) + 1
    external_base = int(EXTERNAL_CIDR.network_address) + 1
    pod_base = int(POD_CIDR.network_address) + 1
    docs: list[dict[str, Any]] = []
    for i in range(services):
        name = f"svc-{i:06d}"
        namespace = f"ns-{i % NAMESPACES:03d}"
        cluster_ip = str(ipaddress.IPv4Address(service_base + i))
        port: dict[str, Any] = {"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}
        spec: dict[str, Any] = {
            "type": "ClusterIP",
            "clusterIP": cluster_ip,
            "clusterIPs": [cluster_ip],
            "ipFamilies": ["IPv4"],
            "ipFamilyPolicy": "SingleStack",
            "internalTrafficPolicy": "Cluster",
            "sessionAffinity": "None",
            "selector": {"app": name},
            "ports": [port],
        }
        if i % NODEPORT_EVERY == 0:
            spec["type"] = "NodePort"
            spec["externalTrafficPolicy"] = "Cluster"
            port["nodePort"] = NODEPORT_BASE + i // NODEPORT_EVERY
        if i % EXTERNAL_IP_EVERY == 5:
            spec["externalIPs"] = [str(ipaddress.IPv4Address(external_base + i))]
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {
                    "name": name,
                    "namespace": namespace,
                    "uid": f"00000000-0000-4000-8000-{i:012d}",
                    "resourceVersion": str(1000 + i),
                    "creationTimestamp": "2026-01-01T00:00:00Z",
                    "labels": {"app": name},
                },
                "spec": spec,
                "status": {"loadBalancer": {}},
            }
        )
        slice_endpoints = []
        for j in range(endpoints):
            k = i * endpoints + j
            pod = f"{name}-pod-{j}"
            slice_endpoints.append(
                {
                    "addresses": [str(ipaddress.IPv4Address(pod_base + k))],
                    "conditions": {"ready": True, "serving": True, "terminating": False},
                    "nodeName": f"node-{k % NODES}",
                    "targetRef": {"kind": "Pod", "namespace": namespace, "name": pod},
                }
            )
        docs.append(
            {
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSlice",
                "metadata": {
                    "name": f"{name}-abcde",
                    "namespace": namespace,
                    "labels": {
                        "kubernetes.io/service-name": name,
                        "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
                    },
                },
                "addressType": "IPv4",
                "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
                "endpoints": slice_endpoints,
            }
        )
    return docs


def write_manifests(docs: list[dict[str, Any]], directory: Path) -> dict[str, Path]:
    """The cluster as one ``kind: List`` in JSON and in YAML (what ``kubectl get -o`` writes)."""
    listed = {"apiVersion": "v1", "kind": "List", "items": docs}
    paths = {"json": directory / "cluster.json", "yaml": directory / "cluster.yaml"}
    paths["json"].write_text(json.dumps(listed, indent=2), encoding="utf-8")
    dumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
    with paths["yaml"].open("w", encoding="utf-8") as stream:
        yaml.dump(listed, stream, Dumper=dumper, default_flow_style=False, sort_keys=False)
    return paths


# --- timing -------------------------------------------------------------------------------


@dataclass
class Timing:
    """Wall-clock seconds of each run of one stage."""

    stage: str
    runs: list[float]
    note: str = ""
    max_rss_mb: float | None = None  # subprocesses: the largest peak resident set of the runs

    @property
    def best(self) -> float:
        return min(self.runs)

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "best": self.best,
            "median": self.median,
            "runs": self.runs,
            "note": self.note,
            "max_rss_mb": self.max_rss_mb,
        }


def timed(
    stage: str, repeat: int, function: Callable[[], T], note: str = "", freeze: bool = False
) -> tuple[Timing, T]:
    """Run ``function`` ``repeat`` times (the garbage collector on, as in the real command,
    after a collection before each run); return the timings and the last result.

    ``freeze``: move the objects that exist before each run out of the collector's sight
    (``gc.freeze``), so that the run's collections do not pay for the benchmark's own data, which
    the real command would not hold at that point (for decoding: the cluster, plan and text).
    """
    runs = []
    result: Any = None
    for _ in range(repeat):
        result = None
        gc.collect()
        if freeze:
            gc.freeze()
        try:
            start = time.perf_counter()
            result = function()
            runs.append(time.perf_counter() - start)
        finally:
            gc.unfreeze()
    timing = Timing(stage, runs, note)
    progress(f"{stage}: {_took(timing)}")
    return timing, result


STARTED = time.monotonic()


def _took(timing: Timing) -> str:
    runs = f"best of {len(timing.runs)}" if len(timing.runs) > 1 else "1 run"
    return f"{timing.best:.3f} s ({runs}; {time.monotonic() - STARTED:.0f} s so far)"


@dataclass
class Child:
    """A finished subprocess: exit code, wall seconds, peak resident set, output."""

    returncode: int
    seconds: float
    max_rss_mb: float
    stdout: str
    stderr: str


# Runs a command and writes its wall time and peak memory to the file argv[1]. The command is
# started from this small process, not from the benchmark: a child's ru_maxrss counts the memory
# of the process it was forked from, which for the benchmark is gigabytes.
_SPAWN = """
import json, os, subprocess, sys, time
start = time.perf_counter()
child = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(child.pid, 0)
seconds = time.perf_counter() - start
with open(sys.argv[1], "w") as report:
    json.dump({"seconds": seconds, "max_rss_kb": usage.ru_maxrss,
               "returncode": os.waitstatus_to_exitcode(status)}, report)
"""


def run_child(
    command: list[str], repeat: int, stage: str, note: str = "", stdin: Path | None = None
) -> tuple[Timing, Child]:
    """Run ``command`` ``repeat`` times, timing each run and reading its peak memory
    (``wait4``'s ``ru_maxrss``); stdout goes to a file, as ``kpgen render > FILE`` would."""
    children = []
    with tempfile.TemporaryDirectory(prefix="kpgen-bench-") as tmp:
        out, err, measured = Path(tmp) / "stdout", Path(tmp) / "stderr", Path(tmp) / "measured"
        for _ in range(repeat):
            with (
                out.open("wb") as stdout,
                err.open("wb") as stderr,
                (stdin or Path(os.devnull)).open("rb") as input_,
            ):
                # in a process group of its own, killed whole if the benchmark is interrupted:
                # the measuring process and the command it runs (kpgen render, a loader)
                child = subprocess.Popen(
                    [sys.executable, "-c", _SPAWN, str(measured), *command],
                    stdin=input_,
                    stdout=stdout,
                    stderr=stderr,
                    start_new_session=True,
                )
                try:
                    returncode = child.wait()
                except BaseException:
                    kill_group(child)
                    raise
                if returncode != 0:
                    raise subprocess.CalledProcessError(returncode, command)
            m = json.loads(measured.read_text())
            children.append(
                Child(
                    m["returncode"],
                    m["seconds"],
                    m["max_rss_kb"] / 1024,
                    out.read_text(encoding="utf-8"),
                    err.read_text(encoding="utf-8"),
                )
            )
    timing = Timing(stage, [c.seconds for c in children], note, max(c.max_rss_mb for c in children))
    progress(f"{stage}: {_took(timing)}")
    return timing, children[-1]


def kill_group(child: subprocess.Popen[bytes]) -> None:
    """Kill ``child`` and everything in its process group, and reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


# --- the machine --------------------------------------------------------------------------


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    except OSError as error:
        return f"unavailable ({error.strerror})"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else ""


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    git = ["git", "-C", str(ROOT)]
    dirty = _first_line([*git, "status", "--porcelain", "--", "kpgen", "templates"])
    # what was measured, exactly, even with uncommitted changes: a digest of the sources
    digest = hashlib.sha256()
    for source in sorted([*ROOT.glob("kpgen/*.py"), *ROOT.glob("templates/*.j2")]):
        digest.update(source.name.encode() + b"\0" + source.read_bytes())
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "jinja2": jinja2.__version__,
        "yaml_rs": importlib.metadata.version("yaml-rs"),  # what kpgen decodes YAML with
        "pyyaml": yaml.__version__,  # what this bench writes the YAML file with
        "nft": _first_line(["nft", "--version"]),
        "iptables": _first_line(["iptables", "--version"]),
        "iptables_legacy": _first_line(["iptables-legacy", "--version"]),
        "kpgen_commit": _first_line([*git, "rev-parse", "--short", "HEAD"]),
        "kpgen_dirty": bool(dirty),
        "kpgen_sources_sha256": digest.hexdigest()[:12],
    }


# --- the render part ----------------------------------------------------------------------


def node_settings(mode: ProxyMode, service_cidr: str) -> tuple[NodeConfig, list[str]]:
    """The node the rules are for, as a NodeConfig and as the same ``kpgen`` flags."""
    flags = [
        "--proxy-mode",
        mode.value,
        "--hostname-override",
        HOSTNAME,
        "--cluster-cidr",
        str(POD_CIDR),
    ]
    if service_cidr:
        flags += ["--service-cidr", service_cidr]
    config = node_config(
        NodeFlags(
            mode=mode.value,
            hostname=HOSTNAME,
            cluster_cidrs=[str(POD_CIDR)],
            service_cidrs=[service_cidr] if service_cidr else [],
        )
    )
    return config, flags


def kpgen_command() -> list[str]:
    """The kpgen command, its modules compiled to bytecode first, as ``pip install`` leaves
    them (a checkout run with PYTHONDONTWRITEBYTECODE would compile every module at every
    start: 0.04 s more)."""
    _compile_kpgen()
    script = Path(sys.executable).parent / "kpgen"
    return [str(script)] if script.exists() else [sys.executable, "-m", "kpgen"]


@functools.cache
def _compile_kpgen() -> None:
    import compileall

    import kpgen

    compileall.compile_dir(Path(kpgen.__file__).parent, quiet=1)


def render_part(args: argparse.Namespace, report: dict[str, Any]) -> list[Timing]:
    n, e, repeat = args.services, args.endpoints, args.repeat
    timings: list[Timing] = []
    generation, docs = timed(
        "generate the synthetic cluster (not kpgen)", 1, lambda: synthetic_cluster(n, e)
    )
    timings.append(generation)

    t, result = timed("parse: parse_documents", repeat, lambda: parse_documents(docs))
    timings.append(t)
    gc.disable()
    try:
        t, _ = timed(
            "parse: parse_documents, garbage collector off",
            repeat,
            lambda: parse_documents(docs),
            note="what gc.disable()/gc.freeze() would save",
        )
    finally:
        gc.enable()
    timings.append(t)
    state: ClusterState = result.state
    if result.problems or len(state.services) != n:
        problems = result.problems[:3]
        raise SystemExit(f"render_bench: the synthetic cluster does not parse: {problems}")

    nodes = {mode: node_settings(mode, args.service_cidr) for mode in ProxyMode}
    node = nodes[ProxyMode.NFTABLES][0]
    # the first render compiles the template: time it apart, on an empty cluster
    for mode in ProxyMode:
        empty = build_plan(ClusterState(), nodes[mode][0], IPFamily.V4)
        cold, _ = timed(
            f"template load + compile, {mode.value} (first render, empty cluster)",
            1,
            partial(render_plan, empty, mode),
        )
        timings.append(cold)

    t, plan = timed("plan: build_plan", repeat, lambda: build_plan(state, node, IPFamily.V4))
    timings.append(t)
    texts: dict[ProxyMode, str] = {}
    for mode in ProxyMode:
        t, texts[mode] = timed(
            f"render: render_plan, {mode.value}", repeat, partial(render_plan, plan, mode)
        )
        timings.append(t)
    totals: dict[str, Timing] = {}
    for mode in ProxyMode:
        config = nodes[mode][0]
        t, text = timed(
            f"model to text: render(), {mode.value} (plan + render)",
            repeat,
            partial(render, state, config),
            note=f"target < {TARGET_SECONDS:g} s",
        )
        timings.append(t)
        totals[mode.value] = t
        assert text == texts[mode], "render() and build_plan + render_plan disagree"

    report["output"] = {
        mode.value: {"bytes": len(text.encode()), "lines": text.count("\n")}
        for mode, text in texts.items()
    }
    report["target"] = {
        mode: {"best": t.best, "target": TARGET_SECONDS, "met": t.best < TARGET_SECONDS}
        for mode, t in totals.items()
    }

    with tempfile.TemporaryDirectory(prefix="kpgen-bench-") as tmp:
        paths = write_manifests(docs, Path(tmp))
        report["manifest_bytes"] = {kind: p.stat().st_size for kind, p in paths.items()}
        for kind, path in paths.items():
            t, _ = timed(
                f"decode: load_documents, {kind} file",
                repeat,
                partial(load_documents, [str(path)]),
                freeze=True,
            )
            timings.append(t)
        if not args.no_e2e:
            t, _ = run_child(
                [*kpgen_command(), "--version"],
                args.e2e_repeat,
                "end to end: kpgen --version (start-up only)",
            )
            timings.append(t)
            for kind, path in paths.items():
                for mode in ProxyMode:
                    command = [*kpgen_command(), "render", "-f", str(path), *nodes[mode][1]]
                    t, done = run_child(
                        command,
                        args.e2e_repeat,
                        f"end to end: kpgen render -f FILE.{kind}, {mode.value}",
                        "subprocess: start-up + decode + parse + plan + render + write",
                    )
                    timings.append(t)
                    # what the command prints: iptables with the jumps as "# once:" lines
                    printed = (
                        iptables_text(state, nodes[mode][0])
                        if mode is ProxyMode.IPTABLES
                        else texts[mode]
                    )
                    if done.returncode != 0 or done.stdout != printed:
                        raise SystemExit(
                            f"render_bench: {' '.join(command)} exit {done.returncode}, output "
                            f"{'differs from' if done.stdout != printed else 'matches'} the "
                            f"in-process render\n{done.stderr[-2000:]}"
                        )
        report["e2e_command"] = (
            f"{' '.join(kpgen_command())} render -f CLUSTER.(json|yaml) "
            + " ".join(nodes[ProxyMode.NFTABLES][1])
        )
    return timings


def run(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, check=False, **kwargs)


# --- the kernel part ----------------------------------------------------------------------

_namespaces = 0


@contextmanager
def throwaway_namespace() -> Iterator[str]:
    """A fresh network namespace, deleted afterwards whatever happens. Every load runs in one:
    the caller's own namespace is never touched."""
    global _namespaces
    _namespaces += 1
    name = f"kpgen-bench-{os.getpid()}-{_namespaces}"
    done = run(["ip", "netns", "add", name])
    if done.returncode != 0:
        raise SystemExit(f"render_bench: ip netns add {name}: {done.stderr.strip()}")
    try:
        yield name
    finally:
        run(["ip", "netns", "delete", name])


@dataclass
class Load:
    """One load of one rendered ruleset into a fresh namespace."""

    loader: str
    services: int
    seconds: float | None
    max_rss_mb: float | None
    ok: bool
    check: str = ""
    error: str = ""


LOADERS = {
    "nft": (ProxyMode.NFTABLES, ["nft", "-f"]),
    "iptables-legacy": (ProxyMode.IPTABLES, ["iptables-legacy-restore"]),
    "iptables-nft": (ProxyMode.IPTABLES, ["iptables-nft-restore"]),
}


def _loaded(loader: str, namespace: str) -> str:
    """What the namespace holds after the load, to check it is what was rendered."""
    exec_ = ["ip", "netns", "exec", namespace]
    if loader == "nft":
        listing = run([*exec_, "nft", "list", "chains"]).stdout
        return f"{listing.count(chr(9) + 'chain ')} chains"
    save = "iptables-legacy-save" if loader == "iptables-legacy" else "iptables-nft-save"
    listing = run([*exec_, save]).stdout
    return f"{sum(line.startswith('-A ') for line in listing.splitlines())} rules"


def _expected(loader: str, text: str) -> str:
    if loader == "nft":
        return f"{sum(line.startswith(chr(9) + 'chain ') for line in text.splitlines())} chains"
    lines = text.splitlines()
    return f"{sum(line.startswith(('-A ', '-I ')) for line in lines)} rules"


def load_once(loader: str, services: int, path: Path, text: str) -> Load:
    command = LOADERS[loader][1]
    with throwaway_namespace() as namespace:
        full = ["ip", "netns", "exec", namespace, *command]
        if loader == "nft":
            full.append(str(path))
        t, done = run_child(full, 1, loader, stdin=None if loader == "nft" else path)
        if done.returncode != 0:
            error = done.stderr.strip()[-500:]
            return Load(loader, services, t.best, t.max_rss_mb, False, error=error)
        found, wanted = _loaded(loader, namespace), _expected(loader, text)
        check = f"{found} loaded" + ("" if found == wanted else f", rendered {wanted}")
        return Load(loader, services, t.best, t.max_rss_mb, found == wanted, check)


def exec_overhead() -> float:
    """Best of 5 ``ip netns exec NS true``: what every timed load includes besides the loader."""
    with throwaway_namespace() as namespace:
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            run(["ip", "netns", "exec", namespace, "true"])
            runs.append(time.perf_counter() - start)
    return min(runs)


def scaling_part(args: argparse.Namespace, report: dict[str, Any]) -> list[dict[str, Any]]:
    """At each size: model-to-text time of both modes, and with --kernel each loader's time."""
    rows: list[dict[str, Any]] = []
    loaders = [name for name in LOADERS if name not in args.skip_loader]
    if args.kernel:
        report["netns_exec_overhead"] = exec_overhead()
    for size in args.sizes:
        state = parse_documents(synthetic_cluster(size, args.endpoints)).state
        row: dict[str, Any] = {"services": size, "endpoints": size * args.endpoints}
        texts: dict[ProxyMode, str] = {}
        for mode in ProxyMode:
            config = node_settings(mode, args.service_cidr)[0]
            t, texts[mode] = timed("model to text", args.repeat, partial(render, state, config))
            row[f"render_{mode.value}"] = t.best
            row[f"bytes_{mode.value}"] = len(texts[mode].encode())
        if args.kernel:
            with tempfile.TemporaryDirectory(prefix="kpgen-bench-") as tmp:
                files = {}
                for mode, text in texts.items():
                    files[mode] = Path(tmp) / f"rules.{mode.value}"
                    files[mode].write_text(text, encoding="utf-8")
                for loader in loaders:
                    mode = LOADERS[loader][0]
                    if loader == "iptables-nft" and size > args.iptables_nft_max:
                        row[loader] = None
                        row[f"{loader}_note"] = f"skipped above {args.iptables_nft_max} services"
                        continue
                    loads = [
                        load_once(loader, size, files[mode], texts[mode])
                        for _ in range(args.kernel_repeat)
                    ]
                    good = [x.seconds for x in loads if x.ok and x.seconds is not None]
                    row[loader] = min(good) if good else None
                    row[f"{loader}_runs"] = [x.seconds for x in loads]
                    row[f"{loader}_max_rss_mb"] = max(x.max_rss_mb or 0 for x in loads)
                    row[f"{loader}_note"] = "; ".join(
                        sorted({x.check if x.ok else f"FAILED: {x.error}" for x in loads})
                    )
        rows.append(row)
        progress(f"size {size}: done")
    return rows


def growth(rows: list[dict[str, Any]], key: str) -> list[str]:
    """Between consecutive sizes: the exponent k of time ~ services^k (1 linear, 2 quadratic)."""
    notes = []
    points: list[tuple[int, float]] = [(r["services"], r[key]) for r in rows if r.get(key)]
    for (n1, t1), (n2, t2) in itertools.pairwise(points):
        exponent = math.log(t2 / t1) / math.log(n2 / n1)
        notes.append(f"{n1}->{n2}: x{t2 / t1:.2f} for x{n2 / n1:.2f} services, k={exponent:.2f}")
    return notes


# --- output -------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(f"render_bench: {message}", file=sys.stderr, flush=True)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def print_report(report: dict[str, Any]) -> None:
    m = report["machine"]
    dirty = " + uncommitted changes in kpgen/ or templates/" if m["kpgen_dirty"] else ""
    print(
        f"kpgen render benchmark (commit {m['kpgen_commit']}{dirty}; "
        f"sources sha256 {m['kpgen_sources_sha256']})"
    )
    print(
        f"machine: {m['nproc']} CPUs ({m['cpu']}), kernel {m['kernel']}, Python {m['python']}, "
        f"jinja2 {m['jinja2']}, yaml-rs {m.get('yaml_rs')} (PyYAML {m['pyyaml']} writes the file)"
    )
    print(f"tools: {m['nft']}; {m['iptables']}; {m['iptables_legacy']}")
    if "stages" in report:
        p = report["params"]
        print(
            f"\ncluster: {p['services']} services x {p['endpoints']} endpoints, one TCP port "
            f"each, every {NODEPORT_EVERY}th a NodePort, every {EXTERNAL_IP_EVERY}th with an "
            f"externalIP; node {HOSTNAME}, --cluster-cidr {POD_CIDR}"
            + (f", --service-cidr {p['service_cidr']}" if p["service_cidr"] else "")
        )
        print(
            f"seconds, best and median of the runs (in-process: {p['repeat']}, "
            f"subprocess: {p['e2e_repeat']})\n"
        )
        rows = [
            [
                s["stage"],
                seconds(s["best"]),
                seconds(s["median"]),
                str(len(s["runs"])),
                "" if s["max_rss_mb"] is None else f"{s['max_rss_mb']:.0f}",
            ]
            for s in report["stages"]
        ]
        print(table(["stage", "best", "median", "runs", "peak RSS MB"], rows))
        out = report["output"]
        print(
            "\noutput: "
            + ", ".join(
                f"{mode} {o['bytes'] / 1e6:.1f} MB, {o['lines']} lines" for mode, o in out.items()
            )
        )
        print(
            "manifests: "
            + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in report["manifest_bytes"].items())
        )
        for mode, t in report["target"].items():
            verdict = "met" if t["met"] else "NOT met"
            print(
                f"target, model to text < {t['target']:g} s, {mode}: best {t['best']:.3f} s: "
                f"{verdict}"
            )
    if report.get("scaling"):
        rows_in = report["scaling"]
        keys = ["render_nftables", "render_iptables"]
        if report["params"]["kernel"]:
            keys += [k for k in LOADERS if any(k in r for r in rows_in)]
        headers = ["services", *[k.replace("render_", "render ") for k in keys]]
        print(
            f"\nscaling: seconds (render: best of {report['params']['repeat']}; "
            f"loads: best of {report['params']['kernel_repeat']}, each into a fresh netns)\n"
        )
        print(
            table(
                headers, [[str(r["services"]), *[seconds(r.get(k)) for k in keys]] for r in rows_in]
            )
        )
        if report["params"]["kernel"]:
            print(f"\nevery load includes `ip netns exec` ({report['netns_exec_overhead']:.3f} s)")
            for r in rows_in:
                for k in LOADERS:
                    if f"{k}_note" in r:
                        rss = r.get(f"{k}_max_rss_mb")
                        memory = f", peak RSS {rss:.0f} MB" if rss else ""
                        print(f"  {r['services']:>6} {k}: {r[f'{k}_note']}{memory}")
        print("\ngrowth between sizes (time ~ services^k):")
        for key in keys:
            for note in growth(rows_in, key):
                print(f"  {key}: {note}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000, help="services (default 10000)")
    parser.add_argument("--endpoints", type=int, default=5, help="endpoints per service (5)")
    parser.add_argument(
        "--repeat",
        type=int,
        default=5,
        help="runs of each in-process stage (default 5: best and median)",
    )
    parser.add_argument(
        "--e2e-repeat", type=int, default=3, help="runs of each end-to-end subprocess (default 3)"
    )
    parser.add_argument("--no-e2e", action="store_true", help="skip the subprocess runs")
    parser.add_argument(
        "--service-cidr",
        default=str(SERVICE_CIDR),
        help=f"the node's --service-cidr (default {SERVICE_CIDR}; '' for none)",
    )
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",") if x],
        help="service counts for the scaling table (e.g. 1000,2000,4000,10000)",
    )
    parser.add_argument(
        "--kernel",
        action="store_true",
        help="also time loading the rules into throwaway network namespaces",
    )
    parser.add_argument(
        "--kernel-repeat",
        type=int,
        default=1,
        help="loads per loader and size, each into a fresh namespace (default 1)",
    )
    parser.add_argument(
        "--iptables-nft-max",
        type=int,
        default=2000,
        help="skip iptables-nft-restore above this many services (default 2000; "
        "it takes minutes at 10,000)",
    )
    parser.add_argument(
        "--skip-loader",
        action="append",
        default=[],
        choices=list(LOADERS),
        help="leave a loader out (repeatable)",
    )
    parser.add_argument(
        "--no-render",
        action="store_true",
        help="skip the per-stage render part (only the scaling/kernel part)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--save", metavar="FILE", help="also write the results as JSON to FILE")
    args = parser.parse_args()
    if args.kernel:
        if os.geteuid() != 0:
            raise SystemExit("render_bench: --kernel needs root (ip netns add)")
        missing = [
            t
            for t in ("ip", "nft", "iptables-legacy-restore", "iptables-nft-restore")
            if shutil.which(t) is None
        ]
        if missing:
            raise SystemExit(f"render_bench: --kernel needs {', '.join(missing)}")
    if args.kernel and not args.sizes:
        args.sizes = [args.services]

    report: dict[str, Any] = {
        "machine": machine(),
        "params": {
            k: getattr(args, k)
            for k in (
                "services",
                "endpoints",
                "repeat",
                "e2e_repeat",
                "service_cidr",
                "sizes",
                "kernel",
                "kernel_repeat",
                "iptables_nft_max",
            )
        },
    }
    if not args.no_render:
        progress(f"render part: {args.services} x {args.endpoints}")
        report["stages"] = [t.as_dict() for t in render_part(args, report)]
    if args.sizes:
        progress(f"scaling part: {args.sizes}{' with kernel loads' if args.kernel else ''}")
        report["scaling"] = scaling_part(args, report)
    if args.save:
        Path(args.save).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.json:
        json.dump(report, sys.stdout, indent=2)
        print()
    else:
        print_report(report)


def _interrupted(signum: int, _: Any) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    # Ctrl-C or SIGTERM: the running stage's child processes are killed, and the temporary
    # directories and network namespaces removed, as the stack unwinds
    signal.signal(signal.SIGTERM, _interrupted)
    try:
        main()
    except KeyboardInterrupt:
        progress("interrupted: child processes stopped, temporary files removed")
        sys.exit(130)
