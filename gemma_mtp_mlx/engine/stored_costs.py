"""What a pair has learned about costs, kept from one process to the next.

Most scripted use is one process per answer; without this, each would start the draft policy
and the meter from nothing. So the costs (engine/costs.py: per number of rows, the plain step,
the pooled plain/round ratios, the round costs per K and what they were just after the plain
step), the policy's acceptance by draft position and what its rounds may still lose are written
to one small JSON file, `$XDG_CACHE_HOME/gemma-chat/costs.json` (`~/.cache/gemma-chat/costs.json`
by default), at the end of an answer (`Decoder.close`, never between rounds), and read by the
first `Decoder` of the pair in a process.

They hold only where they were measured, so an entry is found by its key: the weights'
fingerprints (target and drafter, models/fingerprint.py: another checkpoint or quantisation
differs), their precision, the compile mode, the machine (chip, cores, MLX device, BLAS and its
threads) and the versions of gemma-chat and MLX. A file that cannot be read, is not ours or is
damaged, or an entry that does not hold together, is ignored (one line under `--verbose`) and
replaced at the next write: these figures only save measuring. `gemma-chat --forget-costs`, or
deleting the file, starts over; `gemma-chat doctor` shows what is stored.
"""

import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

import mlx.core as mx

from .. import __version__
from ..blas import openblas_threads
from ..models.fingerprint import fingerprint, precision
from .costs import POOL, Measurements, RowCosts
from .policy import BANKED_MOST

FORMAT = "gemma-chat.costs"
VERSION = 1
MOST_ENTRIES = 32  # pairs x machines x versions kept; the least recently written go first
MOST_DRAFTS = 64  # no draft length beyond this is real (the sliding caches' rollback room)

log = logging.getLogger("gemma_chat.costs")


class Ignored(Exception):
    """The stored costs cannot be used; the message says why in a few words."""


def cache_dir() -> Path:
    """gemma-chat's cache folder: $XDG_CACHE_HOME/gemma-chat, else ~/.cache/gemma-chat."""
    base = os.environ.get("XDG_CACHE_HOME")
    if not base or not os.path.isabs(base):  # the XDG spec: a relative path is to be ignored
        base = Path.home() / ".cache"
    return Path(base) / "gemma-chat"


def costs_path() -> Path:
    return cache_dir() / "costs.json"


def forget() -> Path | None:
    """Delete the stored costs; the file's path, or None when there was none."""
    path = costs_path()
    try:
        path.unlink()
    except FileNotFoundError:
        return None
    return path


def machine() -> str:
    """This machine as its costs depend on it, in words."""
    blas = ""
    if sys.platform.startswith("linux"):
        threads = openblas_threads()
        blas = f", OpenBLAS on {threads} thread{'s' * (threads != 1)}" if threads else ", reference BLAS"
    return (
        f"{platform.system()} {platform.machine()}, {_chip()}, {os.cpu_count()} cores, "
        f"MLX {mx.default_device().type.name}{blas}"
    )


def _chip() -> str:
    try:
        if sys.platform == "darwin":
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True, timeout=5
            )
            return out.stdout.strip() or platform.processor()
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown chip"


def pair_key(target, drafter, compile: bool) -> dict:
    return {
        "target": fingerprint(target),
        "drafter": fingerprint(drafter),
        "precision": f"{precision(target)} / {precision(drafter)}",
        "compile": compile,
        "machine": machine(),
        "gemma_chat": __version__,
        "mlx": mx.__version__,
    }


def read_entries(path: Path) -> list[dict]:
    """The entries of a costs file; Ignored when it cannot be read or is not one."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise Ignored(f"it cannot be read ({e})") from None
    try:
        doc = json.loads(text)
    except ValueError:
        raise Ignored("it is not JSON (damaged)") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise Ignored("it is not a gemma-chat costs file")
    if doc.get("version") != VERSION:
        raise Ignored(f"format version {doc.get('version')!r}; this gemma-chat reads {VERSION}")
    entries = doc.get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise Ignored("its entries are damaged")
    return entries


class CostStore:
    """Where one pair's `Measurements` persist (None `key`: a pair that cannot be keyed, such as
    the bench's simulated drafter, persists nothing)."""

    def __init__(self, key: dict | None, names: dict):
        self.key, self.names = key, names

    @property
    def path(self) -> Path:
        return costs_path()

    @classmethod
    def open(cls, pair, measurements: Measurements, compile: bool) -> "CostStore":
        """The store for `pair`, its entry read into `measurements` when this machine has one."""
        names = {
            "target": _name(getattr(pair, "target_path", None)),
            "drafter": _name(getattr(pair, "drafter_path", None)),
        }
        try:
            key = pair_key(pair.target, pair.drafter, compile)
        except (AttributeError, TypeError):  # not an MLX module: nothing to fingerprint
            return cls(None, names)
        store = cls(key, names)
        try:
            entry = next((e for e in read_entries(store.path) if e.get("key") == key), None)
            if entry is None:
                log.info(f"costs: none stored for this pair on this machine yet ({store.path})")
                return store
            restore(measurements, entry)
        except Ignored as e:
            log.info(f"costs: ignoring {store.path}: {e}")
            return store
        log.info(f"costs: starting from what a run on {entry.get('written', '?')} learned ({store.path})")
        return store

    def save(self, measurements: Measurements) -> None:
        """Write this pair's entry atomically, keeping the others (a file that cannot be used
        is replaced)."""
        if self.key is None:
            return
        try:
            entries = read_entries(self.path)
        except Ignored:
            entries = []
        entry = {"key": self.key, "names": self.names,
                 "written": time.strftime("%Y-%m-%d %H:%M:%S")} | snapshot(measurements)
        entries = [e for e in entries if e.get("key") != self.key][-(MOST_ENTRIES - 1) :] + [entry]
        try:
            _write(self.path, {"format": FORMAT, "version": VERSION, "entries": entries})
        except OSError as e:
            log.info(f"costs: cannot write {self.path}: {e.strerror or e}")


