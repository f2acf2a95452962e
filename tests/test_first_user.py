"""What a first user hit (issue 14, section 2), each as the user sees it: output text and exit
codes of the commands, run as a user runs them."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import kernel
import pytest
from click.testing import CliRunner

from kpgen.cli.main import main
from kpgen.explain.answers import Counts, Health, Status
from kpgen.explain.text import status_text

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "examples" / "seed-cluster.yaml"
NODE_FLAGS = ["--hostname-override", "k8s-worker01", "--cluster-cidr", "192.168.0.0/16"]
PYTHON = sys.executable
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all"]
NO_TRACEBACK = ("Traceback", "please report")


def run(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=120, check=False, cwd=REPO, **kwargs
    )  # type: ignore[call-overload]


def kpgen_in(namespace: str, *args: str, user: list[str] = ()) -> subprocess.CompletedProcess[str]:
    """``kpgen ARGS`` inside ``namespace`` (as ``user``: a setpriv prefix, or root)."""
    return run(["ip", "netns", "exec", namespace, *user, PYTHON, "-m", "kpgen", *args])


def clean(result: subprocess.CompletedProcess[str]) -> None:
    for word in NO_TRACEBACK:
        assert word not in result.stderr + result.stdout, result.stderr


def applied_netns(namespace: str, *mode: str) -> None:
    """The seed cluster's rules for k8s-worker01 loaded in ``namespace``, lo up."""
    assert run(["ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up"]).returncode == 0
    done = kpgen_in(namespace, "apply", "-f", str(SEED), *NODE_FLAGS, *mode)
    assert done.returncode == 0, done.stderr


# --- 1. not root: say that reading the rules needs root ------------------------------------


@kernel.kernel
@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_status_and_explain_live_as_non_root_say_that_reading_needs_root() -> None:
    with kernel.netns() as namespace:
        applied_netns(namespace)
        status = kpgen_in(namespace, "status", user=NOBODY)
        explain = kpgen_in(
            namespace, "explain", "--live", "--src", "10.20.30.1", "--dst", "10.20.30.11:30001",
            user=NOBODY,
        )  # fmt: skip
    assert status.returncode == 1
    assert "needs root (CAP_NET_ADMIN)" in status.stdout
    assert "none of kpgen's" not in status.stdout
    assert "no kpgen rules are loaded" not in status.stdout
    assert explain.returncode == 2
    assert "needs root (CAP_NET_ADMIN)" in explain.stderr
    assert "no kpgen rules are loaded" not in explain.stderr
    # one line, without libnftables' own refusal printed beside it
    assert explain.stderr.count("\n") == 1, explain.stderr
    clean(status), clean(explain)


# --- 2. a typo in --service -----------------------------------------------------------------


def test_explain_of_a_missing_service_names_it_suggests_close_names_and_fails() -> None:
    result = CliRunner().invoke(
        main, ["explain", "-f", str(SEED), *NODE_FLAGS, "--service", "default/nodeport"]
    )
    assert result.exit_code == 2
    assert "--service default/nodeport: no such service in the manifests" in result.stderr
    assert "did you mean default/node-port?" in result.stderr
    assert "answers on no address" not in result.stdout
    other_namespace = CliRunner().invoke(
        main, ["explain", "-f", str(SEED), "--service", "kube-system/node-port"]
    )
    assert other_namespace.exit_code == 2
    assert "did you mean default/node-port?" in other_namespace.stderr


def test_explain_of_an_existing_service_still_answers() -> None:
    result = CliRunner().invoke(
        main, ["explain", "-f", str(SEED), *NODE_FLAGS, "--service", "default/node-port"]
    )
    assert result.exit_code == 0, result.stderr
    assert "ClusterIP 10.101.179.255:8080/tcp" in result.stdout


@kernel.kernel
@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_explain_live_of_a_missing_service_fails_with_close_names(mode: str) -> None:
    with kernel.netns() as namespace:
        applied_netns(namespace, "--proxy-mode", mode)
        result = kpgen_in(namespace, "explain", "--live", "--service", "default/nodeport")
    assert result.returncode == 2
    assert "no such service in the rules loaded here" in result.stderr
    assert "did you mean default/node-port?" in result.stderr
    clean(result)


# --- 3. make bench: progress, and Ctrl-C cleans up ------------------------------------------


