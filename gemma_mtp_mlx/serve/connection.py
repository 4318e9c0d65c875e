"""The HTTP/1.1 connection: uvicorn's h11 protocol with the limits it leaves open. A request
head (the request line and headers) must come within `head_timeout` seconds of the connection
opening or of the previous answer, else 408; a head larger than MAX_HEAD_BYTES gets 431. Either
way the connection then closes. A client still sending a large head would see a reset rather
than the 431 if the server closed with its bytes unread, so they are read and dropped for a
moment first. (Bodies are bounded by serve/limits.py.)"""

import json

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from .protocol import ApiError

MAX_HEAD_BYTES = 16 * 1024  # uvicorn's own bound, which it answers with a reset
LINGER_S = 2.0  # how long a refused client's bytes are still read, before the close
HEAD_END = b"\r\n\r\n"


def connection_class(head_timeout: float) -> type[H11Protocol]:
    """The protocol class uvicorn builds one per connection with (its `http` setting)."""
    return type("Connection", (BoundedConnection,), {"head_timeout": head_timeout})


class BoundedConnection(H11Protocol):
    head_timeout = 30.0

    def connection_made(self, transport) -> None:
        self._head_timer = None
        self._refused = False
        super().connection_made(transport)
        self._expect_head()

    def connection_lost(self, exc) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # read and dropped until the close
        if self.conn.their_state is h11.IDLE:
            head = self.conn.trailing_data[0] + data
            if len(head) > MAX_HEAD_BYTES and HEAD_END not in head[: MAX_HEAD_BYTES + len(HEAD_END)]:
                self._refuse(431, "Request Header Fields Too Large",
                             f"the request head is larger than {MAX_HEAD_BYTES} bytes")
                return
        super().data_received(data)
        self._expect_head()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._expect_head()

    def _expect_head(self) -> None:
        """Time the head while one is awaited; stop once it has come."""
        if self._refused or self.transport.is_closing():
            return
        if self.conn.their_state is not h11.IDLE:
            self._stop_head_timer()
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_late)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_late(self) -> None:
        self._head_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if not self.conn.trailing_data[0]:  # nothing asked: nothing to answer
            self.transport.close()
            return
        self._refuse(408, "Request Timeout",
                     f"the request head did not come within {self.head_timeout:g} s")

    def _refuse(self, status: int, reason: str, message: str) -> None:
        """Answer `status` outside h11 (it has seen no complete request) and close."""
        self._refused = True
        self._stop_head_timer()
        body = json.dumps(ApiError(status, message).body()).encode()
        head = (
            f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        self.transport.write(head.encode() + body)
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
