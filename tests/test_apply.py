"""kpgen apply, apply --check and cleanup against the real kernel, in throwaway namespaces."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import kernel
import pytest

import kpgen.dataplane.apply as kpgen_apply
from kpgen.dataplane.kernel import with_context

ROOT = Path(__file__).resolve().parent.parent
SEED = str(ROOT / "examples" / "seed-cluster.yaml")
SEED_FLAGS = ["--hostname-override", "k8s-worker01", "--cluster-cidr", "192.168.0.0/16"]

pytestmark = kernel.kernel


@pytest.fixture
def ns() -> Iterator[str]:
    with kernel.netns() as name:
        yield name


def run_in(ns: str, *argv: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    assert ns.startswith(kernel.PREFIX)
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def kpgen(ns: str, *args: str) -> subprocess.CompletedProcess[str]:
    return run_in(ns, sys.executable, "-m", "kpgen", *args)


def nft_ruleset(ns: str) -> str:
    return run_in(ns, "nft", "list", "ruleset").stdout


def iptables_save(ns: str, variant: str = "nft") -> str:
    return run_in(ns, f"iptables-{variant}-save").stdout


def without_service(tmp_path: Path, name: str) -> str:
    """The seed cluster without one service and its slice."""
    import yaml

    cluster = yaml.safe_load(Path(SEED).read_text())
    cluster["items"] = [
        item
        for item in cluster["items"]
        if item["metadata"]["name"] != name
        and item["metadata"].get("labels", {}).get("kubernetes.io/service-name") != name
    ]
    path = tmp_path / f"without-{name}.yaml"
    path.write_text(yaml.safe_dump(cluster))
    return str(path)


def test_apply_loads_the_nftables_table_and_reapplying_changes_nothing(ns: str) -> None:
    first = kpgen(ns, "apply", "-f", SEED, *SEED_FLAGS)
    assert first.returncode == 0, first.stderr
    loaded = nft_ruleset(ns)
    assert "table ip kpgen" in loaded
    assert "tcp . 30001 : goto external-default/node-port/tcp/8080" in loaded
    assert kpgen(ns, "apply", "-f", SEED, *SEED_FLAGS).returncode == 0
    assert nft_ruleset(ns) == loaded
    # what nft -f of the rendered text loads, the tables' comments too
    rendered = kpgen(ns, "render", "-f", SEED, *SEED_FLAGS).stdout
    assert 'comment "rules for kpgen"' in rendered
    with kernel.netns() as fresh:
        assert run_in(fresh, "nft", "-f", "-", stdin=rendered).returncode == 0
        assert nft_ruleset(fresh) == loaded


def test_apply_over_a_first_load_cut_short_loads_everything(ns: str) -> None:
    """A first load killed between its transactions leaves every table made, some of them
    still empty: the next load replaces them all, as if nothing had been there."""
    rendered = kpgen(ns, "render", "-f", SEED, *SEED_FLAGS).stdout
    tables = [text for _, text in kpgen_apply._nft_tables(rendered)]
    assert len(tables) >= 2
    heads = "".join("\n".join(table.split("\n", 2)[:2]) + "\n}\n" for table in tables)
    assert 'table ip kpgen {\n\tcomment "rules for kpgen"\n}\n' in heads
    for step in (heads, tables[-1]):  # as the first load's transactions would
        assert run_in(ns, "nft", "-f", "-", stdin=step).returncode == 0
    assert kpgen(ns, "apply", "-f", SEED, *SEED_FLAGS).returncode == 0
    with kernel.netns() as fresh:
        assert run_in(fresh, "nft", "-f", "-", stdin=rendered).returncode == 0
        assert nft_ruleset(ns) == nft_ruleset(fresh)


def test_apply_check_validates_without_loading_anything(ns: str) -> None:
    for mode in ("nftables", "iptables"):
        result = kpgen(ns, "apply", "--check", "--proxy-mode", mode, "-f", SEED, *SEED_FLAGS)
        assert result.returncode == 0, result.stderr
        assert "the kernel accepts the rules" in result.stderr
    assert "kpgen" not in nft_ruleset(ns)
    assert "KPGEN" not in iptables_save(ns)


def test_iptables_reapply_keeps_one_jump_per_builtin_chain(ns: str) -> None:
    for _ in range(3):
        result = kpgen(ns, "apply", "--proxy-mode", "iptables", "-f", SEED, *SEED_FLAGS)
        assert result.returncode == 0, result.stderr
    assert set(kernel.jump_counts(iptables_save(ns)).values()) == {1}


@pytest.mark.parametrize("variant", ["nft", "legacy"])
def test_iptables_reapply_deletes_the_chains_of_a_removed_service(
    ns: str, tmp_path: Path, variant: str
) -> None:
    args = ["apply", "--proxy-mode", "iptables", "--iptables-backend", variant, *SEED_FLAGS]
    assert kpgen(ns, *args, "-f", SEED).returncode == 0
    before = iptables_save(ns, variant)
    assert "default/node-port:node-port" in before
    result = kpgen(ns, *args, "-f", without_service(tmp_path, "node-port"))
    assert result.returncode == 0, result.stderr
    after = iptables_save(ns, variant)
    assert "default/node-port" not in after
    assert after.count(":KPGEN-SVC-") == before.count(":KPGEN-SVC-") - 1
    assert after.count(":KPGEN-SEP-") == before.count(":KPGEN-SEP-") - 2


def test_switching_modes_removes_the_other_modes_rules(ns: str) -> None:
    assert kpgen(ns, "apply", "-f", SEED, *SEED_FLAGS).returncode == 0
    to_iptables = kpgen(ns, "apply", "--proxy-mode", "iptables", "-f", SEED, *SEED_FLAGS)
    assert to_iptables.returncode == 0, to_iptables.stderr
    assert "table ip kpgen" not in nft_ruleset(ns)
    assert ":KPGEN-SERVICES" in iptables_save(ns)
    assert kpgen(ns, "apply", "-f", SEED, *SEED_FLAGS).returncode == 0
    assert "KPGEN" not in iptables_save(ns)
    assert "table ip kpgen" in nft_ruleset(ns)


FOREIGN_NFT = "table ip foreign {\n\tchain keep {\n\t\tip daddr 10.9.9.9 drop\n\t}\n}\n"


def test_cleanup_removes_everything_of_kpgen_and_nothing_else(ns: str) -> None:
    assert run_in(ns, "nft", "-f", "-", stdin=FOREIGN_NFT).returncode == 0
    assert run_in(ns, "iptables", "-t", "nat", "-N", "FOREIGN").returncode == 0
    assert run_in(ns, "iptables", "-t", "nat", "-A", "PREROUTING", "-j", "FOREIGN").returncode == 0
    assert kpgen(ns, "apply", "--proxy-mode", "iptables", "-f", SEED, *SEED_FLAGS).returncode == 0
    assert kpgen(ns, "apply", "--proxy-mode", "iptables", "--iptables-backend", "legacy",
                 "-f", SEED, *SEED_FLAGS).returncode == 0  # fmt: skip
    assert kpgen(ns, "apply", "-f", SEED, *SEED_FLAGS).returncode == 0
    result = kpgen(ns, "cleanup")
    assert result.returncode == 0, result.stderr
    assert "removed nft table ip kpgen" in result.stdout
    ruleset = nft_ruleset(ns)
    assert "kpgen" not in ruleset
    assert "ip daddr 10.9.9.9 drop" in ruleset
    saved = iptables_save(ns) + iptables_save(ns, "legacy")
    assert "KPGEN" not in saved
    assert ":FOREIGN - [0:0]" in saved
    assert "-A PREROUTING -j FOREIGN" in saved
    again = kpgen(ns, "cleanup")
    assert again.returncode == 0
    assert "nothing of kpgen's to remove" in again.stderr


LEFTOVERS = "add table ip6 kpgen-07\nadd table ip kpgen-42\nadd table inet kpgenx\n"
TABLES = "from kpgen.dataplane.kernel import Nft; print(*sorted(Nft().tables()), sep='\\n')"


def test_kpgen_tables_are_read_as_libnftables_lists_them_and_cleanup_removes_them(
    ns: str,
) -> None:
    """kpgen reads the tables through netlink (libnftables' ``list tables`` reads every
    chain and rule first): the same tables, of every family, as ``nft list tables`` shows."""
    assert kpgen(ns, "apply", "-f", SEED, *SEED_FLAGS).returncode == 0
    assert run_in(ns, "nft", "-f", "-", stdin=LEFTOVERS + FOREIGN_NFT).returncode == 0
    listed = run_in(ns, "nft", "list", "tables").stdout.split("\n")
    expected = sorted(
        line.removeprefix("table ")
        for line in listed
        if re.fullmatch(r"table \S+ kpgen(-[0-9]{2})?", line)
    )
    assert "ip6 kpgen-07" in expected and "inet kpgenx" not in " ".join(expected)
    read = run_in(ns, sys.executable, "-c", TABLES)
    assert read.stdout.splitlines() == expected, read.stderr
    removed = kpgen(ns, "cleanup")
    assert removed.returncode == 0, removed.stderr
    assert run_in(ns, "nft", "list", "tables").stdout.split("\n")[:-1] == [
        "table inet kpgenx",
        "table ip foreign",
    ]


REJECTED = textwrap.dedent(
    """
    import sys
    from kpgen.dataplane.apply import ApplyError, Nftables
    from kpgen.core.model import IPFamily
    bad = "table ip kpgen {\\n\\tchain a {\\n\\t\\tjump no-such-chain\\n\\t}\\n}\\n"
    try:
        Nftables(use_binding=sys.argv[1] == "binding").apply({IPFamily.V4: bad})
    except ApplyError as error:
        print(error)
        sys.exit(3)
    """
)


@pytest.mark.parametrize("via", ["binding", "nft"])
def test_a_rejected_load_names_the_line_and_leaves_the_previous_rules(ns: str, via: str) -> None:
    assert kpgen(ns, "apply", "-f", SEED, *SEED_FLAGS).returncode == 0
    before = nft_ruleset(ns)
    result = run_in(ns, sys.executable, "-c", REJECTED, via)
    assert result.returncode == 3, result.stdout + result.stderr
    assert "no-such-chain" in result.stdout
    assert re.search(r"^>\s+\d+ \| \t\tjump no-such-chain$", result.stdout, re.M)
    assert nft_ruleset(ns) == before


CREATED = textwrap.dedent(
    """
    import sys
    from kpgen.dataplane.apply import ApplyError, Nftables
    from kpgen.dataplane.kernel import NfNetlink
    from kpgen.core.model import IPFamily
    table = "table ip {} {{\\n\\tcomment \\"made by a test\\"\\n"
    table += "\\tchain a {{\\n\\t\\t{}\\n\\t}}\\n}}\\n"
    good = "".join(table.format(f"kpgen-{n:02d}", "counter") for n in range(8))
    bad = good + table.format("kpgen-08", "jump no-such-chain")
    nft = Nftables(use_binding=sys.argv[1] == "binding")
    try:
        nft.apply({IPFamily.V4: bad})
    except ApplyError as error:
        print(error)
    print("after the refusal:", sorted(nft.tables()))
    nft.apply({IPFamily.V4: good})
    print("created:", len(nft.tables()))
    before = NfNetlink().generation().id
    nft.apply({IPFamily.V4: good.replace("counter", "accept")})
    print("transactions to replace them:", NfNetlink().generation().id - before)
    """
)


@pytest.mark.parametrize("via", ["binding", "nft"])
def test_a_first_load_creates_the_tables_at_once_all_or_nothing(ns: str, via: str) -> None:
    """Where none of kpgen's tables exists, they are filled in transactions of their own, at
    once: a refused one takes the others with it, and tables that exist are replaced in one
    transaction (the kernel's generation moves once)."""
    result = run_in(ns, sys.executable, "-c", CREATED, via)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "Could not process rule" in lines[0]
    assert re.search(r"^>\s+\d+ \| \t\tjump no-such-chain$", result.stdout, re.M)
    assert lines[-3:] == [
        "after the refusal: []",
        "created: 8",
        "transactions to replace them: 1",
    ]
    listed = nft_ruleset(ns)
    assert listed.count('comment "made by a test"') == 8
    assert re.findall(r"^table ip (\S+)", listed, re.M) == [f"kpgen-{n:02d}" for n in range(8)]


SLOW = textwrap.dedent(
    """
    import logging, sys
    import kpgen.dataplane.apply as apply
    apply.SLOW_IPTABLES_NFT = 0.0  # every iptables-nft load is slow, for this test
    if sys.argv[1] == "run":  # as kpgen run loads: the advice is logged
        from kpgen.core.node import NodeConfig, ProxyMode
        from kpgen.core.plan import build_plans
        from kpgen.core.parse import parse_documents
        from kpgen.inputs.manifests import load_documents
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
        node = NodeConfig(hostname="k8s-worker01", mode=ProxyMode.IPTABLES)
        state = parse_documents(load_documents([sys.argv[2]])).state
        apply.RuleLoader(ProxyMode.IPTABLES, sys.argv[3]).full(build_plans(state, node))
    else:
        from kpgen.cli.main import main
        main(sys.argv[2:], prog_name="kpgen")
    """
)


def test_a_slow_iptables_nft_load_comes_with_advice(ns: str) -> None:
    """iptables-nft-restore grows with the square of the rules (minutes at 10,000 services):
    a slow load says so, and what to use instead; iptables-legacy's does not."""
    apply = ["apply", "--proxy-mode", "iptables", "-f", SEED, *SEED_FLAGS]
    result = run_in(ns, sys.executable, "-c", SLOW, "cli", *apply, "--iptables-backend", "nft")
    assert result.returncode == 0, result.stderr
    assert re.search(
        r"^kpgen: warning: iptables-nft took 0 s to load the rules of 4 service ports, .*"
        r"--proxy-mode nftables loads 10,000 in about 1 s",
        result.stderr,
        re.M,
    ), result.stderr
    ran = run_in(ns, sys.executable, "-c", SLOW, "run", SEED, "nft")
    assert ran.returncode == 0, ran.stderr
    assert "WARNING kpgen.dataplane: iptables-nft took 0 s" in ran.stderr
    legacy = run_in(ns, sys.executable, "-c", SLOW, "run", SEED, "legacy")
    assert legacy.returncode == 0 and legacy.stderr == "", legacy.stderr


BROKEN = textwrap.dedent(
    """
    from kpgen.dataplane import kernel
    from kpgen.dataplane.apply import Nftables
    from kpgen.core.model import IPFamily
    table = "table ip {} {{\\n\\tchain a {{\\n\\t\\tcounter\\n\\t}}\\n}}\\n"
    run = kernel.Nft.run
    def failing(self, text, **kwargs):
        if "kpgen-05" in text and "chain a" in text:
            raise OSError(28, "No space left on device")
        return run(self, text, **kwargs)
    kernel.Nft.run = failing
    nft = Nftables()
    try:
        nft.apply({IPFamily.V4: "".join(table.format(f"kpgen-{n:02d}") for n in range(8))})
    except OSError as error:
        print("raised:", error)
    print("left:", sorted(nft.tables()))
    """
)


def test_a_first_load_that_fails_for_any_reason_leaves_no_table(ns: str) -> None:
    result = run_in(ns, sys.executable, "-c", BROKEN)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["raised: [Errno 28] No space left on device", "left: []"]


def test_with_context_shows_the_named_line_and_its_neighbours() -> None:
    text = "".join(f"line {n}\n" for n in range(1, 11))
    shown = with_context("rules:6:1-4: Error: bad\n", text)
    assert shown.splitlines() == [
        "rules:6:1-4: Error: bad",
        "      4 | line 4",
        "      5 | line 5",
        ">     6 | line 6",
        "      7 | line 7",
        "      8 | line 8",
    ]


def test_advice_is_for_iptables_nft_loads_slower_than_the_threshold() -> None:
    threshold = kpgen_apply.SLOW_IPTABLES_NFT
    assert kpgen_apply.slow_load_advice("nft", threshold - 0.1, 10) is None
    assert kpgen_apply.slow_load_advice("legacy", threshold * 20, 10) is None
    advice = kpgen_apply.slow_load_advice("nft", threshold, 4000)
    assert advice is not None and "4000 service ports" in advice


def test_rendered_text_is_split_into_its_tables_or_not_at_all() -> None:
    one = 'table ip kpgen {\n\tcomment "rules for kpgen"\n\tchain a {\n\t}\n}\n'
    two = "table ip kpgen-03 {\n\tchain b {\n\t}\n}\n"
    split = kpgen_apply._nft_tables(one + two)
    assert [text for _, text in split] == [one, two]
    assert [head[1] for head, _ in split] == ["ip kpgen", "ip kpgen-03"]
    # anything before the first table: loaded as it is, in one transaction
    assert kpgen_apply._nft_tables("add table ip other\n" + one) == []
    assert kpgen_apply._nft_tables("") == []
