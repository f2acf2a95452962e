"""Drift: someone else changes kpgen's rules under a running ``kpgen run``, in each proxy mode
(docs/reliability.md). Each time the next periodic full sync (every 2 s here) notices that the
node's rules changed since kpgen wrote them, says so in its log and in
``kpgen_sync_rules_rewritten_total``, and loads kpgen's rules whole again: the NodePort
answers again, from the same pods. While nobody touches the rules, full syncs write nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
from faultkit import NODE_PORT, WORKER, Cluster, Kpgen, lab_cluster, wait_until
from traffic import curl

from kpgen.core.names import nft_shard, nft_shard_table
from kpgen.lab.lab import MODES
from kpgen.render.text import IPTABLES_JUMPS

pytestmark = [pytest.mark.kernel, pytest.mark.faults]

REWRITTEN = "kpgen_sync_rules_rewritten_total"
NOTICED = r"the node's rules changed since kpgen wrote them"


@pytest.fixture(scope="module", params=MODES)
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster]:
    logs = tmp_path_factory.mktemp(f"drift-{request.param}")
    with lab_cluster(request.param, logs, "d") as instance:
        yield instance


@pytest.fixture(scope="module")
def kpgen(cluster: Cluster) -> Iterator[Kpgen]:
    instance = cluster.kpgen("--iptables-backend", "nft").start()
    instance.wait_synced()
    yield instance
    instance.kill()


def in_worker(cluster: Cluster, *argv: str) -> str:
    result = cluster.lab.exec_in(WORKER, list(argv))
    assert result.returncode == 0, f"{argv}: {result.stderr}"
    return result.stdout


def answered(cluster: Cluster) -> bool:
    answer = curl(cluster.lab, "gateway", f"http://{WORKER}:{NODE_PORT}/whoami", max_time=1)
    return answer.exit_code == 0 and answer.body.split()[0] in ("pod1", "pod2")


def through_drift(cluster: Cluster, kpgen: Kpgen, drift: Callable[[], None]) -> None:
    wait_until("the NodePort answers", lambda: answered(cluster), 20)
    before = kpgen.metrics().get(REWRITTEN, 0.0)
    mark = len(kpgen.log())
    drift()
    wait_until("kpgen notices the drift", lambda: re.search(NOTICED, kpgen.log()[mark:]), 20)
    wait_until("the NodePort answers again", lambda: answered(cluster), 20)
    assert kpgen.metrics()[REWRITTEN] >= before + 1
    assert kpgen.running, kpgen.tail()


def test_full_syncs_write_nothing_while_nobody_touches_the_rules(
    cluster: Cluster, kpgen: Kpgen
) -> None:
    kpgen.wait_synced()
    mark = len(kpgen.log())
    wait_until(
        "three full syncs",
        lambda: len(re.findall(r"sync: full", kpgen.log()[mark:])) >= 3,
        20,
    )
    fulls = re.findall(r"sync: full.*", kpgen.log()[mark:])
    assert all("wrote nothing" in line for line in fulls), fulls
    assert not re.search(NOTICED, kpgen.log()[mark:])


def test_a_deleted_table_or_chains_are_loaded_again(cluster: Cluster, kpgen: Kpgen) -> None:
    if cluster.mode == "nftables":
        through_drift(cluster, kpgen, lambda: in_worker(cluster, "nft", "delete table ip kpgen"))
    else:
        drop = "iptables-nft -t nat -F KPGEN-NODEPORTS"
        through_drift(cluster, kpgen, lambda: in_worker(cluster, "sh", "-c", drop))


def test_a_flushed_service_chain_is_loaded_again(cluster: Cluster, kpgen: Kpgen) -> None:
    if cluster.mode == "nftables":
        table = nft_shard_table(nft_shard("default/node-port"))
        chains = re.findall(
            r"chain (service-default/node-port/\S+) \{",
            in_worker(cluster, "nft", f"list table ip {table}"),
        )
        assert chains
        flush = lambda: in_worker(cluster, "nft", f"flush chain ip {table} {chains[0]}")  # noqa: E731
        through_drift(cluster, kpgen, flush)
    else:
        saved = in_worker(cluster, "iptables-nft-save", "-t", "nat")
        chain = re.search(r"^-A (KPGEN-SVC-\S+) .*node-port", saved, re.M)
        assert chain
        through_drift(
            cluster,
            kpgen,
            lambda: in_worker(cluster, "iptables-nft", "-t", "nat", "-F", chain.group(1)),
        )


def test_a_removed_jump_from_a_built_in_chain_is_added_again(
    cluster: Cluster, kpgen: Kpgen
) -> None:
    if cluster.mode == "nftables":
        table = nft_shard_table(nft_shard("default/node-port"))
        hook = f"flush chain ip {table} nat-prerouting"  # a base chain of kpgen's, emptied
        through_drift(cluster, kpgen, lambda: in_worker(cluster, "nft", hook))
        return
    jump = next(j for j in IPTABLES_JUMPS if j.table == "nat" and j.chain == "PREROUTING")
    delete = f"iptables-nft -t nat -D PREROUTING {jump.spec}"
    through_drift(cluster, kpgen, lambda: in_worker(cluster, "sh", "-c", delete))
    saved = in_worker(cluster, "iptables-nft-save", "-t", "nat")
    assert saved.count('-A PREROUTING -m comment --comment "kpgen service portals"') == 1
