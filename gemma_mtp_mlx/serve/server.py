"""`gemma-chat serve`: our app under uvicorn, on a socket opened first so that a taken port or a
bad address is one line, not a server log.

Shutting down (SIGTERM, or Ctrl-C) stops admitting at once, lets the answers under way finish
for `--shutdown-grace` seconds, then ends each of them with a last chunk, an error event and
`[DONE]` (serve/app.py) before uvicorn closes what is left. A second Ctrl-C quits at once."""

import ipaddress
import os
import socket

import uvicorn

from ..errors import GemmaChatError
from .app import ServeOptions, create_app
from .connection import MAX_HEAD_BYTES, connection_class

# What uvicorn waits beyond the grace for the ended answers' last chunks to go out.
FLUSH_S = 5.0


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


class Server(uvicorn.Server):
    """uvicorn's server, whose shutdown drains our scheduler first."""

    def __init__(self, config: uvicorn.Config, scheduler, grace: float):
        super().__init__(config)
        self.scheduler = scheduler
        self.grace = grace

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            self.scheduler.drain_soon(self.grace)
        super().handle_exit(sig, frame)


def make_server(app, **config) -> Server:
    """A server for an app of `create_app`; `config` adds to uvicorn's settings."""
    options: ServeOptions = app.state.options
    config = uvicorn.Config(
        app,
        http=connection_class(options.read_timeout),
        h11_max_incomplete_event_size=MAX_HEAD_BYTES,
        # Connections beyond the requests in flight and in line, with room for /health and
        # /v1/models, get uvicorn's 503 before any work is done for them.
        limit_concurrency=2 * (options.batch + options.queue) + 16,
        timeout_graceful_shutdown=options.shutdown_grace + FLUSH_S,
        **config,
    )
    return Server(config, app.state.scheduler, options.shutdown_grace)


def run_server(pair, model_name: str, sock: socket.socket, options: ServeOptions) -> None:
    """Serve until SIGTERM or Ctrl-C."""
    make_server(create_app(pair, model_name, options)).run(sockets=[sock])
