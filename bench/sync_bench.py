"""How long from an API event to the rules applied, in ``kpgen run``, without the debounce.

Runs in a throwaway network namespace (it re-executes itself there with ``ip netns exec``):
the test API server of tests/apiserver.py on that namespace's loopback, the real
``kubernetes`` client and kpgen's controller in this process (``--min-sync-period 0``), rules
loaded into the namespace's kernel. For each size it lists N services x E endpoints, waits for
the first (full) sync, then changes one EndpointSlice at a time (an endpoint added, then
removed) and measures from the API write to the end of the sync that applied it.

    .venv/bin/python bench/sync_bench.py --sizes 10,10000 [--mode iptables] [--changes 20]
"""

from __future__ import annotations

import argparse
import os
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
                    "clusterIP": f"10.{96 + i // 65536}.{i // 256 % 256}.{i % 256}",
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


def measure(services: int, endpoints: int, changes: int, mode: str) -> dict[str, Any]:
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
        for n in range(changes):
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
    return {
        "services": services,
        "endpoints": endpoints,
        "mode": mode,
        "first_sync_s": round(first, 3),
        "changes": changes,
        "median_ms": round(statistics.median(latencies) * 1000, 1),
        "p90_ms": round(sorted(latencies)[int(0.9 * (len(latencies) - 1))] * 1000, 1),
        "max_ms": round(max(latencies) * 1000, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,10000", help="service counts (default 10,10000)")
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--changes", type=int, default=20, help="slice changes per size")
    parser.add_argument("--mode", choices=["nftables", "iptables"], default="nftables")
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
    header = ("services", "mode", "first sync s", "median ms", "p90 ms", "max ms")
    print("{:>8} {:>9} {:>12} {:>9} {:>7} {:>7}".format(*header))
    for size in (int(s) for s in args.sizes.split(",")):
        r = measure(size, args.endpoints, args.changes, args.mode)
        print(
            f"{r['services']:>8} {r['mode']:>9} {r['first_sync_s']:>12} {r['median_ms']:>9}"
            f" {r['p90_ms']:>7} {r['max_ms']:>7}",
            flush=True,
        )


if __name__ == "__main__":
    main()