def _processes_marked(mark: str, but: int) -> list[str]:
    """The processes (but ``but``) whose environment holds ``mark``: a process and everything
    it started, also what outlived it."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == but:
            continue
        try:
            if mark.encode() in (entry / "environ").read_bytes().split(b"\0"):
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                found.append(f"{entry.name}: {command}")
        except OSError:
            continue
    return found


def test_bench_prints_each_stage_and_an_interrupt_leaves_no_child_and_no_files(
    tmp_path: Path,
) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    mark = f"KPGEN_BENCH_TEST={os.getpid()}"
    env = {**os.environ, "TMPDIR": str(scratch), mark.split("=")[0]: mark.split("=")[1]}
    argv = [PYTHON, str(REPO / "bench" / "render_bench.py"), "--services", "100",
            "--repeat", "1", "--e2e-repeat", "100"]  # fmt: skip
    bench = subprocess.Popen(argv, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        assert bench.stderr is not None
        deadline = time.monotonic() + 120
        for line in bench.stderr:  # progress, a line per stage, until the end-to-end runs
            lines.append(line)
            if "load_documents, yaml file" in line or time.monotonic() > deadline:
                break
        time.sleep(1.0)  # inside the end-to-end runs: 100 kpgen --version, one by one
        assert list(scratch.iterdir()), "no temporary directory"
        assert _processes_marked(mark, bench.pid), "no child to interrupt"
        bench.send_signal(signal.SIGINT)
        _, rest = bench.communicate(timeout=30)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    stages = [line for line in lines if line.startswith("render_bench: ") and " s (" in line]
    assert len(stages) >= 8, lines
    assert any(line.startswith("render_bench: parse: parse_documents: ") for line in stages)
    assert bench.returncode == 130
    assert "interrupted" in rest and "Traceback" not in rest
    time.sleep(0.2)
    assert _processes_marked(mark, bench.pid) == []
    assert list(scratch.iterdir()) == []


# --- 4. the README's paths, and python -m kpgen from a checkout -----------------------------


def test_every_path_the_readme_gives_to_f_exists() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    code = "\n".join(readme.split("```")[1::2])  # the examples
    paths = re.findall(r"(?:-f |--source manifests:)(\S+)", code)
    paths = [p for p in paths if p != "-"]
    assert "examples/seed-cluster.yaml" in paths and "examples/" in paths
    missing = [p for p in paths if not p.startswith("~") and not (REPO / p).exists()]
    assert missing == []


def test_python_m_kpgen_from_the_checkout_without_the_venv_says_what_to_run() -> None:
    system = Path("/usr/bin/python3")
    if not system.exists():
        pytest.skip("no /usr/bin/python3")
    result = run([str(system), "-m", "kpgen", "render", "-f", str(SEED)])
    clean(result)
    if result.returncode == 0:  # a Python with kpgen's dependencies: it works
        assert result.stdout.startswith("table ip kpgen")
        return
    assert result.returncode == 1
    assert "is missing from /usr/bin/python3" in result.stderr
    assert "make setup" in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_the_templates_are_found_in_the_checkout_when_kpgen_is_not_installed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from kpgen.render import text

    def not_installed(package: str) -> None:
        raise ModuleNotFoundError(f"No module named {package!r}", name=package)

    monkeypatch.setattr(text, "files", not_installed)
    assert "table {{ fam }} {{ table }}" in text._load_template("nftables.nft.j2")


# --- 5. no path outside the repository -----------------------------------------------------


def test_lab_help_and_the_docs_point_inside_the_repository() -> None:
    result = CliRunner().invoke(main, ["lab", "--help"])
    assert result.exit_code == 0
    assert "kpgen/lab/seed-cluster.yaml" in result.stdout and "docs/lab.md" in result.stdout
    assert "shared" not in result.stdout
    for path in [REPO / "README.md", *REPO.glob("docs/*.md"), *REPO.glob("vagrant/**/*.yaml")]:
        assert "shared/seed" not in path.read_text(encoding="utf-8"), path
    assert "## The seed article" in (REPO / "docs" / "lab.md").read_text(encoding="utf-8")


# --- 6. the e2e tests' duration -------------------------------------------------------------


def test_lab_docs_give_the_measured_e2e_duration() -> None:
    lab = (REPO / "docs" / "lab.md").read_text(encoding="utf-8")
    assert "about 50 seconds" not in lab
    assert re.search(r"Both modes together take about \d+ s", lab)


# --- 7. each make target installs what it needs ---------------------------------------------


def _missing_packages(tmp_path: Path, *groups: str) -> set[str]:
    """The packages scripts/install-host-packages asks for on a machine that has none (a
    dpkg-query that knows nothing), as a user who is not root: it lists them and stops."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "dpkg-query").write_text("#!/bin/sh\nexit 1\n")
    (fake / "dpkg-query").chmod(0o755)
    (fake / "id").write_text("#!/bin/sh\necho 1000\n")  # not root
    (fake / "id").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}
    result = run(["sh", str(REPO / "scripts" / "install-host-packages"), *groups], env=env)
    assert result.returncode == 1, result.stderr
    found = re.search(r"missing Debian packages: (.*)", result.stderr)
    assert found, result.stderr
    return set(found.group(1).split())


