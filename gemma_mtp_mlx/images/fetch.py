"""A picture from an http(s) URL, for `gemma-chat serve --allow-image-urls` only: never more
than MAX_BYTES, never longer than FETCH_TIMEOUT_S in all (a server that drips its bytes is cut
off too)."""

import time

from ..errors import GemmaChatError
from .files import MAX_BYTES, ImageBytes, _mib

FETCH_TIMEOUT_S = 10.0


def fetch_image(url: str) -> ImageBytes:
    import httpx

    deadline = time.monotonic() + FETCH_TIMEOUT_S
    data = bytearray()
    try:
        with httpx.stream("GET", url, timeout=FETCH_TIMEOUT_S, follow_redirects=True) as reply:
            if reply.status_code != 200:
                raise GemmaChatError(f"cannot fetch {url}: the server answered {reply.status_code}")
            declared = reply.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_BYTES:
                raise GemmaChatError(f"{url} is {_mib(int(declared))}; at most {_mib(MAX_BYTES)}")
            for chunk in reply.iter_bytes():
                data += chunk
                if len(data) > MAX_BYTES:
                    raise GemmaChatError(f"{url} is over {_mib(MAX_BYTES)}")
                if time.monotonic() > deadline:
                    raise GemmaChatError(f"cannot fetch {url}: over {FETCH_TIMEOUT_S:.0f} s")
    except httpx.HTTPError as e:
        raise GemmaChatError(f"cannot fetch {url}: {e or type(e).__name__}") from None
    return ImageBytes(bytes(data), url)
