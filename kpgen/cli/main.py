"""The ``kpgen`` command line.

Every command reads its inputs, runs the pure pipeline (load, parse, plan, render) and writes
text. Problems with single objects are reported on stderr and the rest goes on; input that
cannot be read at all exits 2 with one line. No traceback reaches the user.
"""

from __future__ import annotations

import atexit
import functools
import gc
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from kpgen import missing_module
from kpgen.cli.halves import SPLIT_MIN_BYTES, SPLIT_MIN_DOCUMENTS, Rendered, render_halves
from kpgen.controller.logs import setup_logging
from kpgen.core.model import IPFamily
from kpgen.core.node import PRIMARY, ConfigError, NodeConfig, NodeFlags, ProxyMode
from kpgen.core.parse import ParseResult, parse_documents
from kpgen.core.plan import build_plans
from kpgen.inputs.config import node_settings
from kpgen.inputs.manifests import (
    InputError,
    decode_manifests,
    load_documents,
    manifests_size,
    read_manifests,
)
from kpgen.render.text import IPTABLES_JUMPS, render_plan

F = TypeVar("F", bound=Callable[..., Any])
EXIT_INPUT = 2


def _fail(message: str) -> None:
    click.echo(f"kpgen: error: {message}", err=True)
    sys.exit(EXIT_INPUT)


def _decorate(command: F, options: Sequence[Any]) -> F:
    for option in reversed(options):
        command = option(command)
    return command


def api_options(kubeconfig_help: str) -> Callable[[F], F]:
    """How to reach the Kubernetes API: the same flags, and client, for every command."""
    return lambda command: _decorate(
        command,
        [
            click.option("--kubeconfig", metavar="FILE", help=kubeconfig_help),
            click.option(
                "--master",
                metavar="URL",
                help="The API server's address (overrides the kubeconfig).",
            ),
        ],
    )


def input_options(command: F) -> F:
    """Where the one-shot commands read their objects: manifests, or a live cluster."""
    return _decorate(
        command,
        [
            click.option(
                "-f",
                "--filename",
                "sources",
                multiple=True,
                metavar="FILE|DIR|-",
                help="Manifests (YAML or JSON; - for stdin). Repeatable.",
            ),
            api_options(
                "Instead of -f: list Services, EndpointSlices and this node's Node once from "
                "this kubeconfig's cluster, as `kpgen run` would."
            ),
            click.option("-v", "--verbose", count=True, help="Also say what was skipped, and why."),
        ],
    )


def node_options(command: F) -> F:
    """The node settings every command shares, under kube-proxy's flag names."""
    options = [
        click.option(
            "--proxy-mode",
            type=click.Choice([m.value for m in ProxyMode]),
            help="Which rules to make.  [default: nftables]",
        ),
        click.option(
            "--hostname-override",
            metavar="NAME",
            help="This node's name: endpoints with this nodeName are local. [default: host name]",
        ),
        click.option(
            "--cluster-cidr",
            multiple=True,
            metavar="CIDR",
            help="The pods' range: ClusterIP traffic from outside it is masqueraded. Repeatable.",
        ),
        click.option(
            "--masquerade-all",
            is_flag=True,
            default=None,
            help="Masquerade all traffic to ClusterIPs.",
        ),
        click.option(
            "--nodeport-addresses",
            multiple=True,
            metavar=f"CIDR|{PRIMARY}",
            help="Node addresses that answer NodePorts.  [default: all local but loopback]",
        ),
        click.option(
            "--node-ip",
            multiple=True,
            metavar="IP",
            help=f"This node's primary address (for --nodeport-addresses {PRIMARY}). Repeatable.",
        ),
        click.option(
            "--service-cidr",
            multiple=True,
            metavar="CIDR",
            help="The ClusterIP range. Repeatable.",
        ),
        click.option(
            "--config",
            "config_file",
            metavar="FILE",
            help="A KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1); flags override it.",
        ),
    ]
    return _decorate(command, options)


