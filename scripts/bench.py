"""`make bench`: `gemma-chat bench` without the installed entry point (the same options).

    LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 .venv/bin/python scripts/bench.py \\
        [--model demo | --shape e2b --acceptance 0.6,0.8] [--quick] [--json] [--plot DIR]

The code is in gemma_mtp_mlx/tools/bench/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma_mtp_mlx.cli import app  # noqa: E402

if __name__ == "__main__":
    app(["bench", *sys.argv[1:]], prog_name="scripts/bench.py")
