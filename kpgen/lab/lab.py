"""The namespace lab: the seed article's cluster built from network namespaces on one machine.

Every machine of the article is a network namespace: the ``gateway`` outside the cluster, the
``k8s-master`` and two workers on the node network 10.20.30.0/24 (an L2 segment: a bridge in a
namespace of its own, ``kpgen-lab-net``), and each pod a namespace of its own, attached to its
node Calico-style (a /32 address, a default route via 169.254.1.1 answered by proxy ARP, a /32
route on the node). The workers route each other's pod CIDRs, the gateway routes the externalIP
10.20.30.20 to k8s-worker01, and ``kpgen apply`` loads each worker's rules, as kube-proxy would.
The pods answer HTTP on port 80: ``GET /`` gives their name, ``GET /whoami`` their name and the
client address they saw (which shows masquerade). They also answer each UDP datagram to port 80
with their name and the client address (``pod1 192.168.69.200``), for UDP services.

This module owns the lab's life: :func:`up`, :func:`down`, :func:`status`, running commands in
it (:func:`exec_in`), more pods (:func:`add_pod`) and rules (:func:`apply`), and the article's
curl loops (:func:`demo`). What it made is recorded under ``/run/kpgen-lab/`` (namespaces with
their inodes, processes with their start times, ``/etc/netns`` host files), and ``down`` removes
exactly that, never a namespace or process of anyone else. It never touches the root network
namespace: every link is created inside a namespace of the lab.

The end-to-end tests (tests/e2e/) use a :class:`Lab` with a name prefix, so that a test run and
a lab brought up by hand never meet.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import click

# --- the cluster of the seed article (examples/seed-cluster.yaml, header comment) -------------

NODE_NETWORK = ipaddress.ip_network("10.20.30.0/24")
CLUSTER_CIDR = "192.168.0.0/16"
POD_GATEWAY = "169.254.1.1"  # Calico's: every pod's default gateway, answered by proxy ARP
EXTERNAL_IP = "10.20.30.20"
EXTERNAL_IP_NODE = "k8s-worker01"  # the externalIP is routed to this worker
NET_NS = "kpgen-lab-net"  # holds the node network's bridge
BRIDGE = "br0"
HTTP_PORT = 80
MODES = ("nftables", "iptables")
# package data, so that an installed kpgen has it (examples/seed-cluster.yaml links here)
SEED = Path(str(files("kpgen.lab").joinpath("seed-cluster.yaml")))
STATE_ROOT = Path("/run/kpgen-lab")
ETC_NETNS = Path("/etc/netns")
# present while /etc/netns is there because a lab made it (labs may come and go in any order)
MADE_ETC_NETNS = STATE_ROOT / "made-etc-netns"
POD_PYTHON = "/usr/bin/python3"  # Debian's, for the pods' HTTP servers
# no DNS in the lab: names come from its hosts files; 127.0.0.1:53 refuses at once
RESOLV_CONF = "# written by kpgen lab: no name server in the lab\nnameserver 127.0.0.1\n"
COMMAND_TIMEOUT = 60.0
READY_TIMEOUT = 10.0


@dataclass(frozen=True)
class Node:
    name: str
    address: str
    pod_cidr: str | None = None  # workers only

    @property
    def is_worker(self) -> bool:
        return self.pod_cidr is not None


@dataclass(frozen=True)
class Pod:
    name: str
    node: str
    address: str
    serve: bool = True  # answers HTTP on port 80


NODES = (
    Node("gateway", "10.20.30.1"),
    Node("k8s-master", "10.20.30.10"),
    Node("k8s-worker01", "10.20.30.11", "192.168.69.192/26"),
    Node("k8s-worker02", "10.20.30.12", "192.168.79.64/26"),
)
NODE_BY_NAME = {node.name: node for node in NODES}
WORKERS = tuple(node.name for node in NODES if node.is_worker)
CLUSTER_NODES = ("k8s-master", *WORKERS)
SEED_PODS = (
    Pod("pod1", "k8s-worker01", "192.168.69.246"),
    Pod("pod2", "k8s-worker02", "192.168.79.106"),
    # the article's test pod, for the ClusterIP loop: a free address of worker01's pod CIDR
    Pod("test-pod", "k8s-worker01", "192.168.69.200", serve=False),
)
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
PREFIX_RE = re.compile(r"^([a-z0-9][a-z0-9-]{0,14})?$")

# The pods' HTTP server, run by Debian's python3 inside the pod's namespace.
POD_SERVER = '''\
"""kpgen lab pod: GET / answers "<name>", GET /whoami "<name> <client address>"; a UDP datagram
to the same port number is answered with "<name> <client address>"."""
import http.server
import socket
import socketserver
import sys
import threading

NAME, PORT = sys.argv[1], int(sys.argv[2])


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"

    def do_GET(self):
        text = f"{NAME} {self.client_address[0]}" if self.path == "/whoami" else NAME
        body = (text + "\\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True

    def server_bind(self):  # without HTTPServer's reverse lookup of the address
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = NAME, self.server_address[1]


def answer_udp(udp):
    while True:
        try:
            _, client = udp.recvfrom(2048)
            udp.sendto(f"{NAME} {client[0]}\\n".encode(), client)
        except OSError:
            pass


server = Server(("0.0.0.0", PORT), Handler)
try:
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("0.0.0.0", PORT))
except OSError:  # the UDP port is taken: HTTP is served all the same
    pass
else:
    threading.Thread(target=answer_udp, args=(udp,), daemon=True).start()
print("ready", flush=True)
server.serve_forever()
'''


class LabError(Exception):
    """The lab could not do what was asked; the message says why and what to do."""


# --- state: what this lab made, so that down removes exactly that -----------------------------


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


@dataclass(frozen=True)
class PodStatus:
    name: str
    node: str
    address: str
    pid: int | None
    running: bool


@dataclass(frozen=True)
class LabStatus:
    """What :func:`status` reports: whether the lab is up, and each part of it."""

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


def _netns_inode(name: str) -> int | None:
    try:
        return os.stat(f"/run/netns/{name}").st_ino
    except OSError:
        return None


def _tool(name: str) -> str:
    found = shutil.which(
        name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    )
    if found is None:
        raise LabError(f"{name} is not installed (make setup installs what the lab needs)")
    return found


def _run(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run a setup command; its failure is a LabError with the tool's message."""
    result = subprocess.run(
        list(argv), capture_output=True, text=True, check=False, timeout=COMMAND_TIMEOUT
    )
    if result.returncode != 0:
        raise LabError(f"{shlex.join(argv)}: {(result.stderr or result.stdout).strip()}")
    return result


