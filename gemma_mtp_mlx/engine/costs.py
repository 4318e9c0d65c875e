"""What decoding costs on this machine, learned from the steps and rounds the engine runs.

Nothing is timed apart: there is no start-up measurement and no throwaway forward. Every figure
is the wall time of real work, as its reader waits for it: from the moment the previous tokens
were out to the moment these were (so it includes the reader's own work between steps, which
plain decoding pays per token and a speculative round per round).

Per number of rows decoded together (B):
- `plain`: a step of the pipelined plain loop in steady state (engine/plain.py). It is the
  baseline behind the speedup meter and what the draft policy must beat.
- `rounds[K]`: a speculative round with K drafts: drafting, verifying K + 1 tokens, accepting,
  committing, and the reader's work.
Draft lengths not run yet are interpolated between those run, or extrapolated along the slope
of the nearest two; with one run so far, a modest slope (a draft step and one more verified
token: memory-bound on a Mac, a fraction of a plain step) that is optimistic on purpose: the
policy then tries the longer round and learns what it costs. All are exponentially decayed
averages, so they follow the context as it grows.

Rounds are timed whole. The draft part alone cannot be read reliably: MLX's CPU backend
evaluates a large queued graph before `async_eval` returns, so "drafts done" would include the
verify pass queued behind them.
"""

import weakref
from dataclasses import dataclass, field

from .policy import DraftPolicy

DECAY = 0.8  # weight of the past in each running average
# Before any drafting round has run, a round of K drafts is taken to cost a plain step and a
# fifth (the verify pass and accepting, which the pipelined plain step hides), plus a quarter
# of a plain step per draft (a drafter step and one more verified token).
PRIOR_ROUND, PRIOR_PER_DRAFT = 1.2, 0.25


def _average(old: float | None, new: float) -> float:
    return new if old is None else old * DECAY + new * (1 - DECAY)


@dataclass
class RowCosts:
    plain: float | None = None
    rounds: dict[int, float] = field(default_factory=dict)
    measured_at: float | None = None  # clock reading of the latest plain step
    measured_context: int = 0  # context length then

    def observe_plain(self, seconds: float, at: float, context: int) -> None:
        self.plain = _average(self.plain, seconds)
        self.measured_at, self.measured_context = at, context

    def observe_round(self, k: int, seconds: float) -> None:
        self.rounds[k] = _average(self.rounds.get(k), seconds)

    def round_seconds(self, k: int) -> float:
        """Expected wall time of a round with K drafts (K = 0: a plain step). Needs `plain`."""
        if k == 0:
            return self.plain
        if k in self.rounds:
            return self.rounds[k]
        known = sorted(self.rounds)
        if not known:
            return self.plain * (PRIOR_ROUND + PRIOR_PER_DRAFT * k)
        below = [j for j in known if j < k]
        above = [j for j in known if j > k]
        if below and above:
            lo, hi = below[-1], above[0]
            return self.rounds[lo] + (self.rounds[hi] - self.rounds[lo]) * (k - lo) / (hi - lo)
        near = below[-2:] if below else above[:2]
        slope = self.plain * PRIOR_PER_DRAFT
        if len(near) == 2:
            slope = max(0.0, (self.rounds[near[1]] - self.rounds[near[0]]) / (near[1] - near[0]))
        j = near[-1] if below else near[0]
        # A round with drafts costs at least a plain step (its verify is a forward of 2+ tokens);
        # extrapolating down a steep, noisy slope could otherwise reach zero.
        return max(self.plain, self.rounds[j] + slope * (k - j))


class Measurements:
    """Costs by number of rows and the draft policy (its acceptance estimates) for one
    (target, drafter) pair, kept for as long as both live, so that every answer of a chat,
    every batch and every request to the server starts from what earlier ones learned."""

    def __init__(self):
        self.by_rows: dict[int, RowCosts] = {}
        self.policy = DraftPolicy()

    def rows(self, b: int) -> RowCosts:
        return self.by_rows.setdefault(b, RowCosts())


_KEPT: dict[tuple[int, int], Measurements] = {}


def measurements_for(target, drafter) -> Measurements:
    """The one `Measurements` of this pair of model objects (drafter None: plain decoding)."""
    key = (id(target), id(drafter))
    if key not in _KEPT:
        _KEPT[key] = Measurements()
        for model in (target, drafter):
            if model is not None:
                weakref.finalize(model, _KEPT.pop, key, None)
    return _KEPT[key]
