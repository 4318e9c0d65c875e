"""`gemma-chat models`: the alias table against this machine (catalog.rows), as a table or as
one JSON object per row."""

import json

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .. import memory
from ..catalog import rows


def show(console: Console, *, max_memory: str | None, as_json: bool) -> None:
    limit = memory.parse_size(max_memory) if max_memory else memory.default_limit()
    table_rows = rows(limit)
    if as_json:
        for row in table_rows:
            console.out(json.dumps(row.as_json()), highlight=False)
        return
    room = f"{memory.format_bytes(limit.bytes)} ({limit.why})" if limit else "unknown"
    table = Table(title=f"Gemma 4 for gemma-chat · memory limit {room}", title_justify="left",
                  box=None, padding=(0, 1), pad_edge=False, header_style="bold underline")
    for column in ("alias", "bits", "target repo", "download", "cached", "memory", "fits"):
        table.add_column(column, no_wrap=column != "target repo", overflow="fold")
    for row in table_rows:
        cp = row.checkpoint
        fits = {True: Text("yes", "green"), False: Text("no", "red"), None: Text("?")}[row.fits]
        table.add_row(
            Text(cp.alias + ("*" if row.default else ""), style="bold" if row.default else ""),
            cp.precision,
            cp.target,
            memory.format_bytes(row.bytes),
            "yes" if row.cached else ("target" if row.target_cached else "no"),
            memory.format_bytes(row.estimate.total if row.estimate else None),
            fits,
        )
    if not console.is_terminal:  # a pipe gets whole lines; a terminal folds long repo names
        console = Console(file=console.file, width=120, no_color=console.no_color)
    console.print(table)
    drafters = {r.checkpoint.alias: r.checkpoint.assistant or "none published" for r in table_rows}
    notes = [
        "* what `gemma-chat` uses without --model on this machine",
        "drafters (every precision): " + ", ".join(f"{a} {d}" for a, d in drafters.items()),
        "memory: weights + drafter + KV cache at the model's full context; download: the text "
        "model's files with the drafter (hub metadata online, the cache offline)",
    ]
    for note in notes:
        console.print(Text(note, style="dim"))
