"""Where a run happened: the machine, the software, and how busy it was."""

import os
import platform
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlx.core as mx

from ... import __version__
from ...blas import openblas_threads


def machine() -> dict:
    preload = os.environ.get("LD_PRELOAD", "")
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory,
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": _version("mlx-lm"),
        "mlx_vlm": _version("mlx-vlm"),
        "gemma_chat": __version__,
        "commit": _git_commit(),
        "device": str(mx.default_device()),
        "openblas_preload": "openblas" in preload.lower(),
        "ld_preload": preload or None,
        "openblas_threads": openblas_threads(),  # as set: gemma-chat leaves the host a core
        "load_average": load_average(),  # at the end of the run; other work skews timings
    }


def load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def busy_note() -> str | None:
    """A warning when other work already loads the machine before a run starts."""
    load, cores = load_average(), os.cpu_count() or 1
    if load is not None and load >= cores / 2:
        return (
            f"the machine was busy before the run (load average {load:.1f} on {cores} cores): "
            "other work skews these timings"
        )
    return None


def preload_note() -> str | None:
    """On Linux, MLX's bundled CPU BLAS is ~5 GFLOP/s: say so when OpenBLAS is not preloaded."""
    if sys.platform == "linux" and "openblas" not in os.environ.get("LD_PRELOAD", "").lower():
        return (
            "no OpenBLAS preload: MLX's bundled CPU BLAS is slow; run under "
            "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 (make bench does)"
        )
    return None


def _git_commit() -> str | None:
    """The checkout's commit, when gemma-chat runs from a git working tree."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def _cpu_name() -> str:
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except OSError:
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None
