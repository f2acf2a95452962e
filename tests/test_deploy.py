"""The in-cluster deployment (deploy/): manifests that hang together, a configuration kpgen
reads, RBAC that grants exactly the API calls `kpgen run` makes, and an image recipe with what
kpgen needs at run time.

Nothing here talks to a cluster or builds the image: the manifests and the Containerfile are
read as data. The RBAC cross-check reads every module of the package for kubernetes-client
calls.
"""

from __future__ import annotations

import ast
import fnmatch
import ipaddress
import json
import re
import shlex
import tomllib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from kpgen.cli.main import main
from kpgen.core.node import NodeFlags, ProxyMode
from kpgen.inputs.config import node_settings, read_kube_proxy_config

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
CONTAINERFILE = DEPLOY / "Containerfile"
IGNORE_FILE = DEPLOY / "Containerfile.dockerignore"
PACKAGE = ROOT / "kpgen"

NAMESPACE = "kube-system"
HEALTHZ_PORT = 10256
METRICS_PORT = 10249
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding"}

# The API calls `kpgen run` makes (kpgen/inputs/api.py): list then watch Services and
# EndpointSlices in all namespaces, and its own Node (fieldSelector metadata.name). No get: it
# reads nothing by name. No events yet: when it records some, add them here and to the ClusterRole
# (create and patch on events in "" and events.k8s.io).
NEEDED_API_ACCESS = {
    ("", "services", "list"),
    ("", "services", "watch"),
    ("discovery.k8s.io", "endpointslices", "list"),
    ("discovery.k8s.io", "endpointslices", "watch"),
    ("", "nodes", "list"),
    ("", "nodes", "watch"),
}


# ---------------------------------------------------------------------------------------------
# Reading the manifests


def _manifest_files() -> list[Path]:
    return sorted(p for p in DEPLOY.iterdir() if p.suffix in (".yaml", ".yml"))


def _load_objects() -> list[dict[str, Any]]:
    objects = []
    for path in _manifest_files():
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is None:
                continue
            assert isinstance(doc, dict), f"{path.name}: every document is an object"
            objects.append(doc)
    return objects


@pytest.fixture(scope="module")
def objects() -> list[dict[str, Any]]:
    found = _load_objects()
    assert found, "deploy/ holds the manifests (*.yaml)"
    return found


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    matches = [o for o in objects if o.get("kind") == kind]
    assert len(matches) == 1, f"exactly one {kind} in deploy/, found {len(matches)}"
    return matches[0]


@pytest.fixture(scope="module")
def daemonset(objects: list[dict[str, Any]]) -> dict[str, Any]:
    return _one(objects, "DaemonSet")