def _veth_name(pod: str) -> str:
    """The node side of a pod's veth: ``cali`` and the pod's name (a hash of it if that is
    too long for an interface name), as Calico names them."""
    name = f"cali{pod}"
    if len(name) > 15:
        name = "cali" + hashlib.sha1(pod.encode()).hexdigest()[:11]
    return name


class Lab:
    """One lab. ``prefix`` goes before every namespace's name (the tests use one); the names
    the lab's machines know each other by (its ``hosts`` files) stay the article's."""

    def __init__(self, prefix: str = "") -> None:
        if not PREFIX_RE.match(prefix):
            raise LabError(f"bad lab prefix {prefix!r}: lowercase letters, digits and '-'")
        self.prefix = prefix
        self.state_dir = STATE_ROOT / (prefix.rstrip("-") or "default")
        self._children: dict[int, subprocess.Popen[bytes]] = {}

    # --- names and state ------------------------------------------------------------------

    def ns(self, name: str) -> str:
        """The network namespace of the lab's machine or pod ``name``."""
        return self.prefix + name

    @property
    def mode(self) -> str | None:
        """The proxy mode the lab was brought up with (None: not up)."""
        return self._load().mode

    @property
    def _state_file(self) -> Path:
        return self.state_dir / "state.json"

    def _load(self) -> State:
        try:
            return State.from_json(self._state_file.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return State(prefix=self.prefix)

    def _save(self, state: State) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        temporary = self._state_file.with_suffix(".tmp")
        temporary.write_text(json.dumps(asdict(state), indent=1), encoding="utf-8")
        temporary.replace(self._state_file)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[State]:
        """The state, under a lock (on /run/kpgen-lab itself) that keeps two processes from
        changing labs at once. ``down`` removes the directory when it is empty, so a lock
        taken on a directory that was removed meanwhile is taken again on the new one."""
        _require_root()
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
                    yield self._load()
                    return
            finally:
                os.close(handle)

    def _ours(self, state: State, namespace: str) -> bool:
        inode = _netns_inode(namespace)
        return inode is not None and state.namespaces.get(namespace) == inode

    # --- running things inside ------------------------------------------------------------

    def _argv(self, name: str, argv: Sequence[str]) -> list[str]:
        return [_tool("ip"), "netns", "exec", self.ns(name), *argv]

    def exec_in(
        self,
        name: str,
        argv: Sequence[str],
        *,
        timeout: float = COMMAND_TIMEOUT,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in the namespace of ``name`` (a node, the gateway or a pod) and wait.

        On timeout, the command and everything it started are killed and
        :class:`subprocess.TimeoutExpired` is raised.
        """
        process = subprocess.Popen(
            self._argv(name, argv),
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
            raise
        return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)

    def popen_in(self, name: str, argv: Sequence[str], **options: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in the namespace of ``name`` without waiting (the caller waits)."""
        return subprocess.Popen(self._argv(name, argv), **options)

    def serve(self, name: str, label: str, port: int = HTTP_PORT) -> int:
        """Start the pods' HTTP server in the namespace of ``name``, answering as ``label``;
        returns its PID once it listens. ``down`` stops it; so does :meth:`stop`."""
        with self._locked() as state:
            return self._serve(state, name, label, port)

    def _serve(self, state: State, name: str, label: str, port: int) -> int:
        script = self.state_dir / "pod-server.py"
        if not script.exists():
            self.state_dir.mkdir(parents=True, exist_ok=True)
            script.write_text(POD_SERVER, encoding="utf-8")
        log_path = self.state_dir / f"{label}-{port}.log"
        with open(log_path, "wb") as log:
            child = subprocess.Popen(
                self._argv(name, [POD_PYTHON, str(script), label, str(port)]),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._children[child.pid] = child
        start = start_time(child.pid)
        state.processes.append(
            Process(child.pid, start or "", self.ns(name), f"http server {label} :{port}")
        )
        self._save(state)
        deadline = time.monotonic() + READY_TIMEOUT
        while b"ready" not in log_path.read_bytes():
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
        self._save(state)

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

    def _add_namespace(self, state: State, namespace: str) -> None:
        _run([_tool("ip"), "netns", "add", namespace])
        inode = _netns_inode(namespace)
        assert inode is not None
        state.namespaces[namespace] = inode
        self._save(state)
        _run([_tool("ip"), "-n", namespace, "link", "set", "lo", "up"])

    def _sysctl(self, name: str, *settings: str) -> None:
        _run(self._argv(name, [_tool("sysctl"), "-q", "-w", *settings]))

    def _ip(self, name: str, command: str) -> None:
        """``ip -n NS command``; the command's words are validated names and addresses."""
        _run([_tool("ip"), "-n", self.ns(name), *command.split()])

    def _write_hosts(self, state: State) -> None:
        """Every namespace's /etc/hosts (``ip netns exec`` mounts /etc/netns/NS/hosts over
        it): the article's names for the nodes and pods. And a resolv.conf without a name
        server outside the lab: a lookup of another name fails at once."""
        pods = [*SEED_PODS, *(Pod(**p) for p in state.pods.values())]
        lines = ["# written by kpgen lab; removed by kpgen lab down", "127.0.0.1\tlocalhost"]
        lines += [f"{node.address}\t{node.name}" for node in NODES]
        lines += [f"{pod.address}\t{pod.name}" for pod in dict((p.name, p) for p in pods).values()]
        text = "\n".join(lines) + "\n"
        if not ETC_NETNS.exists():
            ETC_NETNS.mkdir(parents=True)
            MADE_ETC_NETNS.touch()
        for namespace in state.namespaces:
            directory = ETC_NETNS / namespace
            if str(directory) not in state.hosts_dirs:
                directory.mkdir()
                state.hosts_dirs.append(str(directory))
                self._save(state)
            (directory / "hosts").write_text(text, encoding="utf-8")
            (directory / "resolv.conf").write_text(RESOLV_CONF, encoding="utf-8")
        self._save(state)

    def _add_node(self, state: State, node: Node) -> None:
        namespace = self.ns(node.name)
        self._add_namespace(state, namespace)
        # the veth is made inside the node's namespace, then its peer moved to the bridge's
        bridge_ns = self.ns(NET_NS)
        self._ip(node.name, f"link add eth0 type veth peer name {node.name} netns {bridge_ns}")
        self._ip(NET_NS, f"link set {node.name} master {BRIDGE} up")
        self._ip(node.name, f"addr add {node.address}/{NODE_NETWORK.prefixlen} dev eth0")
        self._ip(node.name, "link set eth0 up")

    def _add_pod(self, state: State, pod: Pod) -> None:
        veth = _veth_name(pod.name)
        self._add_namespace(state, self.ns(pod.name))
        self._ip(pod.node, f"link add {veth} type veth peer name eth0 netns {self.ns(pod.name)}")
        # Calico: the node answers the pod's ARP for 169.254.1.1 at once (proxy ARP, no delay)
        self._sysctl(
            pod.node, f"net.ipv4.conf.{veth}.proxy_arp=1", f"net.ipv4.neigh.{veth}.proxy_delay=0"
        )
        self._ip(pod.node, f"link set {veth} up")
        self._ip(pod.node, f"route add {pod.address}/32 dev {veth} scope link")
        self._ip(pod.name, f"addr add {pod.address}/32 dev eth0")
        self._ip(pod.name, "link set eth0 up")
        self._ip(pod.name, f"route add {POD_GATEWAY} dev eth0 scope link")
        self._ip(pod.name, f"route add default via {POD_GATEWAY} dev eth0")
        if pod.serve:
            self._serve(state, pod.name, pod.name, HTTP_PORT)

    def _build(self, state: State, mode: str) -> list[str]:
        self._add_namespace(state, self.ns(NET_NS))
        self._ip(NET_NS, f"link add {BRIDGE} type bridge")
        self._ip(NET_NS, f"link set {BRIDGE} up")
        for node in NODES:
            self._add_node(state, node)
        gateway = NODE_BY_NAME["gateway"].address
        for name in CLUSTER_NODES:
            self._sysctl(name, "net.ipv4.ip_forward=1")
            # a default route, as nodes have one; it also lets proxy ARP answer for 169.254.1.1
            self._ip(name, f"route add default via {gateway}")
            for other in WORKERS:
                if other != name:
                    node = NODE_BY_NAME[other]
                    self._ip(name, f"route add {node.pod_cidr} via {node.address}")
        self._ip(
            "gateway", f"route add {EXTERNAL_IP}/32 via {NODE_BY_NAME[EXTERNAL_IP_NODE].address}"
        )
        for pod in SEED_PODS:
            self._add_pod(state, pod)
        self._write_hosts(state)
        state.mode = mode
        self._save(state)
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
        _require_root()
        for tool in ("ip", "sysctl"):
            _tool(tool)
        if not os.access(POD_PYTHON, os.X_OK):
            raise LabError(f"{POD_PYTHON} is missing: the pods' HTTP servers run on it")
        if not SEED.exists():
            raise LabError(f"the seed cluster {SEED} is missing")
        with self._locked() as state:
            self._check_free(state, self._lab_namespaces(state))
            if state.namespaces or state.processes:
                self._down(state)
                state = self._load()
            try:
                return self._build(state, mode)
            except BaseException:
                self._down(self._load())
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
            listing = subprocess.run(
                [_tool("ip"), "netns", "pids", namespace], capture_output=True, text=True
            )
            for pid in listing.stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
        deleted = []
        for namespace in sorted(ours, key=lambda n: n == self.ns(NET_NS)):  # the bridge's last
            try:
                _run([_tool("ip"), "netns", "delete", namespace])
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
            self._save(state)
            raise LabError("; ".join(problems))
        shutil.rmtree(self.state_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            STATE_ROOT.rmdir()  # only if no other lab is up
        return done

    def status(self) -> LabStatus:
        """Whether the lab is up, and each of its parts."""
        state = self._load()
        namespaces = {n: self._ours(state, n) for n in self._lab_namespaces(state)}
        if not state.namespaces:
            namespaces = {}
        servers = {p.namespace: p for p in state.processes if p.what.endswith(f":{HTTP_PORT}")}
        pods = []
        for pod in [*SEED_PODS, *(Pod(**p) for p in state.pods.values())]:
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
        tables = self.exec_in(worker, [_tool("nft"), "list", "tables"]).stdout.split("\n")
        found = [t.removeprefix("table ").strip() for t in tables if t.strip().endswith(" kpgen")]
        saved = self.exec_in(worker, [_tool("iptables-save")]).stdout
        chains = len(re.findall(r"^:KPGEN-", saved, re.M))
        parts = [f"nft table {t}" for t in found]
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
            taken = {
                p.name: p.address for p in [*SEED_PODS, *(Pod(**p) for p in state.pods.values())]
            }
            if name in taken or ip in taken.values():
                raise LabError(f"a pod named {name} or with address {ip} exists already")
            self._check_free(state, [self.ns(name)])
            pod = Pod(name, node, str(address), serve)
            state.pods[name] = asdict(pod)
            self._save(state)
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
                _run([_tool("ip"), "netns", "delete", namespace])
            del state.namespaces[namespace]
            directory = ETC_NETNS / namespace
            if str(directory) in state.hosts_dirs:
                shutil.rmtree(directory, ignore_errors=True)
                state.hosts_dirs.remove(str(directory))
            del state.pods[name]
            self._save(state)
            self._write_hosts(state)

    def apply(
        self, node: str, manifest_paths: Sequence[str | Path], mode: str | None = None
    ) -> subprocess.CompletedProcess[str]:
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


def _require_root() -> None:
    if os.geteuid() != 0:
        raise LabError(
            "the lab needs root: it creates network namespaces, veths and a bridge, and loads "
            "rules in them (run it as root, e.g. with sudo)"
        )


# --- the article's loops ------------------------------------------------------------------------

DEMO_LOOPS = (
    ("gateway", "http://k8s-worker01:30001"),
    ("gateway", "http://k8s-worker02:30001"),
    ("test-pod", "http://10.101.179.255:8080"),
    ("gateway", f"http://{EXTERNAL_IP}:8080"),
)
DEMO_TITLES = (
    "NodePort from outside, through k8s-worker01",
    "NodePort from outside, through k8s-worker02",
    "the NodePort service's ClusterIP from a pod (the article's test-pod)",
    "the externalIP from outside (routed to k8s-worker01)",
)


def demo(lab: Lab, echo: Callable[[str], object] = print) -> bool:
    """Run the article's curl loops (without its ``sleep 5``) in the lab, printing them as
    a shell transcript; True when every request was answered by a pod."""
    ok = True
    for (name, url), title in zip(DEMO_LOOPS, DEMO_TITLES, strict=True):
        command = f"for i in 1 2 3 4 5 ;do curl -s {url} | grep pod; done"
        echo(f"# {title}")
        echo(f"[{name} ~]$ {command}")
        try:
            result = lab.exec_in(name, ["sh", "-c", command], timeout=60)
            output = result.stdout
        except subprocess.TimeoutExpired:
            output = ""
        lines = output.splitlines()
        for line in lines:
            echo(line)
        answered = [line for line in lines if re.fullmatch(r"pod\d+", line.strip())]
        if len(answered) != 5:
            echo(f"# only {len(answered)} of 5 requests were answered by a pod")
            ok = False
    return ok


# --- the command line -----------------------------------------------------------------------

DEFAULT = Lab()
up = DEFAULT.up
down = DEFAULT.down
status = DEFAULT.status
exec_in = DEFAULT.exec_in
add_pod = DEFAULT.add_pod
remove_pod = DEFAULT.remove_pod
apply = DEFAULT.apply

_mode_option = click.option(
    "--proxy-mode",
    type=click.Choice(MODES),
    default="nftables",
    show_default=True,
    help="Which rules kpgen loads on the workers.",
)


def _lab_errors(action: Callable[[], object]) -> None:
    try:
        action()
    except LabError as error:
        click.echo(f"kpgen: lab: {error}", err=True)
        sys.exit(1)


def _bring_up(lab: Lab, mode: str) -> None:
    _require_root()
    click.echo(f"kpgen lab: building the seed article's cluster, proxy mode {mode} ...", err=True)
    started = time.monotonic()
    for summary in lab.up(mode):
        click.echo(f"kpgen lab: {summary}", err=True)
    click.echo(f"kpgen lab: up in {time.monotonic() - started:.1f} s", err=True)


@click.group("lab")
def lab_group() -> None:
    """The seed article's cluster in network namespaces on this machine (needs root).

    \b
    gateway 10.20.30.1, k8s-master 10.20.30.10, k8s-worker01 10.20.30.11 (pod1),
    k8s-worker02 10.20.30.12 (pod2) and a test-pod; kpgen apply on each worker.
    """


@lab_group.command("up")
@_mode_option
def lab_up(proxy_mode: str) -> None:
    """Build the lab, load kpgen's rules on the workers.

    A lab left up is taken down and built again; a namespace of the same name that the lab
    did not make is refused.
    """
    _lab_errors(lambda: _bring_up(DEFAULT, proxy_mode))
    click.echo(DEFAULT.status().describe())


@lab_group.command("down")
def lab_down() -> None:
    """Remove everything the lab made.

    Its processes, network namespaces and /etc/netns files; nothing it did not make.
    """

    def action() -> None:
        for done in DEFAULT.down() or ["nothing of the lab to remove"]:
            click.echo(f"kpgen lab: {done}")

    _lab_errors(action)


@lab_group.command("status")
def lab_status() -> None:
    """Whether the lab is up, and its parts."""
    _lab_errors(lambda: click.echo(DEFAULT.status().describe()))


@lab_group.command("demo")
@_mode_option
@click.option("--keep-up", is_flag=True, help="Leave the lab up afterwards.")
def lab_demo(proxy_mode: str, keep_up: bool) -> None:
    """Up, the article's curl loops, down (make lab).

    The loops are the article's, without its `sleep 5`, printed as a shell transcript. Exits 1
    if a request was not answered by a pod.
    """

    def action() -> None:
        _require_root()
        try:
            _bring_up(DEFAULT, proxy_mode)
            ok = demo(DEFAULT, click.echo)
        finally:
            if not keep_up:
                for done in DEFAULT.down():
                    click.echo(f"kpgen lab: {done}", err=True)
        if not ok:
            raise LabError("some requests were not answered (see above)")

    _lab_errors(action)
