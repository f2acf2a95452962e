"""``kpgen explain`` and ``kpgen status`` for a terminal: at most 80 columns, in colour when
standard output is one (``click.echo`` drops the colour otherwise)."""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from typing import Any

import click

from kpgen.core.model import hostport
from kpgen.explain.answers import (
    Explanation,
    Outcome,
    PathStep,
    ServiceExplanation,
    Status,
    outcome_line,
)
from kpgen.explain.trace import percent

WIDTH = 80
Style = Callable[..., str]
_KIND_COLOUR = {"dnat": "green", "untouched": "yellow", "reject": "red", "drop": "red",
                "unknown": "magenta"}  # fmt: skip
_DELIVERY = {"forwarded": "forwarded to the endpoint", "local": "delivered to this node",
             "sent": "sent from this node"}  # fmt: skip


def _plain(text: str, **_: Any) -> str:
    return text


def _styler(colour: bool) -> Style:
    return click.style if colour else _plain


def wrap(text: str, indent: int, hang: int = 4, width: int = WIDTH) -> list[str]:
    """``text`` in lines of at most ``width`` columns; continuation lines indented more."""
    lines = textwrap.wrap(
        text,
        width=width,
        initial_indent=" " * indent,
        subsequent_indent=" " * (indent + hang),
        break_long_words=True,
        break_on_hyphens=False,
    )
    return lines or [" " * indent]


def _styled(lines: list[str], style: Style, **how: Any) -> list[str]:
    return [style(line, **how) for line in lines]


def _source(mode: str, rules: str, where: str | None) -> str:
    if rules == "rendered":
        return f"{mode} rules rendered from the manifests (what kpgen apply loads)"
    return f"{mode} rules read from the kernel" + (f" ({where})" if where else "")


def _path_lines(steps: Sequence[PathStep], style: Style, chain: str = "") -> list[str]:
    """A path, a chain name over the rules that matched in it."""
    lines: list[str] = []
    for step in steps:
        if step.kind == "end" and step.rule == "policy accept":
            continue  # falling through a base chain: nothing to see
        if step.kind == "route":
            lines += _styled(wrap(f"routing: {step.rule}", 2), style, dim=True)
            chain = ""
            continue
        if step.kind == "hook":
            lines += _styled(wrap(step.rule, 2), style, bold=True)
            chain = step.chain
            continue
        if step.chain != chain:
            lines += _styled(wrap(step.chain, 2), style, fg="cyan")
            chain = step.chain
        faint = step.kind in ("miss", "skip", "end")
        lines += _styled(wrap(step.rule, 4), style, dim=faint)
        if step.note:
            lines += _styled(wrap(f"-> {step.note}", 6), style, dim=faint)
    return lines


def _common_prefix(paths: list[list[PathStep]]) -> int:
    length = 0
    for steps in zip(*paths, strict=False):
        if any(step != steps[0] for step in steps):
            break
        length += 1
    return length


def _chain_at(steps: Sequence[PathStep], end: int) -> str:
    """The chain the path is in after its first ``end`` steps."""
    for step in reversed(steps[:end]):
        if step.kind == "route":
            return ""
        if step.chain:
            return step.chain
    return ""


def _outcome_lines(outcome: Outcome, style: Style) -> list[str]:
    share = percent(outcome.probability).rjust(5)
    lines = [style(f"  {share}  {outcome_line(outcome)}", fg=_KIND_COLOUR.get(outcome.kind))]
    if outcome.kind == "dnat":
        lines += wrap(_DELIVERY.get(outcome.delivery, outcome.why), 9)
    else:
        lines += wrap(outcome.why, 9)
    for reason in outcome.masquerade_reasons:
        lines += wrap(f"masqueraded: {reason}", 9)
    return lines


def _footer(assumptions: list[str], notes: list[str], style: Style) -> list[str]:
    lines: list[str] = []
    if assumptions or notes:
        lines.append("")
    for assumption in assumptions:
        lines += _styled(wrap(f"assumed: {assumption}", 0, 2), style, fg="yellow")
    for note in notes:
        lines += _styled(wrap(f"note: {note}", 0, 2), style, fg="yellow")
    return lines


