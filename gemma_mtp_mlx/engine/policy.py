"""How many tokens to draft each round, from costs measured on this machine and the acceptance
seen so far; K = 0 ("parked") when drafting cannot beat plain decoding.

With a_i the running probability that draft i is accepted once drafts 1..i-1 were, a round of
K drafts emits E(K) = 1 + sum_{j<=K} prod_{i<=j} a_i tokens and costs
C(K) = verify(K + 1) + K * draft_step. The policy picks the K with the highest E(K) / C(K);
plain decoding is K = 0 at 1 / plain_step, the step of the pipelined plain loop
(engine/plain.py), which hides the host's work that a speculative round has to wait for.

The start-up measurement times the pieces alone; a real round also pays for accepting, rolling
back and reading tokens (measured: 15-20 % more on the demo pair on a CPU). So the policy keeps
learning from the rounds it runs: the ratio of measured to modelled round time scales C(K), and
the measured plain steps replace plain_step (both exponentially decayed).

While parked, a round now and then drafts once more so that a workload that turns predictable
unparks; each probe that does not unpark doubles the wait for the next (PROBE_EVERY rounds up to
MAX_PROBE_INTERVAL), so a drafter that never hits costs next to nothing.
"""

import itertools
import time
from dataclasses import dataclass

import mlx.core as mx

from .plain import PlainSteps
from .sampling import SamplerSettings
from .speculative import KeyStream, Row, drafter_inputs, rows_cache
from .stats import RoundStats

PROBE_EVERY = 16  # a probe that misses costs about one plain step more than it brings
MAX_PROBE_INTERVAL = 128
# Acceptance estimates start optimistic-but-uncertain and follow recent rounds (exponential decay).
PRIOR_ACCEPTED, PRIOR_SEEN, DECAY = 0.6, 2.0, 0.95
# Measured round times follow recent rounds a little more slowly (timings are noisier).
COST_DECAY = 0.9


@dataclass
class CostModel:
    verify_seconds: list[float]  # [T - 1] -> a target forward of T tokens on a warm cache
    draft_step_seconds: float
    plain_step_seconds: float  # one step of pipelined plain decoding

    @property
    def max_draft(self) -> int:
        return len(self.verify_seconds) - 1

    def round_seconds(self, k: int) -> float:
        """Modelled time of a round with K drafts (K = 0: a pipelined plain step)."""
        if k == 0:
            return self.plain_step_seconds
        return self.verify_seconds[k] + k * self.draft_step_seconds


def expected_tokens(k: int, acceptance: list[float]) -> float:
    """E(K): tokens a round of K drafts emits, given acceptance by position."""
    expected, survive = 1.0, 1.0
    for a in acceptance[:k]:
        survive *= a
        expected += survive
    return expected


def _fastest_seconds(run, repeats: int = 3) -> float:
    """The fastest of a few timed runs after a warm-up: other work on the machine only ever
    adds time, so the minimum is the least noisy estimate of the step's own cost. Three are
    enough: the policy corrects its model with the rounds it runs, and a batch's measurement
    (forwards of up to B x 7 tokens) is paid once per batch size before the first answer."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


PLAIN_STEPS = 8  # pipelined plain steps per timed run (the pipeline needs a few to fill)


def measure_costs(rows: list[Row], drafter, max_draft: int) -> CostModel:
    """Time target forwards of 1..max_draft+1 tokens per row over all `rows` at once, their
    drafter steps (all rows together), and a plain step, at the current contexts; every cache
    is rolled back afterwards (no trace is left). The verify blocks hold distinct random
    tokens: on a MoE, repeated tokens would pick the same experts and make verifying look
    cheaper than it is. One row decodes plainly through the pipelined loop (engine/plain.py),
    which is timed as such; a batch's plain step is its one-token verify."""
    target = rows[0].ctx.target
    cache = rows_cache(rows)
    vocab = target.args.vocab_size

    def verify(t: int):
        block = mx.random.randint(0, vocab, (len(rows), t), key=mx.random.key(t))

        def run():
            mx.eval(target(block, cache, return_hidden=True))
            for r in rows:
                for c in r.ctx.cache:
                    c.trim(t)

        return run

    embedding, hidden, kv, position = drafter_inputs(rows, drafter.sliding_window)

    def draft_step():
        y, g = drafter(embedding, hidden, kv, position)
        mx.eval(drafter.candidate_logits(y[:, 0])[1], g)

    seconds = [_fastest_seconds(verify(t)) for t in range(1, max_draft + 2)]
    # A forward over more tokens never costs less: smooth out timing noise that says otherwise.
    seconds = list(itertools.accumulate(seconds, max))
    plain = seconds[0] if len(rows) > 1 else min(_pipelined_plain_step(rows[0]) for _ in range(3))
    return CostModel(seconds, _fastest_seconds(draft_step), plain)


