"""What the kernel's load would cost with the endpoints in a map instead of in rules.

A measurement for a next layout, not kpgen's rules: two hand-made nftables shapes of N
services x 5 endpoints (one TCP port each, ClusterIPs only, the ClusterIP masquerade check),
spread over 16 tables as kpgen's are, loaded with ``nft -f`` into throwaway network
namespaces (deleted afterwards; never the caller's namespace), beside kpgen's own rendering
of bench/render_bench.py's cluster of the same size:

- ``map``: no chain per service; the dispatch map sends every service of five endpoints to
  one shared chain, which picks the endpoint with ``dnat ip to numgen random mod 5 . ip daddr
  . th dport map @endpoints`` (one map element per endpoint);
- ``map+chains``: a chain per service as now, each with that one rule, its endpoints at an
  offset of their own in the map (``numgen random mod 5 offset K map @endpoints``).

Each shape is also checked with real connections: 300 connects from inside the namespace to
the first service's ClusterIP must reach all five of its endpoints.

    .venv/bin/python bench/layout_bench.py                  # 10,000 x 5, 3 loads each
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from render_bench import (
    kpgen_command,
    node_settings,
    synthetic_cluster,
    throwaway_namespace,
    write_manifests,
)

from kpgen.core.node import ProxyMode

ENDPOINTS = 5
TABLES = 16
SERVICES = ipaddress.IPv4Address("10.96.0.0")
PODS = ipaddress.IPv4Address("100.64.0.0")

HEAD = """table ip layout-{table:02d} {{
\tchain nat-prerouting {{
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tjump services
\t}}
\tchain nat-output {{
\t\ttype nat hook output priority -100; policy accept;
\t\tjump services
\t}}
\tchain mark-for-masquerade {{
\t\tmeta mark set meta mark or 0x4000
\t}}
\tset cluster-cidrs {{
\t\ttype ipv4_addr
\t\tflags interval
\t\telements = {{ 100.64.0.0/10 }}
\t}}
\tchain services {{
\t\tip daddr . meta l4proto . th dport vmap @service-ips
\t}}
"""
MASQUERADE = "ip saddr != @cluster-cidrs jump mark-for-masquerade"


def service(i: int) -> ipaddress.IPv4Address:
    return SERVICES + i + 1


def pod(i: int, j: int) -> ipaddress.IPv4Address:
    return PODS + i * ENDPOINTS + j + 1


def _block(kind: str, name: str, declaration: str, elements: Iterator[str]) -> str:
    listed = ",\n\t\t\t".join(elements)
    return (
        f"\t{kind} {name} {{\n\t\t{declaration}\n\t\telements = {{\n\t\t\t{listed}\n\t\t}}\n\t}}\n"
    )


def shape(services: int, chains: bool) -> Iterator[str]:
    """The rules of one shape (``chains``: map+chains), a table at a time."""
    pick = f"meta l4proto tcp dnat ip to numgen random mod {ENDPOINTS}"
    for table in range(TABLES):
        mine = range(table, services, TABLES)
        yield HEAD.format(table=table)
        target = "service-{i}" if chains else f"balance-{ENDPOINTS}"
        yield _block(
            "map",
            "service-ips",
            "type ipv4_addr . inet_proto . inet_service : verdict",
            (f"{service(i)} . tcp . 80 : goto {target.format(i=i)}" for i in mine),
        )
        if chains:
            typeof = f"typeof numgen random mod {ENDPOINTS} : ip daddr . th dport"
            keys = ((f"{k * ENDPOINTS + j}", i, j) for k, i in enumerate(mine) for j in range(5))
        else:
            typeof = (
                f"typeof numgen random mod {ENDPOINTS} . ip daddr . th dport : ip daddr . th dport"
            )
            keys = ((f"{j} . {service(i)} . 80", i, j) for i in mine for j in range(ENDPOINTS))
        yield _block("map", "endpoints", typeof, (f"{k} : {pod(i, j)} . 8080" for k, i, j in keys))
        if chains:
            for k, i in enumerate(mine):
                rule = f"{pick} offset {k * ENDPOINTS} map @endpoints"
                yield f"\tchain service-{i} {{\n\t\t{MASQUERADE}\n\t\t{rule}\n\t}}\n"
        else:
            rule = f"{pick} . ip daddr . th dport map @endpoints"
            yield f"\tchain balance-{ENDPOINTS} {{\n\t\t{MASQUERADE}\n\t\t{rule}\n\t}}\n"
        yield "}\n"


# Inside the namespace: the first service's endpoints on loopback, a route for the service
# range, a listener that answers with the address it was reached at, 300 connections.
CHECK = f"""
import collections, socket, subprocess, threading
run = lambda *a: subprocess.run(a, check=True)
run("ip", "link", "set", "lo", "up")
for address in {[str(pod(0, j)) for j in range(ENDPOINTS)]}:
    run("ip", "addr", "add", f"{{address}}/32", "dev", "lo")
run("ip", "link", "add", "out0", "type", "veth", "peer", "name", "out1")
run("ip", "link", "set", "out0", "up")
run("ip", "addr", "add", "192.0.2.1/24", "dev", "out0")
run("ip", "route", "add", "10.96.0.0/12", "via", "192.0.2.2", "dev", "out0")
server = socket.create_server(("0.0.0.0", 8080))
def serve():
    while True:
        conn, _ = server.accept()
        conn.sendall(conn.getsockname()[0].encode())
        conn.close()
threading.Thread(target=serve, daemon=True).start()
seen = collections.Counter()
for _ in range(300):
    with socket.create_connection(("{service(0)}", 80), timeout=2) as conn:
        seen[conn.recv(64).decode()] += 1
print(len(seen))
"""


def load(path: Path) -> float:
    with throwaway_namespace() as namespace:
        start = time.perf_counter()
        subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", str(path)], check=True)
        return time.perf_counter() - start


def answers(path: Path) -> int:
    """How many of the first service's endpoints answered 300 connections."""
    with throwaway_namespace() as namespace:
        exec_ = ["ip", "netns", "exec", namespace]
        subprocess.run([*exec_, "nft", "-f", str(path)], check=True)
        done = subprocess.run(
            [*exec_, sys.executable, "-c", CHECK], capture_output=True, text=True, check=True
        )
        return int(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kpgen-bench-") as tmp:
        files = {}
        for name, chains in (("map", False), ("map+chains", True)):
            files[name] = Path(tmp) / f"{name}.nft"
            files[name].write_text("".join(shape(args.services, chains)), encoding="utf-8")
        cluster = write_manifests(synthetic_cluster(args.services, ENDPOINTS), Path(tmp))["json"]
        _, flags = node_settings(ProxyMode.NFTABLES, "")
        rendered = [*kpgen_command(), "render", "-f", str(cluster), *flags]
        files["kpgen"] = Path(tmp) / "kpgen.nft"
        with files["kpgen"].open("w", encoding="utf-8") as out:
            subprocess.run(rendered, stdout=out, check=True)
        print(f"nft -f into a fresh namespace, {args.services} services x {ENDPOINTS} endpoints")
        print(f"(median of {args.repeat} loads; lines of text; endpoints that answered)")
        for name, path in files.items():
            seconds = statistics.median(load(path) for _ in range(args.repeat))
            lines = path.read_text(encoding="utf-8").count("\n")
            reached = "" if name == "kpgen" else f"  {answers(path)} of {ENDPOINTS} answered"
            print(f"  {name:<11} {seconds:6.3f} s  {lines:>7} lines{reached}")


if __name__ == "__main__":
    main()
