"""Chat messages with pictures: content parts `{"type": "image", "path": ...}` (or `"url"`, a
`data:` URL) beside `{"type": "text", "text": ...}`. The chat template sees each picture as a
bare `{"type": "image"}` part, a message's pictures before its text (the order Gemma 4's model
card uses); the pictures themselves are read here, in order, before any weights move."""

from ..errors import GemmaChatError
from .files import ImageBytes, image_from_data_url, read_image_file
from .prompt import MAX_IMAGES


def split_images(messages: list[dict], fetch=None) -> tuple[list[dict], list[ImageBytes]]:
    """(messages as the chat template takes them, the pictures in the order they appear).
    `fetch` reads http(s) URLs (a server that allows them); without it they are refused."""
    out, images = [], []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, list):
            out.append(message)
            continue
        pictures = [part for part in content if _is_image(part)]
        if len(pictures) > MAX_IMAGES:
            raise GemmaChatError(f"{len(pictures)} images in one message; at most {MAX_IMAGES}")
        images += [read_part(part, fetch) for part in pictures]
        rest = [part for part in content if not _is_image(part)]
        out.append({**message, "content": [{"type": "image"} for _ in pictures] + rest})
    return out, images


def has_images(messages) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(_is_image(p) for p in m["content"])
        for m in messages
    )


def _is_image(part) -> bool:
    return isinstance(part, dict) and part.get("type") == "image"


def read_part(part: dict, fetch=None) -> ImageBytes:
    if isinstance(part.get("path"), str):
        return read_image_file(part["path"])
    url = part.get("url")
    if isinstance(url, str) and url.startswith(("http://", "https://")):
        if fetch is None:
            raise GemmaChatError(
                "image URLs over http(s) are not fetched here: send the picture as a data: URL"
                " (a server started with --allow-image-urls fetches them)"
            )
        return fetch(url)
    if isinstance(url, str):
        return image_from_data_url(url)
    raise GemmaChatError('an image part needs "path" (a file) or "url" (a data: URL)')