def _pipelined_plain_step(row: Row) -> float:
    """Seconds per step of the pipelined plain loop once it is full (the first step fills it)."""
    ctx, held = row.ctx, len(row.ctx.tokens)
    steps = PlainSteps(ctx, row.token, SamplerSettings(), None, KeyStream(0))
    steps.step()
    start = time.perf_counter()
    for _ in range(PLAIN_STEPS):
        steps.step()
    seconds = (time.perf_counter() - start) / PLAIN_STEPS
    mx.eval(steps.queued)  # let the look-ahead finish before anything else is timed
    steps.close()
    ctx.rewind(len(ctx.tokens) - held)
    return seconds


class DraftPolicy:
    def __init__(self, costs: CostModel):
        self.costs = costs
        self.accepted = [PRIOR_ACCEPTED * PRIOR_SEEN] * costs.max_draft
        self.seen = [PRIOR_SEEN] * costs.max_draft
        self.parked_rounds = 0
        self.probe_interval = PROBE_EVERY
        self.plain_seconds = costs.plain_step_seconds  # measured plain steps, decayed
        self.round_overhead = 1.0  # measured / modelled time of drafting rounds, decayed

    @property
    def acceptance(self) -> list[float]:
        return [a / s for a, s in zip(self.accepted, self.seen)]

    def seconds(self, k: int) -> float:
        """Expected time of a round with K drafts on this machine, as measured so far."""
        if k == 0:
            return self.plain_seconds
        return self.costs.round_seconds(k) * self.round_overhead

    def best(self) -> int:
        acceptance = self.acceptance
        rates = [expected_tokens(k, acceptance) / self.seconds(k) for k in range(self.costs.max_draft + 1)]
        return max(range(len(rates)), key=rates.__getitem__)

    def choose(self, limit: int) -> int:
        """The draft length for the next round, at most `limit`."""
        k = self.best()
        if k == 0:
            self.parked_rounds += 1
            if self.parked_rounds >= self.probe_interval:
                k, self.parked_rounds = 1, 0
                self.probe_interval = min(2 * self.probe_interval, MAX_PROBE_INTERVAL)
        else:
            self.parked_rounds, self.probe_interval = 0, PROBE_EVERY
        return min(k, limit)

    def observe(self, r: RoundStats) -> None:
        """Learn from a finished round: its time, and for a drafting round the acceptance."""
        if r.drafted == 0:
            self.plain_seconds = self.plain_seconds * COST_DECAY + r.seconds * (1 - COST_DECAY)
            return
        ratio = r.seconds / self.costs.round_seconds(r.drafted)
        self.round_overhead = self.round_overhead * COST_DECAY + ratio * (1 - COST_DECAY)
        # Draft i was tried iff drafts 1..i-1 were accepted, so each tried position is one
        # Bernoulli observation of a_i.
        for i in range(r.drafted):
            self.accepted[i] = self.accepted[i] * DECAY + (1.0 if i < r.accepted else 0.0)
            self.seen[i] = self.seen[i] * DECAY + 1.0
            if i >= r.accepted:
                break

    @property
    def parked(self) -> bool:
        return self.best() == 0