iptables_backend_option = click.option(
    "--iptables-backend",
    type=click.Choice(["auto", "nft", "legacy"]),
    default="auto",
    show_default=True,
    help="Which iptables (iptables mode): auto picks the one that already holds rules.",
)


class Inputs:
    """Where a one-shot command's objects come from: ``-f`` manifests or ``--kubeconfig``."""

    def __init__(self, sources: tuple[str, ...], kubeconfig: str | None, master: str | None):
        if sources and kubeconfig:
            _fail("give either -f MANIFESTS or --kubeconfig FILE, not both")
        self.sources, self.kubeconfig, self.master = sources, kubeconfig, master

    def __bool__(self) -> bool:
        return bool(self.sources or self.kubeconfig)

    def documents(self, node: NodeConfig) -> list[Any]:
        if not self.kubeconfig:
            return load_documents(list(self.sources))
        from kpgen.inputs.api import ApiListError, api_client, list_cluster

        try:
            api = api_client(self.kubeconfig, self.master)
        except Exception as error:  # the client's ConfigException, a missing or bad file
            raise InputError(f"--kubeconfig {self.kubeconfig}: {error}") from None
        try:
            return list_cluster(api, node.hostname)
        except ApiListError as error:
            raise InputError(f"cannot list the cluster: {error}") from None

    def loader(self, node: NodeConfig) -> tuple[Callable[[], list[Any]], bool]:
        """A function that gives the documents (the manifests are read now, decoded by the
        function), and whether they are many: worth two cores (:mod:`kpgen.cli.halves`)."""
        if self.kubeconfig:
            documents = self.documents(node)
            return (lambda: documents), len(documents) >= SPLIT_MIN_DOCUMENTS
        manifests = read_manifests(list(self.sources))
        many = manifests_size(manifests) >= SPLIT_MIN_BYTES
        return (lambda: decode_manifests(manifests)), many


def _start_reading(inputs: Inputs) -> None:
    # A one-shot command builds a large heap of objects that all live to the end: the cyclic
    # garbage collector would only walk it again and again (half the time of parsing 10,000
    # services, three quarters of decoding their YAML; docs/performance.md).
    gc.disable()
    if not inputs:
        _fail("no objects to read: give -f MANIFESTS or --kubeconfig FILE")


def _report(result: ParseResult, verbose: int) -> ParseResult:
    for problem in result.problems:
        click.echo(f"kpgen: warning: {problem}", err=True)
    for kind, count in sorted(result.ignored.items()):
        click.echo(f"kpgen: note: ignored {count} object(s) of kind {kind}", err=True)
    if verbose:
        for skipped in result.skipped:
            click.echo(f"kpgen: note: {skipped}", err=True)
    return result


def _read_inputs(inputs: Inputs, node: NodeConfig, verbose: int) -> ParseResult:
    _start_reading(inputs)
    try:
        documents = inputs.documents(node)
    except InputError as error:
        _fail(str(error))
    return _report(parse_documents(documents), verbose)


def _rendered(inputs: Inputs, node: NodeConfig, verbose: int) -> Rendered:
    """The node's rules for the inputs, made on two cores where that gives the same rules
    (:mod:`kpgen.cli.halves`), else in this process."""
    _start_reading(inputs)
    try:
        load, many = inputs.loader(node)
        rendered, documents = render_halves(load, node, many)
    except InputError as error:
        _fail(str(error))
    if rendered is not None:
        _report(rendered.result, verbose)
        return rendered
    result = _report(parse_documents(documents), verbose)
    plans = build_plans(result.state, node)
    tables = {}
    if node.mode is ProxyMode.NFTABLES:
        tables = {plan.family: render_plan(plan, node.mode) for plan in plans}
    ports = sum(len(plan.ports) for plan in plans)
    return Rendered(result, plans, tables, ports, made_of=(documents,))


def _node(options: dict[str, Any], config: Any = None) -> NodeConfig:
    flags = NodeFlags(
        mode=options["proxy_mode"],
        hostname=options["hostname_override"],
        cluster_cidrs=options["cluster_cidr"],
        masquerade_all=options["masquerade_all"],
        nodeport_addresses=options["nodeport_addresses"],
        node_ips=options["node_ip"],
        service_cidrs=options["service_cidr"],
    )
    try:
        return node_settings(flags, options["config_file"], config)
    except ConfigError as error:
        _fail(str(error))
        raise  # unreachable: _fail exits


