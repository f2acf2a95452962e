"""Traffic through the lab for the end-to-end tests: curl, and tests/e2e/client.py for many
requests (one new TCP connection each). The pods answer ``GET /whoami`` with their name and the
client address they saw, which is how the tests see masquerade."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from kpgen.lab.lab import Lab
from kpgen.lab.podserver import POD_PYTHON

E2E = Path(__file__).resolve().parent
DATA = E2E / "data"
CLIENT = E2E / "client.py"
REAPPLY = E2E / "reapply.py"


@dataclass(frozen=True)
class Curl:
    """One curl: its exit code, the body, and curl's own time for the whole transfer."""

    exit_code: int
    body: str
    seconds: float


def curl(lab: Lab, where: str, url: str, max_time: float = 5, source: str | None = None) -> Curl:
    """``curl -s`` of ``url`` from the namespace of ``where`` (from its address ``source``)."""
    marker = "\n@@time="
    bind = ["--interface", source] if source else []
    result = lab.exec_in(
        where,
        ["curl", "-s", "-m", str(max_time), *bind, "-w", marker + "%{time_total}", url],
        timeout=max_time + 30,
    )
    body, _, seconds = result.stdout.rpartition(marker)
    return Curl(result.returncode, body, float(seconds or "nan"))


def whoami_until(
    lab: Lab, where: str, url: str, wanted: set[str], tries: int = 60
) -> dict[str, set[str]]:
    """``GET url/whoami`` from ``where`` until every pod in ``wanted`` has answered, at most
    ``tries`` times: the pods that answered, each with the client addresses it saw. Every
    request must be answered."""
    seen: dict[str, set[str]] = {}
    for _ in range(tries):
        answer = curl(lab, where, f"{url}/whoami")
        assert answer.exit_code == 0, f"curl {url}/whoami from {where}: exit {answer.exit_code}"
        pod, client = answer.body.split()
        seen.setdefault(pod, set()).add(client)
        if wanted <= seen.keys():
            break
    return seen


@dataclass
class Tally:
    """What tests/e2e/client.py reports."""

    count: int
    failed: int
    failures: list[str]  # the first few
    errors: dict[str, int]  # exception name: how many
    answers: dict[str, int]
    clients: dict[str, list[str]]
    seconds: float

    @classmethod
    def parse(cls, stdout: str) -> Tally:
        return cls(**json.loads(stdout))


def _client_argv(host: str, port: int, *options: str) -> list[str]:
    return [POD_PYTHON, str(CLIENT), host, str(port), *options]


def requests(lab: Lab, where: str, host: str, port: int, count: int) -> Tally:
    """``count`` requests from ``where``, each on a new connection."""
    result = lab.exec_in(where, _client_argv(host, port, "--count", str(count)), timeout=180)
    assert result.returncode == 0, result.stderr
    return Tally.parse(result.stdout)


class BackgroundRequests:
    """Requests from ``where``, one new connection each, until :meth:`finish` (at least
    ``minimum`` of them). Use as a context manager: the client is killed if the test fails."""

    def __init__(self, lab: Lab, where: str, host: str, port: int, minimum: int) -> None:
        self._argv = _client_argv(host, port, "--until-eof", "--min", str(minimum))
        self._lab = lab
        self._where = where
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> BackgroundRequests:
        self._process = self._lab.popen_in(
            self._where,
            self._argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        return self

    def finish(self) -> Tally:
        assert self._process is not None
        stdout, stderr = self._process.communicate("", timeout=180)
        assert self._process.returncode == 0, stderr
        return Tally.parse(stdout)

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.communicate()