def _write(path: Path, doc: dict) -> None:
    """A temporary file beside `path`, renamed over it: a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _name(path: Path | None) -> str | None:
    """A checkpoint's folder as the user knows it: a hub snapshot by its repo id."""
    if path is None:
        return None
    path = Path(path)
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.parent.parent.name.removeprefix("models--").replace("--", "/")
    return path.name


# -- Measurements <-> JSON ---------------------------------------------------------------------
def snapshot(m: Measurements) -> dict:
    rows = {}
    for b, c in m.by_rows.items():
        if c.plain is None:
            continue
        rows[str(b)] = {
            "plain": c.plain,
            "provisional": c.provisional,
            "rounds": {str(k): s for k, s in c.rounds_now.items()},
            "settled": {str(k): s for k, s in c.settled.items()},
            "ratios": {str(k): list(pool) for k, pool in c.ratios.items()},
            "doubted": {str(k): r for k, r in c.doubted.items()},
        }
    policy = {"accepted": m.policy.accepted, "seen": m.policy.seen,
              "budget": {"balance": m.budget.balance, "lowest": m.budget.lowest}}
    return {"rows": rows, "policy": policy}


def restore(m: Measurements, entry: dict) -> None:
    """Read `entry` into `m` (a fresh one); Ignored, leaving `m` as it was, when the entry does
    not hold together."""
    try:
        rows = {int(b): _row(row) for b, row in entry["rows"].items()}
        policy = entry["policy"]
        accepted, seen = [_count(a) for a in policy["accepted"]], [_count(s) for s in policy["seen"]]
        budget = policy.get("budget")  # a file from before it was stored: `m`'s fresh one
        balance, lowest = (
            (m.budget.balance, m.budget.lowest) if budget is None
            else (_steps(budget["balance"]), _steps(budget["lowest"]))
        )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise Ignored("this pair's entry is damaged") from None
    if len(accepted) != m.policy.max_draft or len(seen) != m.policy.max_draft:
        raise Ignored("this pair's entry is damaged")
    if any(b < 1 for b in rows) or any(a > s + 1e-6 for a, s in zip(accepted, seen)):
        raise Ignored("this pair's entry is damaged")
    if not lowest <= min(balance, 0.0) or balance > BANKED_MOST:
        raise Ignored("this pair's entry is damaged")
    m.by_rows.update(rows)
    m.policy.accepted, m.policy.seen = accepted, seen
    m.budget.balance, m.budget.lowest = balance, lowest


def _row(row: dict) -> RowCosts:
    ks = lambda d: {_k(k): _seconds(v) for k, v in d.items()}  # noqa: E731
    c = RowCosts(plain=_seconds(row["plain"]), carried=True)
    c.provisional = row["provisional"]
    if not isinstance(c.provisional, bool):
        raise ValueError("provisional")
    c.rounds, c.settled = ks(row["rounds"]), ks(row["settled"])
    c.carried_rounds = dict(c.rounds)
    for k, pool in row["ratios"].items():
        if not isinstance(pool, list) or not 0 < len(pool) <= POOL:
            raise ValueError("ratios")
        c.ratios[_k(k)] = deque((_positive(r) for r in pool), maxlen=POOL)
    if not c.ratios.keys() <= c.rounds.keys():  # a ratio is a plain step over rounds of its K
        raise ValueError("ratios")
    # A doubted ratio waits for the next measurement, which may come in the next process: one
    # that agrees with it pools both. Forgotten with its process, a pool of one unlucky ratio
    # doubted every later process's own measurement and stayed as it was.
    c.doubted = {_k(k): _positive(r) for k, r in row.get("doubted", {}).items()}
    return c


def _k(text: str) -> int:
    k = int(text)
    if not 0 < k <= MOST_DRAFTS:
        raise ValueError(f"K {k}")
    return k


def _positive(x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not (0 < x < math.inf):
        raise ValueError(f"{x!r}")
    return float(x)


def _seconds(x) -> float:
    if _positive(x) > 3600:
        raise ValueError(f"{x!r} s")
    return float(x)


def _steps(x) -> float:
    """A loss budget's figure, in plain steps (negative: overdrawn)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not abs(x) < 1e6:
        raise ValueError(f"{x!r}")
    return float(x)


def _count(x) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)) or not (0 <= x < math.inf):
        raise ValueError(f"{x!r}")
    return float(x)
