"""Pictures in a chat: finding the image paths a terminal pastes into a message (drag and drop
writes the path, quoted or with its spaces escaped), and the record a transcript keeps of
each picture (where it was, its SHA-256, its soft tokens) to find it again on /load."""

import re
from pathlib import Path

from ..images.files import read_image_file
from ..images.processor import PreparedImage

SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
# A single- or double-quoted string, or a run of non-blanks in which a backslash escapes the
# next character (a space, say).
_WORD = re.compile(r"'([^']+)'|\"([^\"]+)\"|((?:\\.|[^\s\\])+)")


def pasted_paths(text: str) -> tuple[str, list[str]]:
    """(the message without them, the paths of existing image files written in it)."""
    found, kept, at = [], [], 0
    for match in _WORD.finditer(text):
        quoted = match.group(1) or match.group(2)
        word = quoted if quoted is not None else re.sub(r"\\(.)", r"\1", match.group(3))
        if word.lower().endswith(SUFFIXES) and Path(word).expanduser().is_file():
            found.append(word)
            kept.append(text[at : match.start()])
            at = match.end()
    kept.append(text[at:])
    return ("".join(kept).strip() if found else text), found


def record(image: PreparedImage) -> dict:
    """What a transcript keeps of a picture."""
    path = Path(image.name).expanduser()
    return {
        "path": str(path.resolve()) if path.is_file() else image.name,
        "sha256": image.digest,
        "tokens": image.tokens,
    }


def reread(entry: dict, vision) -> tuple[PreparedImage | None, str | None]:
    """The picture a transcript's record names, prepared again; or None and why (one line)."""
    from ..errors import GemmaChatError

    try:
        image = read_image_file(entry["path"])
    except GemmaChatError as e:
        return None, f"{e}: the conversation goes on without that picture"
    if image.digest != entry["sha256"]:
        return None, f"{entry['path']} changed since it was saved: the conversation goes on without it"
    try:
        return vision.prepare(image), None
    except GemmaChatError as e:
        return None, f"{e}: the conversation goes on without that picture"
