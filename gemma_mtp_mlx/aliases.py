"""The one table of short model names: alias -> (target repo, assistant repo)."""

from pathlib import Path
from typing import NamedTuple


class Alias(NamedTuple):
    target: str
    assistant: str
    description: str


ALIASES: dict[str, Alias] = {
    "e2b": Alias(
        "google/gemma-4-E2B-it", "google/gemma-4-E2B-it-assistant", "Gemma 4 E2B (dense, PLE)"
    ),
    "e4b": Alias(
        "google/gemma-4-E4B-it", "google/gemma-4-E4B-it-assistant", "Gemma 4 E4B (dense, PLE)"
    ),
    "26b": Alias(
        "google/gemma-4-26B-A4B-it",
        "google/gemma-4-26B-A4B-it-assistant",
        "Gemma 4 26B-A4B (mixture of experts)",
    ),
    "31b": Alias(
        "google/gemma-4-31B-it", "google/gemma-4-31B-it-assistant", "Gemma 4 31B (dense)"
    ),
}

DEFAULT_MODEL = "e4b"

# A small Gemma-4-architecture pair trained on Shakespeare, shipped inside the package so that
# gemma-chat runs offline anywhere (scripts/make_demo.py makes it; its drafter is in assistant/).
DEMO = "demo"
DEMO_PATH = Path(__file__).parent / "assets" / "demo"
