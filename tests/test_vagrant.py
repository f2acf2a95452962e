"""The Vagrant lab (vagrant/), checked statically: no virtual machine can run here.

What is checked, and with what:

- the settings (vagrant/settings.yaml) pin the box, Kubernetes and the CNI, and have the seed
  cluster's names and addresses (examples/seed-cluster.yaml's header);
- the environment the provisioning scripts get, computed here from the settings, is what
  vagrant/lib/kpgen_lab.rb gives them (`ruby`);
- the Vagrantfile: `ruby -c`, and `vagrant validate` with each provider's configuration
  checked (VirtualBox's through a stand-in VBoxManage; libvirt's with the vagrant-libvirt
  plugin), without a box or a VM;
- every shell script: `shellcheck`;
- the kubeadm configuration and the Calico manifests, rendered as the provisioning renders them
  (the settings' values for their ${NAME}s), and every manifest under vagrant/: they parse, have
  what the lab needs (no kube-proxy, kubelet's node IP, the seed's CIDRs, Calico without its
  eBPF service handling), and the core objects have no field the Kubernetes API lacks (a round
  trip through the kubernetes client's models);
- the workload is the seed's: Services, ports, nodePort, externalIP and ClusterIPs as in
  examples/seed-cluster.yaml, and pages that say pod1 and pod2;
- deploy/kpgen.yaml gets the lab's cluster CIDR and mode, and the kube-proxy kubeconfig with
  the lab's API server address (vagrant/provision/kpgen-manifest.sh, run here);
- check.sh, run with stand-ins for vagrant, kubectl, curl, sudo, nft and sleep: it prints the
  article's loops and exits 0 only when both workers' NodePort, the ClusterIP and the
  externalIP are answered by both pods.

`ruby`, `shellcheck`, `vagrant` and the vagrant-libvirt plugin are Debian packages. A test that
needs one that is missing is skipped, saying which; with KPGEN_REQUIRE_TOOLS=1 it fails instead
(for CI, whose host setup installs them).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

from kpgen.core.node import NodeFlags, ProxyMode
from kpgen.inputs.config import node_settings

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "vagrant"
SETTINGS_FILE = LAB / "settings.yaml"
PROVISION = LAB / "provision"
SEED = ROOT / "examples" / "seed-cluster.yaml"
ARTICLE = ROOT.parent / "shared" / "seed" / "nodeport-blog-ja.txt"
TOKEN = "abcdef.0123456789abcdef"  # a bootstrap token of kubeadm's format, for rendering

SEED_SERVICES = ("cluster-ip", "external-ip", "node-port")


# ---------------------------------------------------------------------------------------------
# Tools

_PACKAGES = {"ruby": "ruby", "shellcheck": "shellcheck", "vagrant": "vagrant"}


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found:
        return found
    reason = f"{name} is not installed (Debian package: {_PACKAGES.get(name, name)})"
    if os.environ.get("KPGEN_REQUIRE_TOOLS") == "1":
        pytest.fail(f"KPGEN_REQUIRE_TOOLS=1 but {reason}")
    pytest.skip(reason)


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    kwargs.setdefault("timeout", 120)
    return subprocess.run(argv, capture_output=True, text=True, check=False, **kwargs)


# ---------------------------------------------------------------------------------------------
# The settings, the seed cluster, and what the provisioning scripts get


@pytest.fixture(scope="module")
def settings() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(SETTINGS_FILE.read_text(encoding="utf-8"))
    return loaded


def _seed_items() -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = yaml.safe_load(SEED.read_text(encoding="utf-8"))["items"]
    return items


def _seed_header() -> dict[str, str]:
    """Names and ranges from examples/seed-cluster.yaml's header comment."""
    found: dict[str, str] = {}
    for line in SEED.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        node = re.match(r"#\s+(gateway|k8s-[\w-]+)\s+(\d+\.\d+\.\d+\.\d+)\s", line + " ")
        if node:
            found[node.group(1)] = node.group(2)
        for key in ("cluster CIDR", "service CIDR"):
            cidr = re.search(key + r"\s+(\d+\.\d+\.\d+\.\d+/\d+)", line)
            if cidr:
                found[key] = cidr.group(1)
    return found


def _node(settings: dict[str, Any], name: str) -> dict[str, Any]:
    matches = [n for n in settings["nodes"] if n["name"] == name]
    assert len(matches) == 1, f"settings.yaml has one node {name}"
    return matches[0]


def _env(settings: dict[str, Any], node: dict[str, Any], token: str = TOKEN) -> dict[str, str]:
    """What vagrant/lib/kpgen_lab.rb's env_for gives a machine's provisioning scripts
    (test_ruby_gives_the_provisioning_this_environment holds the two together)."""
    k8s = settings["kubernetes"]
    version = str(k8s["version"])
    master = next(n for n in settings["nodes"] if n["role"] == "control-plane")
    via = _node(settings, settings["network"]["external_ip_via"])
    return {
        "LAB_DIR": "/vagrant",
        "LAB_HOSTS": " ".join(f"{n['name']}={n['ip']}" for n in settings["nodes"]),
        "NODE_NAME": node["name"],
        "NODE_IP": str(node["ip"]),
        "NODE_ROLE": node["role"],
        "API_ADDRESS": str(master["ip"]),
        "API_PORT": str(k8s["api_server_port"]),
        "KUBERNETES_VERSION": version,
        "KUBERNETES_MINOR": "v" + ".".join(version.split(".")[:2]),
        "KUBERNETES_DEB_VERSION": f"{version}-{k8s['deb_revision']}",
        "POD_CIDR": str(k8s["pod_cidr"]),
        "SERVICE_CIDR": str(k8s["service_cidr"]),
        "CALICO_VERSION": str(settings["cni"]["version"]),
        "CALICO_ENCAPSULATION": str(settings["cni"]["encapsulation"]),
        "KPGEN_MODE": str(settings["kpgen"]["mode"]),
        "EXTERNAL_IP": str(settings["network"]["external_ip"]),
        "EXTERNAL_IP_VIA": str(via["ip"]),
        "BOOTSTRAP_TOKEN": token,
    }


