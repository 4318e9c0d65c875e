"""Linux: run MLX's CPU matmuls on Debian's OpenBLAS instead of the reference BLAS bundled
in the `mlx[cpu]` wheel (about 10x slower: prefill 114-130 tok/s against 1,314-1,384, a
100-turn scripted chat 600 s against 79 s on the demo pair).

The BLAS is chosen when the dynamic linker loads MLX, so it takes LD_PRELOAD at process start:
`gemma-chat` re-executes itself once with the library preloaded, before importing MLX. A
marker variable stops a second re-exec whatever happens; macOS (Accelerate, Metal) is never
touched.
"""

import os
import sys
from pathlib import Path

# Debian/Ubuntu's libopenblas0-pthread, x86_64 and aarch64.
OPENBLAS_PATHS = (
    Path("/usr/lib/x86_64-linux-gnu/libopenblas.so.0"),
    Path("/usr/lib/aarch64-linux-gnu/libopenblas.so.0"),
)
MARKER = "GEMMA_CHAT_BLAS_REEXEC"
HINT = (
    "MLX runs on its slow reference BLAS here; `sudo apt-get install libopenblas0-pthread` "
    "makes gemma-chat about 10x faster on this CPU (it then uses OpenBLAS by itself)"
)


def openblas_library(paths=None) -> Path | None:
    return next((p for p in (paths or OPENBLAS_PATHS) if p.is_file()), None)


def reexec_plan(
    env: dict, platform: str, argv: list[str], executable: str, paths=None
) -> tuple[list[str], dict] | None:
    """(argv, env) to re-execute with OpenBLAS preloaded, or None to go on as we are: not
    Linux, no OpenBLAS installed, already preloaded, or this process is the re-exec."""
    if not platform.startswith("linux") or env.get(MARKER):
        return None
    library = openblas_library(paths)
    if library is None:
        return None
    preloaded = env.get("LD_PRELOAD", "")
    if str(library) in preloaded.split(":"):
        return None
    new_env = dict(env)
    new_env["LD_PRELOAD"] = ":".join(filter(None, [str(library), preloaded]))
    new_env[MARKER] = "1"
    return [executable, *argv[1:]], new_env


def reexec_with_openblas() -> None:
    """Replace this process by itself with OpenBLAS preloaded, when that applies."""
    plan = reexec_plan(dict(os.environ), sys.platform, sys.orig_argv, sys.executable)
    if plan is None:
        return
    argv, env = plan
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, argv, env)
    except OSError:
        return  # cannot re-exec (odd sandbox): run on the bundled BLAS


def openblas_loaded() -> bool:
    """Whether OpenBLAS is mapped into this process (Linux; False elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return "libopenblas" in maps


def needs_hint(platform: str = sys.platform) -> bool:
    """Linux without OpenBLAS installed: say once how to get it."""
    return platform.startswith("linux") and openblas_library() is None
