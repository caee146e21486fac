"""Running the app with uvicorn on a socket bound up front (a busy port is a clear error, port 0 picks a free one)."""

import socket

import uvicorn
from fastapi import FastAPI

from utils import UserError


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port``; a port in use or an unknown host is a UserError."""
    try:
        family, kind, proto = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][:3]
        # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on accepted sockets of that proto; without it an
        # answer's body waits for the client's delayed ACK of its headers (40 ms a request on Linux)
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise UserError(f"cannot use the address {host}:{port} ({err}); pass another --host") from None
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise UserError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port or --host") from None
    sock.listen(2048)  # connections wait in the backlog until the server accepts them
    return sock


def build_server(app: FastAPI, log_level: str = "info", root_path: str = "") -> uvicorn.Server:
    """A uvicorn server for ``app``; run it with ``server.run(sockets=[bind(host, port)])``. ``root_path``: the
    sub-path a reverse proxy serves the app under (the proxy strips it), so that /docs finds its OpenAPI file."""
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, root_path=root_path, timeout_graceful_shutdown=5))