def _no_traceback(command: F) -> F:
    """Turn an unexpected exception into one line on stderr (exit 1)."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (click.exceptions.Exit, click.ClickException, SystemExit, KeyboardInterrupt):
            raise
        except BrokenPipeError:
            sys.exit(0)
        except ModuleNotFoundError as error:  # imported late: kubernetes, the templates
            click.echo(missing_module(error), err=True)
            sys.exit(1)
        except Exception as error:  # the last line of defence
            click.echo(f"kpgen: internal error: {type(error).__name__}: {error}", err=True)
            click.echo("kpgen: please report this with the input that caused it", err=True)
            sys.exit(1)

    return wrapper  # type: ignore[return-value]


class _Group(click.Group):
    """A group whose command list shows each command's first sentence whole, wrapped (click
    would cut it to one line with "..."), and whose ``lab`` commands are imported when used
    (16 ms that every other command would pay at start)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), "lab"})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "lab" and name not in self.commands:
            from kpgen.lab.cli import lab_group

            self.add_command(lab_group)
        return super().get_command(ctx, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            command = self.get_command(ctx, name)
            if command is not None and not command.hidden:
                rows.append((name, command.get_short_help_str(limit=1000)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(
    cls=_Group,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="kpgen")
def main() -> None:
    """kpgen: a kube-proxy written in Python.

    It turns Services and EndpointSlices into the node's service NAT rules (ClusterIP,
    NodePort, externalIPs, LoadBalancer IPs), for nftables or iptables.
    """


_COMMAND = False  # whether this process is the kpgen command itself (see command())


def command() -> None:
    """The kpgen command itself (kpgen/__main__.py): the console script and ``python -m
    kpgen``."""
    global _COMMAND
    _COMMAND = True
    main(prog_name="kpgen")


_KEPT: list[Any] = []  # what the kpgen command leaves for the kernel to free


def _exit_without_freeing(*kept: Any) -> None:
    """Once a one-shot command has written everything: at exit, let the kernel free its heap
    with the process instead of Python freeing it object by object (0.12 s of ``kpgen
    render`` at 10,000 services), the ``kept`` objects too (not freed as the command returns).
    Only in the kpgen command: a caller of :func:`main`, a test, goes on living."""
    if _COMMAND:
        _KEPT.extend(kept)
        atexit.register(_exit_now)


def _exit_now() -> None:
    code = 0
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: what Python's own exit would say
            code = 120
    os._exit(code)


@main.command("render")
@input_options
@node_options
@_no_traceback
def render_command(
    sources: tuple[str, ...],
    kubeconfig: str | None,
    master: str | None,
    verbose: int,
    **options: Any,
) -> None:
    """Print the rules this node would load, without touching it.

    \b
    Examples:
      kpgen render -f examples/seed-cluster.yaml --hostname-override k8s-worker01 \\
          --cluster-cidr 192.168.0.0/16
      kubectl get svc,endpointslices -A -o yaml | kpgen render -f -
      kpgen render --kubeconfig ~/.kube/config --hostname-override worker-1
    """
    inputs = Inputs(sources, kubeconfig, master)
    node = _node(options)
    if node.mode is ProxyMode.IPTABLES:
        parsed = _read_inputs(inputs, node, verbose)
        click.echo(iptables_text(parsed.state, node), nl=False)
        _exit_without_freeing(parsed)
    else:
        rendered = _rendered(inputs, node, verbose)
        click.echo(rendered.text, nl=False)
        _exit_without_freeing(rendered)


JUMPS_NOTE = """\
# Not in this input: kpgen's jumps from the built-in chains, so that loading it twice with
# iptables-restore --noflush does not add them twice (kpgen apply adds them once itself).
# Add them once, after loading this (as root): sed -n 's/^# once: //p' THIS-FILE | sh
"""


def iptables_text(state: Any, node: NodeConfig) -> str:
    """iptables-restore input that can be loaded again and again: every chain of kpgen's is
    declared and rewritten whole, and the jumps from the built-in chains, which a restore
    would add once more each time, are printed before each COMMIT as commands that add them
    only where missing (``# once: iptables -t nat -C ... || iptables -t nat -I ...``)."""
    parts = []
    for plan in build_plans(state, node):
        tool = "iptables" if plan.family is IPFamily.V4 else "ip6tables"
        if plan.family is IPFamily.V6:
            parts.append("# ip6tables-restore input (IPv6)\n")
        table = ""
        for line in render_plan(plan, node.mode, insert_jumps=()).splitlines(keepends=True):
            if line.startswith("*"):
                table = line[1:].strip()
            elif line == "COMMIT\n":
                parts.append(JUMPS_NOTE)
                for jump in IPTABLES_JUMPS:
                    if jump.table == table:
                        where = f"{tool} -t {table}"
                        parts.append(
                            f"# once: {where} -C {jump.chain} {jump.spec} 2>/dev/null"
                            f" || {where} -I {jump.chain} {jump.spec}\n"
                        )
            parts.append(line)
    return "".join(parts)


@main.command("apply")
@input_options
@node_options
@click.option("--check", is_flag=True, help="Let the kernel validate the rules; change nothing.")
@iptables_backend_option
@_no_traceback
def apply_command(
    sources: tuple[str, ...],
    kubeconfig: str | None,
    master: str | None,
    verbose: int,
    check: bool,
    iptables_backend: str,
    **options: Any,
) -> None:
    """Load the rules into this network namespace, atomically.

    The rules kpgen loaded before are replaced in one kernel transaction; the other proxy
    mode's rules are removed. If the kernel refuses the rules, nothing changes.
    """
    from kpgen.dataplane.apply import ApplyError, apply_plans

    inputs = Inputs(sources, kubeconfig, master)
    node = _node(options)
    rendered = _rendered(inputs, node, verbose)
    try:
        applied = apply_plans(
            rendered.plans,
            node.mode,
            check=check,
            iptables_variant=iptables_backend,
            nft_tables=rendered.tables or None,
            ports=rendered.ports,
        )
    except ApplyError as error:
        click.echo(f"kpgen: the rules were not loaded: {error}", err=True)
        sys.exit(1)
    click.echo(f"kpgen: {applied.summary}", err=True)
    if applied.advice:
        click.echo(f"kpgen: warning: {applied.advice}", err=True)
    _exit_without_freeing(rendered)


@main.command("cleanup")
@click.option(
    "--proxy-mode",
    type=click.Choice([*(m.value for m in ProxyMode), "all"]),
    default="all",
    show_default=True,
    help="Whose rules to remove.",
)
@_no_traceback
def cleanup_command(proxy_mode: str) -> None:
    """Remove every rule, chain and table kpgen created here, and nothing else."""
    from kpgen.dataplane.apply import ApplyError, cleanup

    modes = list(ProxyMode) if proxy_mode == "all" else [ProxyMode(proxy_mode)]
    try:
        removed = cleanup(modes, list(IPFamily))
    except ApplyError as error:
        click.echo(f"kpgen: cleanup failed: {error}", err=True)
        sys.exit(1)
    for item in removed:
        click.echo(f"removed {item}")
    if not removed:
        click.echo("nothing of kpgen's to remove", err=True)


@main.command("run")
@node_options
@click.option(
    "--source",
    default="api",
    show_default=True,
    metavar="api|manifests:DIR",
    help="Where objects come from: the Kubernetes API, or a directory re-read when it changes.",
)
@api_options("Kubeconfig.  [default: in a pod, in-cluster; else $KUBECONFIG or ~/.kube/config]")
# Not given: --config's value (docs/config.md), else the default shown.
@click.option("--min-sync-period", show_default="1s", metavar="DURATION",
              help="Syncs come no more often than this.")  # fmt: skip
@click.option("--sync-period", show_default="30s", metavar="DURATION",
              help="A full sync at least this often.")  # fmt: skip
@click.option("--healthz-bind-address", show_default="0.0.0.0:10256",
              metavar="HOST:PORT", help="/healthz and /livez; empty: off.")  # fmt: skip
@click.option("--metrics-bind-address", show_default="127.0.0.1:10249",
              metavar="HOST:PORT", help="/metrics (Prometheus); empty: off.")  # fmt: skip
@iptables_backend_option
@click.option("-v", "--verbose", count=True, help="More log detail (-v: watch events).")
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    show_default="text",
    help="Log lines as text, or as one JSON object each (for log collectors).",
)
@_no_traceback
def run_command(verbose: int, log_format: str | None, **options: Any) -> None:
    """Watch the cluster and keep this node's rules in sync (in place of kube-proxy).

    Rules are written only once every kind has been listed, then on every change (no more
    often than --min-sync-period), partially where possible. On SIGTERM kpgen exits and
    leaves the rules in place; `kpgen cleanup` removes them.
    """
    from kpgen.controller.daemon import RunSettings, run

    gc.enable()  # off for the one-shot commands (kpgen/__main__.py); the sync pauses it itself
    run_flags = {name: options.pop(name) for name in RunSettings.FLAGS}
    config = _kube_proxy_config(options["config_file"])
    node = _node(options, config)
    # logging.format and logging.verbosity (4 and more: -v) when not given as flags
    verbose = verbose or int((config.verbosity or 0) >= 4)
    setup_logging(verbose, log_format or config.log_format or "text")
    try:
        settings = RunSettings.parse(**run_flags, config=config, mode=node.mode.value)
    except ValueError as error:
        _fail(str(error))
    sys.exit(run(node, settings))


def _kube_proxy_config(config_file: str | None) -> Any:
    """The whole KubeProxyConfiguration of --config (kpgen.core.kubeproxy), for kpgen run."""
    from kpgen.inputs.config import read_kube_proxy_config

    try:
        return read_kube_proxy_config(config_file)
    except ConfigError as error:
        _fail(str(error))


# --- explain and status ---------------------------------------------------------------------

output_option = click.option(
    "-o",
    "--output",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="text (80 columns, colour on a terminal) or json (for scripts).",
)


@main.command("explain")
@input_options
@node_options
@click.option("--src", metavar="IP", help="The packet's source address.")
@click.option("--dst", metavar="IP:PORT", help="The packet's destination address and port.")
@click.option(
    "--protocol",
    type=click.Choice(["tcp", "udp", "sctp"]),
    default="tcp",
    show_default=True,
    help="The packet's protocol.",
)
@click.option(
    "--service",
    "service_ref",
    metavar="NAMESPACE/NAME",
    help="Instead of one packet: every address:port of the service and the endpoints behind.",
)
@click.option(
    "--live",
    is_flag=True,
    help="Walk the rules loaded in this network namespace (read from the kernel).",
)
@iptables_backend_option
@output_option
@_no_traceback
def explain_command(
    sources: tuple[str, ...],
    kubeconfig: str | None,
    master: str | None,
    verbose: int,
    src: str | None,
    dst: str | None,
    protocol: str,
    service_ref: str | None,
    live: bool,
    iptables_backend: str,
    output: str,
    **options: Any,
) -> None:
    """What this node's rules do with a packet, and with what chance.

    The rules are walked as written: the text `kpgen apply` loads for the manifests, or with
    --live what the kernel has loaded here. For the packet: the service port it reaches and
    through which address, every outcome with its probability (DNAT to an endpoint,
    masqueraded or not; rejected, dropped or untouched), and the path of rules behind each.
    --node-ip says which addresses are the node's own (--live reads them from the kernel).

    \b
    Examples:
      kpgen explain -f examples/seed-cluster.yaml --hostname-override k8s-worker01 \\
          --cluster-cidr 192.168.0.0/16 --node-ip 10.20.30.11 \\
          --src 10.20.30.1 --dst 10.20.30.11:30001
      kpgen explain -f examples/seed-cluster.yaml --service default/node-port ...
      kpgen explain --live --src 192.168.69.200 --dst 10.101.179.255:8080
    """
    from kpgen.explain import answers as ex
    from kpgen.explain import text as explain_text

    if (dst is None) == (service_ref is None):
        _fail("give either --dst (with --src) or --service")
    if dst is not None and src is None:
        _fail("--dst needs --src: the source decides the path (hook, masquerade)")
    inputs = Inputs(sources, kubeconfig, master)
    if not live and not inputs:
        _fail(
            "explain needs -f MANIFESTS or --kubeconfig FILE"
            " (or --live, to read the rules loaded here)"
        )
    if service_ref is not None and service_ref.count("/") != 1:
        _fail(f"--service {service_ref}: NAMESPACE/NAME")
    node = _node(options)
    parsed = _read_inputs(inputs, node, verbose) if inputs else None
    state = parsed.state if parsed is not None else None
    plans = build_plans(state, node) if state is not None else None
    index = ex.ServiceIndex(state, node, plans) if state is not None else None
    try:
        if service_ref is not None:
            client = ex.parse_address("--src", src) if src else ex.DEFAULT_CLIENT
            family = IPFamily.of(client)
        else:
            assert dst is not None and src is not None
            packet = ex.parse_packet(src, dst, protocol)
            family = packet.family
        rules: ex.Loaded | ex.Rendered
        node_name = node.hostname
        if live:
            rules = ex.live_rules(options["proxy_mode"] or None, iptables_backend)
            locality = ex.live_locality(family)
            recorded = rules.recorded()  # the node the loaded rules were made for
            if recorded and not options["hostname_override"] and not options["config_file"]:
                node_name = recorded["node"]
        else:
            assert state is not None
            rules = ex.Rendered(state, node, plans)
            locality = ex.node_locality(node, family)
        ruleset = rules.ruleset(family)
        if service_ref is not None:
            others = [rules.ruleset(f) for f in IPFamily if f is not family]
            if parsed is not None:
                known = {str(s.ref) for s in parsed.state.services}
                known |= {s.ref for s in parsed.skipped} | {p.ref for p in parsed.problems}
                source = "in the cluster" if kubeconfig else "in the manifests"
                ex.check_service(service_ref, known, source)
            else:
                known = set().union(*(ex.service_names(r) for r in (ruleset, *others)))
                nft = ruleset.mode == ProxyMode.NFTABLES.value
                ex.check_service(service_ref, known, "in the rules loaded here", not nft)
            answer: Any = ex.explain_service(
                ruleset, service_ref, locality, node_name, index, client, others
            )
        else:
            answer = ex.explain_packet(ruleset, packet, locality, node_name, index)
            if live and state is not None:
                ex.compare_with_manifests(answer, state, node, packet, locality)
        answer.where = rules.where(family)
    except ex.ExplainError as error:
        _fail(str(error))
    if output == "json":
        click.echo(ex.to_json(answer))
    elif service_ref is not None:
        click.echo(explain_text.service_text(answer, colour=True), nl=False)
    else:
        click.echo(explain_text.explanation_text(answer, colour=True), nl=False)


@main.command("status")
@click.option(
    "--healthz-address",
    default="127.0.0.1:10256",
    show_default=True,
    metavar="HOST:PORT",
    help="Where `kpgen run` serves /healthz.",
)
@iptables_backend_option
@output_option
@_no_traceback
def status_command(healthz_address: str, iptables_backend: str, output: str) -> None:
    """What kpgen has loaded here and how `kpgen run` is doing.

    The mode and size of the rules loaded in this network namespace (read from the kernel),
    and /healthz of `kpgen run` (healthy, last sync). Exits 1 if no rules are loaded or the
    health endpoint does not say healthy.
    """
    from kpgen.explain import answers as ex
    from kpgen.explain import text as explain_text

    state = ex.status(healthz_address, iptables_backend)
    if output == "json":
        click.echo(ex.to_json(state))
    else:
        click.echo(explain_text.status_text(state, colour=True), nl=False)
    if not state.ok:
        sys.exit(1)
