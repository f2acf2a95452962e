"""The lab's pods: ``GET /`` answers ``<name>``, ``GET /whoami`` ``<name> <client address>``
(which shows masquerade); a UDP datagram to the same port number is answered with
``<name> <client address>``.

    python3 -I podserver.py NAME PORT [READY]

READY is a file created once the server listens (the lab waits for it). It runs by path on
Debian's python3 inside the pod's network namespace, as a container's program would, so it
uses the standard library only, neither kpgen nor kpgen's virtualenv; ``-I`` keeps the
directory it lies in (kpgen/lab/) off ``sys.path``. The lab starts it with :func:`argv`.
"""

from __future__ import annotations

import http.server
import socket
import socketserver
import sys
import threading
from pathlib import Path

POD_PYTHON = "/usr/bin/python3"  # Debian's: the pods' programs run on it


def argv(name: str, port: int, ready: Path) -> list[str]:
    """The command line that runs this server as ``name`` on ``port``."""
    return [POD_PYTHON, "-I", str(Path(__file__).resolve()), name, str(port), str(ready)]


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 1024
    daemon_threads = True

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        super().__init__(("0.0.0.0", port), Handler)

    def server_bind(self) -> None:  # without HTTPServer's reverse lookup of the address
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.name, self.server_address[1]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    server: Server

    def do_GET(self) -> None:
        name = self.server.name
        text = f"{name} {self.client_address[0]}" if self.path == "/whoami" else name
        body = (text + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def answer_udp(udp: socket.socket, name: str) -> None:
    while True:
        try:
            _, client = udp.recvfrom(2048)
            udp.sendto(f"{name} {client[0]}\n".encode(), client)
        except OSError:
            pass


def main(args: list[str]) -> None:
    name, port = args[0], int(args[1])
    server = Server(name, port)
    try:
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("0.0.0.0", port))
    except OSError:  # the UDP port is taken: HTTP is served all the same
        pass
    else:
        threading.Thread(target=answer_udp, args=(udp, name), daemon=True).start()
    if len(args) > 2:
        Path(args[2]).touch()
    server.serve_forever()


if __name__ == "__main__":
    main(sys.argv[1:])
