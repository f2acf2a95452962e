"""Scaling curves for docs/performance.md, drawn from the JSON that bench/sync_bench.py wrote.

    .venv/bin/pip install -e '.[bench]'   # matplotlib: bench only, not a dependency of kpgen
    .venv/bin/python bench/plot.py bench/results/incremental-packets.json \
        bench/results/whole-world-sync.json docs/img/event-to-traffic.png
    .venv/bin/python bench/plot.py --metric first_sync_s bench/results/incremental-process.json \
        bench/results/process-first-load.json docs/img/first-answer.png

Each input is a list of results (one per service count); each becomes one line: services
against ``--metric`` (log scales both): the median time from an API event to the change
applied (``median_ms``, the default), the time from ``kpgen run``'s start until every service
answers (``first_sync_s``), or its resident memory after the changes (``rss_mib``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# metric: (axis label, unit, title)
METRICS = {
    "median_ms": (
        "API event to change applied, median (ms)",
        "ms",
        "kpgen run, nftables: one EndpointSlice change",
    ),
    "first_sync_s": (
        "start to every service answering (s)",
        "s",
        "kpgen run, nftables: the first answer after a start",
    ),
    "rss_mib": (
        "resident memory after the changes (MiB)",
        "MiB",
        "kpgen run, nftables: memory",
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--metric", choices=sorted(METRICS), default="median_ms")
    parser.add_argument("inputs", nargs="+", help="results files, then the image to write")
    args = parser.parse_args()
    if len(args.inputs) < 2:
        parser.error("give at least one results file and the image to write")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    *inputs, output = args.inputs
    label, unit, title = METRICS[args.metric]
    figure, axes = plt.subplots(figsize=(7, 5.6))
    for name in inputs:
        results = json.loads(Path(name).read_text())
        sizes = [r["services"] for r in results]
        values = [r[args.metric] for r in results]
        line = f"{results[0].get('label', Path(name).stem)}"
        axes.plot(sizes, values, marker="o", label=line)
        for size, value in zip(sizes, values, strict=True):
            axes.annotate(
                f"{value:g} {unit}",
                (size, value),
                textcoords="offset points",
                xytext=(4, 6),
                fontsize=8,
            )
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("services (5 endpoints each)")
    axes.set_ylabel(label)
    axes.set_title(title)
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16))
    figure.tight_layout()
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=110)


if __name__ == "__main__":
    main()