def test_settings_pin_the_box_kubernetes_and_the_cni(settings: dict[str, Any]) -> None:
    box = settings["box"]
    assert box["name"] == "debian/bookworm64", "Debian 12, as the project's machines"
    assert re.fullmatch(r"12\.\d{8}\.\d+", str(box["version"])), "one box version, not a range"
    k8s = settings["kubernetes"]
    assert re.fullmatch(r"1\.\d+\.\d+", str(k8s["version"])), "a full Kubernetes version"
    assert re.fullmatch(r"\d+\.\d+", str(k8s["deb_revision"])), "pkgs.k8s.io's revision, 1.1"
    cni = settings["cni"]
    assert cni["name"] == "calico"
    assert re.fullmatch(r"v\d+\.\d+\.\d+", str(cni["version"])), "a Calico release tag"
    assert cni["encapsulation"] in ("IPIP", "IPIPCrossSubnet", "VXLAN", "VXLANCrossSubnet", "None")
    assert settings["kpgen"]["mode"] in ("nftables", "iptables")


def test_settings_have_the_seed_clusters_machines_and_addresses(settings: dict[str, Any]) -> None:
    header = _seed_header()
    machines = {n["name"]: str(n["ip"]) for n in settings["nodes"]}
    assert machines == {k: v for k, v in header.items() if "CIDR" not in k}
    roles = {n["name"]: n["role"] for n in settings["nodes"]}
    assert roles == {
        "gateway": "gateway",
        "k8s-master": "control-plane",
        "k8s-worker01": "worker",
        "k8s-worker02": "worker",
    }
    lab = ipaddress.ip_network(settings["network"]["cidr"])
    assert all(ipaddress.ip_address(ip) in lab for ip in machines.values())
    # the seed's API server (the kubernetes EndpointSlice) is the master
    kubernetes = next(i for i in _seed_items() if i["metadata"]["name"] == "kubernetes")
    api = kubernetes.get("endpoints", [{}])[0].get("addresses")
    if api:
        assert api == [machines["k8s-master"]]
    # kubeadm's minimum for a control plane is 2 CPUs and 1700 MB
    master = _node(settings, "k8s-master")
    assert master["cpus"] >= 2 and master["memory"] >= 1700


def test_settings_ranges_are_the_seed_clusters_and_do_not_overlap(
    settings: dict[str, Any],
) -> None:
    header = _seed_header()
    k8s = settings["kubernetes"]
    pods = ipaddress.ip_network(k8s["pod_cidr"])
    services = ipaddress.ip_network(k8s["service_cidr"])
    assert str(pods) == header["cluster CIDR"]
    assert str(services) == header["service CIDR"]
    for item in _seed_items():
        if item["kind"] == "Service":
            assert ipaddress.ip_address(item["spec"]["clusterIP"]) in services
        if item["kind"] == "EndpointSlice" and item["metadata"]["name"] != "kubernetes":
            for endpoint in item["endpoints"]:
                assert all(ipaddress.ip_address(a) in pods for a in endpoint["addresses"])
    net = settings["network"]
    lab = ipaddress.ip_network(net["cidr"])
    management = ipaddress.ip_network(net["libvirt_management_cidr"])
    # vagrant-libvirt's default management network, 192.168.121.0/24, is inside the pod CIDR
    ranges = {"pods": pods, "services": services, "lab": lab, "libvirt management": management}
    names = sorted(ranges)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not ranges[a].overlaps(ranges[b]), f"{a} {ranges[a]} overlaps {b} {ranges[b]}"
    machines = {ipaddress.ip_address(n["ip"]) for n in settings["nodes"]}
    host = ipaddress.ip_address(net["libvirt_host_ip"])
    assert host in lab and host not in machines, "libvirt's host address is no machine's"
    external = ipaddress.ip_address(net["external_ip"])
    assert external in lab and external not in machines, "no machine owns the externalIP"
    assert _node(settings, net["external_ip_via"])["role"] == "worker"


def _ruby_json(script: str, *args: str) -> Any:
    ruby = _tool("ruby")
    result = _run([ruby, "-I", str(LAB / "lib"), "-rkpgen_lab", "-rjson", "-e", script, *args])
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_ruby_gives_the_provisioning_this_environment(settings: dict[str, Any]) -> None:
    script = (
        "s = KpgenLab.load(ARGV[0]); "
        "puts JSON.dump(KpgenLab.nodes(s).to_h { |n| "
        "[n['name'], KpgenLab.env_for(s, n, ARGV[1])] })"
    )
    from_ruby = _ruby_json(script, str(SETTINGS_FILE), TOKEN)
    assert from_ruby == {n["name"]: _env(settings, n) for n in settings["nodes"]}


def test_ruby_refuses_settings_the_lab_cannot_build(
    tmp_path: Path, settings: dict[str, Any]
) -> None:
    ruby = _tool("ruby")
    broken = [
        ("two control planes", lambda s: s["nodes"][2].update(role="control-plane")),
        ("a machine off the lab network", lambda s: s["nodes"][1].update(ip="10.1.2.3")),
        ("an unpinned Kubernetes", lambda s: s["kubernetes"].update(version="1.32")),
        (
            "the externalIP via the gateway",
            lambda s: s["network"].update(external_ip_via="gateway"),
        ),
        ("no box version", lambda s: s["box"].pop("version")),
    ]
    for what, change in broken:
        copy = json.loads(json.dumps(settings))
        change(copy)
        path = tmp_path / "settings.yaml"
        path.write_text(yaml.safe_dump(copy), encoding="utf-8")
        result = _run(
            [ruby, "-I", str(LAB / "lib"), "-rkpgen_lab", "-e", "KpgenLab.load(ARGV[0])", str(path)]
        )
        assert result.returncode != 0, f"accepted: {what}"
        assert "settings.yaml" in result.stderr, result.stderr


def test_bootstrap_token_is_made_once_and_kept_private(tmp_path: Path) -> None:
    script = (
        "puts JSON.dump([KpgenLab.bootstrap_token(ARGV[0]), KpgenLab.bootstrap_token(ARGV[0])])"
    )
    first, second = _ruby_json(script, str(tmp_path / "state"))
    assert first == second
    assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}", first), "kubeadm's token format"
    path = tmp_path / "state" / "kpgen-bootstrap-token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    (third,) = _ruby_json(
        "puts JSON.dump([KpgenLab.bootstrap_token(ARGV[0])])", str(tmp_path / "other")
    )
    assert third != first, "random per checkout"


