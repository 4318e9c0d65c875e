"""Plain decoding (no drafts) of one or more rows, pipelined: the forward for token n+1 is
queued before the host reads token n, so building the next graph overlaps the current
computation (as mlx-lm's `async_eval` loop does). The queued step has already put the newest
token into the cache and into `Context.tokens` (they always agree).

Ways out: `close()` takes that look-ahead back out, leaving the usual `Row` state (everything
but the newest token cached; `token` and `hidden` are that token and the state that produced
it); `drop(row)` does so for one row that finished, while the others go on; `hand_over()`
instead waits for the queued tokens and leaves them as the rows' newest tokens, so switching
from plain to drafting (the policy unparking) wastes no forward.
"""

import mlx.core as mx

from .speculative import Row


class PlainSteps:
    def __init__(self, rows: list[Row], steps):
        """`steps` runs the device work, eager or compiled (engine/steps.py)."""
        self.rows = list(rows)
        self.steps = steps
        self.queued, self.queued_hidden = self._feed([r.token for r in self.rows])
        for r in self.rows:
            r.ctx.tokens.append(r.token.item())

    def _feed(self, tokens: list[mx.array]) -> tuple[list[mx.array], mx.array]:
        """Put each row's `token` (possibly not computed yet) into its cache and queue the
        computation of the token after it."""
        block = mx.concatenate([t.reshape(1, 1) for t in tokens]) if len(tokens) > 1 else tokens[0]
        nxt, hidden = self.steps.plain(self.rows, block.reshape(-1, 1))
        mx.async_eval(nxt, hidden)
        return nxt, hidden

    def step(self) -> list[int]:
        """Each row's next token; the forward after it is queued before the host waits."""
        tokens, hidden = self.queued, self.queued_hidden
        self.queued, self.queued_hidden = self._feed(tokens)
        ids = [t.item() for t in tokens]
        for b, (r, t) in enumerate(zip(self.rows, ids)):
            r.ctx.tokens.append(t)
            r.token, r.hidden = tokens[b], hidden[b : b + 1]
        return ids

    def hand_over(self) -> list[int]:
        """The queued tokens as one more plain step, leaving the state a speculative round
        starts from: everything before them cached, and the hidden states that produced them."""
        ids = [t.item() for t in self.queued]
        for b, r in enumerate(self.rows):
            r.token, r.hidden = self.queued[b], self.queued_hidden[b : b + 1]
        self.rows = []
        return ids

    def drop(self, row: Row) -> None:
        """`row` leaves: its look-ahead is taken out (the queued forward still computes its next
        token, which nobody reads)."""
        b = self.rows.index(row)
        _take_back(row)
        del self.rows[b], self.queued[b]
        self.queued_hidden = mx.concatenate(
            [self.queued_hidden[:b], self.queued_hidden[b + 1 :]]
        )

    def close(self) -> None:
        for r in self.rows:
            _take_back(r)
        self.rows = []


def _take_back(row: Row) -> None:
    for c in row.ctx.cache:
        c.trim(1)
    row.ctx.tokens.pop()
