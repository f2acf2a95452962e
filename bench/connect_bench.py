"""First-packet cost of kpgen's rules: loopback TCP connects in a namespace with the rules loaded.

Every new connection a node opens goes through the nat and filter OUTPUT hooks, where kpgen's
rules sit (forwarded pod traffic goes through PREROUTING/FORWARD the same way). A rule list that
grows with the number of services adds its walk to every new connection; a map or set does not.
This loads the rules of the synthetic cluster of ``render_bench.py`` (N services x 5 endpoints)
into a throwaway network namespace, once per variant, and times loopback ``connect()`` there:
the connection matches no service, so it walks every rule a non-service connection walks.

    .venv/bin/python bench/connect_bench.py --services 10000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from render_bench import machine, node_settings, synthetic_cluster, throwaway_namespace

from kpgen.core.node import ProxyMode
from kpgen.core.parse import parse_documents
from kpgen.render.text import render

# Run inside the namespace: median connect() time in microseconds, after a warm-up.
PROBE = r"""
import socket, statistics, sys, time
count, warmup = int(sys.argv[1]), int(sys.argv[2])
server = socket.socket()
server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
server.bind(("127.0.0.1", 0))
server.listen(512)
runs = []
for _ in range(warmup + count):
    client = socket.socket()
    start = time.perf_counter()
    client.connect(server.getsockname())
    runs.append(time.perf_counter() - start)
    server.accept()[0].close()
    client.close()
print(statistics.median(runs[warmup:]) * 1e6)
"""

VARIANTS = (
    ("no rules", None, None, ""),
    ("nftables", ProxyMode.NFTABLES, ["nft", "-f"], "10.96.0.0/12"),
    ("iptables-legacy", ProxyMode.IPTABLES, ["iptables-legacy-restore"], ""),
    (
        "iptables-legacy, --service-cidr",
        ProxyMode.IPTABLES,
        ["iptables-legacy-restore"],
        "10.96.0.0/12",
    ),
)


def probe(services: int, endpoints: int, connects: int, rounds: int) -> list[dict[str, object]]:
    state = parse_documents(synthetic_cluster(services, endpoints)).state
    rows: list[dict[str, object]] = []
    for label, mode, loader, service_cidr in VARIANTS:
        with throwaway_namespace() as namespace, tempfile.TemporaryDirectory() as tmp:
            exec_ = ["ip", "netns", "exec", namespace]
            subprocess.run([*exec_, "ip", "link", "set", "lo", "up"], check=True)
            if mode is not None and loader is not None:
                rules = Path(tmp) / "rules"
                rules.write_text(render(state, node_settings(mode, service_cidr)[0]))
                with rules.open("rb") as stdin:
                    command = [*exec_, *loader] + ([str(rules)] if loader[0] == "nft" else [])
                    subprocess.run(command, stdin=stdin, check=True)
            medians = [
                float(
                    subprocess.run(
                        [*exec_, sys.executable, "-c", PROBE, str(connects), "100"],
                        capture_output=True,
                        text=True,
                        check=True,
                    ).stdout
                )
                for _ in range(rounds)
            ]
        rows.append({"variant": label, "service_cidr": service_cidr, "median_us": medians})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--connects", type=int, default=500, help="timed connects per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (processes) per variant")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = probe(args.services, args.endpoints, args.connects, args.rounds)
    if args.json:
        print(json.dumps({"machine": machine(), "params": vars(args), "rows": rows}, indent=2))
        return
    print(
        f"{args.services} services x {args.endpoints} endpoints: median loopback connect(), "
        f"microseconds, {args.rounds} rounds of {args.connects}"
    )
    for row in rows:
        medians = ", ".join(f"{m:.0f}" for m in row["median_us"])  # type: ignore[attr-defined]
        print(f"  {row['variant']:<34} {medians}")


if __name__ == "__main__":
    main()