@pytest.fixture(scope="module")
def pod(daemonset: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = daemonset["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    containers = pod["containers"]
    assert len(containers) == 1, "the pod runs one container, kpgen"
    found: dict[str, Any] = containers[0]
    return found


def _argv(container: dict[str, Any]) -> list[str]:
    return [str(a) for a in (*container.get("command", ()), *container.get("args", ()))]


def _flag_value(argv: list[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", ())}


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    volumes = {v["name"]: v for v in pod.get("volumes", ())}
    assert name in volumes, f"volume {name} is defined"
    found: dict[str, Any] = volumes[name]
    return found


def _mount_at(container: dict[str, Any], path: str) -> dict[str, Any] | None:
    for mount in container.get("volumeMounts", ()):
        if mount["mountPath"] == path:
            found: dict[str, Any] = mount
            return found
    return None


def _config_text(
    objects: list[dict[str, Any]], container: dict[str, Any], pod: dict[str, Any]
) -> str:
    """The KubeProxyConfiguration the container reads: --config's file, followed through its
    volume mount to the ConfigMap key behind it."""
    path = _flag_value(_argv(container), "--config")
    assert path, "kpgen run is given --config"
    file = PurePosixPath(path)
    mount = _mount_at(container, str(file.parent))
    assert mount is not None, f"--config {path}: a volume is mounted at {file.parent}"
    source = _volume(pod, mount["name"])
    assert "configMap" in source, f"--config {path}: the volume at {file.parent} is a ConfigMap"
    items = source["configMap"].get("items")
    if items:
        keys = [i["key"] for i in items if i["path"] == file.name]
        assert keys, f"--config {path}: the ConfigMap volume maps a key to {file.name}"
        key = keys[0]
    else:
        key = file.name
    name = source["configMap"]["name"]
    maps = [o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name]
    assert maps, f"--config {path}: ConfigMap {name} is in deploy/"
    assert maps[0]["metadata"].get("namespace") == NAMESPACE
    data = maps[0].get("data", {})
    assert key in data, f"--config {path}: ConfigMap {name} has the key {key}"
    text: str = data[key]
    return text


# ---------------------------------------------------------------------------------------------
# The objects


def test_every_object_has_api_version_kind_and_name(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        where = f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        assert isinstance(obj.get("apiVersion"), str) and obj["apiVersion"], where
        assert isinstance(obj.get("kind"), str) and obj["kind"], where
        assert isinstance(obj.get("metadata", {}).get("name"), str), where
        assert obj["metadata"]["name"], where


def test_deploy_has_the_service_account_rbac_config_and_daemonset(
    objects: list[dict[str, Any]],
) -> None:
    kinds = sorted(o["kind"] for o in objects)
    for kind in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"):
        assert kind in kinds, f"deploy/ has a {kind}"
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert len(names) == len(objects), "no object is defined twice"


def test_namespaced_objects_are_in_kube_system_and_cluster_objects_in_none(
    objects: list[dict[str, Any]],
) -> None:
    for obj in objects:
        namespace = obj["metadata"].get("namespace")
        where = f"{obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in CLUSTER_SCOPED:
            assert namespace is None, f"{where} is cluster-scoped: no namespace"
        else:
            assert namespace == NAMESPACE, f"{where} is in {NAMESPACE}"


# ---------------------------------------------------------------------------------------------
# The DaemonSet


def test_pod_runs_in_the_nodes_network_namespace_at_node_critical_priority(
    pod: dict[str, Any],
) -> None:
    assert pod.get("hostNetwork") is True
    assert pod.get("priorityClassName") == "system-node-critical"


def test_pod_tolerates_every_taint(pod: dict[str, Any]) -> None:
    tolerations = pod.get("tolerations", [])
    assert any(
        t.get("operator") == "Exists" and "key" not in t and "effect" not in t for t in tolerations
    ), "a toleration with operator Exists, no key and no effect (every taint)"


def test_pod_resolves_names_without_the_cluster_dns_it_has_to_program_first(
    pod: dict[str, Any],
) -> None:
    # The cluster DNS is a Service: on a node without kpgen's rules yet it cannot answer, so a
    # pod that needed it (ClusterFirst / ClusterFirstWithHostNet) could not start there.
    assert pod.get("dnsPolicy") == "Default"


def test_updates_replace_one_node_at_a_time(daemonset: dict[str, Any]) -> None:
    strategy = daemonset["spec"].get("updateStrategy", {})
    assert strategy.get("type") == "RollingUpdate"
    assert strategy.get("rollingUpdate", {}).get("maxUnavailable") in (1, "1", "10%")


def test_pod_selector_matches_the_pod_template(daemonset: dict[str, Any]) -> None:
    selector = daemonset["spec"]["selector"]["matchLabels"]
    labels = daemonset["spec"]["template"]["metadata"]["labels"]
    assert selector and all(labels.get(k) == v for k, v in selector.items())


def test_pod_uses_the_service_account_the_role_is_bound_to(
    objects: list[dict[str, Any]], daemonset: dict[str, Any], pod: dict[str, Any]
) -> None:
    account = _one(objects, "ServiceAccount")
    assert pod.get("serviceAccountName") == account["metadata"]["name"]
    assert daemonset["metadata"]["namespace"] == account["metadata"]["namespace"]
    assert pod.get("automountServiceAccountToken", True) is True, "kpgen needs its token"


def test_container_runs_kpgen_run_from_the_local_image(container: dict[str, Any]) -> None:
    argv = _argv(container)
    assert argv[:2] == ["kpgen", "run"]
    assert container["image"] == "kpgen:latest"
    # a node-loaded image: for :latest the default would be Always, which pulls
    assert container.get("imagePullPolicy") == "IfNotPresent"


def test_container_passes_only_flags_that_kpgen_run_takes(container: dict[str, Any]) -> None:
    run = main.commands["run"]
    known = {opt for param in run.params for opt in (*param.opts, *param.secondary_opts)}
    flags = {a.split("=", 1)[0] for a in _argv(container)[2:] if a.startswith("-")}
    assert flags <= known, f"unknown to kpgen run: {sorted(flags - known)}"


def test_node_name_comes_from_the_pod_spec_and_is_the_hostname_override(
    container: dict[str, Any],
) -> None:
    env = _env(container)
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert _flag_value(_argv(container), "--hostname-override") == "$(NODE_NAME)"


def test_api_server_is_reached_at_its_real_address_not_the_kubernetes_cluster_ip(
    objects: list[dict[str, Any]], container: dict[str, Any], pod: dict[str, Any], tmp_path: Path
) -> None:
    # Not the seed lab's address, nor the ClusterIP kpgen has to program: kube-proxy's own
    # kubeconfig, from kubeadm's `kube-proxy` ConfigMap, as kube-proxy reaches the API server.
    env = _env(container)
    assert "KUBERNETES_SERVICE_HOST" not in env and "KUBERNETES_SERVICE_PORT" not in env
    path = tmp_path / "config.yaml"
    path.write_text(_config_text(objects, container, pod), encoding="utf-8")
    kubeconfig = read_kube_proxy_config(str(path)).kubeconfig
    assert kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    file = PurePosixPath(kubeconfig)
    mount = _mount_at(container, str(file.parent))
    assert mount is not None and mount.get("readOnly") is True
    source = _volume(pod, mount["name"])["configMap"]
    assert source["name"] == "kube-proxy", "kubeadm's ConfigMap, not one of deploy/'s"
    assert {"key": "kubeconfig.conf", "path": file.name} in source["items"]
    assert "10.20.30.10" not in (ROOT / "deploy" / "kpgen.yaml").read_text()


def test_container_may_change_netfilter_rules(container: dict[str, Any]) -> None:
    # nft, iptables-restore and conntrack need CAP_NET_ADMIN; iptables-legacy a raw socket
    context = container.get("securityContext", {})
    added = set(context.get("capabilities", {}).get("add", ()))
    assert context.get("privileged") is True or {"NET_ADMIN", "NET_RAW"} <= added
    assert context.get("runAsNonRoot") is not True, "kpgen loads rules as root"
    assert context.get("runAsUser", 0) == 0


def test_container_shares_the_hosts_xtables_lock_and_sees_its_kernel_modules(
    container: dict[str, Any], pod: dict[str, Any]
) -> None:
    lock = _mount_at(container, "/run/xtables.lock")
    assert lock is not None, "the xtables lock is mounted at /run/xtables.lock"
    lock_source = _volume(pod, lock["name"])["hostPath"]
    assert lock_source == {"path": "/run/xtables.lock", "type": "FileOrCreate"}
    modules = _mount_at(container, "/lib/modules")
    assert modules is not None, "/lib/modules is mounted"
    assert modules.get("readOnly") is True
    assert _volume(pod, modules["name"])["hostPath"]["path"] == "/lib/modules"


def test_liveness_asks_livez_and_readiness_asks_healthz_on_the_healthz_port(
    container: dict[str, Any],
) -> None:
    argv = _argv(container)
    bind = _flag_value(argv, "--healthz-bind-address") or f"0.0.0.0:{HEALTHZ_PORT}"
    assert int(bind.rsplit(":", 1)[1]) == HEALTHZ_PORT
    for probe, path in (("livenessProbe", "/livez"), ("readinessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path, probe
        assert get["port"] == HEALTHZ_PORT, probe
        assert get.get("scheme", "HTTP") == "HTTP", probe


def test_metrics_stay_on_localhost_and_are_not_declared_as_a_port(
    container: dict[str, Any],
) -> None:
    bind = _flag_value(_argv(container), "--metrics-bind-address") or f"127.0.0.1:{METRICS_PORT}"
    assert ipaddress.ip_address(bind.rsplit(":", 1)[0].strip("[]")).is_loopback
    ports = {p["containerPort"] for p in container.get("ports", ())}
    assert METRICS_PORT not in ports, "with hostNetwork a declared port claims the node's port"


def test_container_requests_cpu_and_memory(container: dict[str, Any]) -> None:
    requests = container.get("resources", {}).get("requests", {})
    assert requests.get("cpu") == "100m"
    assert requests.get("memory") in ("64Mi", "96Mi", "128Mi")


# ---------------------------------------------------------------------------------------------
# The configuration


def test_config_flag_names_the_mounted_config_map_key(
    objects: list[dict[str, Any]], container: dict[str, Any], pod: dict[str, Any]
) -> None:
    # _config_text follows --config to its ConfigMap key and asserts every step
    assert _config_text(objects, container, pod).strip()
    path = PurePosixPath(_flag_value(_argv(container), "--config") or "")
    mount = _mount_at(container, str(path.parent))
    assert mount is not None and mount.get("readOnly") is True


def test_configuration_is_accepted_by_kpgens_config_reader(
    objects: list[dict[str, Any]], container: dict[str, Any], pod: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(_config_text(objects, container, pod), encoding="utf-8")
    node = node_settings(NodeFlags(hostname="node-a"), str(path))
    assert node.hostname == "node-a"
    assert node.mode is ProxyMode.NFTABLES
    assert node.cluster_cidrs, "clusterCIDR is set (a placeholder the user changes)"


def test_configuration_leaves_the_node_name_to_each_node(
    objects: list[dict[str, Any]], container: dict[str, Any], pod: dict[str, Any]
) -> None:
    # one ConfigMap for every node: a hostnameOverride in it would make them all the same node
    config = yaml.safe_load(_config_text(objects, container, pod))
    assert "hostnameOverride" not in config


def test_daemonset_settings_render_the_seed_cluster_as_make_render_does(
    objects: list[dict[str, Any]], container: dict[str, Any], pod: dict[str, Any], tmp_path: Path
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(_config_text(objects, container, pod), encoding="utf-8")
    seed = str(ROOT / "examples" / "seed-cluster.yaml")
    node = ["--hostname-override", "k8s-worker01"]
    from_deploy = CliRunner().invoke(main, ["render", "-f", seed, "--config", str(path), *node])
    makefile = (ROOT / "Makefile").read_text()
    flags = re.search(r"^SEED_NODE_FLAGS\s*:=\s*(.+)$", makefile, re.M)
    assert flags
    reference = CliRunner().invoke(main, ["render", "-f", seed, *flags.group(1).split()])
    assert from_deploy.exit_code == 0, from_deploy.output
    assert reference.exit_code == 0, reference.output
    assert from_deploy.stdout == reference.stdout


# ---------------------------------------------------------------------------------------------
# RBAC


def _granted(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    granted = set()
    for rule in role.get("rules", ()):
        assert not rule.get("nonResourceURLs"), "no non-resource URLs"
        assert not rule.get("resourceNames"), "the rules are not narrowed by name"
        for group in rule.get("apiGroups", ()):
            for resource in rule.get("resources", ()):
                for verb in rule.get("verbs", ()):
                    assert "*" not in (group, resource, verb), f"no wildcard: {rule}"
                    granted.add((group, resource, verb))
    return granted


def _describe(triples: Iterable[tuple[str, str, str]]) -> str:
    return ", ".join(f"{g or 'core'}/{r}:{v}" for g, r, v in sorted(triples)) or "nothing"


def test_cluster_role_grants_exactly_the_documented_api_calls(
    objects: list[dict[str, Any]],
) -> None:
    granted = _granted(_one(objects, "ClusterRole"))
    assert granted == NEEDED_API_ACCESS, (
        f"granted but not needed: {_describe(granted - NEEDED_API_ACCESS)}; "
        f"needed but not granted: {_describe(NEEDED_API_ACCESS - granted)}"
    )


def test_cluster_role_binding_binds_the_role_to_the_service_account_in_its_namespace(
    objects: list[dict[str, Any]],
) -> None:
    role = _one(objects, "ClusterRole")
    account = _one(objects, "ServiceAccount")
    binding = _one(objects, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert {
        "kind": "ServiceAccount",
        "name": account["metadata"]["name"],
        "namespace": account["metadata"]["namespace"],
    } in binding["subjects"]


# The kubernetes client's methods for the resources kpgen may touch: verb, optional namespace
# scope, resource, optional all-namespaces and subresource suffixes.
_CLIENT_METHOD = re.compile(
    r"^(?P<verb>create|read|list|patch|replace|delete_collection|delete)_(?:namespaced_)?"
    r"(?P<resource>service|endpoint_slice|node|event)(?:_for_all_namespaces)?"
    r"(?P<sub>_status)?(?:_with_http_info)?$"
)
_VERBS = {
    "create": "create",
    "read": "get",
    "list": "list",
    "patch": "patch",
    "replace": "update",
    "delete": "delete",
    "delete_collection": "deletecollection",
}
_RESOURCES = {
    "service": ("", "services"),
    "endpoint_slice": ("discovery.k8s.io", "endpointslices"),
    "node": ("", "nodes"),
    "event": (None, "events"),  # on CoreV1Api ("") and EventsV1Api (events.k8s.io): by receiver
}
_API_GROUPS = {
    "CoreV1Api": "",
    "DiscoveryV1Api": "discovery.k8s.io",
    "EventsV1Api": "events.k8s.io",
}


class ScanError(Exception):
    """The source calls the API in a way the scanner cannot attribute to one API group."""


def _terminal(node: ast.AST) -> str | None:
    if isinstance(node, ast.arg):
        return node.arg
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Constant) and isinstance(node.value, str):  # "client.CoreV1Api"
        return node.value.rsplit(".", 1)[-1]
    if isinstance(node, ast.Subscript):  # Optional[CoreV1Api], CoreV1Api | None
        return _terminal(node.slice)
    if isinstance(node, ast.BinOp):
        return _terminal(node.left) or _terminal(node.right)
    return None


def _api_class(node: ast.AST | None) -> str | None:
    name = _terminal(node) if node is not None else None
    return name if name in _API_GROUPS else None


@dataclass(frozen=True)
class _Bindings:
    """Which names (variables, attributes, parameters) hold which kubernetes API class."""

    classes: dict[str, set[str]]

    @classmethod
    def of(cls, tree: ast.AST) -> _Bindings:
        classes: dict[str, set[str]] = {}

        def bind(target: ast.AST, api: str | None) -> None:
            name = _terminal(target)
            if api and name:
                classes.setdefault(name, set()).add(api)

        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                for target in node.targets:
                    bind(target, _api_class(node.value.func))
            elif isinstance(node, ast.AnnAssign):
                api = _api_class(node.annotation)
                if api is None and isinstance(node.value, ast.Call):
                    api = _api_class(node.value.func)
                bind(node.target, api)
            elif isinstance(node, ast.arg):
                bind(node, _api_class(node.annotation))
        return cls(classes)

    def receiver(self, node: ast.AST) -> str | None:
        if isinstance(node, ast.Call):
            return _api_class(node.func)
        found = self.classes.get(_terminal(node) or "", set())
        return next(iter(found)) if len(found) == 1 else None


def _watch_flag(call: ast.Call) -> bool | None:
    """The call's watch= keyword: True, False (absent or false), None (not a constant, or it may
    come in **kwargs, as when Watch().stream calls a wrapper that passes its kwargs on)."""
    for keyword in call.keywords:
        if keyword.arg == "watch":
            if isinstance(keyword.value, ast.Constant):
                return bool(keyword.value.value)
            return None
    if any(keyword.arg is None for keyword in call.keywords):
        return None
    return False


# A collection's path: /api/v1/RESOURCE (the core group) or /apis/GROUP/VERSION/RESOURCE.
_COLLECTION = re.compile(r"^/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/(?P<resource>[a-z]+)$")


def _paths_of(
    functions: list[ast.FunctionDef], path: ast.AST, tree: ast.AST, where: str
) -> list[str]:
    """The paths a ``resource_path=`` argument takes: a string, or a parameter of an enclosing
    function (innermost first), which every call of that function gives as a string."""
    if isinstance(path, ast.Constant) and isinstance(path.value, str):
        return [path.value]
    name = _terminal(path)
    for function in functions:
        params = [a.arg for a in function.args.args]
        if name not in params:
            continue
        position, paths = params.index(name), []
        for call in ast.walk(tree):
            if isinstance(call, ast.Call) and _terminal(call.func) == function.name:
                given = {k.arg: k.value for k in call.keywords}.get(name)
                if given is None and position < len(call.args):
                    given = call.args[position]
                if not (isinstance(given, ast.Constant) and isinstance(given.value, str)):
                    raise ScanError(f"{where}: a call of {function.name} gives {name} no string")
                paths.append(given.value)
        return paths
    raise ScanError(f"{where}: resource_path is neither a string nor a parameter")


def _requests_in(tree: ast.AST, filename: str) -> set[tuple[str, str, str]]:
    """What kpgen's own requests (``ApiClient.param_serialize``) need: a GET of a collection is
    a list or, when the caller adds ``watch=True`` (kpgen's informers do), a watch: both."""
    found: set[tuple[str, str, str]] = set()
    functions = [f for f in ast.walk(tree) if isinstance(f, ast.FunctionDef)]
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and _terminal(node.func) == "param_serialize"):
            continue
        where = f"{filename}:{node.lineno}"
        given = {k.arg: k.value for k in node.keywords}
        method = given.get("method")
        if not (isinstance(method, ast.Constant) and method.value == "GET"):
            raise ScanError(f"{where}: only GET requests are understood here")
        enclosing = [f for f in functions if any(n is node for n in ast.walk(f))]
        enclosing.sort(key=lambda f: -f.lineno)  # innermost first
        for path in _paths_of(enclosing, given.get("resource_path", node), tree, where):
            match = _COLLECTION.match(path)
            if match is None:
                raise ScanError(f"{where}: {path} is not a collection's path")
            group = match["group"] or ""
            found |= {(group, match["resource"], verb) for verb in ("list", "watch")}
    return found


def api_access_in_source(source: str, filename: str = "<source>") -> set[tuple[str, str, str]]:
    """The (API group, resource, verb) triples that kubernetes-client calls in `source` need.

    A list method called directly needs list (watch with watch=True, either with **kwargs that
    may carry watch=True); passed on uncalled (to Watch().stream, or an informer helper that lists
    then watches) it needs list and watch.
    Events exist in two API groups under the same method names, so the receiver must be known:
    a name assigned from, or annotated with, CoreV1Api or EventsV1Api.
    """
    tree = ast.parse(source, filename)
    bindings = _Bindings.of(tree)
    called = {id(n.func): n for n in ast.walk(tree) if isinstance(n, ast.Call)}
    found: set[tuple[str, str, str]] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        match = _CLIENT_METHOD.match(node.attr)
        if match is None:
            continue
        group, resource = _RESOURCES[match["resource"]]
        if group is None:
            api = bindings.receiver(node.value)
            if api not in ("CoreV1Api", "EventsV1Api"):
                raise ScanError(
                    f"{filename}:{node.lineno}: {ast.unparse(node)}: cannot tell whether this is "
                    "CoreV1Api's or EventsV1Api's (assign or annotate the receiver with the class)"
                )
            group = _API_GROUPS[api]
        if match["sub"]:
            resource += "/status"
        verb = _VERBS[match["verb"]]
        if verb != "list":
            verbs = {verb}
        elif id(node) in called:
            watch = _watch_flag(called[id(node)])
            verbs = {"list", "watch"} if watch is None else {"watch"} if watch else {"list"}
        else:
            verbs = {"list", "watch"}
        found |= {(group, resource, v) for v in verbs}
    return found | _requests_in(tree, filename)


def _package_sources() -> Iterator[Path]:
    yield from sorted(PACKAGE.rglob("*.py"))


def test_cluster_role_grants_exactly_what_the_controller_code_calls(
    objects: list[dict[str, Any]],
) -> None:
    used: set[tuple[str, str, str]] = set()
    for path in _package_sources():
        used |= api_access_in_source(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    granted = _granted(_one(objects, "ClusterRole"))
    assert used, (
        "no kubernetes-client call found in kpgen/: if the controller reaches the API another "
        "way, teach api_access_in_source about it"
    )
    assert used == granted, (
        f"granted but never called: {_describe(granted - used)}; "
        f"called but not granted: {_describe(used - granted)}"
    )


SAMPLE_CONTROLLER = """
from kubernetes import client, watch
from kubernetes.client import EventsV1Api

class Controller:
    def __init__(self, api: client.ApiClient, node: str) -> None:
        self.core = client.CoreV1Api(api)
        self.discovery = client.DiscoveryV1Api(api)
        self.events: EventsV1Api = EventsV1Api(api)
        self.node = node

    def run(self) -> None:
        services = self.core.list_service_for_all_namespaces()
        for event in watch.Watch().stream(
            self.discovery.list_endpoint_slice_for_all_namespaces, resource_version="1"
        ):
            pass
        self.core.read_node(self.node)
        self.core.list_node(field_selector=f"metadata.name={self.node}", watch=True)

    def record(self, core: client.CoreV1Api, body: object) -> None:
        self.events.create_namespaced_event("default", body)
        core.patch_namespaced_event("x", "default", body)
"""


def test_api_call_scanner_attributes_each_call_to_its_group_resource_and_verb() -> None:
    assert api_access_in_source(SAMPLE_CONTROLLER) == {
        ("", "services", "list"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("", "nodes", "get"),
        ("", "nodes", "watch"),
        ("events.k8s.io", "events", "create"),
        ("", "events", "patch"),
    }


SAMPLE_REQUESTS = """
def lister(api, path, **fixed):
    def call(**kwargs):
        request = api.param_serialize(method="GET", resource_path=path, query_params=[])
        return api.call_api(*request)
    return call

def lists(api):
    services = lister(api, "/api/v1/services")
    return [services, lister(api, path="/apis/discovery.k8s.io/v1/endpointslices")]
"""


def test_api_call_scanner_reads_the_paths_of_kpgens_own_requests() -> None:
    assert api_access_in_source(SAMPLE_REQUESTS) == {
        ("", "services", "list"),
        ("", "services", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
    }
    with pytest.raises(ScanError, match="only GET"):
        api_access_in_source(SAMPLE_REQUESTS.replace('method="GET"', 'method="POST"'))
    with pytest.raises(ScanError, match="gives path no string"):
        api_access_in_source(SAMPLE_REQUESTS + "lister(None, some_path)\n")


def test_api_call_scanner_sees_writes_and_subresources() -> None:
    source = (
        "def f(core):\n"
        "    core.patch_node_status('n', {})\n"
        "    core.replace_namespaced_service('s', 'd', {})\n"
    )
    assert api_access_in_source(source) == {
        ("", "nodes/status", "patch"),
        ("", "services", "update"),
    }


def test_api_call_scanner_refuses_an_event_call_it_cannot_place_in_a_group() -> None:
    with pytest.raises(ScanError, match="CoreV1Api's or EventsV1Api's"):
        api_access_in_source(
            "def f(api, body):\n    api.create_namespaced_event('default', body)\n"
        )


# ---------------------------------------------------------------------------------------------
# The Containerfile


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int


def _instructions() -> list[Instruction]:
    """The Containerfile's instructions: comments dropped, continuation lines joined."""
    instructions = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(CONTAINERFILE.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1].strip())
            continue
        pending.append(line)
        keyword, _, arguments = " ".join(pending).partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
        pending = []
    assert not pending, "the Containerfile does not end inside a continued line"
    return instructions


def _runs() -> list[Instruction]:
    return [i for i in _instructions() if i.keyword == "RUN"]


def _commands(run: Instruction) -> list[list[str]]:
    """The simple commands of a RUN's shell line, split on && || ; (no quoting in between)."""
    return [shlex.split(part) for part in re.split(r"&&|\|\||;", run.arguments) if part.strip()]


def _apt_installs() -> list[list[str]]:
    return [
        argv for run in _runs() for argv in _commands(run) if argv[:2] == ["apt-get", "install"]
    ]


DEBIAN_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _env_at(index: int) -> dict[str, str]:
    """The environment an instruction runs in (ENV instructions before it; the base's PATH)."""
    env: dict[str, str] = {"PATH": DEBIAN_PATH}
    for instruction in _instructions()[:index]:
        if instruction.keyword != "ENV":
            continue
        words = shlex.split(instruction.arguments)
        if "=" not in words[0]:  # legacy `ENV KEY value`
            env[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            env[key] = value.replace("${PATH}", env["PATH"]).replace("$PATH", env["PATH"])
    return env


def _venv() -> str:
    for run in _runs():
        for argv in _commands(run):
            if argv[1:3] == ["-m", "venv"]:
                return argv[-1]
    raise AssertionError("the Containerfile makes a venv (python3 -m venv ...)")


def test_image_is_built_on_debian_12_slim() -> None:
    froms = [i.arguments.split()[0] for i in _instructions() if i.keyword == "FROM"]
    assert froms and all(image == "debian:12-slim" for image in froms)


def test_image_installs_the_netfilter_tools_and_debians_python_with_its_nftables_binding() -> None:
    packages = {word for argv in _apt_installs() for word in argv[2:] if not word.startswith("-")}
    needed = {
        "nftables",
        "iptables",
        "conntrack",
        "iproute2",
        "ca-certificates",
        "python3",
        "python3-nftables",
        "python3-venv",
    }
    assert needed <= packages, f"missing: {sorted(needed - packages)}"


def test_every_apt_get_install_is_unattended_and_without_recommends() -> None:
    installs = _apt_installs()
    assert installs, "the image installs Debian packages"
    for argv in installs:
        assert "-y" in argv or "--yes" in argv or "-qy" in argv, argv
        assert "--no-install-recommends" in argv, argv


def test_apt_lists_are_removed_in_the_layer_that_fetched_them() -> None:
    updates = [run for run in _runs() if "apt-get update" in run.arguments]
    assert updates, "the image runs apt-get update"
    for run in updates:
        assert ["rm", "-rf", "/var/lib/apt/lists/*"] in _commands(run), f"line {run.line}"
    for run in _runs():
        if "apt-get install" in run.arguments:
            assert "apt-get update" in run.arguments, (
                f"line {run.line}: update and install together"
            )


def test_venv_is_made_from_debians_python_and_sees_its_packages() -> None:
    makes = [argv for run in _runs() for argv in _commands(run) if argv[1:3] == ["-m", "venv"]]
    assert len(makes) == 1, "one venv"
    assert makes[0][0] == "/usr/bin/python3"
    assert "--system-site-packages" in makes[0]


def _resolve(argv0: str, env: dict[str, str]) -> str:
    """Where a command name is found: in the venv when its bin/ leads PATH, else the system's."""
    if "/" in argv0:
        return argv0
    first = env["PATH"].split(":")[0]
    if first == f"{_venv()}/bin":
        return f"{first}/{argv0}"
    return f"/usr/bin/{argv0}"


def test_kpgen_is_pip_installed_into_the_venv_without_a_cache() -> None:
    venv = _venv()
    instructions = _instructions()
    installs = [
        (index, argv)
        for index, instruction in enumerate(instructions)
        if instruction.keyword == "RUN"
        for argv in _commands(instruction)
        if "pip" in " ".join(argv[:3]) and "install" in argv
    ]
    assert len(installs) == 1, "one pip install"
    index, argv = installs[0]
    assert _resolve(argv[0], _env_at(index)).startswith(f"{venv}/bin/"), "pip is the venv's"
    assert "--no-cache-dir" in argv
    assert "." in argv, "installs the project copied into the work directory"


def test_image_copies_everything_pip_install_reads() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    setuptools = project["tool"]["setuptools"]
    package_dirs = setuptools.get("package-dir", {})
    needed = {"pyproject.toml", project["project"]["readme"]}
    for package in setuptools["packages"]:
        path = package_dirs.get(package, package.replace(".", "/"))
        needed.add(path.split("/")[0])
    copied: dict[str, str] = {}
    for instruction in _instructions():
        if instruction.keyword not in ("COPY", "ADD"):
            continue
        words = [w for w in shlex.split(instruction.arguments) if not w.startswith("--")]
        *sources, destination = words
        for source in sources:
            copied[source.rstrip("/")] = destination
    for path in sorted(needed):
        assert path in copied, f"{path} is copied into the image"
        destination = copied[path].rstrip("/") or "."
        if (ROOT / path).is_dir():
            assert destination == path, f"{path}/ keeps its name (copied to {copied[path]})"
        else:
            assert destination in (".", path), f"{path} lands in the work directory"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether an ignore pattern leaves `path` out of the build context: it matches the path or
    a directory above it (from the context's root; `**/` from any depth)."""
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[:end]) for end in range(1, len(parts) + 1)]
    anywhere = [
        "/".join(parts[start:end])
        for start in range(len(parts))
        for end in range(start + 1, len(parts) + 1)
    ]
    for pattern in patterns:
        pattern = pattern.strip("/")
        if pattern.startswith("**/"):
            if any(fnmatch.fnmatchcase(p, pattern[3:]) for p in anywhere):
                return True
        elif any(fnmatch.fnmatchcase(p, pattern) for p in prefixes):
            return True
    return False


def test_build_context_ignore_file_keeps_out_nothing_the_image_needs() -> None:
    lines = IGNORE_FILE.read_text(encoding="utf-8").splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")]
    assert ".venv" in patterns and ".git" in patterns, "the large directories stay out"
    assert not any(p.startswith("!") for p in patterns), "no exceptions to reason about"
    needed = ["pyproject.toml", "README.md"]
    for directory in ("kpgen", "templates"):
        needed += [
            str(p.relative_to(ROOT))
            for p in (ROOT / directory).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts
        ]
    kept_out = [path for path in needed if _ignored(path, patterns)]
    assert not kept_out, f"ignored but copied into the image: {kept_out}"
    assert _ignored(".venv/bin/python", patterns) and _ignored("kpgen/__pycache__/x.pyc", patterns)


def test_image_runs_kpgen_run_from_the_venv_by_default() -> None:
    instructions = _instructions()
    entrypoint: list[str] = []
    command: list[str] = []
    for instruction in instructions:
        if instruction.keyword in ("ENTRYPOINT", "CMD"):
            words = json.loads(instruction.arguments)  # exec form: no shell in between
            assert isinstance(words, list), f"line {instruction.line}: exec form"
            if instruction.keyword == "ENTRYPOINT":
                entrypoint, command = words, []
            else:
                command = words
    argv = entrypoint + command
    assert argv[:2] in (["kpgen", "run"], [f"{_venv()}/bin/kpgen", "run"])
    assert _resolve(argv[0], _env_at(len(instructions))) == f"{_venv()}/bin/kpgen"
