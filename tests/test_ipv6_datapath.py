"""IPv6 with real packets: a dual-stack service's IPv6 ClusterIP and NodePort reach the pod
through kpgen's ip6 table (nftables) or ip6tables rules, in namespaces this test makes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import kernel
import pytest
import yaml

pytestmark = kernel.kernel

CLIENT, NODE, POD = "2001:db8:1::1", "2001:db8:1::11", "fd00:10:244:1::5"
CLUSTER_IP, NODE_PORT = "fd00:10:96::10", 30080

SERVER = """
import http.server, socket, sys
class Server(http.server.ThreadingHTTPServer):
    address_family = socket.AF_INET6
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = f"pod {self.client_address[0]}\\n".encode()
        self.send_response(200); self.send_header("Content-Length", str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *args): pass
Server(("::", 8080), Handler).serve_forever()
"""

CLUSTER = {
    "apiVersion": "v1",
    "kind": "List",
    "items": [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": "NodePort",
                "clusterIP": "10.96.0.10",
                "clusterIPs": ["10.96.0.10", CLUSTER_IP],
                "ports": [{"name": "http", "port": 80, "nodePort": NODE_PORT}],
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-v6",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv6",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [{"addresses": [POD], "nodeName": "node-a"}],
        },
    ],
}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def run_in(ns: str, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, *argv], capture_output=True, text=True, timeout=60
    )


@pytest.fixture
def net() -> Iterator[tuple[str, str, str]]:
    """client -- node -- pod, IPv6 only; the pod answers HTTP on 8080 with its client."""
    with kernel.netns() as client, kernel.netns() as node, kernel.netns() as pod:
        ip("link", "add", "c0", "netns", client, "type", "veth", "peer", "n0", "netns", node)
        ip("link", "add", "p0", "netns", pod, "type", "veth", "peer", "np", "netns", node)
        for ns in (client, node, pod):
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", client, "addr", "add", f"{CLIENT}/64", "dev", "c0", "nodad")
        ip("-n", node, "addr", "add", f"{NODE}/64", "dev", "n0", "nodad")
        ip("-n", node, "addr", "add", "fe80::1/64", "dev", "np", "nodad")
        ip("-n", pod, "addr", "add", f"{POD}/128", "dev", "p0", "nodad")
        for ns, dev in ((client, "c0"), (node, "n0"), (node, "np"), (pod, "p0")):
            ip("-n", ns, "link", "set", dev, "up")
        ip("-n", node, "route", "add", f"{POD}/128", "dev", "np")
        ip("-n", pod, "route", "add", "default", "via", "fe80::1", "dev", "p0")
        ip("-n", client, "route", "add", "fd00:10:96::/112", "via", NODE)
        run_in(node, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
        server = subprocess.Popen(["ip", "netns", "exec", pod, sys.executable, "-c", SERVER])
        try:
            yield client, node, pod
        finally:
            server.kill()
            server.wait()


def fetch(client: str, url: str) -> str:
    for _ in range(20):  # the pod's server may still be starting
        answer = run_in(client, "curl", "-s", "-m", "2", url)
        if answer.returncode == 0:
            return answer.stdout.strip()
        time.sleep(0.1)
    raise AssertionError(f"{url}: no answer ({answer.returncode}) {answer.stderr}")


@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_ipv6_clusterip_and_nodeport_reach_the_pod_masqueraded(
    net: tuple[str, str, str], mode: str, tmp_path: Path
) -> None:
    client, node, _ = net
    manifest = tmp_path / "dual-stack.yaml"
    manifest.write_text(yaml.safe_dump(CLUSTER))
    applied = run_in(
        node, sys.executable, "-m", "kpgen", "apply", "-f", str(manifest),
        "--proxy-mode", mode, "--hostname-override", "node-a",
        "--cluster-cidr", "10.244.0.0/16", "--cluster-cidr", "fd00:10:244::/56",
    )  # fmt: skip
    assert applied.returncode == 0, applied.stderr
    # the client is outside the cluster CIDR: the pod sees the node, not the client
    answer = fetch(client, f"http://[{CLUSTER_IP}]:80/")
    assert answer.startswith("pod ") and answer != f"pod {CLIENT}", answer
    nodeport = fetch(client, f"http://[{NODE}]:{NODE_PORT}/")
    assert nodeport.startswith("pod ") and nodeport != f"pod {CLIENT}", nodeport
