"""Private files written atomically: a temporary file beside the target (mode 0600 from its
creation), synced, then renamed over it, so a reader never sees half a file. A save killed
before its rename leaves its temporary behind; the next save of the same file removes it."""

import os
import re
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from ..errors import GemmaChatError


def write_private(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Call `write` on a new private file and put it at `path` in one rename."""
    remove_stale_temporaries(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise GemmaChatError(f"cannot write {path}: {e.strerror}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)  # mkstemp's mode, whatever the platform's default
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise GemmaChatError(f"cannot write {path}: {e.strerror}") from None
    return path


def remove_stale_temporaries(path: Path) -> None:
    """Remove the temporaries of earlier saves of `path` that never reached their rename: files
    named exactly as `write_private` names them (mkstemp's 8 random characters) and owned by
    this user. Two processes saving the same file at the same moment are not supported (the
    later rename would win anyway)."""
    ours = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return  # an unreadable folder: the save itself reports the problem
    for candidate in candidates:
        if not ours.fullmatch(candidate.name):
            continue
        try:
            info = candidate.lstat()
            if stat.S_ISREG(info.st_mode) and info.st_uid == os.getuid():
                candidate.unlink()
        except OSError:
            continue
