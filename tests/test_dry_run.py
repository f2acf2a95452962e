"""A dry run against a live cluster: ``kpgen render|explain|apply --check --kubeconfig``.

The real ``kubernetes`` client lists Services, EndpointSlices and this node's Node from the
test API server (tests/apiserver.py), through the calls ``kpgen run`` makes, and the rules are
those that ``-f`` renders for the same objects.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kernel
import netsock
import pytest
import yaml
from apiserver import ApiServer
from click.testing import CliRunner, Result

from kpgen.cli.main import main
from kpgen.inputs.api import LIST_PAGE

ROOT = Path(__file__).resolve().parent.parent
SEED = ROOT / "examples" / "seed-cluster.yaml"
NODE_FLAGS = ["--hostname-override", "k8s-worker01", "--cluster-cidr", "192.168.0.0/16"]
NODE = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {
        "name": "k8s-worker01",
        "labels": {
            "topology.kubernetes.io/zone": "zone-a",
            "kubernetes.io/hostname": "k8s-worker01",
        },
    },
    "spec": {"podCIDR": "192.168.69.0/24", "podCIDRs": ["192.168.69.0/24"]},
    "status": {"addresses": [{"type": "InternalIP", "address": "10.20.30.11"}]},
}


def seed_objects() -> list[dict[str, Any]]:
    return list(yaml.safe_load(SEED.read_text())["items"])


def kpgen(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


@pytest.fixture
def server() -> Iterator[ApiServer]:
    with ApiServer(bookmark_interval=3600) as srv:
        yield srv
    assert srv.errors == []


@pytest.fixture
def kubeconfig(server: ApiServer, tmp_path: Path) -> str:
    return str(server.kubeconfig(tmp_path / "kubeconfig"))


def manifest_file(tmp_path: Path, objects: list[dict[str, Any]]) -> str:
    path = tmp_path / "objects.json"
    path.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": objects}))
    return str(path)


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_render_from_the_api_is_render_of_the_same_objects_as_manifests(
    server: ApiServer, kubeconfig: str, tmp_path: Path, mode: str
) -> None:
    server.set_objects([*seed_objects(), NODE])
    from_api = kpgen("render", "--kubeconfig", kubeconfig, "--proxy-mode", mode, *NODE_FLAGS)
    assert from_api.exit_code == 0, from_api.output
    # what the server returns, written to a file: its items as the REST list gives them
    served = [*server.objects("Service"), *server.objects("EndpointSlice"), NODE]
    from_file = kpgen("render", "-f", manifest_file(tmp_path, served), "--proxy-mode", mode,
                      *NODE_FLAGS)  # fmt: skip
    assert from_file.exit_code == 0, from_file.output
    assert from_api.stdout == from_file.stdout
    assert "192.168.69.246" in from_api.stdout  # pod1 of the seed cluster is a DNAT target


def test_only_this_nodes_node_is_listed_and_its_zone_is_used(
    server: ApiServer, kubeconfig: str
) -> None:
    other = copy.deepcopy(NODE)
    other["metadata"]["name"] = "k8s-worker02"
    server.set_objects([*seed_objects(), NODE, other])
    kpgen("render", "--kubeconfig", kubeconfig, *NODE_FLAGS)
    node_lists = [r for r in server.requests if r.path == "/api/v1/nodes"]
    assert [r.query.get("fieldSelector") for r in node_lists] == ["metadata.name=k8s-worker01"]
    assert not [r for r in server.requests if r.watch]


def test_large_lists_are_read_page_by_page_and_nothing_is_lost(
    server: ApiServer, kubeconfig: str, tmp_path: Path
) -> None:
    count = LIST_PAGE * 2 + 7
    services = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": f"svc-{i:04d}", "namespace": "default"},
            "spec": {"clusterIP": f"10.96.{i // 250}.{i % 250 + 1}", "ports": [{"port": 80}]},
        }
        for i in range(count)
    ]
    server.set_objects(services)
    result = kpgen("render", "--kubeconfig", kubeconfig, *NODE_FLAGS)
    assert result.exit_code == 0, result.output
    service_lists = [r for r in server.requests if r.path == "/api/v1/services"]
    assert len(service_lists) == 3
    assert all(r.query.get("limit") == str(LIST_PAGE) for r in service_lists)
    assert [bool(r.query.get("continue")) for r in service_lists] == [False, True, True]
    assert f"10.96.{(count - 1) // 250}.{(count - 1) % 250 + 1}" in result.stdout


def test_headless_and_other_proxies_services_are_left_out_by_the_server(
    server: ApiServer, kubeconfig: str
) -> None:
    proxied = seed_objects()
    other = copy.deepcopy(proxied[0])
    other["metadata"]["name"] = "elsewhere"
    other["metadata"]["labels"] = {"service.kubernetes.io/service-proxy-name": "other-proxy"}
    other["spec"]["clusterIP"] = other["spec"]["clusterIPs"][0] = "10.96.99.99"
    server.set_objects([*proxied, other])
    result = kpgen("render", "--kubeconfig", kubeconfig, *NODE_FLAGS)
    assert result.exit_code == 0, result.output
    (service_list,) = [r for r in server.requests if r.path == "/api/v1/services"]
    assert "!service.kubernetes.io/service-proxy-name" in service_list.query["labelSelector"]
    assert "10.96.99.99" not in result.stdout


def test_every_list_carries_the_kubeconfigs_bearer_token(server: ApiServer, tmp_path: Path) -> None:
    """kpgen makes its list and watch requests through the client's ApiClient, not the
    generated API classes: they must authenticate as those do (a service account's token)."""
    server.set_objects([*seed_objects(), NODE])
    with_token = str(server.kubeconfig(tmp_path / "token.kubeconfig", token="s3cr3t-t0ken"))
    result = kpgen("render", "--kubeconfig", with_token, *NODE_FLAGS)
    assert result.exit_code == 0, result.output
    lists = {r.path: r.authorization for r in server.requests}
    assert set(lists) == {
        "/api/v1/services",
        "/apis/discovery.k8s.io/v1/endpointslices",
        "/api/v1/nodes",
    }
    assert set(lists.values()) == {"Bearer s3cr3t-t0ken"}


def test_explain_reads_the_cluster_through_the_api(server: ApiServer, kubeconfig: str) -> None:
    server.set_objects([*seed_objects(), NODE])
    result = kpgen("explain", "--kubeconfig", kubeconfig, *NODE_FLAGS,
                   "--service", "default/node-port", "-o", "json")  # fmt: skip
    assert result.exit_code == 0, result.output
    answer = json.loads(result.stdout)
    endpoints = json.dumps(answer)
    assert "192.168.69.246" in endpoints and "192.168.79.106" in endpoints


def test_an_unreachable_server_is_one_line_naming_the_kind_and_the_server(
    tmp_path: Path,
) -> None:
    with ApiServer() as srv:
        config = str(srv.kubeconfig(tmp_path / "kubeconfig"))
        url = srv.url
    result = kpgen("render", "--kubeconfig", config, *NODE_FLAGS)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"kpgen: error: cannot list the cluster: Service list from {url}: ")


