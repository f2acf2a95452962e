"""What sessionAffinity costs at load time: N services x 5 endpoints, a share of them with
ClientIP affinity (one dynamic set per endpoint of those, as kube-proxy's layout), each
rendered ruleset loaded with one `nft -f` into a fresh throwaway network namespace.

    .venv/bin/python bench/affinity_bench.py --sizes 1000,2000,4000 --shares 0,0.01,0.1,1
    .venv/bin/python bench/affinity_bench.py --sizes 10000 --shares 0,0.01,0.1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sync_bench import cluster

from kpgen.core.node import NodeFlags, ProxyMode, node_config
from kpgen.core.parse import parse_documents
from kpgen.core.plan import build_plans
from kpgen.render.text import render_plan


def rules(services: int, share: float) -> str:
    """The rules of ``services`` services, the first ``share`` of them with affinity."""
    documents = cluster(services, 5)
    sticky = [d for d in documents if d["kind"] == "Service"][: int(services * share)]
    for doc in sticky:
        doc["spec"]["sessionAffinity"] = "ClientIP"
    state = parse_documents(documents).state
    node = node_config(NodeFlags(hostname="node-0", cluster_cidrs=["100.64.0.0/10"]))
    return render_plan(build_plans(state, node)[0], ProxyMode.NFTABLES)


def load_seconds(text: str) -> float:
    namespace = f"kpgen-bench-aff-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", namespace], check=True)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".nft") as handle:
            handle.write(text)
            handle.flush()
            started = time.perf_counter()
            subprocess.run(["ip", "netns", "exec", namespace, "nft", "-f", handle.name], check=True)
            return time.perf_counter() - started
    finally:
        subprocess.run(["ip", "netns", "delete", namespace], check=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000,2000,4000,10000")
    parser.add_argument("--shares", default="0,0.01,0.1,1", help="shares of services with affinity")
    args = parser.parse_args()
    shares = [float(s) for s in args.shares.split(",")]
    print(f"{'services':>8} " + " ".join(f"{f'{s:.0%} ClientIP, s':>16}" for s in shares))
    for size in (int(s) for s in args.sizes.split(",")):
        times = [load_seconds(rules(size, share)) for share in shares]
        print(f"{size:>8} " + " ".join(f"{t:>16.2f}" for t in times), flush=True)


if __name__ == "__main__":
    main()