def explanation_text(explanation: Explanation, colour: bool = False) -> str:
    """What happens to the packet: service, outcomes, the path of each."""
    style = _styler(colour)
    p = explanation.packet
    head = f"{p.protocol} {p.src} -> {hostport(p.dst, p.port)}, a new connection from {p.origin}"
    lines = _styled(wrap(head, 0), style, bold=True)
    where = _source(explanation.mode, explanation.rules, explanation.where)
    lines += wrap(f"node {explanation.node}; {where}", 0)
    lines.append("")
    match = explanation.service
    if match is None:
        lines += wrap("service: none (no service rule of kpgen's matches this packet)", 0)
    else:
        name = match.service or "a service port the rules do not name (-f names it)"
        port = ""
        if match.port is not None:
            port = f" ({match.protocol}/{match.port})"
        if match.port_name:
            port = f", port {match.port_name}{port}"
        lines += wrap(f"service: {name}{port}", 0)
        lines += wrap(f"via:     {match.via}" + (f"; {match.policy}" if match.policy else ""), 0, 9)
    lines += ["", style("outcomes", bold=True)]
    for outcome in explanation.outcomes:
        lines += _outcome_lines(outcome, style)
    paths = [o.path for o in explanation.outcomes]
    shared = _common_prefix(paths)
    lines += ["", style("path" if len(paths) == 1 else "path (common to every outcome)", bold=True)]
    lines += _path_lines(paths[0][:shared] if paths else [], style)
    if len(paths) > 1:
        for outcome in explanation.outcomes:
            title = f"then, {percent(outcome.probability)}: {outcome_line(outcome)}"
            lines += ["", *_styled(wrap(title, 0), style, bold=True)]
            lines += _path_lines(outcome.path[shared:], style, _chain_at(outcome.path, shared))
    lines += _footer(explanation.assumptions, explanation.notes, style)
    return "\n".join(lines) + "\n"


def service_text(explanation: ServiceExplanation, colour: bool = False) -> str:
    """Every address of a service on this node and the endpoints behind each."""
    style = _styler(colour)
    lines = _styled([f"service {explanation.service}"], style, bold=True)
    where = _source(explanation.mode, explanation.rules, explanation.where)
    lines += wrap(f"node {explanation.node}; {where}", 0)
    lines += wrap(f"traced from a client at {explanation.client} (--src to change)", 0)
    if not explanation.entries:
        lines += ["", "it answers on no address of this node"]
    for entry in explanation.entries:
        name = f" (port {entry.port_name})" if entry.port_name else ""
        head = f"{entry.via} {hostport(entry.address, entry.port)}/{entry.protocol}{name}"
        lines += ["", *_styled(wrap(head, 2), style, fg="cyan")]
        if entry.policy:
            lines += wrap(entry.policy, 4)
        for share in entry.outcomes:
            line = f"    {percent(share.probability).rjust(5)}  {outcome_line(share)}"
            lines.append(style(line, fg=_KIND_COLOUR.get(share.kind)))
    lines += _footer(explanation.assumptions, explanation.notes, style)
    return "\n".join(lines) + "\n"


def plural(count: int, noun: str, suffix: str = "s") -> str:
    """``1 NodePort``, ``2 NodePorts``, ``0 service addresses``."""
    return f"{count} {noun}{'' if count == 1 else suffix}"


def status_text(state: Status, colour: bool = False) -> str:
    """What is loaded, and how kpgen run is doing."""
    style = _styler(colour)
    lines = []
    if state.unreadable is not None:
        lines += _styled(
            wrap(f"rules:      cannot tell: {state.unreadable}", 0, 12), style, fg="red"
        )
    elif state.mode is None:
        lines.append(style("rules:      none of kpgen's in this network namespace", fg="red"))
    else:
        lines.append(f"mode:       {state.mode} ({state.rules})")
    if state.node is not None:
        settings = ", ".join(f"--{k} {v}" for k, v in state.settings.items())
        lines += wrap(f"node:       {state.node}" + (f" ({settings})" if settings else ""), 0, 12)
    if state.counts is not None:
        c = state.counts
        lines.append(f"services:   {c.services} with endpoints: "
                     f"{plural(c.service_ports, 'service port')}, "
                     f"{plural(c.endpoints, 'endpoint')}")  # fmt: skip
        lines.append(f"addresses:  {plural(c.addresses, 'service address', 'es')}, "
                     f"{plural(c.node_ports, 'NodePort')}")  # fmt: skip
        lines.append(f"rejecting:  {c.rejected} (service ports without endpoints)")
    h = state.health
    if not state.controller:
        text = (
            f"controller: none (nothing answers /healthz at {h.address}): the rules stay as "
            "loaded, by kpgen apply; nothing keeps them in sync with the cluster"
        )
        lines += wrap(text, 0, 12)
    elif not h.reachable:
        lines += _styled(wrap(f"health:     no answer: {h.error}", 0, 12), style, fg="red")
    else:
        word, hue = ("healthy", "green") if h.healthy else ("UNHEALTHY", "red")
        lines.append(style(f"health:     {word} (HTTP {h.code} from {h.address})", fg=hue))
        lines.append(f"last sync:  {h.last_updated or 'never'}")
        if h.current_time:
            lines.append(f"now:        {h.current_time}")
    for problem in state.problems:
        lines += _styled(wrap(f"problem:    {problem}", 0, 12), style, fg="yellow")
    return "\n".join(lines) + "\n"
