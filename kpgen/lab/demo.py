"""The seed article's curl loops, run in the lab and printed as a shell transcript (``make lab``,
``kpgen lab demo``)."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from kpgen.lab.lab import Lab, LabError
from kpgen.lab.topology import EXTERNAL_IP


class Loop(NamedTuple):
    where: str  # the lab machine or pod it runs in
    url: str
    title: str  # what it shows


DEMO_LOOPS = (
    Loop("gateway", "http://k8s-worker01:30001", "NodePort from outside, through k8s-worker01"),
    Loop("gateway", "http://k8s-worker02:30001", "NodePort from outside, through k8s-worker02"),
    Loop(
        "test-pod",
        "http://10.101.179.255:8080",
        "the NodePort service's ClusterIP from a pod (the article's test-pod)",
    ),
    Loop(
        "gateway",
        f"http://{EXTERNAL_IP}:8080",
        "the externalIP from outside (routed to k8s-worker01)",
    ),
)


def demo(lab: Lab, echo: Callable[[str], object] = print) -> bool:
    """Run the article's curl loops (without its ``sleep 5``) in the lab, printing them as
    a shell transcript; True when every request was answered by a pod."""
    ok = True
    for name, url, title in DEMO_LOOPS:
        command = f"for i in 1 2 3 4 5 ;do curl -s {url} | grep pod; done"
        echo(f"# {title}")
        echo(f"[{name} ~]$ {command}")
        try:
            output = lab.exec_in(name, ["sh", "-c", command], timeout=60).stdout
        except LabError:  # the loop hung
            output = ""
        lines = output.splitlines()
        for line in lines:
            echo(line)
        answered = [line for line in lines if re.fullmatch(r"pod\d+", line.strip())]
        if len(answered) != 5:
            echo(f"# only {len(answered)} of 5 requests were answered by a pod")
            ok = False
    return ok
