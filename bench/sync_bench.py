"""How long from an API event to the rules applied, in ``kpgen run``, without the debounce.

Runs in a throwaway network namespace (it re-executes itself there with ``ip netns exec``):
the test API server of tests/apiserver.py on that namespace's loopback, the real
``kubernetes`` client and kpgen's controller in this process (``--min-sync-period 0``), rules
loaded into the namespace's kernel. For each size it lists N services x E endpoints, waits for
the first (full) sync, then changes one EndpointSlice at a time (an endpoint added, then
removed) and measures from the API write to the end of the sync that applied it.

With ``--packets`` it measures what a user feels instead: every endpoint address is a local
address of the namespace that refuses connections (100.64.0.0/10 on lo); each change creates
a second EndpointSlice for one service with one endpoint that answers (a listener on port
9090), and a client connects to the service's ClusterIP again and again (each refused try
costs microseconds) until the new endpoint answers: from the API write to that answer. The
slice is deleted again before the next change.

    .venv/bin/python bench/sync_bench.py --sizes 10,10000 [--mode iptables] [--changes 20]
    .venv/bin/python bench/sync_bench.py --packets --sizes 10000,50000

With ``--process`` (implies ``--packets``), ``kpgen run`` runs as its own process, as on a
node: "first sync" is then from its start until the last service answers, and the last of
every shard table (a node's first load fills its tables side by side), and the RSS is
kpgen's own, after the first sync and after all the changes (each change is an API event of
its own, and its deletion another).

    .venv/bin/python bench/sync_bench.py --process --sizes 10000 --changes 500
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

NAMESPACE = f"kpgen-bench-sync-{os.getpid()}"


def cluster(services: int, endpoints: int) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "Node", "metadata": {"name": "node-0"}}
    ]
    for i in range(services):
        name = f"svc-{i}"
        objects.append(
            {
                "apiVersion": "v1",
                "kind": "Service",
                "metadata": {"name": name, "namespace": "default"},
                "spec": {
                    "clusterIP": cluster_ip(i),
                    "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
                },
            }
        )
        objects.append(slice_of(i, endpoints))
    return objects


def slice_of(i: int, endpoints: int) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"svc-{i}-abc",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": f"svc-{i}"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [f"100.{64 + i // 65536}.{i // 256 % 256}.{e + 1}"], "nodeName": "n"}
            for e in range(endpoints)
        ],
    }


LIVE_ADDRESS, LIVE_PORT = "100.127.255.1", 9090


def cluster_ip(i: int) -> str:
    return f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}"


def live_slice(i: int) -> dict[str, Any]:
    """A second slice of service ``i`` whose one endpoint answers."""
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"svc-{i}-live",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": f"svc-{i}"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": LIVE_PORT, "protocol": "TCP"}],
        "endpoints": [{"addresses": [LIVE_ADDRESS], "nodeName": "n"}],
    }


_LISTENING: list[socket.socket] = []


def local_network() -> None:
    """Inside the throwaway namespace, once: every endpoint address local (and refusing), a
    route for the service addresses, and the listener of the live endpoint."""
    if _LISTENING:
        return
    for argv in (
        ["ip", "addr", "add", "100.64.0.1/10", "dev", "lo"],
        ["ip", "link", "add", "out0", "type", "veth", "peer", "name", "out1"],
        ["ip", "link", "set", "out0", "up"],
        ["ip", "link", "set", "out1", "up"],
        ["ip", "addr", "add", "192.0.2.1/24", "dev", "out0"],
        ["ip", "route", "add", "default", "via", "192.0.2.2", "dev", "out0"],
    ):
        subprocess.run(argv, check=True)
    listener = socket.create_server((LIVE_ADDRESS, LIVE_PORT), backlog=128)

    def serve() -> None:
        while True:
            conn, _ = listener.accept()
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    _LISTENING.append(listener)


def answered_after(address: str, deadline: float) -> float | None:
    """Connect to ``address``:80 until a connection is accepted; when it was (monotonic)."""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((address, 80), timeout=0.05):
                return time.monotonic()
        except (ConnectionRefusedError, TimeoutError, OSError):
            continue
    return None


def live_endpoint_added(server: Any, i: int) -> tuple[float, float]:
    """Give service ``i`` an endpoint that answers: when it was written to the API, and when
    a client first got an answer from it (monotonic)."""
    t0 = time.monotonic()
    server.create(live_slice(i))
    answered = answered_after(cluster_ip(i), t0 + 30)
    if answered is None:
        raise SystemExit(f"svc-{i}: the new endpoint never answered")
    return t0, answered


def measure(
    services: int, endpoints: int, changes: int, mode: str, packets: bool = False
) -> dict[str, Any]:
    from apiserver import ApiServer

    from kpgen.controller.health import Health, Timing
    from kpgen.controller.metrics import Metrics
    from kpgen.controller.sync import Controller
    from kpgen.core.node import NodeFlags, ProxyMode, node_config
    from kpgen.dataplane.apply import RuleLoader
    from kpgen.inputs.api import NODE, SERVICE, SLICE, Store, api_client, api_informers

    done: list[tuple[float, int]] = []
    synced = threading.Condition()

    class Timed(Controller):
        def sync(self, snapshot: Any) -> None:
            super().sync(snapshot)
            with synced:
                done.append((time.monotonic(), snapshot.endpoint_changes))
                synced.notify_all()

    def wait_sync(after: int, timeout: float = 600) -> tuple[float, int]:
        with synced:
            synced.wait_for(lambda: len(done) > after, timeout)
            return done[after]

    node = node_config(NodeFlags(hostname="node-0", mode=mode, cluster_cidrs=["100.64.0.0/10"]))
    timing = Timing(min_sync_period=0.0, sync_period=3600.0)
    with ApiServer(bookmark_interval=30.0) as server:
        server.set_objects(cluster(services, endpoints))
        kubeconfig = server.kubeconfig(Path(f"/tmp/{NAMESPACE}.kubeconfig"))
        stop = threading.Event()
        holder: list[Controller] = []
        store = Store((SERVICE, SLICE, NODE), on_change=lambda: holder[0].on_change())
        loader = RuleLoader(ProxyMode(mode), "legacy")
        controller = Timed(node, store, loader, Metrics(mode), Health(timing), timing)
        holder.append(controller)
        started = time.monotonic()
        for informer in api_informers(store, api_client(str(kubeconfig), None), "node-0", stop):
            informer.start()
        thread = threading.Thread(target=controller.run, args=(stop,), daemon=True)
        thread.start()
        first_done, _ = wait_sync(0)
        first = first_done - started
        latencies = []
        synced_after = []
        if packets:
            local_network()
        for n in range(changes if packets else 0):
            i = (n * 7919) % services  # spread over the table
            before = len(done)
            t0, answered = live_endpoint_added(server, i)
            latencies.append(answered - t0)
            finished, _ = wait_sync(before)
            synced_after.append(finished - t0)
            before = len(done)
            server.delete("EndpointSlice", "default", f"svc-{i}-live")
            wait_sync(before)
        for n in range(0 if packets else changes):
            i = n % services
            current = server.get("EndpointSlice", "default", f"svc-{i}-abc")
            grow = len(current["endpoints"]) == endpoints  # add one endpoint, or take it away
            body = slice_of(i, endpoints + 1 if grow else endpoints)
            body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            before = len(done)
            t0 = time.monotonic()
            server.update(body)
            while True:  # the sync that took this change (not one that ran just before it)
                finished, endpoint_changes = wait_sync(before)
                if endpoint_changes:
                    break
                before += 1
            latencies.append(finished - t0)
        stop.set()
        server.drop_watches()
    rss = _rss_mib()
    return {
        "services": services,
        "endpoints": endpoints,
        "mode": mode,
        "measured": "API write to the new endpoint's answer"
        if packets
        else "API write to sync end",
        "rss_mib": rss,
        "sync_end_median_ms": round(statistics.median(synced_after) * 1000, 1)
        if synced_after
        else None,
        "first_sync_s": round(first, 3),
        "changes": changes,
        "median_ms": round(statistics.median(latencies) * 1000, 1),
        "p90_ms": round(sorted(latencies)[int(0.9 * (len(latencies) - 1))] * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
    }


def refused(address: str) -> bool:
    """Whether a connection to ``address``:80 is refused at once (the rules DNAT it to a
    local address where nothing listens), rather than going nowhere."""
    try:
        with socket.create_connection((address, 80), timeout=0.05):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


def measure_process(services: int, endpoints: int, changes: int, mode: str) -> dict[str, Any]:
    """``kpgen run`` as a process against the test API server; a client sees each change."""
    from apiserver import ApiServer

    from kpgen.core import names

    with ApiServer(bookmark_interval=30.0) as server:
        server.set_objects(cluster(services, endpoints))
        kubeconfig = server.kubeconfig(Path(f"/tmp/{NAMESPACE}.kubeconfig"))
        local_network()
        argv = [sys.executable, "-m", "kpgen", "run", "--kubeconfig", str(kubeconfig)]
        argv += ["--hostname-override", "node-0", "--cluster-cidr", "100.64.0.0/10"]
        argv += ["--proxy-mode", mode, "--min-sync-period", "0", "--sync-period", "5s"]
        argv += ["--healthz-bind-address", "", "--metrics-bind-address", ""]
        log = open(f"/tmp/{NAMESPACE}.log", "w")  # noqa: SIM115  # closed below
        started = time.monotonic()
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            # the last service, and the last of every shard table (a first load fills the
            # tables side by side): every service answers once these do
            waiting = {names.nft_shard(f"default/svc-{i}"): i for i in range(services)}
            for i in sorted(waiting.values(), reverse=True):
                while not refused(cluster_ip(i)):
                    if proc.poll() is not None or time.monotonic() - started > 600:
                        raise SystemExit(f"kpgen run never served svc-{i}")
            first = time.monotonic() - started
            # the rules are in the kernel before the first sync ends (it then gives memory
            # back and logs): the changes are measured from its end, not from within its tail
            log_path = Path(f"/tmp/{NAMESPACE}.log")
            while "sync: full" not in log_path.read_text():
                if proc.poll() is not None or time.monotonic() - started > 900:
                    raise SystemExit("kpgen run never finished its first sync")
                time.sleep(0.05)
            rss_first = _rss_mib(proc.pid)
            latencies = []
            for n in range(changes):
                i = (n * 7919) % services
                t0, answered = live_endpoint_added(server, i)
                latencies.append(answered - t0)
                server.delete("EndpointSlice", "default", f"svc-{i}-live")
                gone = time.monotonic() + 30
                while sum(refused(cluster_ip(i)) for _ in range(20)) < 20:  # applied
                    if time.monotonic() > gone:
                        raise SystemExit(f"svc-{i}: the deleted endpoint still answers")
            time.sleep(11)  # two periodic full syncs with nothing to change
            rss_last = _rss_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(30)
            log.close()
            server.drop_watches()
        # the periodic full syncs after the first: "sync: full, ..., wrote nothing, 1.2 ms"
        lines = Path(f"/tmp/{NAMESPACE}.log").read_text().splitlines()
        fulls = [
            float(m.group(1))
            for m in (re.search(r"sync: full, .* wrote nothing, ([0-9.]+) ms", ln) for ln in lines)
            if m
        ]
    return {
        "services": services,
        "endpoints": endpoints,
        "mode": mode,
        "measured": "kpgen run as a process: API write to the new endpoint's answer",
        "first_sync_s": round(first, 3),
        "changes": changes,
        "median_ms": round(statistics.median(latencies) * 1000, 1),
        "p90_ms": round(sorted(latencies)[int(0.9 * (len(latencies) - 1))] * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
        "rss_mib": rss_last,
        "rss_after_first_sync_mib": rss_first,
        "idle_full_syncs": len(fulls),
        "idle_full_sync_median_ms": round(statistics.median(fulls), 1) if fulls else None,
    }


def _rss_mib(pid: int | str = "self") -> float:
    """A process's resident memory now."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,10000", help="service counts (default 10,10000)")
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--changes", type=int, default=20, help="slice changes per size")
    parser.add_argument("--mode", choices=["nftables", "iptables"], default="nftables")
    parser.add_argument(
        "--packets", action="store_true", help="measure until the new endpoint answers a client"
    )
    parser.add_argument(
        "--process", action="store_true", help="kpgen run as its own process (implies --packets)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.inside:
        if os.geteuid() != 0:
            sys.exit("sync_bench: needs root (it works in a throwaway network namespace)")
        subprocess.run(["ip", "netns", "add", NAMESPACE], check=True)
        try:
            subprocess.run(["ip", "-n", NAMESPACE, "link", "set", "lo", "up"], check=True)
            argv = ["ip", "netns", "exec", NAMESPACE, sys.executable, __file__, *sys.argv[1:]]
            sys.exit(subprocess.run([*argv, "--inside"]).returncode)
        finally:
            subprocess.run(["ip", "netns", "delete", NAMESPACE], check=False)
    import logging

    logging.basicConfig(level=logging.WARNING)
    what = "API write -> answer" if args.packets or args.process else "API write -> sync end"
    whose = "kpgen run's" if args.process else "this process's (controller + test API server)"
    print(f"# {what}; RSS: {whose}")
    header = ("services", "mode", "first sync s", "median ms", "p90 ms", "max ms", "RSS MiB")
    print("{:>8} {:>9} {:>12} {:>9} {:>7} {:>7} {:>8}".format(*header))
    results = []
    for size in (int(s) for s in args.sizes.split(",")):
        if args.process:
            r = measure_process(size, args.endpoints, args.changes, args.mode)
            print(
                f"# {size}: RSS after the first sync {r['rss_after_first_sync_mib']} MiB;"
                f" {r['idle_full_syncs']} periodic full syncs with nothing to change,"
                f" median {r['idle_full_sync_median_ms']} ms",
                flush=True,
            )
        else:
            r = measure(size, args.endpoints, args.changes, args.mode, args.packets)
        print(
            f"{r['services']:>8} {r['mode']:>9} {r['first_sync_s']:>12} {r['median_ms']:>9}"
            f" {r['p90_ms']:>7} {r['max_ms']:>7} {r['rss_mib']:>8}",
            flush=True,
        )
        results.append(r)
        if args.json:  # after each size: a long run that is interrupted keeps what it measured
            Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
