"""Bounds on request bodies: larger ones get a 413 in the OpenAI error shape before any of them
is parsed, and a client that stops sending one halfway gets a 408 after `timeout` seconds of
silence instead of holding its connection forever. Neither Starlette nor uvicorn bounds a body
or the time it takes, and a chat request has no reason to be larger than a context's worth of
text. (The request head is bounded by serve/connection.py.)"""

import asyncio
import json

from .protocol import ApiError


class BodyLimit:
    """ASGI middleware: reads the body (stopping as soon as it is too large or its client goes
    quiet), then hands it to the app as one message; later `receive` calls (the wait for a
    disconnect) pass through."""

    def __init__(self, app, max_bytes: int, timeout: float):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._too_large(send)
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except TimeoutError:
                silent = f"no part of the request body came for {self.timeout:g} s"
                return await self._refuse(send, ApiError(408, silent, code="request_timeout"))
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._too_large(send)
            if not message.get("more_body"):
                break
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _too_large(self, send):
        error = ApiError(
            413,
            f"the request body is larger than {self.max_bytes} bytes",
            code="request_too_large",
        )
        await self._refuse(send, error)

    async def _refuse(self, send, error: ApiError):
        body = json.dumps(error.body()).encode()
        await send(
            {
                "type": "http.response.start",
                "status": error.status,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