def test_make_test_and_make_lab_install_no_vagrant_and_ci_still_does(tmp_path: Path) -> None:
    vagrant = {"vagrant", "vagrant-libvirt", "ruby", "shellcheck"}
    for group in ("test", "lab"):
        wanted = _missing_packages(tmp_path, group)
        assert {"nftables", "python3-nftables", "iptables", "conntrack", "curl"} <= wanted
        assert not wanted & vagrant, group
    assert vagrant <= _missing_packages(tmp_path, "vagrant-checks")
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "scripts/install-host-packages test\n" in makefile
    assert "scripts/install-host-packages lab\n" in makefile
    assert "install-host-packages test vagrant-checks" in (REPO / ".ci" / "run").read_text()


# --- 8. a node that only ran kpgen apply; the node the rules were made for ------------------


@kernel.kernel
def test_status_on_a_node_that_only_ran_apply_reports_the_rules_and_no_controller() -> None:
    with kernel.netns() as namespace:
        applied_netns(namespace)
        result = kpgen_in(namespace, "status")
    assert result.returncode == 0, result.stdout
    assert "mode:       nftables (nft table ip kpgen)" in result.stdout
    assert "controller: none (nothing answers /healthz at 127.0.0.1:10256)" in result.stdout
    assert "1 NodePort\n" in result.stdout
    clean(result)


def _with_node_record(text: str, comment: str, mode: str) -> str:
    """Rendered rules with the node's record, as the templates will write it (issue 14, 8):
    nftables, a rule of a chain that nothing jumps to; iptables, a rule of KPGEN-NODE."""
    if comment in text:
        return text  # the templates write it already
    if mode == "nftables":
        head = 'comment "rules for kpgen"\n'
        chain = f'\tchain node-settings {{\n\t\treturn comment "{comment}"\n\t}}\n'
        return text.replace(head, head + chain, 1)
    chain = f':KPGEN-NODE - [0:0]\n-A KPGEN-NODE -m comment --comment "{comment}" -j RETURN\n'
    return text.replace("*nat\n", "*nat\n" + chain, 1)


@kernel.kernel
@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_status_and_explain_live_read_the_node_the_rules_record(mode: str) -> None:
    from kpgen.core.model import IPFamily
    from kpgen.core.node import NodeFlags
    from kpgen.core.parse import parse_documents
    from kpgen.core.plan import build_plan
    from kpgen.inputs.config import node_settings
    from kpgen.inputs.manifests import load_documents
    from kpgen.render.text import node_comment, render_plan

    node = node_settings(
        NodeFlags(mode=mode, hostname="k8s-worker01", cluster_cidrs=["192.168.0.0/16"]), None
    )
    state = parse_documents(load_documents([str(SEED)])).state
    plan = build_plan(state, node, IPFamily.V4)
    comment = node_comment(plan)
    assert comment == "rules for kpgen; node=k8s-worker01; cluster-cidr=192.168.0.0/16"
    text = _with_node_record(render_plan(plan, node.mode), comment, mode)
    packet = ["--src", "10.20.30.1", "--dst", "10.20.30.11:30001"]
    with kernel.netns() as namespace:
        if mode == "nftables":
            assert kernel.exec_in(namespace, ["nft", "-f", "-"], text)[0]
        else:
            assert kernel.iptables_load(text, namespace)[0]
        status = kpgen_in(namespace, "status")
        explain = kpgen_in(namespace, "explain", "--live", *packet)
        overridden = kpgen_in(namespace, "explain", "--live", *packet, "--hostname-override", "x")
    assert "node:       k8s-worker01 (--cluster-cidr 192.168.0.0/16)" in status.stdout
    assert explain.returncode == 0, explain.stderr
    assert "\nnode k8s-worker01; " in explain.stdout
    assert "\nnode x; " in overridden.stdout


