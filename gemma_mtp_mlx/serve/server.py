"""`gemma-chat serve`: our app under uvicorn, on a socket opened first so that a taken port or a
bad address is one line, not a server log."""

import ipaddress
import os
import socket

from ..errors import GemmaChatError
from .app import ServeOptions, create_app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family)
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)  # not create_server's long wording
        raise GemmaChatError(f"cannot listen on {host}:{port}: {why}") from None


def run_server(pair, model_name: str, sock: socket.socket, options: ServeOptions) -> None:
    """Serve until Ctrl-C (uvicorn's graceful shutdown: answers under way get a few seconds to
    finish)."""
    import uvicorn

    config = uvicorn.Config(
        create_app(pair, model_name, options),
        # Connections beyond the requests in flight and in line, with room for /health and
        # /v1/models, get uvicorn's 503 before any work is done for them.
        limit_concurrency=2 * (options.batch + options.queue) + 16,
        timeout_graceful_shutdown=5,
    )
    uvicorn.Server(config).run(sockets=[sock])
