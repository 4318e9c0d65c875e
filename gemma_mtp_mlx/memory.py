"""How much memory a Gemma 4 pair takes, and how much this machine allows.

The estimate is target weights + drafter weights + the KV cache at the context the session
uses (`--context`, by default the target's `max_position_embeddings`: a chat may fill it).
Weights are counted on the loader's own model, built lazily (MLX allocates nothing until
evaluated): for a checkpoint on disk, exactly as `load` builds it from the files (dtypes and
quantised modules as stored); for one not downloaded yet, from its config (the hub's, or
`models/configs.py` for an alias) at the precision it will be stored in. The KV cache follows
from `ModelArgs`: layers that share another layer's K/V store nothing, full-attention layers keep
every token, sliding layers keep their window plus the rollback slack.

The limit is `--max-memory`, by default 75 % of physical memory (macOS keeps the rest for
itself and other apps) and, on a Mac, no more than Metal's recommended working set.
"""

import os
import re
import sys
from dataclasses import dataclass

from .errors import GemmaChatError
from .models.rollback import DEFAULT_SLACK

DEFAULT_SHARE = 0.75


@dataclass
class Estimate:
    target: int
    drafter: int
    kv: int
    context: int

    @property
    def total(self) -> int:
        return self.target + self.drafter + self.kv

    def describe(self) -> str:
        return (
            f"{format_bytes(self.total)} (weights {format_bytes(self.target)}, drafter "
            f"{format_bytes(self.drafter)}, KV cache {format_bytes(self.kv)} at "
            f"{self.context:,} tokens)"
        )


@dataclass
class Limit:
    bytes: int
    why: str  # "75% of 16.0 GiB", "--max-memory"


# -- what a model takes --------------------------------------------------------------------------
def parameter_bytes(module) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def kv_cache_bytes(args, context: int, dtype_bytes: int) -> int:
    """K and V of every layer that stores them, at `context` tokens; the sliding rings twice,
    as the chat keeps one snapshot of them (engine/snapshot.py)."""
    total = 0
    for layer in range(args.first_shared_layer):
        tokens = context
        if args.layer_types[layer] != "full_attention":
            tokens = 2 * min(args.sliding_window + DEFAULT_SLACK, context)
        total += 2 * tokens * args.kv_heads_of(layer) * args.head_dim_of(layer) * dtype_bytes
    return total


def estimate(target, drafter=None, *, context: int | None = None) -> Estimate:
    """`target`, `drafter`: lazily built models (`loading.build_target` / `build_drafter`);
    `context`: tokens the KV cache must hold (default: the model's whole context)."""
    activation = _activation_bytes(target)
    context = context or target.args.max_position_embeddings
    return Estimate(
        target=parameter_bytes(target),
        drafter=parameter_bytes(drafter) if drafter is not None else 0,
        kv=kv_cache_bytes(target.args, context, activation),
        context=context,
    )


def largest_context(target, drafter, limit: int) -> int | None:
    """The most tokens (a multiple of 1,024, below the model's context) at which the pair fits
    in `limit` bytes; None when not even 1,024 fit, or the whole context does."""
    most = target.args.max_position_embeddings
    lo, hi = 0, most // 1024  # in units of 1,024 tokens; lo fits (0: nothing known to)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if estimate(target, drafter, context=mid * 1024).total <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo * 1024 if 0 < lo * 1024 < most else None


def _activation_bytes(target) -> int:
    """Bytes per K/V element: the dtype the model computes in (its norms' dtype; quantised
    layers keep their scales in it too)."""
    return target.model.norm.weight.dtype.size


# -- what the machine allows ---------------------------------------------------------------------
def physical_memory() -> int | None:
    if sys.platform == "darwin":
        import subprocess

        try:
            out = subprocess.run(
                ["sysctl", "-n", "hw.memsize"], capture_output=True, text=True, timeout=5
            )
            return int(out.stdout.strip())
        except (OSError, ValueError, subprocess.SubprocessError):
            return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def metal_working_set() -> int | None:
    """Metal's recommended working set (what the GPU can keep resident); None without Metal."""
    import mlx.core as mx

    if not mx.metal.is_available():
        return None
    info = mx.device_info() if hasattr(mx, "device_info") else mx.metal.device_info()
    size = info.get("max_recommended_working_set_size")
    return int(size) if size else None


def default_limit() -> Limit | None:
    memory = physical_memory()
    if not memory:
        return None
    limit = Limit(int(memory * DEFAULT_SHARE), f"{DEFAULT_SHARE:.0%} of {format_bytes(memory)}")
    metal = metal_working_set()
    if metal and metal < limit.bytes:
        limit = Limit(metal, "Metal's recommended working set")
    return limit


_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_size(text: str) -> Limit:
    """`--max-memory`: bytes with an optional K/M/G/T suffix (powers of 1024; `GB` and `GiB`
    alike), or a share of physical memory (`60%`)."""
    value = text.strip().lower().replace(" ", "")
    if value.endswith("%"):
        memory = physical_memory()
        number = _number(value[:-1], text)
        if memory is None or not 0 < number <= 100:
            raise GemmaChatError(f"--max-memory {text}: a share must be between 0 and 100%")
        return Limit(int(memory * number / 100), f"--max-memory {text}")
    match = re.fullmatch(r"([0-9.]+)([kmgt]?)(?:i?b)?", value)
    if not match:
        raise GemmaChatError(f"--max-memory {text}: expected a size such as 12G, 800M or 60%")
    size = int(_number(match.group(1), text) * _UNITS[match.group(2)])
    if size <= 0:
        raise GemmaChatError(f"--max-memory {text}: must be more than 0")
    return Limit(size, f"--max-memory {text}")


def _number(text: str, original: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise GemmaChatError(f"--max-memory {original}: expected a size such as 12G or 60%") from None


def format_bytes(n: float | None) -> str:
    if n is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