# ---------------------------------------------------------------------------------------------
# The Vagrantfile


def test_vagrantfile_is_valid_ruby() -> None:
    ruby = _tool("ruby")
    for path in (LAB / "Vagrantfile", LAB / "lib" / "kpgen_lab.rb"):
        result = _run([ruby, "-wc", str(path)])
        assert result.returncode == 0 and "Syntax OK" in result.stdout, result.stderr
        assert "warning" not in result.stderr, result.stderr


@pytest.fixture
def vagrant_env(tmp_path: Path) -> dict[str, str]:
    """Vagrant's state, home and token in tmp_path (never vagrant/.vagrant or ~/.vagrant.d);
    no network (no version check); a stand-in VBoxManage, so that the VirtualBox provider counts
    as usable and its configuration is validated."""
    stubs = tmp_path / "bin"
    stubs.mkdir()
    vboxmanage = stubs / "VBoxManage"
    vboxmanage.write_text("#!/bin/sh\necho 7.0.20r163906\n", encoding="utf-8")
    vboxmanage.chmod(0o755)
    env = dict(os.environ)
    env.update(
        PATH=f"{stubs}{os.pathsep}{env.get('PATH', '')}",
        VAGRANT_HOME=str(tmp_path / "vagrant.d"),
        VAGRANT_DOTFILE_PATH=str(tmp_path / "dot"),
        VAGRANT_CHECKPOINT_DISABLE="1",
        VAGRANT_CWD=str(LAB),
    )
    env.pop("VAGRANT_DEFAULT_PROVIDER", None)
    return env


def _validate(env: dict[str, str], *args: str) -> None:
    vagrant = _tool("vagrant")
    result = _run([vagrant, "validate", *args], env=env, cwd=LAB)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


def test_vagrant_validates_the_vagrantfile(vagrant_env: dict[str, str]) -> None:
    _validate(vagrant_env, "--ignore-provider")
    # the Vagrantfile keeps the bootstrap token in Vagrant's state directory
    token = Path(vagrant_env["VAGRANT_DOTFILE_PATH"]) / "kpgen-bootstrap-token"
    assert re.fullmatch(r"[a-z0-9]{6}\.[a-z0-9]{16}\n", token.read_text())


def test_vagrant_validates_the_virtualbox_configuration(vagrant_env: dict[str, str]) -> None:
    _validate({**vagrant_env, "VAGRANT_DEFAULT_PROVIDER": "virtualbox"})


def test_vagrant_validates_the_libvirt_configuration(vagrant_env: dict[str, str]) -> None:
    vagrant = _tool("vagrant")
    plugins = _run([vagrant, "plugin", "list"], env=vagrant_env)
    if "vagrant-libvirt" not in plugins.stdout:
        reason = "the vagrant-libvirt plugin is not installed (Debian package: vagrant-libvirt)"
        if os.environ.get("KPGEN_REQUIRE_TOOLS") == "1":
            pytest.fail(f"KPGEN_REQUIRE_TOOLS=1 but {reason}")
        pytest.skip(reason)
    _validate({**vagrant_env, "VAGRANT_DEFAULT_PROVIDER": "libvirt"})


def test_vagrantfile_runs_the_scripts_for_each_role_and_syncs_what_the_build_needs() -> None:
    text = (LAB / "Vagrantfile").read_text(encoding="utf-8")
    assert 'config.vm.box_version = settings["box"]["version"]' in text
    for provider in ('"virtualbox"', '"libvirt"'):
        assert f"config.vm.provider {provider}" in text
    for script in ("common", "gateway", "node", "kpgen-image"):
        assert f'"{script}"' in text and (PROVISION / f"{script}.sh").is_file()
    for role in ("control-plane", "worker"):
        assert (PROVISION / f"{role}.sh").is_file(), f"the {role} role's script"
    # the rsync copy keeps what the image build (the Containerfile's COPYs) and the
    # provisioning read
    ruby = (LAB / "lib" / "kpgen_lab.rb").read_text(encoding="utf-8")
    block = re.search(r"RSYNC_EXCLUDE = \[(.*?)\]", ruby, re.S)
    assert block
    excluded = re.findall(r'"([^"]+)"', block.group(1))
    containerfile = (ROOT / "deploy" / "Containerfile").read_text(encoding="utf-8")
    copied = [
        word
        for line in containerfile.splitlines()
        if line.startswith("COPY ")
        for word in line.split()[1:-1]
    ]
    assert copied, "the Containerfile COPYs from the context"
    needed = [*copied, "deploy/", "vagrant/", "examples/"]
    for path in needed:
        top = path.split("/")[0] + ("/" if "/" in path else "")
        assert top not in excluded and path not in excluded, f"{path} is synced"
    assert ".vagrant/" in excluded and ".venv/" in excluded and ".git/" in excluded


# ---------------------------------------------------------------------------------------------
# The shell scripts


def _lab_files(pattern: str) -> list[Path]:
    """vagrant/'s files, without Vagrant's own state (vagrant/.vagrant/ after a `vagrant up`)."""
    return sorted(p for p in LAB.rglob(pattern) if ".vagrant" not in p.relative_to(LAB).parts)


def _scripts() -> list[Path]:
    return _lab_files("*.sh")


