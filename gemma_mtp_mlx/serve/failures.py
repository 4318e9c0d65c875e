"""What the server does with an exception nothing else handled: one line in its log (the
traceback too under --debug) and a 500 in the OpenAI error shape, or, once a streamed answer
has begun, the end of that stream. Starlette's own handler would log a full traceback for each,
and a client able to trigger one could fill the log."""

import json
import logging

from .protocol import ApiError

log = logging.getLogger("gemma_chat.serve")


class Failures:
    """ASGI middleware around the app (inside Starlette's last-resort handler)."""

    def __init__(self, app, debug: bool = False):
        self.app = app
        self.debug = debug

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def sending(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as e:
            log.error(
                "%s %s failed: %s: %s", scope["method"], scope["path"], type(e).__name__, e,
                exc_info=e if self.debug else None,
            )
            if started:
                return  # the stream ends here; its client sees the connection close
            body = json.dumps(ApiError(500, "internal server error", type="server_error").body())
            await send(
                {
                    "type": "http.response.start",
                    "status": 500,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body.encode()})
