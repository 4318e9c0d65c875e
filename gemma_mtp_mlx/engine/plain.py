"""Plain decoding (no drafts), pipelined: the forward for token n+1 is queued before the host
reads token n, so building the next graph overlaps the current computation (as mlx-lm's
`async_eval` loop does). The queued step has already put the newest token into the cache and
into `Context.tokens` (they always agree).

Two ways out: `close()` takes that look-ahead back out, leaving the usual state (everything but
the newest token cached); `hand_over()` instead waits for the queued token and returns it as a
finished step with the hidden state a speculative round starts from, so switching from plain to
drafting (the policy unparking) wastes no forward.
"""

import time

import mlx.core as mx

from .context import Context
from .sampling import SamplerSettings, probabilities, sample
from .speculative import KeyStream, RoundResult
from .stats import RoundStats


class PlainSteps:
    def __init__(
        self, ctx: Context, token: mx.array, settings: SamplerSettings, bias, keys: KeyStream
    ):
        self.ctx, self.settings, self.bias, self.keys = ctx, settings, bias, keys
        self.queued, self.queued_hidden = self._feed(token)
        ctx.tokens.append(token.item())
        self.last = time.perf_counter()
        self.open = True

    def _feed(self, token: mx.array) -> tuple[mx.array, mx.array]:
        """Put `token` (possibly not computed yet) into the cache and queue the computation of
        the token after it."""
        logits, hidden = self.ctx.target(token, self.ctx.cache, return_hidden=True, last_only=True)
        logits = logits[0, -1]
        if self.bias is not None:
            logits = logits + self.bias
        if self.settings.greedy:
            nxt = mx.argmax(logits)
        else:
            nxt = sample(probabilities(logits, self.settings), self.keys())
        nxt = nxt.reshape(1, 1)
        mx.async_eval(nxt, hidden)
        return nxt, hidden

    def _finish(self, token: mx.array, hidden: mx.array) -> RoundResult:
        token_id = token.item()
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return RoundResult([token_id], token, hidden, RoundStats(0, 0, 1, 0.0, seconds, seconds))

    def step(self) -> RoundResult:
        """The next token; its own forward is queued before the host waits for it."""
        token, hidden = self.queued, self.queued_hidden
        self.queued, self.queued_hidden = self._feed(token)
        self.ctx.tokens.append(token.item())
        return self._finish(token, hidden)

    def hand_over(self) -> RoundResult:
        """The queued token as one more plain step, leaving the state a speculative round
        starts from: everything before it cached, and the hidden state that produced it."""
        self.open = False
        return self._finish(self.queued, self.queued_hidden)

    def close(self) -> None:
        if self.open:
            self.open = False
            for c in self.ctx.cache:
                c.trim(1)
            self.ctx.tokens.pop()