def test_shellcheck_finds_nothing_in_the_scripts() -> None:
    shellcheck = _tool("shellcheck")
    scripts = _scripts()
    assert len(scripts) >= 8
    result = _run([shellcheck, "-x", *[str(p.relative_to(ROOT)) for p in scripts]], cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_executable_and_stop_at_the_first_error() -> None:
    for path in _scripts():
        text = path.read_text(encoding="utf-8")
        if path.name == "lib.sh":  # sourced, not run
            assert text.startswith("# shellcheck shell=bash")
            continue
        assert os.access(path, os.X_OK), f"{path.name} is executable"
        assert text.startswith("#!/usr/bin/env bash\n") or text.startswith("#!/bin/sh\n")
        if path.name != "check.sh":  # check.sh goes on after a failed loop, to report them all
            assert re.search(r"^set -e", text, re.M), f"{path.name}: set -e"


# ---------------------------------------------------------------------------------------------
# Templates: the kubeadm configuration and the Calico manifests


def _template_vars() -> set[str]:
    lib = (PROVISION / "lib.sh").read_text(encoding="utf-8")
    found = re.search(r"^TEMPLATE_VARS='([^']*)'", lib, re.M)
    assert found, "lib.sh lists the templates' variables"
    return set(re.findall(r"\$\{(\w+)\}", found.group(1)))


def _templates() -> dict[Path, set[str]]:
    """The files the provisioning renders (`render "$LAB_DIR/vagrant/..."`), with the roles
    whose scripts render them."""
    found: dict[Path, set[str]] = {}
    for script in PROVISION.glob("*.sh"):
        for relative in re.findall(r'render "\$LAB_DIR/(vagrant/[^"]+)"', script.read_text()):
            found.setdefault(ROOT / relative, set()).add(script.stem)
    return found


def _render(path: Path, env: dict[str, str]) -> str:
    """As envsubst with lib.sh's list: only those ${NAME}s, nothing else."""
    names = _template_vars()
    text = path.read_text(encoding="utf-8")
    return re.sub(
        r"\$\{(\w+)\}", lambda m: env[m.group(1)] if m.group(1) in names else m.group(0), text
    )


def test_templates_use_only_the_settings_values_the_scripts_get(settings: dict[str, Any]) -> None:
    templates = _templates()
    assert {p.relative_to(LAB).as_posix() for p in templates} == {
        "kubeadm/init.yaml",
        "kubeadm/join.yaml",
        "manifests/calico.yaml",
        "manifests/calico-api-server.yaml",
    }
    names = _template_vars()
    assert names <= set(_env(settings, settings["nodes"][0])), "every name is in the environment"
    for path in templates:
        used = set(re.findall(r"\$\{(\w+)\}", path.read_text(encoding="utf-8")))
        assert used, f"{path.name} has placeholders"
        assert used <= names, f"{path.name}: {sorted(used - names)} are not in lib.sh's list"
        assert not re.search(r"\$(?!\{)", path.read_text(encoding="utf-8")), (
            f"{path.name}: a bare $"
        )


def _docs(text: str) -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all(text) if d is not None]
    assert all(isinstance(d, dict) for d in docs)
    return docs


def _rendered(name: str, settings: dict[str, Any], node: str) -> list[dict[str, Any]]:
    return _docs(_render(LAB / name, _env(settings, _node(settings, node))))


def _kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [d for d in docs if d.get("kind") == kind]
    assert len(matches) == 1, f"one {kind}"
    return matches[0]


def _extra_args(registration: dict[str, Any]) -> dict[str, str]:
    args = registration.get("kubeletExtraArgs", [])
    if isinstance(args, dict):  # v1beta3's map
        return {str(k): str(v) for k, v in args.items()}
    return {str(a["name"]): str(a["value"]) for a in args}  # v1beta4's list


# The fields of kubeadm's v1beta4 types (kubernetes.io/docs/reference/config-api/
# kubeadm-config.v1beta4) that the lab's configuration may use: a misspelt one is an error
# kubeadm would report only on the VM.
_KUBEADM_FIELDS = {
    "InitConfiguration": {
        "apiVersion",
        "kind",
        "bootstrapTokens",
        "localAPIEndpoint",
        "nodeRegistration",
        "skipPhases",
        "certificateKey",
        "patches",
        "timeouts",
        "dryRun",
    },
    "ClusterConfiguration": {
        "apiVersion",
        "kind",
        "kubernetesVersion",
        "clusterName",
        "controlPlaneEndpoint",
        "networking",
        "proxy",
        "dns",
        "etcd",
        "apiServer",
        "controllerManager",
        "scheduler",
        "certificatesDir",
        "imageRepository",
        "featureGates",
        "encryptionAlgorithm",
        "certificateValidityPeriod",
        "caCertificateValidityPeriod",
    },
    "JoinConfiguration": {
        "apiVersion",
        "kind",
        "discovery",
        "nodeRegistration",
        "controlPlane",
        "skipPhases",
        "caCertPath",
        "patches",
        "timeouts",
        "dryRun",
    },
    "nodeRegistration": {
        "name",
        "criSocket",
        "taints",
        "kubeletExtraArgs",
        "ignorePreflightErrors",
        "imagePullPolicy",
        "imagePullSerial",
    },
    "networking": {"serviceSubnet", "podSubnet", "dnsDomain"},
    "bootstrapToken": {"token", "description", "ttl", "expires", "usages", "groups"},
    "discovery": {"bootstrapToken", "file", "tlsBootstrapToken", "timeout"},
    "discovery.bootstrapToken": {
        "token",
        "apiServerEndpoint",
        "caCertHashes",
        "unsafeSkipCAVerification",
    },
}


def _only_known(obj: dict[str, Any], kind: str) -> None:
    unknown = set(obj) - _KUBEADM_FIELDS[kind]
    assert not unknown, f"{kind}: fields kubeadm v1beta4 does not have: {sorted(unknown)}"


