"""Plain decoding (no drafter), pipelined: the forward for token n+1 is queued before the host
reads token n, so building the next graph overlaps the current computation (as mlx-lm's
`async_eval` loop does). The queued step has already put the newest token into the cache and
into `Context.tokens` (they always agree); `close()` takes that look-ahead back out, leaving the
usual state: everything but the newest token cached.
"""

import time

import mlx.core as mx

from .context import Context
from .sampling import SamplerSettings, probabilities, sample
from .speculative import KeyStream, RoundResult
from .stats import RoundStats


class PlainSteps:
    def __init__(self, ctx: Context, token: mx.array, settings: SamplerSettings, bias, keys: KeyStream):
        self.ctx, self.settings, self.bias, self.keys = ctx, settings, bias, keys
        self.queued = self._feed(token)
        ctx.tokens.append(token.item())
        self.last = time.perf_counter()
        self.open = True

    def _feed(self, token: mx.array) -> mx.array:
        """Put `token` (possibly not computed yet) into the cache and queue the computation of
        the token after it."""
        logits = self.ctx.target(token, self.ctx.cache, last_only=True)[0, -1]
        if self.bias is not None:
            logits = logits + self.bias
        if self.settings.greedy:
            nxt = mx.argmax(logits)
        else:
            nxt = sample(probabilities(logits, self.settings), self.keys())
        nxt = nxt.reshape(1, 1)
        mx.async_eval(nxt)
        return nxt

    def step(self) -> RoundResult:
        token = self.queued
        self.queued = self._feed(token)  # queued before the host waits for `token`
        token_id = token.item()
        self.ctx.tokens.append(token_id)
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return RoundResult([token_id], token, None, RoundStats(0, 0, 1, 0.0, seconds, seconds))

    def close(self) -> None:
        if self.open:
            self.open = False
            for c in self.ctx.cache:
                c.trim(1)
            self.ctx.tokens.pop()
