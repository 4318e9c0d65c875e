"""Slash commands that change the session, shared by the interactive chat and scripted (piped)
chats, which have no terminal for the others (/stats, /verify, /help, /quit). Each takes the
session and its argument and returns the line to show. A line that starts with `//` is a
message that starts with `/`."""

import re
from collections.abc import Callable
from pathlib import Path

from ..errors import GemmaChatError
from .pictures import pasted_paths
from .session import Loaded, Session


def parse(line: str) -> tuple[str, str] | None:
    """(command, argument) when `line` is a slash command; None when it is a message."""
    text = line.strip()
    if not text.startswith("/") or text.startswith("//"):
        return None
    name, _, arg = text.partition(" ")
    if "/" in name[1:]:
        return None  # an absolute path (a dropped picture's), not a command
    return name.lower(), arg.strip()


def message(line: str) -> str:
    """The message a line that is not a command sends: `//text` sends `/text`."""
    text = line.strip()
    return text[1:] if text.startswith("//") else text


def reset(session: Session, arg: str) -> str:
    session.reset()
    return "new conversation"


def system(session: Session, arg: str) -> str:
    if not arg:
        return f"system prompt: {session.system}" if session.system else "no system prompt"
    session.set_system(None if arg.lower() == "off" else arg)
    return "system prompt cleared" if session.system is None else "system prompt set"


def mtp(session: Session, arg: str) -> str:
    return session.set_mtp(arg) if arg else session.mtp_state()


def think(session: Session, arg: str) -> str:
    if arg.lower() not in ("", "on", "off"):
        raise GemmaChatError("usage: /think on|off")
    if arg:
        session.set_think(arg.lower() == "on")
    return f"thinking {'on' if session.settings.think else 'off'}"


def save(session: Session, arg: str, *, replace: bool = False) -> str:
    if not arg:
        raise GemmaChatError("usage: /save FILE (/save! FILE replaces a file that is not a session)")
    saved = session.save(arg, replace=replace)
    line = f"saved {saved.messages} messages to {saved.path}"
    if saved.cached_tokens:
        line += f" (and its KV cache, {saved.cached_tokens:,} tokens, beside it)"
    return line


def load(session: Session, arg: str) -> str:
    if not arg:
        raise GemmaChatError("usage: /load FILE")
    return loaded_line(session.load(arg))


def save_over(session: Session, arg: str) -> str:
    return save(session, arg, replace=True)


def loaded_line(loaded: Loaded) -> str:
    line = f"loaded {loaded.messages} messages"
    if loaded.dropped:
        s = "s" * (loaded.dropped > 1)
        line += f" (the {loaded.dropped} oldest exchange{s} left out: they do not fit the context)"
    if loaded.cached_tokens:
        line += f" and their KV cache ({loaded.cached_tokens:,} tokens)"
    else:
        if loaded.refused:
            line += f"; its saved KV cache is not used: {loaded.refused}"
        if loaded.ids_refused:
            line += f"; {loaded.ids_refused}: its text is encoded again"
        line += "; the next answer prefills the conversation"
    return "\n".join([line, *loaded.pictures])


def image(session: Session, arg: str) -> str:
    if not arg:
        raise GemmaChatError("usage: /image PATH")
    return attached_line([session.attach(unquote(arg))])


def attached_line(images, *, to: str = "the next message") -> str:
    """One line for pictures just attached; a server counts their tokens itself."""
    names = ", ".join(Path(i.name).name for i in images)
    tokens = [i.tokens for i in images if hasattr(i, "tokens")]
    counted = f" ({sum(tokens):,} image tokens)" if tokens else ""
    return f"attached {names}{counted} to {to}"


def attach_pasted(session: Session, text: str) -> tuple[str, str | None]:
    """A message in which a terminal pasted image paths (drag and drop): the message without
    them and the line saying they are attached; the message as is for a model without vision."""
    if not session.takes_pictures:
        return text, None
    rest, paths = pasted_paths(text)
    if not paths:
        return text, None
    return rest, attached_line([session.attach(p) for p in paths], to="this message")


def unquote(path: str) -> str:
    """A path as typed or dropped: quoted, or with escaped spaces."""
    path = path.strip()
    if len(path) > 1 and path[0] == path[-1] and path[0] in "'\"":
        return path[1:-1]
    return re.sub(r"\\(.)", r"\1", path)


SESSION_COMMANDS: dict[str, Callable[[Session, str], str]] = {
    "/reset": reset,
    "/system": system,
    "/mtp": mtp,
    "/think": think,
    "/save": save,
    "/save!": save_over,
    "/load": load,
    "/image": image,
}
