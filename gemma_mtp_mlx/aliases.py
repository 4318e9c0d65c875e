"""The one table of short model names: alias x precision -> (target repo, assistant repo).

4- and 8-bit targets are the mlx-community conversions (made with mlx-vlm, vision tower
included: it loads on the first picture), bf16 targets Google's originals. The drafters are published
in bf16 only, by mlx-community, and serve every precision of their size. The repo names come
from public references, not from the hub itself: a wrong one is a one-line fix here.
"""

from pathlib import Path
from typing import NamedTuple

from .errors import GemmaChatError

PRECISIONS = ("4bit", "8bit", "bf16")
DEFAULT_PRECISION = "4bit"
# Without --model: the first of these that fits this machine, at the default precision.
DEFAULT_CHOICES = ("e4b", "e2b")


class Alias(NamedTuple):
    description: str
    targets: dict[str, str]  # precision -> target repo
    assistant: str | None  # None: no drafter published for this size


class Checkpoint(NamedTuple):
    """One row of the table: what `--model ALIAS --precision P` downloads."""

    alias: str
    precision: str
    target: str
    assistant: str | None


ALIASES: dict[str, Alias] = {
    "e2b": Alias(
        "Gemma 4 E2B (dense, PLE)",
        {
            "4bit": "mlx-community/gemma-4-e2b-it-4bit",
            "8bit": "mlx-community/gemma-4-e2b-it-8bit",
            "bf16": "google/gemma-4-E2B-it",
        },
        "mlx-community/gemma-4-E2B-it-assistant-bf16",
    ),
    "e4b": Alias(
        "Gemma 4 E4B (dense, PLE)",
        {
            "4bit": "mlx-community/gemma-4-e4b-it-4bit",
            "8bit": "mlx-community/gemma-4-e4b-it-8bit",
            "bf16": "google/gemma-4-E4B-it",
        },
        "mlx-community/gemma-4-E4B-it-assistant-bf16",
    ),
    "26b": Alias(
        "Gemma 4 26B-A4B (mixture of experts)",
        {
            "4bit": "mlx-community/gemma-4-26b-a4b-it-4bit",
            "8bit": "mlx-community/gemma-4-26b-a4b-it-8bit",
            "bf16": "google/gemma-4-26B-A4B-it",
        },
        "mlx-community/gemma-4-26B-A4B-it-assistant-bf16",
    ),
    "31b": Alias(
        "Gemma 4 31B (dense)",
        {
            "4bit": "mlx-community/gemma-4-31b-it-4bit",
            "8bit": "mlx-community/gemma-4-31b-it-8bit",
            "bf16": "google/gemma-4-31B-it",
        },
        "mlx-community/gemma-4-31B-it-assistant-bf16",
    ),
}

# A small Gemma-4-architecture pair trained on Shakespeare, shipped inside the package so that
# gemma-chat runs offline anywhere (scripts/make_demo.py makes it; its drafter is in assistant/).
DEMO = "demo"
DEMO_PATH = Path(__file__).parent / "assets" / "demo"


def checkpoints() -> list[Checkpoint]:
    """Every alias x precision that exists, smallest size first, 4-bit first within a size."""
    return [
        Checkpoint(name, precision, alias.targets[precision], alias.assistant)
        for name, alias in ALIASES.items()
        for precision in PRECISIONS
        if precision in alias.targets
    ]


def checkpoint(alias: str, precision: str) -> Checkpoint:
    """The row for `alias` at `precision`, or one line listing the combinations that exist."""
    alias = alias.lower()
    for row in checkpoints():
        if (row.alias, row.precision) == (alias, precision):
            return row
    known = ", ".join(f"{r.alias} {r.precision}" for r in checkpoints())
    raise GemmaChatError(f"there is no {alias} in {precision}; published: {known}")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise GemmaChatError(f"unknown precision '{precision}': use {', '.join(PRECISIONS)}")
    return precision
