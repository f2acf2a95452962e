"""Re-apply kpgen's rules in this network namespace, back to back, for a number of seconds.

Each round is the kernel transaction ``kpgen apply`` makes (kpgen/dataplane/apply.py): in
nftables mode ``Nftables.apply`` (one nft transaction that replaces the ``kpgen`` table), in
iptables mode ``Iptables.apply`` (one ``iptables-restore --noflush``). The rules are the same
every round, so a correct applier changes nothing a packet can see. Run inside a lab node by the
venv's python; prints how many rounds it made.

    reapply.py SECONDS MODE HOSTNAME MANIFEST...
"""

from __future__ import annotations

import sys
import time

from kpgen.core.node import NodeFlags, ProxyMode, node_config
from kpgen.core.parse import parse_documents
from kpgen.core.plan import build_plans
from kpgen.dataplane.apply import Iptables, Nftables, detect_iptables_variant
from kpgen.inputs.manifests import load_documents
from kpgen.render.text import render_plan


def main() -> None:
    seconds, mode, hostname, *manifests = sys.argv[1:]
    flags = NodeFlags(mode=mode, hostname=hostname, cluster_cidrs=("192.168.0.0/16",))
    node = node_config(flags)
    (plan,) = build_plans(parse_documents(load_documents(manifests)).state, node)
    if node.mode is ProxyMode.NFTABLES:
        nft, tables = Nftables(), {plan.family: render_plan(plan, node.mode)}

        def apply() -> None:
            nft.apply(tables)
    else:
        iptables = Iptables(detect_iptables_variant(plan.family), plan.family)

        def apply() -> None:
            iptables.apply(plan)

    rounds = 0
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline:
        apply()
        rounds += 1
    print(rounds)


if __name__ == "__main__":
    main()
