"""Scaling curves for docs/performance.md, drawn from the JSON that bench/sync_bench.py wrote.

    .venv/bin/pip install -e '.[bench]'   # matplotlib: bench only, not a dependency of kpgen
    .venv/bin/python bench/plot.py bench/results/incremental-packets.json \
        bench/results/whole-world-sync.json docs/img/event-to-traffic.png

Each input is a list of results (one per service count); each becomes one line: services
against the median time from an API event to the change applied (log scales both).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    *inputs, output = sys.argv[1:]
    figure, axes = plt.subplots(figsize=(7, 5.6))
    for name in inputs:
        results = json.loads(Path(name).read_text())
        sizes = [r["services"] for r in results]
        medians = [r["median_ms"] for r in results]
        label = f"{results[0].get('label', Path(name).stem)}"
        axes.plot(sizes, medians, marker="o", label=label)
        for size, median in zip(sizes, medians, strict=True):
            axes.annotate(
                f"{median:g} ms",
                (size, median),
                textcoords="offset points",
                xytext=(4, 6),
                fontsize=8,
            )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("services (5 endpoints each)")
    axes.set_ylabel("API event to change applied, median (ms)")
    axes.set_title("kpgen run, nftables: one EndpointSlice change")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    figure.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)


if __name__ == "__main__":
    main()
