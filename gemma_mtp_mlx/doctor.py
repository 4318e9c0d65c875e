"""`gemma-chat doctor`: this machine, the Hugging Face cache, and which Gemma 4 pairs fit in memory.

Every probe is guarded: one that fails prints "unknown", the report goes on, nothing raises.
Nothing here touches the network or loads weights.

Memory estimate (per alias, at 8192 tokens of context) = target weights + drafter weights + KV cache.

* Architecture numbers: `shared/spec/gemma4-mtp.md` §0.1 (targets: the `_VARIANTS` of HF's
  `convert_gemma4_weights.py`, defaults from `Gemma4TextConfig`) and §0.2 (assistants).
* Parameter counts are derived from that table, text decoder only: the loader drops the vision and
  audio towers, so they take no memory here. Derived totals: E2B 4.63 B (of which the per-layer
  embedding table 2.35 B), E4B 7.46 B (PLE table 2.82 B), 26B-A4B 25.23 B, 31B 30.70 B. Model cards
  say 5.1 B / 8 B for E2B / E4B because they also count the vision and audio encoders (their
  "2.3 B effective" for E2B is the derived total less the PLE table); 25.2 B and 30.7 B for
  26B-A4B and 31B agree with the derivation.
* Drafters are derived from §0.2 (tied [262144, H_d] embedding, pre/post projections between drafter
  and backbone width, 4 query-only layers, centroids on E2B/E4B): E2B 77.7 M, E4B 78.5 M (as a public
  load probe measured), 26B-A4B 419.7 M, 31B 469.5 M parameters. They are published in bf16 only.
* Bytes: bf16 = 2 bytes per parameter; MLX affine 4-bit with group size 64 = 4 bits plus a bf16 scale
  and bias per 64 weights = 4.5 bits per parameter (norms and the 8-bit MoE router are < 0.1 % and
  counted at the same rate). KV cache in bf16; KV-shared layers store nothing; full layers keep every
  token; sliding layers keep min(window + 64 slack for rollback, context); k_eq_v full layers still
  store separate K and V arrays.
* Verdict against total memory (unified memory on a Mac, RAM elsewhere): "fits" below 75 %,
  "tight" up to 90 %, else "does not fit". macOS lets the GPU wire roughly 65-75 % of unified
  memory by default, so "tight" usually needs a raised `iogpu.wired_limit_mb`.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import __version__
from .aliases import ALIASES

UNKNOWN = "unknown"
CONTEXT_TOKENS = 8192
SLIDING_SLACK = 64
FITS_FRACTION = 0.75
TIGHT_FRACTION = 0.90
BF16_BYTES = 2
VOCAB = 262144


@dataclass(frozen=True)
class Arch:
    """One Gemma 4 size: the target decoder and its MTP assistant (spec §0.1, §0.2)."""

    name: str
    hidden: int
    layers: int
    full_every: int  # layer i is full attention iff (i + 1) % full_every == 0
    heads: int
    kv_heads_sliding: int
    kv_heads_full: int
    k_eq_v: bool  # full layers have no v_proj (V comes from the K projection)
    sliding_window: int
    intermediate: int  # dense MLP; the shared-expert MLP on MoE
    double_wide_shared: bool  # KV-shared layers use 2 x intermediate
    kv_shared_layers: int
    ple_dim: int
    experts: int
    moe_intermediate: int
    drafter_hidden: int
    drafter_intermediate: int
    drafter_heads: int
    drafter_centroids: int  # 0: plain tied head
    head_dim: int = 256
    global_head_dim: int = 512
    drafter_layers: int = 4

    def layer_types(self) -> list[str]:
        return ["full" if (i + 1) % self.full_every == 0 else "sliding" for i in range(self.layers)]


ARCHS: dict[str, Arch] = {
    arch.name: arch
    for arch in (
        Arch(
            name="E2B", hidden=1536, layers=35, full_every=5, heads=8,
            kv_heads_sliding=1, kv_heads_full=1, k_eq_v=False, sliding_window=512,
            intermediate=6144, double_wide_shared=True, kv_shared_layers=20, ple_dim=256,
            experts=0, moe_intermediate=0,
            drafter_hidden=256, drafter_intermediate=2048, drafter_heads=4, drafter_centroids=2048,
        ),
        Arch(
            name="E4B", hidden=2560, layers=42, full_every=6, heads=8,
            kv_heads_sliding=2, kv_heads_full=2, k_eq_v=False, sliding_window=512,
            intermediate=10240, double_wide_shared=False, kv_shared_layers=18, ple_dim=256,
            experts=0, moe_intermediate=0,
            drafter_hidden=256, drafter_intermediate=2048, drafter_heads=4, drafter_centroids=2048,
        ),
        Arch(
            name="26B-A4B", hidden=2816, layers=30, full_every=6, heads=16,
            kv_heads_sliding=8, kv_heads_full=2, k_eq_v=True, sliding_window=1024,
            intermediate=2112, double_wide_shared=False, kv_shared_layers=0, ple_dim=0,
            experts=128, moe_intermediate=704,
            drafter_hidden=1024, drafter_intermediate=8192, drafter_heads=16, drafter_centroids=0,
        ),
        Arch(
            name="31B", hidden=5376, layers=60, full_every=6, heads=32,
            kv_heads_sliding=16, kv_heads_full=4, k_eq_v=True, sliding_window=1024,
            intermediate=21504, double_wide_shared=False, kv_shared_layers=0, ple_dim=0,
            experts=0, moe_intermediate=0,
            drafter_hidden=1024, drafter_intermediate=8192, drafter_heads=32, drafter_centroids=0,
        ),
    )
}  # fmt: skip


def arch_for(repo_id: str) -> Arch | None:
    """The size a repo id names ("google/gemma-4-E2B-it", "mlx-community/gemma-4-e2b-it-4bit")."""
    name = repo_id.lower()
    for key in sorted(ARCHS, key=len, reverse=True):
        if f"gemma-4-{key.lower()}" in name:
            return ARCHS[key]
    return None


def _head_dim(arch: Arch, layer_type: str) -> int:
    return arch.global_head_dim if layer_type == "full" else arch.head_dim


def _kv_heads(arch: Arch, layer_type: str) -> int:
    return arch.kv_heads_full if layer_type == "full" else arch.kv_heads_sliding


def target_params(arch: Arch) -> int:
    """Text-decoder parameters: embeddings, PLE, attention, MLP / MoE, norms."""
    h = arch.hidden
    total = VOCAB * h + h  # tied embedding / LM head, final norm
    if arch.ple_dim:
        width = arch.layers * arch.ple_dim
        total += VOCAB * width + width * h + arch.ple_dim  # table, model projection, its norm
    first_shared = arch.layers - arch.kv_shared_layers
    for i, kind in enumerate(arch.layer_types()):
        hd, kv = _head_dim(arch, kind), _kv_heads(arch, kind)
        total += 2 * h * arch.heads * hd + hd  # q_proj, o_proj, q_norm
        if i < first_shared:
            total += h * kv * hd + hd  # k_proj, k_norm
            if not (kind == "full" and arch.k_eq_v):
                total += h * kv * hd  # v_proj
        width = arch.intermediate
        if arch.double_wide_shared and i >= first_shared:
            width *= 2
        total += 3 * h * width + 4 * h + 1  # gate/up/down, four norms, layer_scalar
        if arch.experts:
            total += arch.experts * 3 * h * arch.moe_intermediate  # experts
            total += arch.experts * h + h + arch.experts  # router proj, scale, per-expert scale
            total += 3 * h  # the extra MoE norms
        if arch.ple_dim:
            total += 2 * h * arch.ple_dim + h  # gate, projection, post norm
    return total


def drafter_params(arch: Arch) -> int:
    """MTP assistant parameters: tied embedding, pre/post projections, 4 query-only layers."""
    d = arch.drafter_hidden
    total = VOCAB * d + d  # tied embedding / LM head, final norm
    total += d * 2 * arch.hidden + arch.hidden * d  # pre_projection, post_projection
    kinds = ["sliding"] * (arch.drafter_layers - 1) + ["full"]
    for kind in kinds:
        hd = _head_dim(arch, kind)
        total += 2 * d * arch.drafter_heads * hd + hd  # q_proj, o_proj, q_norm
        total += 3 * d * arch.drafter_intermediate + 4 * d + 1
    total += arch.drafter_centroids * d
    return total


def drafter_bytes(arch: Arch) -> int:
    """bf16 weights, plus the int64 token ordering of the centroid head."""
    ordering = VOCAB * 8 if arch.drafter_centroids else 0
    return drafter_params(arch) * BF16_BYTES + ordering


def weight_bytes(params: int, bits: int) -> int:
    """bf16 (bits=16) or MLX affine quantisation with group size 64 (bf16 scale + bias per group)."""
    if bits == 16:
        return params * BF16_BYTES
    return params * (bits * 64 + 2 * 16) // (64 * 8)


def kv_cache_bytes(arch: Arch, context: int = CONTEXT_TOKENS) -> int:
    """bf16 K and V of every layer that stores them, at `context` tokens."""
    total = 0
    first_shared = arch.layers - arch.kv_shared_layers
    for kind in arch.layer_types()[:first_shared]:
        tokens = context if kind == "full" else min(arch.sliding_window + SLIDING_SLACK, context)
        total += 2 * tokens * _kv_heads(arch, kind) * _head_dim(arch, kind) * BF16_BYTES
    return total


class Estimate(NamedTuple):
    target: int
    drafter: int
    kv: int

    @property
    def total(self) -> int:
        return self.target + self.drafter + self.kv


def estimate(arch: Arch, bits: int, context: int = CONTEXT_TOKENS) -> Estimate:
    return Estimate(
        weight_bytes(target_params(arch), bits), drafter_bytes(arch), kv_cache_bytes(arch, context)
    )


def verdict(total_bytes: int, memory_bytes: int | None) -> str:
    if not memory_bytes:
        return UNKNOWN
    share = total_bytes / memory_bytes
    if share < FITS_FRACTION:
        return "fits"
    if share <= TIGHT_FRACTION:
        return "tight"
    return "does not fit"


def format_bytes(n: float | None) -> str:
    if n is None:
        return UNKNOWN
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --- machine probes -----------------------------------------------------------------------------


def _sysctl(name: str) -> str:
    out = subprocess.run(
        ["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=True
    )
    return out.stdout.strip()


def _is_macos() -> bool:
    return sys.platform == "darwin"


def _mlx_device_info() -> dict[str, Any]:
    import mlx.core as mx

    if not mx.metal.is_available():
        return {}
    if hasattr(mx, "device_info"):
        return dict(mx.device_info())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dict(mx.metal.device_info())


def mlx_version() -> str:
    import mlx.core as mx

    return mx.__version__


def package_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def device_description() -> str:
    import mlx.core as mx

    device = mx.default_device()
    if device.type == mx.gpu and mx.metal.is_available():
        info = _mlx_device_info()
        name = info.get("device_name") or info.get("architecture") or "Apple GPU"
        return f"Metal GPU ({name})"
    return "CPU (Metal not available)" if not _is_macos() else "CPU"


def chip() -> str | None:
    if _is_macos():
        return _sysctl("machdep.cpu.brand_string")
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.lower().startswith(("model name", "hardware")):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or None


def os_description() -> str:
    if _is_macos():
        return f"macOS {platform.mac_ver()[0]} ({platform.machine()})"
    return f"{platform.system()} {platform.release()} ({platform.machine()})"


def total_memory_bytes() -> int | None:
    if _is_macos():
        return int(_sysctl("hw.memsize"))
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        meminfo = Path("/proc/meminfo")
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def wired_limit() -> str:
    """macOS: the GPU wired-memory limit and MLX's recommended working set; "n/a" elsewhere."""
    if not _is_macos():
        return "n/a"
    parts = []
    try:
        mb = int(_sysctl("iogpu.wired_limit_mb"))
        parts.append(f"iogpu.wired_limit_mb={mb}" + (" (system default)" if mb == 0 else ""))
    except Exception:
        parts.append(f"iogpu.wired_limit_mb {UNKNOWN}")
    try:
        recommended = _mlx_device_info().get("max_recommended_working_set_size")
        if recommended:
            parts.append(f"MLX recommended working set {format_bytes(recommended)}")
    except Exception:
        pass
    return ", ".join(parts)


