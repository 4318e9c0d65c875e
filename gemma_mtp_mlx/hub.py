"""The Hugging Face hub and its local cache, through huggingface_hub: what a repo costs to
download, whether it is cached, and the download itself (only what the text model needs).

The cache location and offline mode are read from the environment at each call, not from
huggingface_hub's constants (frozen at its import), so a process that sets HF_HOME or
HF_HUB_OFFLINE after start-up (tests, embedding applications) is honoured.
"""

import json
import os
import threading
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

from .errors import GemmaChatError

# What the model reads: the text model's files (the vision tower's weights are in the same
# safetensors) and the processor config, which says a picture's soft-token budget. Never *.bin
# (pickles), *.gguf, *.onnx, or the audio and video configs of the multimodal repos.
TEXT_MODEL_FILES = [
    "config.json",
    "processor_config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "*.safetensors",
    "model.safetensors.index.json",
]


def cache_dir() -> Path:
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(os.path.expandvars(env[name])).expanduser()
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(env["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower()
    return constants.HF_HUB_OFFLINE or flag in ("1", "true", "yes", "on")


def cached_snapshot(repo: str) -> Path | None:
    """The cached snapshot of `repo` when it holds a config.json and every weight file its
    index names (a download cut short leaves the weights out); None otherwise."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo, "config.json", cache_dir=cache_dir())
    if not isinstance(config, str):
        return None
    folder = Path(config).parent
    return folder if weights_complete(folder) else None


def weights_complete(folder: Path) -> bool:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError):
            return False
        return all((folder / shard).is_file() for shard in shards)
    return any(folder.glob("*.safetensors"))


def local_size(folder: Path) -> int:
    """Bytes of the files the text model reads in a local folder."""
    from huggingface_hub.utils import filter_repo_objects

    files = [p for p in folder.iterdir() if p.is_file()]
    chosen = filter_repo_objects(files, allow_patterns=TEXT_MODEL_FILES, key=lambda p: p.name)
    return sum(p.stat().st_size for p in chosen)


class DownloadSize(NamedTuple):
    total: int  # the text model's files
    missing: int  # those not in the cache yet


def download_size(repo: str) -> DownloadSize | None:
    """From the hub's file metadata; None when the hub cannot be asked (offline, unreachable,
    gated, missing)."""
    if offline():
        return None
    from huggingface_hub import snapshot_download

    try:
        with _hub_bars_off():
            files = snapshot_download(
                repo, allow_patterns=TEXT_MODEL_FILES, cache_dir=cache_dir(), dry_run=True
            )
    except Exception:  # whatever the hub says, the size is just unknown
        return None
    total = sum(f.file_size or 0 for f in files)
    missing = sum(f.file_size or 0 for f in files if f.will_download)
    return DownloadSize(total, missing)


def download(repo: str, *, console=None, expected: int | None = None) -> Path:
    """The repo's text model in the cache, downloading what is missing (after an interrupted
    download: the files that did not complete). With a terminal `console`, a Rich bar of the
    bytes arriving (`expected`: how many, when the hub said)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    bar = _DownloadBar(console, repo, expected) if console is not None and console.is_terminal else None
    blobs = _blobs(repo)
    partial_before = set(blobs.glob("*.incomplete"))
    try:
        with bar or nullcontext(), _hub_bars_off():
            folder = _interruptible(lambda: snapshot_download(
                repo,
                allow_patterns=TEXT_MODEL_FILES,
                cache_dir=cache_dir(),
                local_files_only=offline(),
            ))
    except KeyboardInterrupt:
        # Files already complete stay in the cache. huggingface_hub writes each file to a
        # temporary name of its own and cannot reuse it later; its threads are abandoned (the
        # caller exits), so remove those partial files here.
        for partial in set(blobs.glob("*.incomplete")) - partial_before:
            partial.unlink(missing_ok=True)
        raise
    except GatedRepoError:
        raise GemmaChatError(
            f"{repo} is gated: accept its licence on huggingface.co and run `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise GemmaChatError(f"{repo} was not found on the Hugging Face hub") from None
    except LocalEntryNotFoundError:
        raise GemmaChatError(f"{repo} is not in the local cache and {_why_unreachable()}") from None
    except OSError as e:
        raise GemmaChatError(f"could not download {repo}: {e}") from None
    folder = Path(folder)
    if not weights_complete(folder):
        raise GemmaChatError(f"{repo} is only partly in the local cache and {_why_unreachable()}")
    return folder


_bars_lock = threading.Lock()
_bars_users = 0


@contextmanager
def _hub_bars_off():
    """huggingface_hub's own tqdm bars off (ours is the Rich bar; a pipe gets one line). Its
    switch is global: concurrent users (sizes asked in parallel) share one off period."""
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    global _bars_users, _bars_were_off
    with _bars_lock:
        if _bars_users == 0:
            _bars_were_off = are_progress_bars_disabled()
            disable_progress_bars()
        _bars_users += 1
    try:
        yield
    finally:
        with _bars_lock:
            _bars_users -= 1
            if _bars_users == 0 and not _bars_were_off:
                enable_progress_bars()


_bars_were_off = False


def _interruptible(fn):
    """`fn()` in a daemon thread, waited for here, so that Ctrl-C stops the wait at once:
    snapshot_download's own worker threads finish their files before it lets an interrupt
    through, minutes for a large model. The caller exits the process without waiting for them."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn()
        except BaseException as e:  # handed to the waiting thread, raised there
            outcome["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.2)
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def _blobs(repo: str) -> Path:
    return cache_dir() / ("models--" + repo.replace("/", "--")) / "blobs"


def _why_unreachable() -> str:
    return "offline mode (HF_HUB_OFFLINE) is on" if offline() else "the hub could not be reached"


class _DownloadBar:
    """A Rich bar fed by polling the repo's blob folder (finished and `.incomplete` files), so it
    shows the same whether huggingface_hub fetches over plain HTTP or Xet."""

    def __init__(self, console, repo: str, expected: int | None):
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        self.blobs = _blobs(repo)
        self.start = self._bytes()
        self.progress = Progress(
            TextColumn(f"{repo}"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = self.progress.add_task("download", total=expected)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _bytes(self) -> int:
        try:
            return sum(p.stat().st_size for p in self.blobs.iterdir() if p.is_file())
        except OSError:
            return 0

    def _poll(self):
        while not self.stop.wait(0.25):
            self.progress.update(self.task, completed=max(0, self._bytes() - self.start))

    def __enter__(self):
        self.progress.start()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.progress.stop()