def test_a_refused_list_names_the_kind_and_the_status(server: ApiServer, kubeconfig: str) -> None:
    server.set_objects(seed_objects())
    server.fail_next(1, 403, path="/apis/discovery.k8s.io/v1/endpointslices")
    result = kpgen("render", "--kubeconfig", kubeconfig, *NODE_FLAGS)
    assert result.exit_code == 2
    assert result.stderr == (
        f"kpgen: error: cannot list the cluster: EndpointSlice list from {server.url}:"
        " 403 Forbidden\n"
    )


def test_a_missing_kubeconfig_is_one_line(tmp_path: Path) -> None:
    result = kpgen("render", "--kubeconfig", str(tmp_path / "nothing"), *NODE_FLAGS)
    assert result.exit_code == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"kpgen: error: --kubeconfig {tmp_path / 'nothing'}: ")


def test_manifests_and_a_kubeconfig_together_are_refused(kubeconfig: str) -> None:
    result = kpgen("render", "-f", str(SEED), "--kubeconfig", kubeconfig)
    assert result.exit_code == 2
    assert (
        result.stderr == "kpgen: error: give either -f MANIFESTS or --kubeconfig FILE, not both\n"
    )


def test_render_without_any_input_says_what_it_needs() -> None:
    result = kpgen("render")
    assert result.exit_code == 2
    assert result.stderr == (
        "kpgen: error: no objects to read: give -f MANIFESTS or --kubeconfig FILE\n"
    )


@kernel.kernel
@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_apply_check_validates_a_live_clusters_rules_in_the_kernel(
    tmp_path: Path, mode: str
) -> None:
    """kpgen runs in a throwaway namespace and reaches the API server on that namespace's
    loopback, as it would on a node."""
    with kernel.netns() as ns:
        subprocess.run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"], check=True)
        listener = netsock.listen_via(
            lambda argv, **options: subprocess.Popen(["ip", "netns", "exec", ns, *argv], **options),
            sys.executable,
            "127.0.0.1",
            6443,
        )
        with ApiServer().start(listener) as server:  # type: ignore[arg-type]
            server.set_objects([*seed_objects(), NODE])
            config = server.kubeconfig(tmp_path / "kubeconfig")
            result = subprocess.run(
                ["ip", "netns", "exec", ns, sys.executable, "-m", "kpgen", "apply", "--check",
                 "--kubeconfig", str(config), "--proxy-mode", mode, *NODE_FLAGS],
                capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert result.returncode == 0, result.stderr
            assert "the kernel accepts the rules" in result.stderr
            assert [r.path for r in server.requests] == [
                "/api/v1/services", "/apis/discovery.k8s.io/v1/endpointslices", "/api/v1/nodes"
            ]  # fmt: skip
            listing = subprocess.run(["ip", "netns", "exec", ns, "nft", "list", "ruleset"],
                                     capture_output=True, text=True, check=True)  # fmt: skip
            assert "kpgen" not in listing.stdout
