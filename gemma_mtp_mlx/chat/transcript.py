"""A saved conversation's transcript: JSON with the system prompt, the thinking switch, the
messages, and the conversation's token ids, which `/load` validates before anything of it is
used.

The token ids are the exact tokens the model read and wrote (chat/session.py's `_carried`): a
model's answer is not always the tokenizer's split of its text, so a conversation re-encoded
from its text differs, and so does the next answer. With them, a chat resumed without its KV
cache prefills exactly what the cache held. A digest binds them to the messages: ids that no
longer match (the file was edited) are not used, and the text is encoded instead.

A session file is at most MAX_SESSION_BYTES, checked before it is read; what fits the context
is chosen later (chat/session.py), counting only as many tokens as the context holds."""

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import GemmaChatError
from .private_files import write_private

SESSION_FORMAT = "gemma-chat.session"
SESSION_VERSION = 1
# A conversation that fills a 256k-token context, with its token ids, takes a few MB.
MAX_SESSION_BYTES = 64 << 20


@dataclass
class Transcript:
    system: str | None
    think: bool | None  # None: the file does not say
    messages: list[dict]  # user and assistant turns, alternating, the user first; a user
    # turn's pictures under "images" (chat/pictures.py)
    model: str | None = None  # the model it was saved with, for people reading the file
    token_ids: list[int] | None = None  # the conversation as the model read it, when known
    ids_refused: str | None = None  # why the file's token ids are not used

    def digest(self) -> str:
        """What identifies the conversation (not the model name): a saved KV cache records it
        to refuse being used with another transcript."""
        content = {"system": self.system, "think": self.think, "messages": self.messages}
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()

    def ids_digest(self, ids: list[int]) -> str:
        """What binds `ids` to this conversation."""
        return hashlib.sha256(f"{self.digest()}:{ids}".encode()).hexdigest()


def write_transcript(path: Path, transcript: Transcript) -> Path:
    data = {
        "format": SESSION_FORMAT,
        "version": SESSION_VERSION,
        "model": transcript.model,
        "system": transcript.system,
        "think": transcript.think,
        "messages": transcript.messages,
    }
    ids = transcript.token_ids
    if ids is not None:
        data["token_ids_digest"] = transcript.ids_digest(ids)
    text = json.dumps(data, indent=2, ensure_ascii=False)
    if ids is not None:  # on one line, last: the messages stay readable above them
        text = text[: -len("\n}")] + f',\n  "token_ids": {json.dumps(ids, separators=(",", ":"))}\n}}'
    return write_private(path, lambda f: f.write((text + "\n").encode("utf-8")))


def read_transcript(path: Path) -> Transcript:
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise GemmaChatError(f"no session file at {path}") from None
    except OSError as e:
        raise GemmaChatError(f"cannot read {path}: {e.strerror}") from None
    if size > MAX_SESSION_BYTES and path.is_file():
        raise GemmaChatError(
            f"{path} is {size / 2**20:,.0f} MiB; a session file holds at most "
            f"{MAX_SESSION_BYTES >> 20} MiB"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GemmaChatError(f"no session file at {path}") from None
    except IsADirectoryError:
        raise GemmaChatError(f"{path} is a folder, not a session file") from None
    except OSError as e:
        raise GemmaChatError(f"cannot read {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GemmaChatError(f"{path} is not a gemma-chat session (not JSON: {e})") from None
    return parse_transcript(data, path)


def parse_transcript(data, path: Path) -> Transcript:
    def bad(why: str) -> GemmaChatError:
        return GemmaChatError(f"{path} is not a gemma-chat session ({why})")

    if not isinstance(data, dict) or not isinstance(data.get("messages"), list):
        raise bad("no message list")
    if data.get("format", SESSION_FORMAT) != SESSION_FORMAT:
        raise bad(f"format {data.get('format')!r}")
    if data.get("version", SESSION_VERSION) != SESSION_VERSION:
        raise bad(f"version {data.get('version')!r}; this gemma-chat reads {SESSION_VERSION}")
    system = data.get("system")
    messages = []
    for i, m in enumerate(data["messages"]):
        if not (isinstance(m, dict) and isinstance(m.get("content"), str)):
            raise bad(f"message {i} has no text content")
        if not is_text(m["content"]):
            raise bad(f"message {i} is not valid Unicode text")
        role = m.get("role")
        if role == "system" and i == 0 and system is None:
            system = m["content"]
            continue
        if role not in ("user", "assistant"):
            raise bad(f"message {i} has role {role!r}")
        expected = "user" if len(messages) % 2 == 0 else "assistant"
        if role != expected:
            raise bad(f"message {i} is a second {role} turn in a row; turns alternate")
        messages.append({"role": role, "content": m["content"]})
        if "images" in m:
            if role != "user" or not _picture_records(m["images"]):
                raise bad(f"message {i} has images that are not a list of path, sha256, tokens")
            messages[-1]["images"] = m["images"]
    if messages and messages[-1]["role"] == "user":
        raise bad("the last user message has no answer")
    if system is not None and not (isinstance(system, str) and is_text(system)):
        raise bad("the system prompt is not text")
    think = data.get("think")
    if think is not None and not isinstance(think, bool):
        raise bad(f"think is {think!r}, not true or false")
    model = data.get("model") if isinstance(data.get("model"), str) else None
    transcript = Transcript(system or None, think, copy.deepcopy(messages), model)
    ids = data.get("token_ids")
    if ids is None:
        return transcript
    if not (isinstance(ids, list) and all(type(t) is int and t >= 0 for t in ids)):
        transcript.ids_refused = "its token ids are not a list of token ids"
    elif data.get("token_ids_digest") != transcript.ids_digest(ids):
        transcript.ids_refused = "its token ids do not match its messages (edited)"
    else:
        transcript.token_ids = ids
    return transcript


def is_session(path: Path) -> bool:
    """Whether `path` holds a gemma-chat session (which a save may replace)."""
    try:
        read_transcript(path)
    except GemmaChatError:
        return False
    return True


def _picture_records(images) -> bool:
    """A user message's pictures as chat/pictures.py records them."""
    return isinstance(images, list) and all(
        isinstance(p, dict) and isinstance(p.get("path"), str) and is_text(p["path"])
        and isinstance(p.get("sha256"), str) and len(p["sha256"]) == 64
        and isinstance(p.get("tokens"), int)
        for p in images
    )


def is_text(s: str) -> bool:
    """Encodable as UTF-8: no lone surrogates (JSON escapes such as \\udcff decode to them, and
    so do undecodable bytes read with surrogateescape); the tokenizer rejects them."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