def test_kubeadm_init_skips_kube_proxy_and_pins_the_masters_address(
    settings: dict[str, Any],
) -> None:
    docs = _rendered("kubeadm/init.yaml", settings, "k8s-master")
    master = _node(settings, "k8s-master")
    init = _kind(docs, "InitConfiguration")
    cluster = _kind(docs, "ClusterConfiguration")
    kubelet = _kind(docs, "KubeletConfiguration")
    for doc in (init, cluster):
        assert doc["apiVersion"] == "kubeadm.k8s.io/v1beta4"
        _only_known(doc, doc["kind"])
    assert kubelet["apiVersion"] == "kubelet.config.k8s.io/v1beta1"
    # no kube-proxy: the phase is skipped (kubeadm init --skip-phases=addon/kube-proxy) and
    # the addon disabled for upgrades
    assert "addon/kube-proxy" in init["skipPhases"]
    assert cluster["proxy"] == {"disabled": True}
    assert "KubeProxyConfiguration" not in {d["kind"] for d in docs}
    # the master's lab address everywhere, never the NAT interface's
    registration = init["nodeRegistration"]
    _only_known(registration, "nodeRegistration")
    assert registration["name"] == "k8s-master"
    assert _extra_args(registration) == {"node-ip": master["ip"]}
    assert init["localAPIEndpoint"] == {
        "advertiseAddress": master["ip"],
        "bindPort": settings["kubernetes"]["api_server_port"],
    }
    assert registration["criSocket"] == "unix:///run/containerd/containerd.sock"
    # the settings' (and the seed's) ranges and version
    _only_known(cluster["networking"], "networking")
    assert cluster["networking"]["podSubnet"] == settings["kubernetes"]["pod_cidr"]
    assert cluster["networking"]["serviceSubnet"] == settings["kubernetes"]["service_cidr"]
    assert cluster["networking"]["podSubnet"] == _seed_header()["cluster CIDR"]
    assert cluster["networking"]["serviceSubnet"] == _seed_header()["service CIDR"]
    assert cluster["networking"]["dnsDomain"] == "cluster.local", "the article's FQDN"
    assert cluster["kubernetesVersion"] == "v" + settings["kubernetes"]["version"]
    # kubelet and containerd agree on the cgroup driver (node.sh sets SystemdCgroup = true)
    assert kubelet["cgroupDriver"] == "systemd"
    assert "SystemdCgroup = true" in (PROVISION / "node.sh").read_text()
    (token,) = init["bootstrapTokens"]
    _only_known(token, "bootstrapToken")
    assert token["token"] == TOKEN
    assert "system:bootstrappers:kubeadm:default-node-token" in token["groups"]
    assert set(token["usages"]) == {"signing", "authentication"}


@pytest.mark.parametrize("worker", ["k8s-worker01", "k8s-worker02"])
def test_kubeadm_join_pins_each_workers_address(settings: dict[str, Any], worker: str) -> None:
    docs = _rendered("kubeadm/join.yaml", settings, worker)
    join = _kind(docs, "JoinConfiguration")
    assert join["apiVersion"] == "kubeadm.k8s.io/v1beta4"
    _only_known(join, "JoinConfiguration")
    _only_known(join["discovery"], "discovery")
    discovery = join["discovery"]["bootstrapToken"]
    _only_known(discovery, "discovery.bootstrapToken")
    master = _node(settings, "k8s-master")
    assert (
        discovery["apiServerEndpoint"]
        == f"{master['ip']}:{settings['kubernetes']['api_server_port']}"
    )
    assert discovery["token"] == TOKEN, "the token kubeadm init made (init.yaml)"
    assert discovery.get("unsafeSkipCAVerification") is True or discovery.get("caCertHashes")
    registration = join["nodeRegistration"]
    _only_known(registration, "nodeRegistration")
    assert registration["name"] == worker
    assert _extra_args(registration) == {"node-ip": _node(settings, worker)["ip"]}


def test_calico_routes_pods_in_the_pod_cidr_and_proxies_no_service(
    settings: dict[str, Any],
) -> None:
    installation = _kind(_rendered("manifests/calico.yaml", settings, "k8s-master"), "Installation")
    assert installation["apiVersion"] == "operator.tigera.io/v1"
    assert installation["metadata"]["name"] == "default", "the operator reads `default`"
    network = installation["spec"]["calicoNetwork"]
    # not BPF: Calico's eBPF dataplane replaces kube-proxy with its own service handling
    assert network["linuxDataplane"] == "Iptables"
    assert network["nodeAddressAutodetectionV4"] == {"kubernetes": "NodeInternalIP"}
    (pool,) = network["ipPools"]
    assert pool["cidr"] == settings["kubernetes"]["pod_cidr"]
    assert pool["encapsulation"] == settings["cni"]["encapsulation"]
    assert pool["blockSize"] == 26, "the seed's per-node /26 blocks"
    assert "kubeProxyReplacement" not in json.dumps(installation)


def test_calico_reaches_the_api_server_at_its_real_address(settings: dict[str, Any]) -> None:
    docs = _rendered("manifests/calico-api-server.yaml", settings, "k8s-master")
    assert _kind(docs, "Namespace")["metadata"]["name"] == "tigera-operator"
    config = _kind(docs, "ConfigMap")
    assert config["metadata"] == {
        "name": "kubernetes-services-endpoint",
        "namespace": "tigera-operator",
    }
    assert config["data"] == {
        "KUBERNETES_SERVICE_HOST": _node(settings, "k8s-master")["ip"],
        "KUBERNETES_SERVICE_PORT": str(settings["kubernetes"]["api_server_port"]),
    }
    script = (PROVISION / "control-plane.sh").read_text(encoding="utf-8")
    # applied before the operator, which reads it at start
    assert script.index("calico-api-server.yaml") < script.index("tigera-operator.yaml")
    assert "/$CALICO_VERSION/manifests/tigera-operator.yaml" in script


# ---------------------------------------------------------------------------------------------
# Every manifest, and the seed's workload


def _all_yaml(settings: dict[str, Any]) -> Iterator[tuple[Path, list[dict[str, Any]]]]:
    templates = _templates()
    for path in [*_lab_files("*.yaml"), *_lab_files("*.yml")]:
        if path in templates:
            node = "k8s-worker01" if "worker" in templates[path] else "k8s-master"
            yield path, _docs(_render(path, _env(settings, _node(settings, node))))
        else:
            yield path, _docs(path.read_text(encoding="utf-8"))


_MODELS = {
    ("v1", "Service"): "V1Service",
    ("v1", "Pod"): "V1Pod",
    ("v1", "ConfigMap"): "V1ConfigMap",
    ("v1", "Namespace"): "V1Namespace",
    ("apps/v1", "Deployment"): "V1Deployment",
}


