"""``kube-proxy``: kpgen under kube-proxy's own command line, so that kpgen's image runs from
kube-proxy's DaemonSet unchanged (``kube-proxy --config=/var/lib/kube-proxy/config.conf
--hostname-override=$(NODE_NAME)``).

Every kube-proxy flag is taken, in pflag's forms (``--flag=value``, ``--flag value``,
``-v 2``): it sets its KubeProxyConfiguration field over the --config file's and is honoured as
that field is, or is noted once in the log with why kpgen ignores it (docs/config.md). A flag
kube-proxy does not know is noted too, never fatal. Then it is ``kpgen run``.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError, version

import click

from kpgen.controller.logs import setup_logging
from kpgen.core.kubeproxy import FlagError, flags_only_config, merged, parse_flags
from kpgen.core.node import ConfigError, NodeFlags
from kpgen.inputs.config import node_settings, read_document, read_kube_proxy_config

EXIT_INPUT = 2
# kube-proxy's -v levels: 0-3 are kpgen's normal detail, 4 and more its -v.
DETAIL_VERBOSITY = 4

USAGE = """\
Usage: kube-proxy [flags]

kpgen, answering to kube-proxy's command line: it takes every kube-proxy flag and
--config=FILE (a KubeProxyConfiguration), then runs `kpgen run`. The flags kpgen honours
and those it ignores (with why) are in docs/config.md; ignored ones are noted in the log.

  --config FILE              a KubeProxyConfiguration (kubeproxy.config.k8s.io/v1alpha1)
  --hostname-override NAME   this node's name
  --kubeconfig FILE          how to reach the API server (or clientConnection.kubeconfig)
  --proxy-mode MODE          nftables (the default) or iptables (ipvs: iptables)
  --cleanup                  remove kpgen's rules, and exit
  --init-only                set the conntrack sysctls, and exit
  --version                  print kpgen's version, and exit
"""


def _say(kind: str, message: str) -> None:
    click.echo(f"kube-proxy (kpgen): {kind}: {message}", err=True)


def _version() -> str:
    try:
        return version("kpgen")
    except PackageNotFoundError:
        return "unknown"


def main(argv: Sequence[str] | None = None) -> None:
    """The ``kube-proxy`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        flags = parse_flags(args)
    except FlagError as error:
        _say("error", str(error))
        sys.exit(EXIT_INPUT)
    if flags.help:
        click.echo(USAGE, nl=False)
        sys.exit(0)
    if flags.version:
        click.echo(f"kpgen {_version()} (kube-proxy's command line)")
        sys.exit(0)
    if flags.cleanup:
        sys.exit(_cleanup(flags.notes))
    try:
        config = read_kube_proxy_config(flags.config, flags)
        if flags.write_config_to:
            _write_config(flags.config, flags.patch, flags.write_config_to)
            sys.exit(0)
        node = node_settings(NodeFlags(), flags.config, config)
    except ConfigError as error:
        _say("error", str(error))
        sys.exit(EXIT_INPUT)
    verbose = 1 if (config.verbosity or 0) >= DETAIL_VERBOSITY else 0
    setup_logging(verbose, config.log_format or "text")
    import logging

    log = logging.getLogger("kpgen.controller")
    for note in flags.notes:
        log.info("note: %s", note)
    from kpgen.controller.daemon import RunSettings, run, set_conntrack

    if flags.init_only:
        for note in config.notes:
            log.info("note: %s", note)
        set_conntrack(config.conntrack, threading.Event(), wait=0)
        sys.exit(0)
    try:
        settings = RunSettings.parse(
            source="api",
            kubeconfig=None,
            master=flags.master,
            min_sync_period=None,
            sync_period=None,
            healthz_bind_address=None,
            metrics_bind_address=None,
            iptables_backend="auto",
            config=config,
            mode=node.mode.value,
        )
    except ValueError as error:
        _say("error", str(error))
        sys.exit(EXIT_INPUT)
    sys.exit(run(node, settings))


def _cleanup(notes: list[str]) -> int:
    """kube-proxy --cleanup: remove what this proxy made (kpgen's tables and chains)."""
    from kpgen.core.model import IPFamily
    from kpgen.core.node import ProxyMode
    from kpgen.dataplane.apply import ApplyError, cleanup

    for note in notes:
        _say("note", note)
    try:
        removed = cleanup(list(ProxyMode), list(IPFamily))
    except ApplyError as error:
        _say("error", f"cleanup failed: {error}")
        return 1
    for item in removed:
        click.echo(f"removed {item}")
    if not removed:
        _say("note", "nothing of kpgen's to remove")
    return 0


def _write_config(path: str | None, patch: dict[str, object], target: str) -> None:
    """kube-proxy --write-config-to: the configuration in effect (file and flags), as JSON
    (which is YAML), then exit."""
    doc = merged(read_document(path) if path else flags_only_config(), patch)
    try:
        with open(target, "w", encoding="utf-8") as stream:
            json.dump(doc, stream, indent=2)
            stream.write(os.linesep)
    except OSError as error:
        raise ConfigError(f"--write-config-to: {target}: {error.strerror or error}") from None


if __name__ == "__main__":
    main()
