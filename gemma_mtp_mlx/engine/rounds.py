"""Speculative rounds with the next one always queued before the current one is read (compiled
steps, engine/steps.py).

Read in the plain way, a round has to wait for the host: the next one drafts from the token the
verify picked, at the position the accepted count gives, so the host reads the count, then
builds the next graph while the device idles. Here the next round starts from the device's own
outputs instead, all arrays: the verify's token, the hidden state at the accepted count, the
offsets moved by it. It is queued first; then the host reads the current round, commits it
and emits it while the device already runs the next (DESIGN §2.6).

The host's view of a row follows one round behind: reading a round appends its tokens to the
row's context and moves `token`/`hidden` on, and the caches' offsets become the committed
length plus the round in flight, which wrote its K + 1 positions right after it. A rejected
draft's position is written over by the next round, exactly as a rollback would have left it.

Ways out, as for the plain pipeline (engine/plain.py): `finish()` reads the round in flight and
queues none (the decoder switches to plain steps); `close()` takes the round in flight back out
instead, leaving every cache holding exactly what was read; `drop(row)` does so for one row.
Queueing ahead needs the sliding rings to roll back the round in flight on top of the rejected
drafts before it (`fits`); a longer draft than that reads each round before the next.
"""

from dataclasses import dataclass

import mlx.core as mx

from ..models.cache import SlidingWindowCache
from .round_timing import RoundTiming
from .speculative import RoundOutputs, RoundResult, Row


@dataclass
class InFlight:
    k: int
    rows: list[Row]
    out: RoundOutputs
    next_start: tuple  # the next round's tokens [B, 1], hidden states [B, 1, H], offsets [B]
    whole: bool = True  # False once a row left it: it still computes that row, so its time is
    # no round of the rows it now holds


class RoundPipeline:
    def __init__(self, rows: list[Row], steps, k: int):
        """Queue a round of `k` drafts for `rows` (compiled `steps`)."""
        self.rows = list(rows)
        self.steps = steps
        self.timing = RoundTiming()  # which round each step's interval holds
        tokens = mx.concatenate([r.token.reshape(1, 1) for r in self.rows])
        hidden = mx.concatenate([r.hidden for r in self.rows])
        offsets = mx.array([len(r.ctx.tokens) for r in self.rows], dtype=mx.int32)
        self.inflight: InFlight | None = self._queue(k, (tokens, hidden, offsets))

    def _queue(self, k: int, start: tuple) -> InFlight:
        out = self.steps.speculate(self.rows, k, start)
        # The caches' offsets bound the round's start from above; moved past its K + 1
        # positions, they bound what it writes, so a round queued behind it, before it is read,
        # grows the full-attention buffers to hold its own writes. The rings count them written
        # now, whatever happens before it is read.
        for r in self.rows:
            for c in r.ctx.cache:
                c.offset += k + 1
                if isinstance(c, SlidingWindowCache):
                    c.written = max(c.written, c.offset)
        accepted = out.accepted
        hidden = mx.take_along_axis(out.hiddens, accepted[:, None, None], axis=1)
        next_start = (out.next_tokens[:, None], hidden, start[2] + accepted + 1)
        mx.async_eval(out.accepted, out.next_tokens, out.drafts, *next_start)
        return InFlight(k, list(self.rows), out, next_start)

    def fits(self, k: int, k_next: int) -> bool:
        """Whether a round of `k_next` drafts may be queued behind one of `k`: taking it back
        out (`close`) rolls back its K + 1 positions on top of the `k` drafts the round before
        may have rejected, within every ring's slack."""
        slack = min(
            (c.slack for r in self.rows for c in r.ctx.cache if isinstance(c, SlidingWindowCache)),
            default=None,
        )
        return slack is None or k + k_next + 1 <= slack - 1

    def step(self, k_next: int) -> tuple[int, list[RoundResult]]:
        """The round in flight read, after queueing the next, of `k_next` drafts (0: none).
        Returns the read round's draft length and each row's result."""
        current, self.inflight = self.inflight, None
        if k_next and self.fits(current.k, k_next):
            self.inflight = self._queue(k_next, current.next_start)
        return current.k, self._read(current)

    def finish(self) -> tuple[int, list[RoundResult]]:
        """The round in flight read; none queued after it."""
        return self.step(0)

    def _read(self, current: InFlight) -> list[RoundResult]:
        out = current.out
        mx.eval(out.accepted, out.next_tokens, out.drafts)
        accepted, nxt, drafts = out.accepted.tolist(), out.next_tokens.tolist(), out.drafts.tolist()
        ahead = self.inflight.k + 1 if self.inflight is not None else 0
        tokens, hidden, _ = current.next_start
        results = []
        for b, (r, n) in enumerate(zip(current.rows, accepted)):
            base = len(r.ctx.tokens)
            r.ctx.tokens += [r.token.item()] + drafts[b][:n]
            r.token, r.hidden = tokens[b : b + 1], hidden[b : b + 1]
            in_flight = ahead if r in self.rows else 0
            _place(r, written=base + current.k + 1, ahead=in_flight)
            results.append(RoundResult(drafts[b][:n] + [nxt[b]], n))
        return results

    def drop(self, row: Row) -> None:
        """`row` leaves: its part of the round in flight is taken back out (the round still
        computes it, and nobody reads it), and no later round includes it."""
        b = self.rows.index(row)
        del self.rows[b]
        if self.inflight is not None:
            _place(row, written=len(row.ctx.tokens) + self.inflight.k + 1, ahead=0)
            if not self.rows:
                self.inflight = None
                return
            keep = mx.array([i for i in range(len(self.rows) + 1) if i != b], dtype=mx.int32)
            tokens, hidden, offsets = self.inflight.next_start
            self.inflight.next_start = (tokens[keep], hidden[keep], offsets[keep])
            self.inflight.rows.remove(row)
            self.inflight.whole = False
            self.inflight.out = RoundOutputs(*(a[keep] for a in self.inflight.out))

    def close(self) -> None:
        """Take the round in flight back out of every row."""
        if self.inflight is not None:
            for r in self.rows:
                _place(r, written=len(r.ctx.tokens) + self.inflight.k + 1, ahead=0)
        self.inflight, self.rows = None, []


def _place(row: Row, *, written: int, ahead: int) -> None:
    """Set the row's caches to hold its committed tokens and `ahead` positions of a round in
    flight after them; sliding rings also learn that positions up to `written` were written."""
    offset = len(row.ctx.tokens) + ahead
    for c in row.ctx.cache:
        c.offset = offset
        if isinstance(c, SlidingWindowCache):
            c.written = max(c.written, written, offset)
