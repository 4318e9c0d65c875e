"""Linux: run MLX's CPU matmuls on Debian's OpenBLAS instead of the reference BLAS bundled
in the `mlx[cpu]` wheel (about 10x slower: prefill 114-130 tok/s against 1,314-1,384, a
100-turn scripted chat 600 s against 79 s on the demo pair).

The BLAS is chosen when the dynamic linker loads MLX, so it takes LD_PRELOAD at process start:
`gemma-chat` re-executes itself once with the library preloaded, before importing MLX. A
marker variable stops a second re-exec whatever happens; macOS (Accelerate, Metal) is never
touched.

OpenBLAS then runs on every core but one (`leave_a_core_to_the_host`). Decoding keeps two
threads busy, MLX's evaluation (which calls the BLAS) and the host's Python building the next
step meanwhile, as a Mac's CPU does beside its GPU. With a BLAS thread on every core, the
worker woken by a matmul of several rows (a verify pass, a prefill chunk) spins on after it,
taking the host's core. Measured on the 2-core test VM with the demo pair: plain steps taken
right after drafting ran 8-27 % slower (per run, over their first 24 steps) than plain steps
further on, which made the plain step measured between drafting rounds (the speedup meter's
baseline) read slow; with one thread, 0.96-1.03. Plain decoding itself ran 184-235 tok/s
with one thread against 139-207 with two; prefill lost about 10 % (2,300 against 2,600 tok/s).
`OPENBLAS_NUM_THREADS` or `OMP_NUM_THREADS`, when set, are left as they are.
"""

import ctypes
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


def host_core_threads(env: dict, cores: int) -> int | None:
    """BLAS threads that leave one core to the host, or None to leave OpenBLAS as configured:
    the user chose (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS) or there is no core to spare."""
    if "OPENBLAS_NUM_THREADS" in env or "OMP_NUM_THREADS" in env or cores < 2:
        return None
    return cores - 1


def usable_cores() -> int:
    """Cores this process may run on (a container's CPU set, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _loaded_openblas():
    """The process's OpenBLAS, when one is mapped in with its public symbols (None otherwise:
    macOS, the bundled reference BLAS)."""
    try:
        library = ctypes.CDLL(None)
    except OSError:
        return None
    return library if hasattr(library, "openblas_set_num_threads") else None


def leave_a_core_to_the_host() -> None:
    """Run OpenBLAS, if this process has it, on every core but one (see the module's note)."""
    threads = host_core_threads(dict(os.environ), usable_cores())
    library = _loaded_openblas()
    if threads is not None and library is not None:
        library.openblas_set_num_threads(threads)


def openblas_threads() -> int | None:
    """How many threads this process's OpenBLAS runs on (None: no OpenBLAS)."""
    library = _loaded_openblas()
    return None if library is None else library.openblas_get_num_threads()
