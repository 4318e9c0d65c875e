"""`make bench`: the full benchmark (`gemma-chat bench`) without going through the CLI.

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 .venv/bin/python scripts/bench.py \\
        [--model demo] [--quick] [--json] [--png DIR]

Same options as `gemma-chat bench --help`; the code is in gemma_mtp_mlx/bench.py.
"""

import sys
from pathlib import Path

import typer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma_mtp_mlx.bench import command  # noqa: E402

if __name__ == "__main__":
    typer.run(command)
