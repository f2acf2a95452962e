"""The namespace lab: the seed article's cluster (kpgen/lab/topology.py) made of network
namespaces on one machine, with kpgen's rules on its workers.

This module owns the lab's life: :meth:`Lab.up` makes the namespaces, links, addresses and
routes the topology describes, starts the pods' HTTP servers (kpgen/lab/podserver.py) and runs
``kpgen apply`` on each worker, as kube-proxy would load its rules; :meth:`Lab.down` removes it
all again; :meth:`Lab.status` says what is up. Tests and scripts run commands in it
(:meth:`Lab.exec_in`), add pods (:meth:`Lab.add_pod`) and load other rules (:meth:`Lab.apply`).
Every process goes through kpgen's one runner (kpgen/dataplane/run.py). What a lab made is
recorded (kpgen/lab/state.py), and ``down`` removes exactly that, never a namespace or process
of anyone else. It never touches the root network namespace: every link is created inside a
namespace of the lab.

The end-to-end tests (tests/e2e/) use a :class:`Lab` with a name prefix, so that a test run and
a lab brought up by hand never meet.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from kpgen.core.names import NFT_TABLE, is_nft_table
from kpgen.dataplane.run import DEVNULL, STDOUT, Completed, Started, ToolError, run, spawn, tool
from kpgen.lab.state import STATE_ROOT, Process, State, StateDir, start_time
from kpgen.lab.topology import (
    BRIDGE,
    CLUSTER_CIDR,
    CLUSTER_WIRING,
    HTTP_PORT,
    NET_NS,
    NODE_BY_NAME,
    NODE_NETWORK,
    NODES,
    SEED,
    SEED_PODS,
    WORKERS,
    Pod,
    Wiring,
    host_names,
    node_wiring,
    pod_wiring,
)

MODES = ("nftables", "iptables")
ETC_NETNS = Path("/etc/netns")
# present while /etc/netns is there because a lab made it (labs may come and go in any order)
MADE_ETC_NETNS = STATE_ROOT / "made-etc-netns"
# no DNS in the lab: names come from its hosts files; 127.0.0.1:53 refuses at once
RESOLV_CONF = "# written by kpgen lab: no name server in the lab\nnameserver 127.0.0.1\n"
COMMAND_TIMEOUT = 60.0
READY_TIMEOUT = 10.0
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
PREFIX_RE = re.compile(r"^([a-z0-9][a-z0-9-]{0,14})?$")


class LabError(Exception):
    """The lab could not do what was asked; the message says why and what to do."""


@contextlib.contextmanager
def _tool_errors() -> Iterator[None]:
    """A tool that is missing, failed or hung is the lab's error, with the tool's message."""
    try:
        yield
    except ToolError as error:
        raise LabError(str(error)) from None


def _run(
    argv: Sequence[str],
    *,
    netns: str | None = None,
    check: bool = True,
    timeout: float = COMMAND_TIMEOUT,
    input: str | None = None,
) -> Completed[str]:
    with _tool_errors():
        return run(argv, netns=netns, check=check, timeout=timeout, input=input)


def require_root() -> None:
    if os.geteuid() != 0:
        raise LabError(
            "the lab needs root: it creates network namespaces, veths and a bridge, and loads "
            "rules in them (run it as root, e.g. with sudo)"
        )


@dataclass(frozen=True)
class PodStatus:
    name: str
    node: str
    address: str
    pid: int | None
    running: bool


@dataclass(frozen=True)
class LabStatus:
    """What :meth:`Lab.status` reports: whether the lab is up, and each part of it."""

    up: bool
    mode: str | None
    state_dir: str
    namespaces: dict[str, bool]  # every namespace of the lab: exists?
    pods: tuple[PodStatus, ...]
    rules: dict[str, str]  # worker: what kpgen loaded there

    def describe(self) -> str:
        if not self.namespaces:
            return "kpgen lab: down (nothing of the lab exists)"
        head = "up" if self.up else "partly up (run `kpgen lab down`)"
        lines = [f"kpgen lab: {head}, proxy mode {self.mode or '-'} (state in {self.state_dir})"]
        for name, exists in self.namespaces.items():
            node = NODE_BY_NAME.get(name)
            what = "" if exists else "  MISSING"
            if node is not None:
                pods = [p for p in self.pods if p.node == name]
                listed = ", ".join(
                    f"{p.name} {p.address}"
                    + (
                        f" (http :{HTTP_PORT}, pid {p.pid}{'' if p.running else ' DEAD'})"
                        if p.pid
                        else ""
                    )
                    for p in pods
                )
                rules = f"  rules: {self.rules[name]}" if name in self.rules else ""
                lines.append(f"  {name:<14} {node.address:<13}{what}{rules}".rstrip())
                if listed:
                    lines.append(f"  {'':<14} pods: {listed}")
            elif name == NET_NS:
                lines.append(f"  {name:<14} bridge {BRIDGE}: the node network {NODE_NETWORK}{what}")
        return "\n".join(lines)


def _netns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


class Lab:
    """One lab. ``prefix`` goes before every namespace's name (the tests use one); the names
    the lab's machines know each other by (its ``hosts`` files) stay the article's."""

    def __init__(self, prefix: str = "") -> None:
        if not PREFIX_RE.match(prefix):
            raise LabError(f"bad lab prefix {prefix!r}: lowercase letters, digits and '-'")
        self.prefix = prefix
        self._state = StateDir(prefix)
        self.state_dir = self._state.path
        self._children: dict[int, Started[Any]] = {}

    # --- names and state ------------------------------------------------------------------

    def ns(self, name: str) -> str:
        """The network namespace of the lab's machine or pod ``name``."""
        return self.prefix + name

    @property
    def mode(self) -> str | None:
        """The proxy mode the lab was brought up with (None: not up)."""
        return self._state.load().mode

    @contextlib.contextmanager
    def _locked(self) -> Iterator[State]:
        require_root()
        with self._state.locked() as state:
            yield state

    def _ours(self, state: State, namespace: str) -> bool:
        inode = _netns_inode(namespace)
        return inode is not None and state.namespaces.get(namespace) == inode

    def _pods(self, state: State) -> list[Pod]:
        return [*SEED_PODS, *(Pod(**p) for p in state.pods.values())]

    # --- running things inside ------------------------------------------------------------

    def exec_in(
        self,
        name: str,
        argv: Sequence[str],
        *,
        timeout: float = COMMAND_TIMEOUT,
        input: str | None = None,
    ) -> Completed[str]:
        """Run ``argv`` in the namespace of ``name`` (a node, the gateway or a pod) and wait.

        On timeout, the command and everything it started are killed and :class:`LabError`
        is raised.
        """
        return _run(argv, netns=self.ns(name), check=False, timeout=timeout, input=input)

    def popen_in(self, name: str, argv: Sequence[str], **options: Any) -> Started[Any]:
        """Start ``argv`` in the namespace of ``name`` without waiting (the caller waits);
        ``options`` are :class:`subprocess.Popen`'s."""
        with _tool_errors():
            return spawn(argv, netns=self.ns(name), **options)

    def serve(self, name: str, label: str, port: int = HTTP_PORT) -> int:
        """Start the pods' HTTP server in the namespace of ``name``, answering as ``label``;
        returns its PID once it listens. ``down`` stops it; so does :meth:`stop`."""
        with self._locked() as state:
            return self._serve(state, name, label, port)

    def _serve(self, state: State, name: str, label: str, port: int) -> int:
        from kpgen.lab import podserver  # here: its http.server would slow every kpgen command

        self.state_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.state_dir / f"{label}-{port}.log"
        ready = self.state_dir / f"{label}-{port}.ready"
        ready.unlink(missing_ok=True)
        with open(log_path, "wb") as log:
            child = self.popen_in(
                name,
                podserver.argv(label, port, ready),
                stdin=DEVNULL,
                stdout=log,
                stderr=STDOUT,
                start_new_session=True,
            )
        self._children[child.pid] = child
        start = start_time(child.pid)
        state.processes.append(
            Process(child.pid, start or "", self.ns(name), f"http server {label} :{port}")
        )
        self._state.save(state)
        deadline = time.monotonic() + READY_TIMEOUT
        while not ready.exists():
            if child.poll() is not None or time.monotonic() > deadline:
                output = log_path.read_text(errors="replace").strip()
                raise LabError(
                    f"the HTTP server of {label} in {self.ns(name)} did not start: {output}"
                )
            time.sleep(0.02)
        return child.pid

    def stop(self, pid: int) -> None:
        """Stop a process the lab started (:meth:`serve`)."""
        with self._locked() as state:
            self._stop(state, [p for p in state.processes if p.pid == pid])

    def _stop(self, state: State, processes: list[Process]) -> None:
        for process in processes:
            if start_time(process.pid) == process.start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for process in processes:
            child = self._children.pop(process.pid, None)
            while start_time(process.pid) == process.start and time.monotonic() < deadline:
                if child is not None and child.poll() is not None:
                    break
                time.sleep(0.02)
            if start_time(process.pid) == process.start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
            if child is not None:
                child.wait()
            state.processes.remove(process)
        self._state.save(state)

    # --- building ---------------------------------------------------------------------------

    def _lab_namespaces(self, state: State) -> list[str]:
        names = [NET_NS, *(n.name for n in NODES), *(p.name for p in SEED_PODS), *state.pods]
        return list(dict.fromkeys(self.ns(n) for n in names))

    def _check_free(self, state: State, namespaces: Sequence[str]) -> None:
        """Refuse to go on if a namespace (or its /etc/netns directory) exists that the lab
        did not make."""
        for namespace in namespaces:
            foreign_ns = _netns_inode(namespace) is not None and not self._ours(state, namespace)
            hosts_dir = str(ETC_NETNS / namespace)
            foreign_dir = os.path.exists(hosts_dir) and hosts_dir not in state.hosts_dirs
            if foreign_ns or foreign_dir:
                thing = f"network namespace {namespace}" if foreign_ns else hosts_dir
                raise LabError(
                    f"{thing} exists and was not made by kpgen lab: not touching it. "
                    "Remove it yourself if it is a leftover, then run `kpgen lab up` again."
                )

    def _add_namespace(self, state: State, name: str) -> None:
        namespace = self.ns(name)
        _run(["ip", "netns", "add", namespace])
        inode = _netns_inode(namespace)
        assert inode is not None
        state.namespaces[namespace] = inode
        self._state.save(state)
        self._ip(name, "link", "set", "lo", "up")

    def _ip(self, name: str, *words: str) -> None:
        """``ip -n NS ...`` in the namespace of ``name``."""
        _run(["ip", "-n", self.ns(name), *words])

    def _wire(self, wiring: Wiring) -> None:
        """Make what ``wiring`` describes, in its order."""
        for veth in wiring.veths:
            # made inside the first machine, its peer moved into the other's namespace
            self._ip(veth.machine, "link", "add", veth.name, "type", "veth",
                     "peer", "name", veth.peer_name, "netns", self.ns(veth.peer))  # fmt: skip
            bridge = ["master", veth.bridge] if veth.bridge else []
            self._ip(veth.peer, "link", "set", veth.peer_name, *bridge, "up")
            self._ip(veth.machine, "link", "set", veth.name, "up")
        for machine, sysctls in itertools.groupby(wiring.sysctls, lambda s: s.machine):
            settings = [sysctl.setting for sysctl in sysctls]
            _run(["sysctl", "-q", "-w", *settings], netns=self.ns(machine))
        for address in wiring.addresses:
            self._ip(address.machine, "addr", "add", address.cidr, "dev", address.device)
        for route in wiring.routes:
            how = ["via", route.via] if route.via else []
            if route.device:
                how += ["dev", route.device, *([] if route.via else ["scope", "link"])]
            self._ip(route.machine, "route", "add", route.destination, *how)

    def _write_hosts(self, state: State) -> None:
        """Every namespace's /etc/hosts (``ip netns exec`` mounts /etc/netns/NS/hosts over
        it): the article's names for the nodes and pods. And a resolv.conf without a name
        server outside the lab: a lookup of another name fails at once."""
        lines = ["# written by kpgen lab; removed by kpgen lab down", "127.0.0.1\tlocalhost"]
        lines += [f"{address}\t{name}" for address, name in host_names(self._pods(state))]
        text = "\n".join(lines) + "\n"
        if not ETC_NETNS.exists():
            ETC_NETNS.mkdir(parents=True)
            MADE_ETC_NETNS.touch()
        for namespace in state.namespaces:
            directory = ETC_NETNS / namespace
            if str(directory) not in state.hosts_dirs:
                directory.mkdir()
                state.hosts_dirs.append(str(directory))
                self._state.save(state)
            (directory / "hosts").write_text(text, encoding="utf-8")
            (directory / "resolv.conf").write_text(RESOLV_CONF, encoding="utf-8")
        self._state.save(state)

    def _add_pod(self, state: State, pod: Pod) -> None:
        self._add_namespace(state, pod.name)
        self._wire(pod_wiring(pod))
        if pod.serve:
            self._serve(state, pod.name, pod.name, HTTP_PORT)

    def _build(self, state: State, mode: str) -> list[str]:
        self._add_namespace(state, NET_NS)
        self._ip(NET_NS, "link", "add", BRIDGE, "type", "bridge")
        self._ip(NET_NS, "link", "set", BRIDGE, "up")
        for node in NODES:
            self._add_namespace(state, node.name)
            self._wire(node_wiring(node))
        self._wire(CLUSTER_WIRING)
        for pod in SEED_PODS:
            self._add_pod(state, pod)
        self._write_hosts(state)
        state.mode = mode
        self._state.save(state)
        return [
            f"{worker}: {self.apply(worker, [SEED], mode).stderr.strip()}" for worker in WORKERS
        ]

    # --- the public operations ------------------------------------------------------------

    def up(self, mode: str = "nftables") -> list[str]:
        """Build the lab and load kpgen's rules in ``mode`` on both workers. A lab this one
        made before is taken down first; anything else in the way is refused. If building
        fails, everything made so far is removed again. Returns kpgen apply's summaries."""
        if mode not in MODES:
            raise LabError(f"unknown proxy mode {mode!r} (choose from {', '.join(MODES)})")
        require_root()
        with _tool_errors():
            for name in ("ip", "sysctl"):
                tool(name)
        from kpgen.lab.podserver import POD_PYTHON

        if not os.access(POD_PYTHON, os.X_OK):
            raise LabError(f"{POD_PYTHON} is missing: the pods' HTTP servers run on it")
        if not SEED.exists():
            raise LabError(f"the seed cluster {SEED} is missing")
        with self._locked() as state:
            self._check_free(state, self._lab_namespaces(state))
            if state.namespaces or state.processes:
                self._down(state)
                state = self._state.load()
            try:
                return self._build(state, mode)
            except BaseException:
                self._down(self._state.load())
                raise

    def down(self) -> list[str]:
        """Stop the lab's processes, delete its namespaces and files; returns what was removed.
        Only what this lab recorded is removed."""
        with self._locked() as state:
            return self._down(state)

    def _down(self, state: State) -> list[str]:
        done, problems = [], []
        if state.processes:
            count = len(state.processes)
            self._stop(state, list(state.processes))
            done.append(f"stopped {count} process{'es' if count > 1 else ''}")
        ours = [n for n in state.namespaces if self._ours(state, n)]
        # anything still running inside a namespace of ours was started in the lab
        for namespace in ours:
            listing = _run(["ip", "netns", "pids", namespace], check=False)
            for pid in listing.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        deleted = []
        for namespace in sorted(ours, key=lambda n: n == self.ns(NET_NS)):  # the bridge's last
            try:
                _run(["ip", "netns", "delete", namespace])
                deleted.append(namespace)
            except LabError as error:
                problems.append(str(error))
        if deleted:
            done.append(f"deleted {len(deleted)} network namespaces ({', '.join(deleted)})")
        removed = [d for d in state.hosts_dirs if os.path.isdir(d)]
        for directory in removed:
            shutil.rmtree(directory)
        if removed:
            done.append(f"removed {len(removed)} directories of hosts files from {ETC_NETNS}")
        if MADE_ETC_NETNS.exists():
            with contextlib.suppress(OSError):
                ETC_NETNS.rmdir()  # only once empty: another lab or someone else may use it
                MADE_ETC_NETNS.unlink()
        if problems:
            self._state.save(state)
            raise LabError("; ".join(problems))
        self._state.remove()
        return done

    def status(self) -> LabStatus:
        """Whether the lab is up, and each of its parts."""
        state = self._state.load()
        namespaces = {n: self._ours(state, n) for n in self._lab_namespaces(state)}
        if not state.namespaces:
            namespaces = {}
        servers = {p.namespace: p for p in state.processes if p.what.endswith(f":{HTTP_PORT}")}
        pods = []
        for pod in self._pods(state):
            server = servers.get(self.ns(pod.name))
            pods.append(
                PodStatus(
                    pod.name,
                    pod.node,
                    pod.address,
                    server.pid if server else None,
                    server is not None and start_time(server.pid) == server.start,
                )
            )
        rules = {}
        if namespaces and os.geteuid() == 0:
            for worker in WORKERS:
                if namespaces.get(self.ns(worker)):
                    rules[worker] = self._rules_summary(worker)
        up = (
            bool(namespaces)
            and all(namespaces.values())
            and all(p.running for p in pods if p.pid is not None)
        )
        return LabStatus(up, state.mode, str(self.state_dir), namespaces, tuple(pods), rules)

    def _rules_summary(self, worker: str) -> str:
        tables = self.exec_in(worker, ["nft", "list", "tables"]).stdout.split("\n")
        names = [t.removeprefix("table ").strip().split() for t in tables if t.strip()]
        ours = [(f, n) for f, n in (w for w in names if len(w) == 2) if is_nft_table(n)]
        saved = self.exec_in(worker, ["iptables-save"]).stdout
        chains = len(re.findall(r"^:KPGEN-", saved, re.M))
        parts = []
        for family, name in ours:
            if name == NFT_TABLE:
                shards = sum(1 for f, n in ours if f == family and n != NFT_TABLE)
                parts.append(f"nft table {family} {name} (+{shards} service port tables)")
        if chains:
            parts.append(f"{chains} iptables KPGEN- chains")
        return ", ".join(parts) or "none of kpgen's"

    def add_pod(self, name: str, node: str, ip: str, *, serve: bool = True) -> Pod:
        """Add a pod ``name`` at ``ip`` on worker ``node`` (an address of its pod CIDR),
        answering HTTP on port 80 unless ``serve`` is false. Endpoints for it come with the
        manifests given to :meth:`apply`."""
        if not NAME_RE.match(name):
            raise LabError(f"bad pod name {name!r}: a DNS label (lowercase, digits, '-')")
        worker = NODE_BY_NAME.get(node)
        if worker is None or worker.pod_cidr is None:
            raise LabError(f"{node!r} is not a worker of the lab ({', '.join(WORKERS)})")
        address = ipaddress.ip_address(ip)
        if address not in ipaddress.ip_network(worker.pod_cidr):
            raise LabError(f"{ip} is not in {node}'s pod CIDR {worker.pod_cidr}")
        with self._locked() as state:
            if not state.namespaces:
                raise LabError("the lab is not up (kpgen lab up)")
            taken = {p.name: p.address for p in self._pods(state)}
            if name in taken or ip in taken.values():
                raise LabError(f"a pod named {name} or with address {ip} exists already")
            self._check_free(state, [self.ns(name)])
            pod = Pod(name, node, str(address), serve)
            state.pods[name] = asdict(pod)
            self._state.save(state)
            self._add_pod(state, pod)
            self._write_hosts(state)
            return pod

    def remove_pod(self, name: str) -> None:
        """Remove a pod that :meth:`add_pod` added: its server, namespace and hosts file."""
        with self._locked() as state:
            if name not in state.pods:
                raise LabError(f"no added pod {name} (the seed's pods stay until down)")
            namespace = self.ns(name)
            self._stop(state, [p for p in state.processes if p.namespace == namespace])
            if self._ours(state, namespace):
                _run(["ip", "netns", "delete", namespace])
            del state.namespaces[namespace]
            directory = ETC_NETNS / namespace
            if str(directory) in state.hosts_dirs:
                shutil.rmtree(directory, ignore_errors=True)
                state.hosts_dirs.remove(str(directory))
            del state.pods[name]
            self._state.save(state)
            self._write_hosts(state)

    def apply(
        self, node: str, manifest_paths: Sequence[str | Path], mode: str | None = None
    ) -> Completed[str]:
        """``kpgen apply`` of the manifests inside ``node``'s namespace, as that node
        (``--hostname-override``) with the cluster CIDR, in ``mode`` (the lab's by default)."""
        mode = mode or self.mode or "nftables"
        argv = [sys.executable, "-m", "kpgen", "apply"]
        for path in manifest_paths:
            argv += ["-f", str(Path(path).resolve())]
        argv += ["--hostname-override", node, "--cluster-cidr", CLUSTER_CIDR, "--proxy-mode", mode]
        result = self.exec_in(node, argv)
        if result.returncode != 0:
            raise LabError(f"kpgen apply on {node} failed: {result.stderr.strip()}")
        return result


# The lab of `kpgen lab`, and its operations as functions.
DEFAULT = Lab()
up = DEFAULT.up
down = DEFAULT.down
status = DEFAULT.status
exec_in = DEFAULT.exec_in
add_pod = DEFAULT.add_pod
remove_pod = DEFAULT.remove_pod
apply = DEFAULT.apply
