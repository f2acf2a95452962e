"""A fast HTTP client for the lab's end-to-end tests: one new TCP connection per request.

Run inside a lab namespace by Debian's python3 (``lab.exec_in(ns, [python3, this, ...])``).
Each request is ``GET /whoami``; the pods answer ``<pod> <client address they saw>``. Prints
one JSON object: how many requests, which pod answered how often, the client addresses each
pod saw, and the failures (how many of each kind, the first few with their error).

    client.py HOST PORT --count N        N requests, then stop
    client.py HOST PORT --until-eof --min N
                                          requests until standard input closes, at least N
"""

from __future__ import annotations

import argparse
import collections
import json
import socket
import sys
import threading
import time

SHOWN_FAILURES = 20


def request(host: str, port: int, timeout: float) -> tuple[str, str]:
    """One GET /whoami on a new connection: (pod, client address it saw)."""
    with socket.create_connection((host, port), timeout=timeout) as connection:
        connection.sendall(b"GET /whoami HTTP/1.0\r\nHost: lab\r\n\r\n")
        chunks = []
        while chunk := connection.recv(4096):
            chunks.append(chunk)
    response = b"".join(chunks).decode(errors="replace")
    head, _, body = response.partition("\r\n\r\n")
    if not head.startswith("HTTP/1.0 200"):
        raise ValueError(f"unexpected response {response[:80]!r}")
    pod, client = body.split()
    return pod, client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--count", type=int)
    parser.add_argument("--until-eof", action="store_true")
    parser.add_argument("--min", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args()

    stop = threading.Event()
    if args.until_eof:
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    answers: collections.Counter[str] = collections.Counter()
    clients: dict[str, set[str]] = collections.defaultdict(set)
    failures = []
    errors: collections.Counter[str] = collections.Counter()
    count = 0
    started = time.monotonic()
    while True:
        if args.count is not None and count >= args.count:
            break
        if args.until_eof and stop.is_set() and count >= args.min:
            break
        count += 1
        try:
            pod, client = request(args.host, args.port, args.timeout)
        except Exception as error:  # every failure counts, whatever it is
            failures.append(f"request {count}: {type(error).__name__}: {error}")
            errors[type(error).__name__] += 1
            continue
        answers[pod] += 1
        clients[pod].add(client)
    json.dump(
        {
            "count": count,
            "failed": len(failures),
            "failures": failures[:SHOWN_FAILURES],
            "errors": dict(errors),
            "answers": dict(answers),
            "clients": {pod: sorted(seen) for pod, seen in clients.items()},
            "seconds": round(time.monotonic() - started, 3),
        },
        sys.stdout,
    )


if __name__ == "__main__":
    main()