# --- Hugging Face cache ---------------------------------------------------------------------------


def hf_cache_dir() -> Path:
    """The hub cache, read now (env may differ from when huggingface_hub was imported)."""
    env = os.environ
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(name):
            return Path(os.path.expandvars(env[name])).expanduser()
    if env.get("HF_HOME"):
        return Path(os.path.expandvars(env["HF_HOME"])).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def free_disk_bytes(path: Path) -> int:
    """Free space on the volume that holds `path` (or its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return shutil.disk_usage(probe).free


def cached_models(cache_dir: Path) -> dict[str, int]:
    """Model repos in the cache: lower-case repo id -> size on disk. Empty if there is no cache."""
    if not cache_dir.is_dir():
        return {}
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache_dir)
    return {r.repo_id.lower(): r.size_on_disk for r in info.repos if r.repo_type == "model"}


def other_gemma4_repos(cached: dict[str, int]) -> list[str]:
    known = {repo.lower() for alias in ALIASES.values() for repo in (alias.target, alias.assistant)}
    return sorted(repo for repo in cached if "gemma-4" in repo and repo not in known)


# --- report ---------------------------------------------------------------------------------------


def _probe(fn: Callable[..., Any], *args: Any) -> Any:
    try:
        value = fn(*args)
    except Exception:
        return None
    return value


def _text(value: Any) -> Text:
    return Text(UNKNOWN if value is None or value == "" else str(value))


def _cache_status(repo: str, cached: dict[str, int] | None) -> Text:
    if cached is None:
        return Text(UNKNOWN)
    size = cached.get(repo.lower())
    if size is None:
        return Text("not cached", style="dim")
    return Text(f"cached ({format_bytes(size)})", style="green")


_VERDICT_STYLE = {"fits": "green", "tight": "yellow", "does not fit": "red"}


def run(console: Console) -> int:
    """Print the report on `console`; 0 whenever a report was printed."""
    try:
        _report(console)
    except Exception as error:  # the per-probe guards should make this unreachable
        console.print(Text(f"doctor: the report failed: {error}"))
        return 1
    return 0


def _table(title: str, *columns: str, show_header: bool = True) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE, show_header=show_header)
    for column in columns:
        table.add_column(column)
    return table


def _report(console: Console) -> None:
    memory = _probe(total_memory_bytes)
    cache_dir = _probe(hf_cache_dir)
    cached = _probe(cached_models, cache_dir) if cache_dir is not None else None

    facts = Table(title="gemma-chat doctor", title_justify="left", box=None, show_header=False)
    facts.add_column("check", style="bold", no_wrap=True)
    facts.add_column("value", overflow="fold")
    rows = [
        ("gemma-chat", __version__),
        ("mlx", _probe(mlx_version)),
        ("mlx-lm", _probe(package_version, "mlx-lm")),
        ("huggingface_hub", _probe(package_version, "huggingface_hub")),
        ("device", _probe(device_description)),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("os", _probe(os_description)),
        ("chip", _probe(chip)),
        ("unified memory" if _is_macos() else "memory", format_bytes(memory) if memory else None),
        ("wired limit", _probe(wired_limit)),
        ("HF cache", str(cache_dir) if cache_dir is not None else None),
        ("free disk", format_bytes(_probe(free_disk_bytes, cache_dir)) if cache_dir else None),
    ]
    for label, value in rows:
        facts.add_row(label, _text(value))
    console.print(facts)

    models = _table("Gemma 4 in the HF cache", "alias", "role", "repo", "status")
    for name, alias in ALIASES.items():
        for role, repo in (("target", alias.target), ("assistant", alias.assistant)):
            models.add_row(name, role, repo, _cache_status(repo, cached))
    console.print(models)
    if cached is None:
        console.print(Text(f"cache scan: {UNKNOWN}"))
    else:
        for repo in other_gemma4_repos(cached):
            console.print(Text(f"also cached: {repo} ({format_bytes(cached[repo])})"))

    memory_text = format_bytes(memory) if memory else UNKNOWN
    fit = _table(
        f"Fit in {memory_text} at {CONTEXT_TOKENS} tokens: target + drafter (bf16) + KV cache",
        "alias", "weights", "target", "drafter", "KV cache", "total", "verdict",
    )  # fmt: skip
    for name, alias in ALIASES.items():
        arch = arch_for(alias.target)
        for bits, label in ((16, "bf16"), (4, "4-bit")):
            if arch is None:
                fit.add_row(name, label, *[UNKNOWN] * 5)
                continue
            parts = estimate(arch, bits)
            word = verdict(parts.total, memory)
            fit.add_row(
                name,
                label,
                format_bytes(parts.target),
                format_bytes(parts.drafter),
                format_bytes(parts.kv),
                format_bytes(parts.total),
                Text(word, style=_VERDICT_STYLE.get(word, "")),
            )
    console.print(fit)
    console.print(
        Text(
            f"fits: under {FITS_FRACTION:.0%} of memory; tight: up to {TIGHT_FRACTION:.0%}. "
            "Estimated from the architecture, not measured.",
            style="dim",
        )
    )
