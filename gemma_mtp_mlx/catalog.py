"""The alias table against this machine: for each alias x precision, its download size, whether
it is cached, what it needs in memory and whether that fits; the default model; the largest
that fits. `gemma-chat models` shows it, `gemma-chat` picks its default from it, and a refused
preflight names its largest fitting row."""

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from . import hub, memory
from .aliases import (
    ALIASES,
    DEFAULT_CHOICES,
    DEFAULT_PRECISION,
    PRECISIONS,
    Checkpoint,
    checkpoint,
    checkpoints,
)


@dataclass
class Row:
    checkpoint: Checkpoint
    target_cached: bool
    assistant_cached: bool
    target_bytes: int | None  # download size of the files the text model needs
    assistant_bytes: int | None
    estimate: memory.Estimate | None
    fits: bool | None  # None: the machine's memory or the estimate is unknown
    default: bool = False
    vision: bool | None = None  # the checkpoint carries a vision tower (None: config unseen)

    @property
    def cached(self) -> bool:
        return self.target_cached and (self.assistant_cached or self.checkpoint.assistant is None)

    @property
    def bytes(self) -> int | None:
        if self.target_bytes is None or (self.checkpoint.assistant and self.assistant_bytes is None):
            return None
        return self.target_bytes + (self.assistant_bytes or 0)

    def as_json(self) -> dict:
        cp = self.checkpoint
        return {
            "alias": cp.alias,
            "precision": cp.precision,
            "target_repo": cp.target,
            "assistant_repo": cp.assistant,
            "default": self.default,
            "cached": self.cached,
            "target_cached": self.target_cached,
            "assistant_cached": self.assistant_cached,
            "fits": self.fits,
            "bytes": self.bytes,
            "target_bytes": self.target_bytes,
            "assistant_bytes": self.assistant_bytes,
            "memory_bytes": self.estimate.total if self.estimate else None,
            "context_tokens": self.estimate.context if self.estimate else None,
            "vision": self.vision,
        }


def estimate_of(cp: Checkpoint) -> memory.Estimate | None:
    from .errors import GemmaChatError
    from .loading import estimate, plan

    try:
        return estimate(plan(cp.alias, "auto", precision=cp.precision))
    except GemmaChatError:  # a broken cached checkpoint: its row says "unknown"
        return None


def fits(found: memory.Estimate | None, limit: memory.Limit | None) -> bool | None:
    if found is None or limit is None:
        return None
    return found.total <= limit.bytes


def download_bytes(repo: str) -> int | None:
    """The hub's file metadata when online; the cache when offline; None otherwise."""
    size = hub.download_size(repo)
    if size is not None:
        return size.total
    folder = hub.cached_snapshot(repo)
    return hub.local_size(folder) if folder else None


def carries_vision(repo: str) -> bool | None:
    """Whether the repo's config.json (the cache's, or the hub's when online) has a vision
    tower; None when neither can be read."""
    from .errors import GemmaChatError
    from .loading import hub_config, read_config
    from .models.multimodal import has_vision

    folder = hub.cached_snapshot(repo)
    try:
        config = read_config(folder) if folder else hub_config(repo)
    except GemmaChatError:  # a broken cached config: its row says "unknown"
        return None
    return None if config is None else has_vision(config)


def rows(limit: memory.Limit | None) -> list[Row]:
    table = checkpoints()
    repos = sorted({r for cp in table for r in (cp.target, cp.assistant) if r})
    targets = sorted({cp.target for cp in table})
    with ThreadPoolExecutor(max_workers=8) as pool:
        sizes = dict(zip(repos, pool.map(download_bytes, repos)))
        vision = dict(zip(targets, pool.map(carries_vision, targets)))
    cached = {repo: hub.cached_snapshot(repo) is not None for repo in repos}
    default, _ = choose_default(limit)
    out = []
    for cp in table:
        found = estimate_of(cp)
        out.append(Row(
            cp,
            target_cached=cached[cp.target],
            assistant_cached=bool(cp.assistant) and cached[cp.assistant],
            target_bytes=sizes[cp.target],
            assistant_bytes=sizes.get(cp.assistant) if cp.assistant else None,
            estimate=found,
            fits=fits(found, limit),
            default=cp == default,
            vision=vision[cp.target],
        ))
    return out


def choose_default(limit: memory.Limit | None) -> tuple[Checkpoint, str]:
    """The model `gemma-chat` uses without --model, and why, in one line: the first of
    DEFAULT_CHOICES that fits at the default precision (the last one when none does: the
    preflight then says what fits instead)."""
    choices = [checkpoint(alias, DEFAULT_PRECISION) for alias in DEFAULT_CHOICES]
    passed_over = []
    for cp in choices:
        found = estimate_of(cp)
        if fits(found, limit) is False and cp is not choices[-1]:
            passed_over.append(f"{cp.alias} needs about {memory.format_bytes(found.total)}")
            continue
        size = f"about {memory.format_bytes(found.total)}" if found else "an unknown amount"
        if limit is None:
            why = "this machine's memory is unknown"
        else:
            room = f"the {memory.format_bytes(limit.bytes)} limit ({limit.why})"
            why = f"{'; '.join(passed_over)}, over {room}" if passed_over else f"it fits in {room}"
        return cp, (
            f"using {cp.alias} at {cp.precision} ({cp.target}, {size} with its drafter at full "
            f"context): {why}; --model and --precision choose another"
        )
    raise AssertionError("DEFAULT_CHOICES is empty")


def largest_fitting(limit: memory.Limit) -> Checkpoint | None:
    """The biggest size that fits, at the highest precision that fits."""
    for alias in reversed(list(ALIASES)):
        for precision in reversed(PRECISIONS):
            if precision not in ALIASES[alias].targets:
                continue
            cp = checkpoint(alias, precision)
            if fits(estimate_of(cp), limit):
                return cp
    return None
