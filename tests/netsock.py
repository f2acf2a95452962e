"""A listening TCP socket made inside another network namespace, for a server in the test
process: a socket belongs to the namespace it was created in, whoever uses it.

A short-lived helper, started in the namespace (``ip netns exec``), creates and binds the
socket and hands it over on a unix socket pair (SCM_RIGHTS). The test API server then answers
clients of that namespace without the root namespace ever being involved.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from typing import Any

# Run by a python3 inside the namespace: bind, listen, pass the socket back.
_LISTEN = """\\
import socket, sys
parent = socket.socket(fileno=int(sys.argv[1]))
listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind((sys.argv[2], int(sys.argv[3])))
listener.listen(128)
socket.send_fds(parent, [b"listening"], [listener.fileno()])
"""

Popen = Callable[..., "subprocess.Popen[Any]"]


def listen_via(popen: Popen, python: str, address: str, port: int) -> socket.socket:
    """A TCP socket listening on ``address:port``, made by ``python`` started with ``popen``
    (which runs its argv inside the namespace)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        helper = popen(
            [python, "-c", _LISTEN, str(theirs.fileno()), address, str(port)],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        theirs.close()
        try:
            _, stderr = helper.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.communicate()
            raise
        if helper.returncode != 0:
            raise RuntimeError(f"listening in a namespace failed: {stderr.decode().strip()}")
        ours.settimeout(5)
        message, fds, _, _ = socket.recv_fds(ours, 64, 1)
    if message != b"listening" or len(fds) != 1:
        raise RuntimeError(f"no socket came back: {message!r} {fds}")
    return socket.socket(fileno=fds[0])
