"""kpgen's apply benchmark: ``kpgen apply`` end to end against ``nft -f`` of its own text.

The synthetic cluster of bench/render_bench.py (N Services x E endpoints) is written as one
JSON ``kind: List`` and rendered once with ``kpgen render`` (the text ``kpgen apply`` loads).
Then, ``--repeat`` times, each in throwaway network namespaces (``ip netns add``, deleted
afterwards; never the caller's namespace):

- ``nft -f RULES`` into a fresh namespace: the kernel's and libnftables' share, the floor;
- ``kpgen apply -f CLUSTER.json`` into a fresh namespace: start-up, decoding, parsing,
  planning, rendering and the same load; what it loaded must list as what ``nft -f`` loaded;
- ``kpgen apply`` again into that namespace: replacing rules that are there (a node's second
  apply, or ``kpgen run`` starting where an earlier one left its rules).

    .venv/bin/python bench/apply_bench.py                       # 10,000 x 5, 3 runs
    .venv/bin/python bench/apply_bench.py --services 1000 --repeat 5 --json result.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from render_bench import (
    kpgen_command,
    machine,
    node_settings,
    progress,
    run,
    run_child,
    synthetic_cluster,
    throwaway_namespace,
    write_manifests,
)

from kpgen.core.node import ProxyMode

TARGET_RATIO = 1.3  # issue 12: kpgen apply within 1.3x of nft -f of its own text


def listing(namespace: str) -> str:
    """The namespace's ruleset as nft prints it (to compare two loads)."""
    return run(["ip", "netns", "exec", namespace, "nft", "list", "ruleset"]).stdout


def measure(services: int, endpoints: int, repeat: int) -> dict[str, Any]:
    _, flags = node_settings(ProxyMode.NFTABLES, "10.96.0.0/12")
    with tempfile.TemporaryDirectory(prefix="kpgen-bench-") as tmp:
        manifest = write_manifests(synthetic_cluster(services, endpoints), Path(tmp))["json"]
        rules = Path(tmp) / "rules.nft"
        rendered = subprocess.run(
            [*kpgen_command(), "render", "-f", str(manifest), *flags],
            capture_output=True,
            text=True,
            check=True,
        )
        rules.write_text(rendered.stdout, encoding="utf-8")
        apply = [*kpgen_command(), "apply", "-f", str(manifest), *flags]
        runs: dict[str, list[float]] = {"nft": [], "apply": [], "reapply": []}
        for i in range(repeat):
            with throwaway_namespace() as namespace:
                load = ["ip", "netns", "exec", namespace, "nft", "-f", str(rules)]
                t, _ = run_child(load, 1, "nft -f")
                runs["nft"].append(t.best)
                wanted = listing(namespace)
            with throwaway_namespace() as namespace:
                exec_ = ["ip", "netns", "exec", namespace]
                t, _ = run_child([*exec_, *apply], 1, "kpgen apply, fresh namespace")
                runs["apply"].append(t.best)
                if listing(namespace) != wanted:
                    raise SystemExit("apply_bench: kpgen apply loaded other rules than nft -f")
                t, _ = run_child([*exec_, *apply], 1, "kpgen apply over its own rules")
                runs["reapply"].append(t.best)
                if listing(namespace) != wanted:
                    raise SystemExit("apply_bench: the second kpgen apply changed the rules")
            progress(f"{services}: run {i + 1} of {repeat} done")
    medians = {name: statistics.median(values) for name, values in runs.items()}
    return {
        "services": services,
        "endpoints": endpoints,
        "command": " ".join(["kpgen", "apply", "-f", "CLUSTER.json", *flags]),
        "runs": runs,
        "median_s": {name: round(value, 3) for name, value in medians.items()},
        "apply_vs_nft": round(medians["apply"] / medians["nft"], 2),
        "reapply_vs_nft": round(medians["reapply"] / medians["nft"], 2),
        "target_ratio": TARGET_RATIO,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--services", type=int, default=10000)
    parser.add_argument("--endpoints", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = parser.parse_args()
    result = measure(args.services, args.endpoints, args.repeat)
    m = result["median_s"]
    print(f"kpgen apply vs nft -f, {args.services} services x {args.endpoints} endpoints")
    print(f"(medians of {args.repeat}; each load into a fresh network namespace)")
    print(f"  nft -f of kpgen's text         {m['nft']:.3f} s")
    print(f"  kpgen apply                    {m['apply']:.3f} s  ({result['apply_vs_nft']}x)")
    print(f"  kpgen apply over its own rules {m['reapply']:.3f} s  ({result['reapply_vs_nft']}x)")
    if args.json:
        report = {"machine": machine(), **result}
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