def _normalized(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _normalized(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_normalized(v) for v in value]
    return value


def test_every_yaml_file_parses_and_core_objects_have_only_real_fields(
    settings: dict[str, Any],
) -> None:
    client = ApiClient()
    seen = set()
    for path, docs in _all_yaml(settings):
        assert docs, f"{path.name} is not empty"
        for doc in docs:
            if path.name == "settings.yaml" or doc.get("kind", "").endswith("Configuration"):
                continue
            where = (
                f"{path.relative_to(LAB)}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            )
            assert doc.get("apiVersion") and doc.get("kind") and doc["metadata"].get("name"), where
            model = _MODELS.get((doc["apiVersion"], doc["kind"]))
            if model is None:
                assert doc["apiVersion"] == "operator.tigera.io/v1", f"{where}: checked elsewhere"
                continue
            seen.add(doc["kind"])
            # a field the API does not have is dropped by the model: the round trip shows it
            parsed = client._ApiClient__deserialize(doc, model)  # type: ignore[attr-defined]
            again = client.sanitize_for_serialization(parsed)
            assert _normalized(again) == _normalized(doc), where
    assert seen == {"Deployment", "Service", "Pod", "ConfigMap", "Namespace"}


def _workload() -> list[dict[str, Any]]:
    return _docs((LAB / "manifests" / "seed-workload.yaml").read_text(encoding="utf-8"))


def test_services_are_the_seeds(settings: dict[str, Any]) -> None:
    services = {d["metadata"]["name"]: d for d in _workload() if d["kind"] == "Service"}
    assert set(services) == set(SEED_SERVICES)
    seed = {
        i["metadata"]["name"]: i
        for i in _seed_items()
        if i["kind"] == "Service" and i["metadata"]["name"] in SEED_SERVICES
    }
    for name, service in services.items():
        spec, expected = service["spec"], seed[name]["spec"]
        assert service["metadata"].get("namespace", "default") == "default"
        assert spec["type"] == expected["type"], name
        assert spec["selector"] == expected["selector"] == {"app": "nginx-dep"}, name
        assert spec["ports"] == expected["ports"], name
        assert spec.get("externalIPs") == expected.get("externalIPs"), name
        # pinned to the seed's ClusterIPs: the cluster is examples/seed-cluster.yaml's
        assert spec["clusterIP"] == expected["clusterIP"], name
        services_range = ipaddress.ip_network(settings["kubernetes"]["service_cidr"])
        assert ipaddress.ip_address(spec["clusterIP"]) in services_range
        if "externalTrafficPolicy" in expected:
            assert spec["externalTrafficPolicy"] == expected["externalTrafficPolicy"]
    assert services["node-port"]["spec"]["ports"][0]["nodePort"] == 30001
    assert services["external-ip"]["spec"]["externalIPs"] == [settings["network"]["external_ip"]]
    assert services["external-ip"]["spec"]["externalIPs"] == ["10.20.30.20"]


def test_nginx_dep_has_one_replica_per_worker(settings: dict[str, Any]) -> None:
    (deployment,) = [d for d in _workload() if d["kind"] == "Deployment"]
    assert deployment["metadata"]["name"] == "nginx-dep"
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    assert spec["selector"]["matchLabels"] == {"app": "nginx-dep"}
    assert spec["template"]["metadata"]["labels"]["app"] == "nginx-dep"
    (term,) = spec["template"]["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]
    assert term["topologyKey"] == "kubernetes.io/hostname"
    assert term["labelSelector"]["matchLabels"] == {"app": "nginx-dep"}
    workers = [n for n in settings["nodes"] if n["role"] == "worker"]
    assert len(workers) == spec["replicas"]


def _page_script(deployment: dict[str, Any]) -> tuple[str, str]:
    (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
    assert init["env"] == [
        {"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}
    ]
    assert init["command"][:2] == ["sh", "-c"]
    (mount,) = init["volumeMounts"]
    return init["command"][2], mount["mountPath"]


@pytest.mark.parametrize(
    ("node", "page"),
    [("k8s-worker01", "pod1"), ("k8s-worker02", "pod2"), ("k8s-worker10", "pod10")],
)
def test_each_replicas_page_says_pod_and_its_workers_number(
    tmp_path: Path, node: str, page: str
) -> None:
    (deployment,) = [d for d in _workload() if d["kind"] == "Deployment"]
    script, mount = _page_script(deployment)
    # the page goes to the volume nginx serves
    (nginx,) = deployment["spec"]["template"]["spec"]["containers"]
    served = {m["name"]: m["mountPath"] for m in nginx["volumeMounts"]}
    assert served["html"] == "/usr/share/nginx/html"
    # Kubernetes would expand $(NAME) in a command: the script must have none
    assert "$(" not in script
    local = script.replace(mount + "/", str(tmp_path) + "/")
    result = _run(["sh", "-c", local], env={"NODE_NAME": node, "PATH": os.environ["PATH"]})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "index.html").read_text() == page + "\n"


def test_page_script_fails_on_a_node_name_without_a_number(tmp_path: Path) -> None:
    (deployment,) = [d for d in _workload() if d["kind"] == "Deployment"]
    script, mount = _page_script(deployment)
    local = script.replace(mount + "/", str(tmp_path) + "/")
    result = _run(["sh", "-c", local], env={"NODE_NAME": "k8s-worker", "PATH": os.environ["PATH"]})
    assert result.returncode != 0 and not (tmp_path / "index.html").exists()


def test_images_are_pinned(settings: dict[str, Any]) -> None:
    images = []
    for _path, docs in _all_yaml(settings):
        for doc in docs:
            spec = doc.get("spec", {})
            pod = spec.get("template", {}).get("spec", spec)
            for container in [*pod.get("initContainers", []), *pod.get("containers", [])]:
                images.append(container["image"])
    assert images
    for image in images:
        assert re.fullmatch(r"docker\.io/[\w./-]+:\d[\w.-]*", image), (
            f"{image}: registry and version tag"
        )


def test_test_pod_has_curl_and_stays_up() -> None:
    (pod,) = _docs((LAB / "manifests" / "test-pod.yaml").read_text(encoding="utf-8"))
    assert pod["kind"] == "Pod" and pod["metadata"]["name"] == "test-pod"
    (container,) = pod["spec"]["containers"]
    assert "curl" in container["image"]
    assert container["command"][0] == "sleep"
    assert pod["spec"].get("restartPolicy", "Always") == "Always"


# ---------------------------------------------------------------------------------------------
# kpgen from deploy/


def _kpgen_manifest(*args: str, text: str | None = None) -> subprocess.CompletedProcess[str]:
    source = text if text is not None else (ROOT / "deploy" / "kpgen.yaml").read_text()
    return _run(["sh", str(PROVISION / "kpgen-manifest.sh"), *args], input=source)


def _kpgen_settings(manifest: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The kube-proxy kubeconfig the lab adds, and kpgen's configuration."""
    docs = _docs(manifest)
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    kubeconfig: dict[str, Any] = yaml.safe_load(maps["kube-proxy"]["data"]["kubeconfig.conf"])
    config: dict[str, Any] = yaml.safe_load(maps["kpgen"]["data"]["config.yaml"])
    return kubeconfig, config


def _server(kubeconfig: dict[str, Any]) -> str:
    (cluster,) = kubeconfig["clusters"]
    server: str = cluster["cluster"]["server"]
    return server


def test_kpgen_gets_the_api_servers_real_address_and_the_pod_cidr(
    settings: dict[str, Any], tmp_path: Path
) -> None:
    env = _env(settings, _node(settings, "k8s-master"))
    args = (env["API_ADDRESS"], env["API_PORT"], env["POD_CIDR"], env["KPGEN_MODE"])
    result = _kpgen_manifest(*args)
    assert result.returncode == 0, result.stderr
    kubeconfig, config = _kpgen_settings(result.stdout)
    # the lab's kubeadm installs no kube-proxy, so the lab writes the kube-proxy kubeconfig
    # kubeadm would have (deploy/kpgen.yaml reads the API server's address from it)
    assert _server(kubeconfig) == "https://10.20.30.10:6443"
    assert env["API_ADDRESS"] == "10.20.30.10"
    assert kubeconfig["users"][0]["user"] == {
        "tokenFile": "/var/run/secrets/kubernetes.io/serviceaccount/token"
    }
    assert config["clientConnection"]["kubeconfig"] == "/var/lib/kube-proxy/kubeconfig.conf"
    assert config["clusterCIDR"] == settings["kubernetes"]["pod_cidr"]
    assert config["mode"] == settings["kpgen"]["mode"]
    # the same objects as deploy/kpgen.yaml otherwise, and the kube-proxy ConfigMap
    original = _docs((ROOT / "deploy" / "kpgen.yaml").read_text())
    assert [(d["kind"], d["metadata"]["name"]) for d in _docs(result.stdout)] == [
        *((d["kind"], d["metadata"]["name"]) for d in original),
        ("ConfigMap", "kube-proxy"),
    ]
    # and kpgen reads the configuration it makes
    path = tmp_path / "config.yaml"
    (config_map,) = [
        d
        for d in _docs(result.stdout)
        if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "kpgen"
    ]
    path.write_text(config_map["data"]["config.yaml"])
    node = node_settings(NodeFlags(hostname="k8s-worker01"), str(path))
    assert node.mode is ProxyMode(settings["kpgen"]["mode"])
    assert [str(c) for c in node.cluster_cidrs] == [settings["kubernetes"]["pod_cidr"]]


def test_kpgen_manifest_follows_other_settings_and_refuses_a_manifest_it_cannot_patch() -> None:
    result = _kpgen_manifest("192.0.2.7", "7443", "10.244.0.0/16", "iptables")
    assert result.returncode == 0, result.stderr
    kubeconfig, config = _kpgen_settings(result.stdout)
    assert _server(kubeconfig) == "https://192.0.2.7:7443"
    assert config["clusterCIDR"] == "10.244.0.0/16"
    assert config["mode"] == "iptables"
    text = (ROOT / "deploy" / "kpgen.yaml").read_text()
    for line in ("clusterCIDR:", "mode: nftables"):
        broken = _kpgen_manifest(
            "192.0.2.7", "7443", "10.244.0.0/16", "iptables", text=text.replace(line, "# gone")
        )
        assert broken.returncode == 1 and broken.stdout == "", line
        assert "not once" in broken.stderr
    assert _kpgen_manifest("192.0.2.7").returncode == 2


def test_kpgen_image_is_imported_under_the_name_the_daemonset_uses() -> None:
    deploy = _docs((ROOT / "deploy" / "kpgen.yaml").read_text())
    (daemonset,) = [d for d in deploy if d["kind"] == "DaemonSet"]
    (container,) = daemonset["spec"]["template"]["spec"]["containers"]
    image = container["image"]
    assert container["imagePullPolicy"] == "IfNotPresent", "the node's copy is used"
    name = image if "/" in image else f"docker.io/library/{image}"
    lib = (PROVISION / "lib.sh").read_text()
    assert re.search(rf"^KPGEN_IMAGE={re.escape(name)}$", lib, re.M)
    script = (PROVISION / "kpgen-image.sh").read_text()
    assert '"$LAB_DIR/deploy/Containerfile"' in script
    assert "ctr --namespace k8s.io images import" in script


# ---------------------------------------------------------------------------------------------
# check.sh, with stand-ins


_STUBS = {
    # vagrant ssh NAME -c COMMAND -- -T: as Vagrant does it, COMMAND between single quotes
    # given to a shell on NAME (here: this machine, with the other stand-ins on PATH).
    "vagrant": r"""#!/bin/sh
[ "$1" = ssh ] && [ "$3" = -c ] || { echo "stub vagrant: $*" >&2; exit 64; }
[ "$5 $6" = "-- -T" ] || { echo "stub vagrant: no -- -T: $*" >&2; exit 64; }
printf '%s: %s\n' "$2" "$4" >>"$STUB_DIR/log"
STUB_HOST=$2 exec sh -c "bash -c '$4'"
""",
    "kubectl": r"""#!/bin/sh
printf 'kubectl %s\n' "$*" >>"$STUB_DIR/log"
[ "$1" = -n ] && shift 2
case "$1" in
exec)
    while [ "$1" != -- ]; do shift; done
    shift
    STUB_HOST=test-pod exec "$@" ;;
wait)
    [ "$STUB_SCENARIO" = not-ready ] && { echo "error: timed out" >&2; exit 1; }
    echo "condition met" ;;
get)
    case "$*" in
    *"daemonset kube-proxy"*) [ "$STUB_SCENARIO" = kube-proxy ] && echo daemonset.apps/kube-proxy ;;
    *"service cluster-ip"*) printf 10.101.47.213 ;;
    *"service external-ip"*) printf 10.20.30.20 ;;
    *) echo "NAME  TYPE  CLUSTER-IP  EXTERNAL-IP  PORT(S)" ;;
    esac ;;
*) echo "stub kubectl: $1 done" ;;
esac
""",
    # answers like the pods behind a working service, alternating pod1 and pod2 per URL,
    # unless the scenario says otherwise
    "curl": r"""#!/bin/sh
for url; do :; done
printf '%s curl %s\n' "$STUB_HOST" "$url" >>"$STUB_DIR/log"
key=$(printf '%s %s' "$STUB_HOST" "$url" | cksum | cut -d' ' -f1)
n=$(cat "$STUB_DIR/count.$key" 2>/dev/null || echo 0)
n=$((n + 1))
echo "$n" >"$STUB_DIR/count.$key"
case "$STUB_SCENARIO:$url" in
only-pod1:*) echo pod1; exit 0 ;;
external-fails:*10.20.30.20*) exit 7 ;;
worker02-down:*k8s-worker02*) exit 7 ;;
pod2-late:*) [ "$n" -le 5 ] && { echo pod1; exit 0; } ;;
esac
if [ $((n % 2)) -eq 0 ]; then echo pod2; else echo pod1; fi
""",
    "sudo": '#!/bin/sh\nexec "$@"\n',
    "nft": r"""#!/bin/sh
case "$*" in
"list table ip kpgen") exit 0 ;;
"list table ip kube-proxy") [ "$STUB_SCENARIO" = kube-proxy ] ;;
*) exit 1 ;;
esac
""",
    "iptables-save": "#!/bin/sh\nexit 0\n",
    "sleep": '#!/bin/sh\nprintf "sleep %s\\n" "$*" >>"$STUB_DIR/log"\n',
}


def _check(
    tmp_path: Path, scenario: str, **env: str
) -> tuple[subprocess.CompletedProcess[str], str]:
    stubs = tmp_path / scenario
    stubs.mkdir()
    for name, text in _STUBS.items():
        (stubs / name).write_text(text, encoding="utf-8")
        (stubs / name).chmod(0o755)
    run_env = {
        "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}",
        "STUB_DIR": str(stubs),
        "STUB_SCENARIO": scenario,
        **env,
    }
    result = _run(["bash", str(LAB / "check.sh")], env=run_env, timeout=120)
    log = (stubs / "log").read_text() if (stubs / "log").exists() else ""
    return result, log


def test_check_prints_the_articles_loops_and_passes_when_both_pods_answer_everywhere(
    tmp_path: Path,
) -> None:
    result, log = _check(tmp_path, "good")
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    for where, url in (
        ("gateway", "http://k8s-worker01:30001"),
        ("gateway", "http://k8s-worker02:30001"),
        ("test-pod", "http://node-port.default.svc.cluster.local:8080"),
        ("test-pod", "http://10.101.47.213:8080"),
        ("gateway", "http://10.20.30.20:8080"),
    ):
        loop = f"[{where} ~]$ for i in 1 2 3 4 5 ;do curl -s {url} | grep pod; done"
        assert loop in out.splitlines(), loop
        # run where the article ran it: five requests from there
        assert log.count(f"{where} curl {url}\n") == 5, (where, url)
    assert sum(line in ("pod1", "pod2") for line in out.splitlines()) == 25
    assert "FAIL" not in out
    assert out.rstrip().endswith("no kube-proxy, kpgen's rules on both workers")


def test_check_with_the_articles_sleep_prints_its_loops_word_for_word(tmp_path: Path) -> None:
    result, log = _check(tmp_path, "good", KPGEN_CHECK_SLEEP="5")
    assert result.returncode == 0, result.stdout + result.stderr
    article = ARTICLE.read_text(encoding="utf-8") if ARTICLE.exists() else None
    for worker in ("k8s-worker01", "k8s-worker02"):
        url = f"http://{worker}:30001"
        loop = f"[gateway ~]$ for i in 1 2 3 4 5 ;do curl -s {url} | grep pod; sleep 5;done"
        assert loop in result.stdout.splitlines()
        if article is not None:
            assert loop in article.splitlines(), "the article's own line"
    assert log.count("sleep 5\n") == 25


def test_check_asks_again_when_the_first_five_answers_came_from_one_pod(tmp_path: Path) -> None:
    result, _log = _check(tmp_path, "pod2-late", KPGEN_CHECK_TRIES="12")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(7 more requests, as pod2 had not answered:" in result.stdout


@pytest.mark.parametrize(
    ("scenario", "message"),
    [
        ("only-pod1", "no answer from pod2"),
        (
            "external-fails",
            "the externalIP from outside (routed to k8s-worker01): no answer from pod1 pod2",
        ),
        ("worker02-down", "NodePort from outside, through k8s-worker02: no answer from pod1 pod2"),
        ("kube-proxy", "kube-proxy"),
        ("not-ready", "the lab is not ready"),
    ],
)
def test_check_fails_unless_every_loop_reaches_both_pods(
    tmp_path: Path, scenario: str, message: str
) -> None:
    result, _log = _check(tmp_path, scenario, KPGEN_CHECK_TRIES="8")
    assert result.returncode != 0, result.stdout
    assert message in result.stdout, result.stdout


def test_check_lists_every_loop_that_one_pod_alone_answered(tmp_path: Path) -> None:
    result, _log = _check(tmp_path, "only-pod1", KPGEN_CHECK_TRIES="8")
    failures = [line for line in result.stdout.splitlines() if line.startswith("FAIL: ")]
    assert len(failures) == 5, "each of the five loops"
    assert (
        result.stdout.rstrip().splitlines()[-1]
        == "  the externalIP from outside (routed to k8s-worker01): "
        "no answer from pod2 (pod1 x8, pod2 x0)"
    )


# ---------------------------------------------------------------------------------------------
# The documentation


def test_docs_say_how_to_run_it_and_how_it_relates_to_make_lab() -> None:
    doc = (ROOT / "docs" / "vagrant.md").read_text(encoding="utf-8")
    for needed in (
        "vagrant up",
        "./check.sh",
        "make lab",
        "vagrant destroy -f",
        "--provider=libvirt",
        "settings.yaml",
        "for i in 1 2 3 4 5 ;do curl -s http://k8s-worker01:30001 | grep pod; done",
    ):
        assert needed in doc, needed
