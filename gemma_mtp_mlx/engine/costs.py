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

The plain step is only measured now and then (while drafting, plain steps are extra work), so it
carries the round costs seen just after it: the same machine doing the same work at the same
cost per round does plain steps at the same cost too. Per K, the median of the first SETTLE
rounds after the plain step (a median: one of them may carry a stall) is what it goes with.
Between measurements the plain step moves with the rounds (`current_plain`: the measured step
times the rounds' cost now over then), so that the meter and the policy follow a machine that
speeds up or slows down by a few percent; once the rounds since then (a decayed average of
those alone) cost DRIFT more or less (the machine got busier or cooler, the context grew),
the plain step is stale and the decoder measures it again. A measurement is a few steps, and a
stall among them would otherwise stand for as long as the rounds hold still: once the rounds
after it settle, it is held to the one before, moved as the rounds' medians moved between the
two, and taken once more at the next check if it lands DRIFT away.

Rounds are timed whole. The draft part alone cannot be read reliably: MLX's CPU backend
evaluates a large queued graph before `async_eval` returns, so "drafts done" would include the
verify pass queued behind them.
"""

import weakref
from dataclasses import dataclass, field
from statistics import median

from .policy import DraftPolicy

DECAY = 0.8  # weight of the past in each running average
# Before any drafting round has run, a round of K drafts is taken to cost a plain step and a
# fifth (the verify pass and accepting, which the pipelined plain step hides), plus a quarter
# of a plain step per draft (a drafter step and one more verified token).
PRIOR_ROUND, PRIOR_PER_DRAFT = 1.2, 0.25
# How far round costs may move from those seen just after the latest plain step before that
# plain step is taken to be out of date (the meter is held to within 10 % of plain decoding).
DRIFT = 0.1
SETTLE = 8  # rounds of a K after a plain step that set what it is held to


def _average(old: float | None, new: float) -> float:
    return new if old is None else old * DECAY + new * (1 - DECAY)


@dataclass
class RowCosts:
    plain: float | None = None
    rounds: dict[int, float] = field(default_factory=dict)
    # Since the latest plain step, per K: its first SETTLE round times, their median once all
    # are in, and a decayed average.
    first_since_plain: dict[int, list[float]] = field(default_factory=dict)
    settled: dict[int, float] = field(default_factory=dict)
    since_plain: dict[int, float] = field(default_factory=dict)
    # The latest measurement was taken in an answer's first rounds, which run slower than the
    # rest (the pair's very first has to be: the policy needs a plain step), or it landed far
    # from what was expected of it: measure again.
    provisional: bool = False
    restart: bool = False  # the next plain step starts a new measurement
    # The trusted plain step before the latest measurement and the medians of the rounds that
    # went with it, until the new measurement is checked against them (None: nothing to check).
    reference: tuple[float, dict[int, float]] | None = None

    def start_measurement(self, provisional: bool) -> None:
        """The next plain steps measure `plain` anew: a stale figure is not averaged in."""
        trusted = self.plain is not None and bool(self.settled)
        trusted = trusted and not (provisional or self.provisional)
        self.reference = (self.plain, dict(self.settled)) if trusted else None
        self.restart, self.provisional = True, provisional

    def observe_plain(self, seconds: float) -> None:
        self.plain = seconds if self.restart else _average(self.plain, seconds)
        self.restart = False
        self.first_since_plain, self.settled, self.since_plain = {}, {}, {}

    def observe_round(self, k: int, seconds: float) -> None:
        self.rounds[k] = _average(self.rounds.get(k), seconds)
        self.since_plain[k] = _average(self.since_plain.get(k), seconds)
        first = self.first_since_plain.setdefault(k, [])
        if len(first) < SETTLE:
            first.append(seconds)
            if len(first) == SETTLE:
                self.settled[k] = median(first)
                self._check_measurement(k)

    def _check_measurement(self, k: int) -> None:
        """Once rounds of a K seen after both measurements have settled: did the plain step move
        as they did? If not, by more than DRIFT, it is measured again (once: the second stands)."""
        if self.reference is None or k not in self.reference[1]:
            return
        plain_then, settled_then = self.reference
        expected = plain_then * self.settled[k] / settled_then[k]
        self.provisional = abs(self.plain / expected - 1) > DRIFT
        self.reference = None

    def _drifts(self) -> list[float]:
        """Per K settled since the latest plain step: what its rounds cost now over then."""
        return [self.since_plain[k] / then for k, then in self.settled.items()]

    @property
    def stale(self) -> bool:
        """No plain step measured yet, only a provisional one, or rounds no longer cost what they
        did just after it."""
        if self.plain is None or self.provisional:
            return True
        return any(abs(d - 1) > DRIFT for d in self._drifts())

    @property
    def current_plain(self) -> float | None:
        """The measured plain step, moved as the rounds' costs have moved since (None: not
        measured yet). What the meter shows and the policy weighs drafting against."""
        if self.plain is None:
            return None
        drifts = self._drifts()
        return self.plain * median(drifts) if drifts else self.plain

    def round_seconds(self, k: int) -> float:
        """Expected wall time of a round with K drafts (K = 0: a plain step). Needs `plain`."""
        if k in self.rounds:  # the common case: no plain step to work out (the policy asks per K)
            return self.rounds[k]
        plain = self.current_plain
        if k == 0:
            return plain
        known = sorted(self.rounds)
        if not known:
            return plain * (PRIOR_ROUND + PRIOR_PER_DRAFT * k)
        below = [j for j in known if j < k]
        above = [j for j in known if j > k]
        if below and above:
            lo, hi = below[-1], above[0]
            return self.rounds[lo] + (self.rounds[hi] - self.rounds[lo]) * (k - lo) / (hi - lo)
        near = below[-2:] if below else above[:2]
        slope = plain * PRIOR_PER_DRAFT
        if len(near) == 2:
            slope = max(0.0, (self.rounds[near[1]] - self.rounds[near[0]]) / (near[1] - near[0]))
        j = near[-1] if below else near[0]
        # A round with drafts costs at least a plain step (its verify is a forward of 2+ tokens);
        # extrapolating down a steep, noisy slope could otherwise reach zero.
        return max(plain, self.rounds[j] + slope * (k - j))


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
