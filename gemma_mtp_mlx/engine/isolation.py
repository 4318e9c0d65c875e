"""One answer's failure stays its own. A round is shared by every row of the batch, so a fault
in one row's work (its sampler, its numbers) raises out of the round for all of them. Then every
row goes back to where it stood before the round, each steps alone, and the rows whose own step
fails leave with an error while the others go on together.

`mark` notes each running row before a round: the tokens its cache holds (a plain look-ahead
or a round in flight not counted), its newest token and the hidden state behind it, its counters. `step_each_alone`
rewinds each row to its mark (the failed round wrote at most a round's drafts and a look-ahead,
which the caches' rollback room takes back, models/rollback.py) and runs one step per row. A
row that steps alone emits what it would have in the batch: greedy rows do not depend on their
neighbours, and a sampled row draws from its own key stream (moved on by the failed round's
draws, so still distributed exactly as the target).
"""

from dataclasses import dataclass

import mlx.core as mx

from .decode import Decoder, Emitted, Stream, clock


@dataclass
class Mark:
    stream: Stream
    length: int  # tokens its cache held, the plain look-ahead taken out
    token: mx.array
    hidden: mx.array
    emitted: int
    last_out: float
    rounds_to_baseline: int
    stats: dict  # its GenerationStats' fields (a plain copy: this runs before every round)


def mark(decoder: Decoder) -> list[Mark]:
    ahead = set() if decoder.plain is None else {id(r) for r in decoder.plain.rows}
    marks = []
    for s in decoder.streams:
        row = s.row
        stats = vars(s.stats).copy()
        for name in ("accepted_by_position", "drafted_by_position"):  # grown in place
            stats[name] = list(stats[name])
        length = len(row.ctx.tokens) - (id(row) in ahead)
        marks.append(
            Mark(s, length, row.token, row.hidden, s.emitted, s.last_out, s.rounds_to_baseline, stats)
        )
    return marks


def rewind(m: Mark) -> bool:
    """Put the row back as `m` found it; False when its caches cannot go back that far."""
    ctx = m.stream.row.ctx
    back = [c.offset - m.length for c in ctx.cache]
    if any(n < 0 or n > c.max_rollback() for n, c in zip(back, ctx.cache)):
        return False
    for n, c in zip(back, ctx.cache):
        c.trim(n)
    del ctx.tokens[m.length :]
    s = m.stream
    s.row.token, s.row.hidden = m.token, m.hidden
    s.emitted, s.last_out, s.rounds_to_baseline = m.emitted, m.last_out, m.rounds_to_baseline
    vars(s.stats).update(m.stats)
    s.finish_reason = None
    return True


def step_each_alone(decoder: Decoder, marks: list[Mark]) -> tuple[list[Emitted], list[Stream]]:
    """After a round that raised: every row back to its mark, then one step for each row on its
    own. Returns what the rows gave and the rows that failed (out of the decoder); the rows
    still running are the decoder's again, for the next round together."""
    decoder.plain = decoder.rounds = None  # whatever the failed round queued is gone with it
    out, failed, running = [], [], []
    for m in marks:
        if not rewind(m):
            failed.append(m.stream)
            continue
        decoder.streams = [m.stream]
        decoder.last_end = clock()
        try:
            out += decoder.step()
            decoder.close()  # the look-ahead out: the next row steps alone from a clean state
        except Exception:
            decoder.plain = decoder.rounds = None
            failed.append(m.stream)
            continue
        if m.stream.finish_reason is None:
            running.append(m.stream)
    decoder.streams = running
    return out, failed
