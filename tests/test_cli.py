"""The kpgen command line: kpgen.cli.main.main through click's CliRunner, and `python -m kpgen`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from builders import endpoint, endpoint_slice, manifest, service
from click.testing import CliRunner

from kpgen.cli.main import main

REPO = Path(__file__).resolve().parents[1]
SEED = REPO / "examples" / "seed-cluster.yaml"
NODE_FLAGS = ["--hostname-override", "k8s-worker01", "--cluster-cidr", "192.168.0.0/16"]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"


def kpgen(*args: str, stdin: str | None = None):
    """Run ``kpgen render ARGS`` in-process; stdout and stderr are kept apart."""
    return CliRunner().invoke(main, ["render", *args], input=stdin)


def stderr_lines(result) -> list[str]:
    return result.stderr.splitlines()


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def web_service_and_slice() -> list[dict]:
    """A good service with one ready pod."""
    return [
        service("web", cluster_ip="10.96.0.20"),
        endpoint_slice(
            "web-1", service_name="web", ports=[{"port": 8080}], endpoints=[endpoint("10.244.1.5")]
        ),
    ]


# --- the seed cluster ---------------------------------------------------------------------------


def test_render_seed_cluster_gives_the_nftables_table_with_node_port_and_both_pods():
    result = kpgen("-f", str(SEED), *NODE_FLAGS)
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.startswith("table ip kpgen {\n")
    assert "tcp . 30001 : goto external-default/node-port/tcp/8080" in result.stdout
    assert "dnat to 192.168.69.246:80" in result.stdout
    assert "dnat to 192.168.79.106:80" in result.stdout
    assert "10.20.30.20 . tcp . 8080 : goto external-default/external-ip/tcp/8080" in result.stdout
    assert "dnat to 10.20.30.10:6443" in result.stdout


def test_render_seed_cluster_in_iptables_mode_gives_restore_input():
    result = kpgen("-f", str(SEED), *NODE_FLAGS, "--proxy-mode", "iptables")
    assert result.exit_code == 0, result.stderr
    assert result.stdout.startswith("*nat\n")
    assert "-p tcp -m tcp --dport 30001 -j KPGEN-EXT-" in result.stdout
    assert "--to-destination 192.168.79.106:80" in result.stdout
    assert "--to-destination 192.168.69.246:80" in result.stdout
    assert "\nCOMMIT\n" in result.stdout
    assert result.stdout.endswith("COMMIT\n")


def test_render_reads_stdin_with_dash_f_dash():
    from_file = kpgen("-f", str(SEED), *NODE_FLAGS)
    from_stdin = kpgen("-f", "-", *NODE_FLAGS, stdin=SEED.read_text(encoding="utf-8"))
    assert from_stdin.exit_code == 0, from_stdin.stderr
    assert "dnat to 192.168.79.106:80" in from_stdin.stdout
    assert from_stdin.stdout == from_file.stdout


def test_render_reads_several_sources_and_directories(tmp_path):
    service_doc, slice_doc = web_service_and_slice()
    directory = tmp_path / "manifests"
    directory.mkdir()
    write(directory, "service.yaml", manifest(service_doc))
    slice_path = write(tmp_path, "slice.yaml", manifest(slice_doc))
    result = kpgen("-f", str(directory), "-f", slice_path, "--hostname-override", "w")
    assert result.exit_code == 0, result.stderr
    assert "10.96.0.20 . tcp . 80 : goto service-default/web/tcp/80" in result.stdout
    assert "meta l4proto tcp dnat to 10.244.1.5:8080" in result.stdout


def test_service_without_endpoints_is_rejected_not_dnatted(tmp_path):
    path = write(tmp_path, "lonely.yaml", manifest(service("lonely", cluster_ip="10.96.0.50")))
    result = kpgen("-f", path, "--hostname-override", "w")
    assert result.exit_code == 0, result.stderr
    assert "10.96.0.50 . tcp . 80 : goto reject-chain" in result.stdout
    assert "service-default/lonely" not in result.stdout


def test_config_file_sets_the_mode_and_the_flag_overrides_it(tmp_path):
    config = write(
        tmp_path,
        "kube-proxy.yaml",
        "apiVersion: kubeproxy.config.k8s.io/v1alpha1\nkind: KubeProxyConfiguration\n"
        "mode: iptables\nhostnameOverride: k8s-worker01\n",
    )
    from_file = kpgen("-f", str(SEED), "--config", config)
    overridden = kpgen("-f", str(SEED), "--config", config, "--proxy-mode", "nftables")
    assert from_file.exit_code == 0, from_file.stderr
    assert from_file.stdout.startswith("*nat\n")
    assert overridden.exit_code == 0, overridden.stderr
    assert overridden.stdout.startswith("table ip kpgen {\n")


# --- input that cannot be read: exit 2, one line ------------------------------------------------


def test_missing_file_exits_2_with_one_error_line_and_no_traceback(tmp_path):
    missing = tmp_path / "absent.yaml"
    result = kpgen("-f", str(missing), *NODE_FLAGS)
    assert result.exit_code == 2
    assert stderr_lines(result) == [
        f"kpgen: error: cannot read {missing}: No such file or directory"
    ]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_bad_yaml_exits_2_with_one_error_line_and_no_traceback(tmp_path):
    path = write(tmp_path, "bad.yaml", "apiVersion: v1\nkind: Service: x\n")
    result = kpgen("-f", path, *NODE_FLAGS)
    assert result.exit_code == 2
    assert stderr_lines(result) == [
        f"kpgen: error: {path}: invalid YAML at line 2, column 14:"
        " mapping values are not allowed in this context"
    ]
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_bad_yaml_in_a_later_file_renders_nothing(tmp_path):
    path = write(tmp_path, "bad.yaml", "items: [1\n")
    result = kpgen("-f", str(SEED), "-f", path, *NODE_FLAGS)
    assert result.exit_code == 2
    assert stderr_lines(result) == [
        f"kpgen: error: {path}: invalid YAML at line 1, column 8: unclosed bracket '['"
    ]
    assert result.stdout == ""


def test_bad_cluster_cidr_flag_exits_2_naming_the_flag():
    result = kpgen("-f", str(SEED), "--hostname-override", "w", "--cluster-cidr", "nonsense")
    assert result.exit_code == 2
    assert stderr_lines(result) == [
        'kpgen: error: --cluster-cidr: "nonsense" is not a CIDR (address/prefix-length)'
    ]
    assert result.stdout == ""


def test_nodeport_addresses_primary_without_node_ip_exits_2():
    result = kpgen("-f", str(SEED), "--hostname-override", "w", "--nodeport-addresses", "primary")
    assert result.exit_code == 2
    assert stderr_lines(result) == [
        "kpgen: error: --nodeport-addresses: primary needs the node's address (--node-ip)"
    ]


def test_unknown_proxy_mode_is_a_usage_error():
    result = kpgen("-f", str(SEED), "--proxy-mode", "ipvs")
    assert result.exit_code == 2
    assert "Invalid value for '--proxy-mode'" in result.stderr
    assert "'ipvs' is not one of" in result.stderr
    assert result.stdout == ""


def test_config_file_with_bad_yaml_exits_2_with_one_error_line(tmp_path):
    config = write(tmp_path, "kube-proxy.yaml", "mode: [iptables\n")
    result = kpgen("-f", str(SEED), "--config", config)
    assert result.exit_code == 2
    assert len(stderr_lines(result)) == 1
    assert result.stderr.startswith(f"kpgen: error: --config: {config}: invalid YAML at line 1")


# --- bad objects: warned about, the rest renders ------------------------------------------------


def test_bad_object_is_a_warning_and_the_good_services_still_render(tmp_path):
    bad = service("bad", cluster_ip="10.96.0.30", ports=[{"port": 0}])
    path = write(tmp_path, "mixed.yaml", manifest(bad, *web_service_and_slice()))
    result = kpgen("-f", path, "--hostname-override", "w")
    assert result.exit_code == 0
    assert stderr_lines(result) == [
        "kpgen: warning: default/bad: spec.ports[0].port: 0 is out of range 1-65535"
        " (Service skipped)"
    ]
    assert "meta l4proto tcp dnat to 10.244.1.5:8080" in result.stdout
    assert "10.96.0.30" not in result.stdout


def test_name_that_is_not_a_dns_label_never_reaches_rule_text(tmp_path):
    evil = service('x"; flush ruleset; "', cluster_ip="10.96.0.31")
    path = write(tmp_path, "evil.yaml", manifest(evil, *web_service_and_slice()))
    for mode in ("nftables", "iptables"):
        result = kpgen("-f", path, "--hostname-override", "w", "--proxy-mode", mode)
        assert result.exit_code == 0
        assert "flush ruleset" not in result.stdout
        assert "10.96.0.31" not in result.stdout
        assert (
            "dnat to 10.244.1.5:8080" in result.stdout
            or "--to-destination 10.244.1.5:8080" in result.stdout
        )
        assert stderr_lines(result) == [
            'kpgen: warning: default/x"; flush ruleset; ": metadata.name: "x"; flush ruleset; ""'
            " is not an RFC 1035 label (lower case, at most 63) (Service skipped)"
        ]


def test_other_kinds_are_noted_and_skipped_objects_are_told_only_when_verbose(tmp_path):
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"}}
    headless = service("db", cluster_ip="None")
    path = write(tmp_path, "misc.yaml", manifest(deployment, headless, *web_service_and_slice()))
    quiet = kpgen("-f", path, "--hostname-override", "w")
    verbose = kpgen("-f", path, "--hostname-override", "w", "-v")
    assert quiet.exit_code == verbose.exit_code == 0
    assert stderr_lines(quiet) == ["kpgen: note: ignored 1 object(s) of kind Deployment (apps/v1)"]
    assert stderr_lines(verbose) == [
        "kpgen: note: ignored 1 object(s) of kind Deployment (apps/v1)",
        "kpgen: note: default/db: Service not proxied: headless (clusterIP: None)",
    ]
    assert quiet.stdout == verbose.stdout


# --- determinism ---------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_same_input_renders_byte_identical_output(mode):
    first = kpgen("-f", str(SEED), *NODE_FLAGS, "--proxy-mode", mode)
    second = kpgen("-f", str(SEED), *NODE_FLAGS, "--proxy-mode", mode)
    assert first.exit_code == second.exit_code == 0
    assert first.stdout_bytes == second.stdout_bytes


def test_order_of_documents_does_not_change_the_output(tmp_path):
    docs = [
        service("b", cluster_ip="10.96.0.2", externalIPs=["203.0.113.2"]),
        service(
            "a", cluster_ip="10.96.0.1", type="NodePort", ports=[{"port": 80, "nodePort": 30080}]
        ),
        endpoint_slice(
            "a-1", service_name="a", endpoints=[endpoint("10.244.1.2"), endpoint("10.244.1.1")]
        ),
        endpoint_slice("b-1", service_name="b", endpoints=[endpoint("10.244.2.1")]),
    ]
    forward = kpgen(
        "-f", write(tmp_path, "forward.yaml", manifest(*docs)), "--hostname-override", "w"
    )
    backward = kpgen(
        "-f",
        write(tmp_path, "backward.yaml", manifest(*reversed(docs))),
        "--hostname-override",
        "w",
    )
    assert forward.exit_code == backward.exit_code == 0
    assert forward.stdout_bytes == backward.stdout_bytes


# --- python -m kpgen ----------------------------------------------------------------------------


def venv_python() -> str:
    return str(VENV_PYTHON) if VENV_PYTHON.exists() else sys.executable


def test_python_dash_m_kpgen_renders_the_seed_cluster():
    completed = subprocess.run(
        [venv_python(), "-m", "kpgen", "render", "-f", str(SEED), *NODE_FLAGS],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stderr == ""
    assert "tcp . 30001 : goto external-default/node-port/tcp/8080" in completed.stdout
    assert completed.stdout == kpgen("-f", str(SEED), *NODE_FLAGS).stdout


def test_non_utf8_stdin_exits_2_with_one_error_line():
    completed = subprocess.run(
        [venv_python(), "-m", "kpgen", "render", "-f", "-", "--hostname-override", "w"],
        input=b"apiVersion: v1\nkind: Service\nmetadata: {name: caf\xe9}\n",
        capture_output=True,
        timeout=60,
        check=False,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    lines = completed.stderr.decode("utf-8", "replace").splitlines()
    assert completed.returncode == 2
    assert len(lines) == 1
    assert lines[0].startswith("kpgen: error: ")
