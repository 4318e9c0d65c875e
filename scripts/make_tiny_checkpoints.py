"""Write the tiny random Gemma 4 checkpoints the tests use (targets of every shape, assistants
with dense and centroid heads, multimodal and mlx-community layouts) into a folder.

    .venv/bin/python scripts/make_tiny_checkpoints.py OUTDIR
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fixtures.tiny_checkpoints import make_all  # noqa: E402

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    for name, path in make_all(Path(sys.argv[1])).items():
        print(f"{name:24s} {path}")