@kernel.kernel
def test_explain_live_of_rules_without_a_record_names_the_host_as_before() -> None:
    import socket

    with kernel.netns() as namespace:
        text = CliRunner().invoke(main, ["render", "-f", str(SEED), *NODE_FLAGS]).stdout
        text = re.sub(r'(return|counter) comment "rules for kpgen;[^"]*"\n', "", text)
        assert kernel.exec_in(namespace, ["nft", "-f", "-"], text)[0]
        explain = kpgen_in(namespace, "explain", "--live", "--src", "10.20.30.1",
                           "--dst", "10.20.30.11:30001")  # fmt: skip
    assert explain.returncode == 0, explain.stderr
    assert f"\nnode {socket.gethostname()}; " in explain.stdout


# --- 9. kpgen run without a kubeconfig ------------------------------------------------------


@kernel.kernel
def test_run_without_a_kubeconfig_says_how_to_give_it_one(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KUBE", "KUBERNETES_"))}
    env["HOME"] = str(tmp_path)
    with kernel.netns() as namespace:
        result = run(
            ["ip", "netns", "exec", namespace, PYTHON, "-m", "kpgen", "run",
             "--healthz-bind-address", "", "--metrics-bind-address", ""],
            env=env,
        )  # fmt: skip
    assert result.returncode == 1
    for hint in ("--kubeconfig FILE", "in a pod", "--source manifests:DIR"):
        assert hint in result.stderr, result.stderr
    clean(result)


# --- 10. kpgen render --proxy-mode iptables, loaded twice -----------------------------------


@kernel.kernel
def test_iptables_render_loaded_twice_has_each_jump_once() -> None:
    result = CliRunner().invoke(main, ["render", "-f", str(SEED), *NODE_FLAGS,
                                       "--proxy-mode", "iptables"])  # fmt: skip
    assert result.exit_code == 0, result.stderr
    text = result.stdout
    assert "\n-I " not in text
    once = [line.removeprefix("# once: ") for line in text.splitlines()
            if line.startswith("# once: ")]  # fmt: skip
    assert len(once) == len(kernel.KPGEN_JUMPS) + 1  # FILTER OUTPUT has two
    with kernel.netns() as namespace:
        for _ in range(2):  # as the printed note says: load, then add the jumps once
            ok, error = kernel.iptables_load(text, namespace)
            assert ok, error
            ok, error = kernel.exec_in(namespace, ["sh", "-c", "\n".join(once)])
            assert ok, error
        counts = kernel.jump_counts(kernel.iptables_save(namespace))
    assert set(counts.values()) == {1}, counts


# --- 11. small things ------------------------------------------------------------------------


def test_status_says_1_nodeport_not_1_nodeports() -> None:
    state = Status("nftables", "nft table ip kpgen", Counts(1, 1, 1, 1, 1, 0),
                   Health("127.0.0.1:10256", False, refused=True))  # fmt: skip
    text = status_text(state)
    assert "1 service address, 1 NodePort\n" in text and "NodePorts" not in text
    assert "1 service port, 1 endpoint\n" in text


def test_top_level_help_shows_every_commands_first_sentence_whole() -> None:
    result = CliRunner(env={"COLUMNS": "80"}).invoke(main, ["--help"], terminal_width=80)
    commands = result.stdout.split("Commands:", 1)[1]
    assert "..." not in commands
    assert "Remove every rule, chain and table kpgen created here, and nothing else." in " ".join(
        commands.split()
    )


def test_run_help_explains_log_format_and_agrees_with_the_readme_on_kubeconfig() -> None:
    result = CliRunner().invoke(main, ["run", "--help"], terminal_width=200)
    help_text = " ".join(result.stdout.split())
    assert "--log-format [text|json] Log lines as text, or as one JSON object each" in help_text
    default = "in a pod, in-cluster; else $KUBECONFIG or ~/.kube/config"
    assert default in help_text
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "in a pod, in-cluster; else `$KUBECONFIG` or `~/.kube/config`" in readme
