"""`gemma-chat doctor`: this machine, the Hugging Face cache, and which Gemma 4 pairs fit.

Every probe is guarded: one that fails prints "unknown", the report goes on, nothing raises.
Nothing here touches the network or loads weights. It also shows the decoding costs earlier runs
stored (engine/stored_costs.py): what the meter and the draft policy start from.

Memory per alias and precision comes from `catalog` / `memory`, the code the load preflight
runs: the loader's own model built lazily over the cached checkpoint (or, when it is not
cached, over the alias's config in `models/configs.py` at that precision), plus the drafter,
plus the KV cache at the model's full context. "fits" means `gemma-chat` would load it under
the default memory limit (75 % of memory; on a Mac also Metal's recommended working set).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import __version__, blas, hub
from ..aliases import checkpoints
from ..memory import default_limit, format_bytes, physical_memory

UNKNOWN = "unknown"


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
    return physical_memory()


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
    return hub.cache_dir()


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
    known = {repo.lower() for cp in checkpoints() for repo in (cp.target, cp.assistant) if repo}
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


_VERDICT_STYLE = {"fits": "green", "does not fit": "red"}


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


def blas_description() -> str:
    """Linux: which BLAS MLX's CPU matmuls run on, and how to get the fast one."""
    if not sys.platform.startswith("linux"):
        return "n/a (Accelerate / Metal)" if _is_macos() else "n/a"
    if blas.openblas_loaded():
        threads = blas.openblas_threads()
        if not threads:
            return "OpenBLAS (preloaded by gemma-chat)"
        on = f"{threads} thread{'s' * (threads != 1)} of {blas.usable_cores()} cores"
        return f"OpenBLAS (preloaded by gemma-chat, {on})"
    if blas.openblas_library() is not None:
        return f"MLX's reference BLAS in this process; gemma-chat preloads {blas.openblas_library()}"
    return blas.HINT


def fit_rows() -> list[tuple]:
    """(checkpoint, memory estimate or None) for every alias x precision."""
    from ..catalog import estimate_of

    return [(cp, _probe(estimate_of, cp)) for cp in checkpoints()]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def stored_costs_report(console: Console) -> None:
    """Per stored pair: where and when it was measured, and per number of rows the plain step
    and what a round of K drafts costs; the policy's acceptance by draft position and loss
    budget."""
    from ..engine.costs import Measurements
    from ..engine.stored_costs import Ignored, costs_path, machine, read_entries, restore

    path = costs_path()
    try:
        entries = read_entries(path)
    except Ignored as e:
        console.print(Text(f"stored costs: {path} is ignored: {e}"))
        return
    if not entries:
        console.print(Text(f"stored costs: none yet ({path})"))
        return
    here = _probe(machine)
    console.print(Text(f"Stored decoding costs ({path}; `gemma-chat --forget-costs` starts over)", style="italic"))
    for entry in entries:
        key, names = entry.get("key") or {}, entry.get("names") or {}
        where = "this machine" if key.get("machine") == here else f"on {key.get('machine')}"
        compiled = ", compiled" if key.get("compile") else ""
        console.print(Text(
            f" {names.get('target')} + {names.get('drafter')} · {key.get('precision')}{compiled} · "
            f"{where} · gemma-chat {key.get('gemma_chat')} · written {entry.get('written')}"
        ))
        m = Measurements()
        try:
            restore(m, entry)
        except Ignored as e:
            console.print(Text(f"   {e}", style="red"))
            continue
        for b, costs in sorted(m.by_rows.items()):
            plain = costs.current_plain
            trust = "" if costs.trusted else ", provisional"
            rounds = ", ".join(f"K={k} {_ms(s)}" for k, s in sorted(costs.rounds.items()))
            console.print(Text(
                f"   {b} row{'s' * (b != 1)}: plain step {_ms(plain)} ({b / plain:.0f} tok/s{trust})"
                + (f"; a round of {rounds}" if rounds else "")
            ))
        acceptance = " ".join(f"{a:.2f}" for a in m.policy.acceptance)
        console.print(Text(f"   acceptance by draft position: {acceptance}"))
        console.print(Text(
            f"   what drafting may still lose: {m.budget.balance:.1f} plain steps"
            + (" (parked until probes earn it back)" if m.budget.spent else "")
        ))


def _report(console: Console) -> None:
    memory = _probe(total_memory_bytes)
    limit = _probe(default_limit)
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
        ("blas", _probe(blas_description)),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("os", _probe(os_description)),
        ("chip", _probe(chip)),
        ("unified memory" if _is_macos() else "memory", format_bytes(memory) if memory else None),
        ("wired limit", _probe(wired_limit)),
        ("memory limit", f"{format_bytes(limit.bytes)} ({limit.why})" if limit else None),
        ("HF cache", str(cache_dir) if cache_dir is not None else None),
        ("free disk", format_bytes(_probe(free_disk_bytes, cache_dir)) if cache_dir else None),
    ]
    for label, value in rows:
        facts.add_row(label, _text(value))
    console.print(facts)

    models = _table("Gemma 4 in the HF cache", "alias", "role", "repo", "status")
    seen = set()
    for cp in checkpoints():
        for role, repo in (("target", cp.target), ("assistant", cp.assistant)):
            if repo and repo not in seen:
                seen.add(repo)
                models.add_row(cp.alias, role, repo, _cache_status(repo, cached))
    console.print(models)
    if cached is None:
        console.print(Text(f"cache scan: {UNKNOWN}"))
    else:
        for repo in other_gemma4_repos(cached):
            console.print(Text(f"also cached: {repo} ({format_bytes(cached[repo])})"))

    limit_text = format_bytes(limit.bytes) if limit else UNKNOWN
    fit = _table(
        f"Fit in the {limit_text} limit: target + drafter + KV cache at the model's full context",
        "alias", "precision", "target", "drafter", "KV cache", "total", "verdict",
    )  # fmt: skip
    for cp, found in fit_rows():
        if found is None:
            fit.add_row(cp.alias, cp.precision, *[UNKNOWN] * 5)
            continue
        word = UNKNOWN if limit is None else ("fits" if found.total <= limit.bytes else "does not fit")
        fit.add_row(
            cp.alias,
            cp.precision,
            format_bytes(found.target),
            format_bytes(found.drafter),
            format_bytes(found.kv),
            format_bytes(found.total),
            Text(word, style=_VERDICT_STYLE.get(word, "")),
        )
    console.print(fit)
    console.print(
        Text(
            "Counted on the loader's own model over each checkpoint's config (the cached one, or "
            "models/configs.py), not measured. `gemma-chat models` adds download sizes.",
            style="dim",
        )
    )
    stored_costs_report(console)
