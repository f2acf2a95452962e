"""``kpgen lab``: the lab's commands (up, down, status, demo), for kpgen/cli/main.py."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import click

from kpgen.lab.demo import demo
from kpgen.lab.lab import MODES, Lab, LabError, require_root

_mode_option = click.option(
    "--proxy-mode",
    type=click.Choice(MODES),
    default="nftables",
    show_default=True,
    help="Which rules kpgen loads on the workers.",
)


def _lab_errors(action: Callable[[], object]) -> None:
    try:
        action()
    except LabError as error:
        click.echo(f"kpgen: lab: {error}", err=True)
        sys.exit(1)


def _bring_up(lab: Lab, mode: str) -> None:
    require_root()
    click.echo(f"kpgen lab: building the seed article's cluster, proxy mode {mode} ...", err=True)
    started = time.monotonic()
    for summary in lab.up(mode):
        click.echo(f"kpgen lab: {summary}", err=True)
    click.echo(f"kpgen lab: up in {time.monotonic() - started:.1f} s", err=True)


@click.group("lab")
@click.option(
    "--prefix",
    default="",
    metavar="PREFIX",
    help="Start the lab's namespace names with PREFIX: a lab of its own beside the default one "
    "(the tests use one).",
)
@click.pass_context
def lab_group(context: click.Context, prefix: str) -> None:
    """The seed article's cluster in network namespaces on this machine (needs root).

    \b
    gateway 10.20.30.1, k8s-master 10.20.30.10, k8s-worker01 10.20.30.11 (pod1),
    k8s-worker02 10.20.30.12 (pod2) and a test-pod; kpgen apply on each worker.
    The cluster: kpgen/lab/seed-cluster.yaml (package data; examples/seed-cluster.yaml
    in the repository). The article and the lab: docs/lab.md.
    """
    try:
        context.obj = Lab(prefix)
    except LabError as error:
        raise click.BadParameter(str(error), param_hint="--prefix") from None


@lab_group.command("up")
@_mode_option
@click.pass_obj
def lab_up(lab: Lab, proxy_mode: str) -> None:
    """Build the lab, load kpgen's rules on the workers.

    A lab left up is taken down and built again; a namespace of the same name that the lab
    did not make is refused.
    """
    _lab_errors(lambda: _bring_up(lab, proxy_mode))
    click.echo(lab.status().describe())


@lab_group.command("down")
@click.pass_obj
def lab_down(lab: Lab) -> None:
    """Remove everything the lab made.

    Its processes, network namespaces and /etc/netns files; nothing it did not make.
    """

    def action() -> None:
        for done in lab.down() or ["nothing of the lab to remove"]:
            click.echo(f"kpgen lab: {done}")

    _lab_errors(action)


@lab_group.command("status")
@click.pass_obj
def lab_status(lab: Lab) -> None:
    """Whether the lab is up, and its parts."""
    _lab_errors(lambda: click.echo(lab.status().describe()))


@lab_group.command("demo")
@_mode_option
@click.option("--keep-up", is_flag=True, help="Leave the lab up afterwards.")
@click.pass_obj
def lab_demo(lab: Lab, proxy_mode: str, keep_up: bool) -> None:
    """Up, the article's curl loops, down (make lab).

    The loops are the article's, without its `sleep 5`, printed as a shell transcript. Exits 1
    if a request was not answered by a pod.
    """

    def action() -> None:
        require_root()
        try:
            _bring_up(lab, proxy_mode)
            ok = demo(lab, click.echo)
        finally:
            if not keep_up:
                for done in lab.down():
                    click.echo(f"kpgen lab: {done}", err=True)
        if not ok:
            raise LabError("some requests were not answered (see above)")

    _lab_errors(action)
