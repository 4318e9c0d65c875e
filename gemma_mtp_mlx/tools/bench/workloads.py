"""The pair bench's four workload classes: prose, code, structured output, and a prompt longer
than the sliding window (so decoding runs past it)."""

import random
from dataclasses import dataclass

from ...engine.generate import encode_prompt


@dataclass
class Workload:
    name: str
    description: str
    prompt: list[int]


PROSE = (
    "Tell me the tale of the old king who lost his crown in a single night of storm, of the "
    "daughter who sailed after him, and of what the sea gave back to them both."
)
CODE = (
    "Complete this Python module so that it reads a CSV file and returns its rows as "
    "dictionaries, skipping blank lines.\n\n```python\nimport csv\n\n\ndef read_rows(path):\n"
)
_STRUCTURED = (
    "Return a JSON list of six books, each an object with the keys title, author, year and "
    'genre, like this:\n[\n  {"title": "The Tempest", "author": "William Shakespeare", '
    '"year": 1611, "genre": "comedy"},\n'
)
_NAMES = ["ariel", "prospero", "miranda", "caliban", "ferdinand", "gonzalo", "antonio", "sebastian"]
_EVENTS = ["opened", "closed", "renamed", "moved", "archived", "restored", "shared", "locked"]


def _long_context_body(tokenizer, tokens: int) -> str:
    """A varied, deterministic log of at least `tokens` tokens: no passage repeats, so the
    drafter cannot simply copy from the prompt."""
    rng = random.Random(0)
    lines, count, i = [], 0, 0
    while count < tokens:
        line = (
            f"{9 + i // 60:02d}:{i % 60:02d} {rng.choice(_NAMES)} {rng.choice(_EVENTS)} "
            f"file-{rng.randint(100, 999)} ({rng.randint(1, 64)} kB)"
        )
        lines.append(line)
        count += len(tokenizer.encode(line + "\n", add_special_tokens=False))
        i += 1
    return "\n".join(lines)


def workloads(pair, max_tokens: int) -> list[Workload]:
    """Prose, code, structured output and a prompt that runs past the sliding window."""
    args = pair.target.args
    room = args.max_position_embeddings - max_tokens - 64
    long_tokens = max(64, min(int(args.sliding_window * 1.5), room))
    long_text = (
        "Here is today's activity log. Summarize who did what, in order.\n\n"
        + _long_context_body(pair.tokenizer, long_tokens)
    )

    def encode(text):
        raw = pair.tokenizer.chat_template is None
        return encode_prompt(pair.tokenizer, text, raw=raw)

    window = args.sliding_window
    return [
        Workload("prose", "a story request", encode(PROSE)),
        Workload("code", "complete a Python function", encode(CODE)),
        Workload("structured", "a JSON list", encode(_STRUCTURED)),
        Workload("long", f"a log past the {window}-token sliding window", encode(long_text)),
    ]
