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
of the nearest two (a shorter one never below the line from a plain step to the shortest run);
with one run so far, a modest slope (a draft step and one more verified token: memory-bound on a
Mac, a fraction of a plain step) that is optimistic on purpose: the policy then tries the longer
round and learns what it costs. All are exponentially decayed averages, so they follow the
context as it grows.

The plain step is only measured now and then (while drafting, plain steps are extra work): a
few steps, a burst of a few dozen milliseconds, which on a busy machine lands in a slow or a
fast moment more often than the rounds around it do. What carries over is therefore a ratio,
not a time: per K, a plain step over the median of the first SETTLE rounds of K after it (the
same machine, a moment apart), pooled over the latest POOL measurements by their median; a
ratio far from the pool's is taken once more before it counts, so that one unlucky burst moves
nothing. The plain step now (`current_plain`) is that ratio times what rounds of K cost now,
and a round of K is worth 1 / ratio plain steps: the meter counts an answer's rounds that way
(engine/stats.py), so its baseline follows the machine through the answer. Once the rounds
since the latest plain step (a decayed average of those alone) cost DRIFT more or less than just
after it (the machine got busier or cooler, the context grew), the decoder measures again,
adding to the pool. Only warm rounds are held against the plain step: an answer's first rounds
after its prefill run slower, and taken for the rounds after a measurement they made it look
cheap (at Gemma 4's shapes, baselines 12-14 % high).

What a pair has learned outlives the process (engine/stored_costs.py): a fresh process starts
from the plain step, the pooled ratios, the round costs and what rounds cost just after that plain
step (`settled`), as the last one left them (`carried`). Its warm rounds are held against those,
so the drift rule measures again where this process differs; a carried plain step goes into no
ratio with this process's rounds. A ratio resting on fewer than POOL measurements, or on POOL
that disagree by more than DRIFT, is measured once more by each process that drafts its K, until
it rests on POOL that agree: one process's unlucky moment must not count the rounds of every
process after it. Carried round costs were timed in that process's moment: the lengths this
process runs say how much slower or faster the machine runs now, and those it has not run yet
(and the plain step, through their ratios) move with them.

Rounds are timed whole. The draft part alone cannot be read reliably: MLX's CPU backend
evaluates a large queued graph before `async_eval` returns, so "drafts done" would include the
verify pass queued behind them.
"""

import weakref
from collections import deque
from dataclasses import dataclass, field
from statistics import median

from .policy import DraftPolicy, LossBudget

DECAY = 0.8  # weight of the past in each running average
# Before any drafting round has run, a round of K drafts is taken to cost a plain step and a
# fifth (the verify pass and accepting, which the pipelined plain step hides), plus a quarter
# of a plain step per draft (a drafter step and one more verified token).
PRIOR_ROUND, PRIOR_PER_DRAFT = 1.2, 0.25
# How far round costs may move from those seen just after the latest plain step before that
# plain step is taken to be out of date (the meter is held to within 10 % of plain decoding).
DRIFT = 0.1
SETTLE = 8  # rounds of a K after a plain step that set what it is held to
MEDIAN_STEPS = 5  # a measurement's steps taken by their median (then a decayed average)
POOL = 3  # plain/round ratios kept per K (their median), few enough to follow the context
# With nothing trusted yet, measurements follow one another until two in a row agree within
# DRIFT (a fresh process's first plain steps run slow, for a few steps or for dozens), the
# latest trusted after this many at most.
WARM_UP_MOST = 5


def _average(old: float | None, new: float) -> float:
    return new if old is None else old * DECAY + new * (1 - DECAY)


@dataclass
class RowCosts:
    plain: float | None = None  # the latest measurement: the median of its steps
    plain_count: int = 0  # steps in it so far (0: the next plain step starts a new measurement)
    plain_steps: list[float] = field(default_factory=list)  # its first MEDIAN_STEPS steps
    rounds: dict[int, float] = field(default_factory=dict)
    # Since the latest plain step, per K: its first SETTLE round times, their median once all
    # are in, and a decayed average.
    first_since_plain: dict[int, list[float]] = field(default_factory=dict)
    settled: dict[int, float] = field(default_factory=dict)
    since_plain: dict[int, float] = field(default_factory=dict)
    # Per K, the latest POOL measurements' plain step over the settled rounds after it, and a
    # ratio doubted until measured again.
    ratios: dict[int, deque] = field(default_factory=dict)
    doubted: dict[int, float] = field(default_factory=dict)
    # The latest measurement was taken in an answer's first rounds, which run slower than the
    # rest, or while nothing was trusted yet (`warm_up`), or was doubted: it goes into no ratio,
    # and is measured again (without pooled ratios, nothing goes by it: not `trusted`).
    provisional: bool = False
    warm_up: list[float] = field(default_factory=list)  # measurements while nothing was trusted
    # The plain step and `settled` come from an earlier process (engine/stored_costs.py); this
    # process has not taken a plain step yet.
    carried: bool = False
    # The round costs an earlier process stored, as it stored them. What the lengths this process
    # has run (`ran`) cost now over those is how much slower or faster the machine runs now
    # (`pace`, their median), and a length not run yet is taken to have moved with them: held at
    # what it cost in another process's moment, it would look cheap next to lengths timed in a
    # slow one, and the policy would leave the best length for it (and trace it).
    carried_rounds: dict[int, float] = field(default_factory=dict)
    ran: set[int] = field(default_factory=set)
    pace: float = 1.0

    def start_measurement(self, provisional: bool) -> None:
        """The next plain steps measure `plain` anew: a stale figure is not averaged in."""
        self.plain_count, self.provisional = 0, provisional

    def end_measurement(self) -> None:
        """With nothing trusted yet, a measurement is trusted once it agrees with the one before
        within DRIFT (the machine is warm), or once WARM_UP_MOST were taken."""
        if self.trusted or self.plain is None:
            return
        self.warm_up.append(self.plain)
        agree = len(self.warm_up) > 1 and abs(self.warm_up[-1] / self.warm_up[-2] - 1) <= DRIFT
        if agree or len(self.warm_up) >= WARM_UP_MOST:
            self.provisional, self.warm_up = False, []

    def observe_plain(self, seconds: float) -> None:
        # The median of a measurement's steps: one step caught in a hiccup moves nothing (the
        # first steps of a plain pipeline, which run slower than the rest, are not timed:
        # SETTLING_STEPS in engine/decode.py). Past MEDIAN_STEPS, as in a long parked stretch, a
        # decayed average that follows the context.
        self.plain_count += 1
        self.carried = False
        if self.plain_count == 1:
            self.plain_steps = []
        if self.plain_count <= MEDIAN_STEPS:
            self.plain_steps.append(seconds)
            self.plain = median(self.plain_steps)
        else:
            self.plain += (seconds - self.plain) / MEDIAN_STEPS
        self.first_since_plain, self.settled, self.since_plain = {}, {}, {}

    def observe_round(self, k: int, seconds: float, warm: bool = True) -> None:
        """`warm`: no row is in its first rounds after a prefill, which run slower than the rest;
        only warm rounds are held against the plain step (a cold one would pass for a slower
        machine, or make a plain step measured before it look cheap)."""
        self.rounds[k] = _average(self.round_now(k) if k in self.rounds else None, seconds)
        self.ran.add(k)
        if k in self.carried_rounds:
            both = self.ran & self.carried_rounds.keys()
            self.pace = median(self.rounds[j] / self.carried_rounds[j] for j in both)
        if not warm:
            return
        self.since_plain[k] = _average(self.since_plain.get(k), seconds)
        if k in self.settled:  # carried over, or settled since the latest plain step
            return
        first = self.first_since_plain.setdefault(k, [])
        first.append(seconds)
        if len(first) == SETTLE:
            self.settled[k] = median(first)
            if not self.provisional and not self.carried:
                self._pool_ratio(k, self.plain / self.settled[k])

    def _pool_ratio(self, k: int, ratio: float) -> None:
        """A ratio 2 x DRIFT from the pool's is doubted: measured again at the next check (the
        next process's, where this one ends first: the doubt is stored), and pooled only if that
        one agrees with it (then both are). On a busy machine a burst of plain steps can run at
        half speed while the rounds around it do not."""
        pool = self.ratios.setdefault(k, deque(maxlen=POOL))
        doubted = self.doubted.pop(k, None)
        if doubted is not None and abs(ratio / doubted - 1) <= 2 * DRIFT:
            pool.append(doubted)  # measured twice: the ratio moved
        elif pool and abs(ratio / median(pool) - 1) > 2 * DRIFT:
            self.doubted[k] = ratio
            self.provisional = True  # stale: measured again at the next check
            return
        pool.append(ratio)

    def plain_ratio(self, k: int) -> float | None:
        """A plain step over a round of K drafts (None: not measured yet)."""
        pool = self.ratios.get(k)
        return median(pool) if pool else None

    def pool_settled(self, k: int) -> bool:
        """K's ratio rests on POOL measurements that agree within DRIFT."""
        pool = self.ratios.get(k, ())
        return len(pool) == POOL and max(pool) <= min(pool) * (1 + DRIFT)

    @property
    def stale(self) -> bool:
        """No plain step measured yet, only a provisional one, rounds that no longer cost what
        they did just after it, or a carried plain step where this process runs a K whose pool is
        not settled: one unlucky measurement in an earlier process would otherwise count every
        later process's rounds, the drift rule watching the rounds alone."""
        if self.plain is None or self.provisional:
            return True
        if self.carried and not all(self.pool_settled(k) for k in self.since_plain):
            return True
        return any(
            abs(self.since_plain[k] / then - 1) > DRIFT
            for k, then in self.settled.items()
            if k in self.since_plain  # a carried K this process has not run warm yet
        )

    @property
    def trusted(self) -> bool:
        """A plain step the meter and the policy can go by: pooled ratios, or a measurement
        taken once an answer's first rounds were over."""
        return bool(self.ratios) or (self.plain is not None and not self.provisional)

    @property
    def current_plain(self) -> float | None:
        """The plain step now: what the rounds cost now times their pooled ratios (the median
        over Ks), else the latest measurement as it stands (None: nothing measured yet). What
        the policy weighs drafting against, and the meter's figure for an answer whose own
        rounds cannot say it."""
        if self.plain is None:
            return None
        now = [self.plain_ratio(k) * self.round_now(k) for k in self.ratios]
        return median(now) if now else self.plain

    @property
    def trusted_plain(self) -> float | None:
        """`current_plain` once it is `trusted` (None before)."""
        return self.current_plain if self.trusted else None

    def round_now(self, k: int) -> float:
        """What a round of a length run before costs now (carried ones at this process's pace)."""
        return self.rounds[k] if k in self.ran else self.rounds[k] * self.pace

    @property
    def rounds_now(self) -> dict[int, float]:
        return {k: self.round_now(k) for k in self.rounds}

    def round_seconds(self, k: int) -> float:
        """Expected wall time of a round with K drafts (K = 0: a plain step). Needs `plain`."""
        if k in self.rounds:  # the common case: no plain step to work out (the policy asks per K)
            return self.round_now(k)
        plain = self.current_plain
        if k == 0:
            return plain
        rounds = self.rounds_now
        known = sorted(rounds)
        if not known:
            return plain * (PRIOR_ROUND + PRIOR_PER_DRAFT * k)
        below = [j for j in known if j < k]
        above = [j for j in known if j > k]
        if below and above:
            lo, hi = below[-1], above[0]
            return rounds[lo] + (rounds[hi] - rounds[lo]) * (k - lo) / (hi - lo)
        near = below[-2:] if below else above[:2]
        slope = plain * PRIOR_PER_DRAFT
        if len(near) == 2 and rounds[near[1]] > rounds[near[0]]:
            # (a longer round measured cheaper is noise: past it, drafts are not free)
            slope = (rounds[near[1]] - rounds[near[0]]) / (near[1] - near[0])
        j = near[-1] if below else near[0]
        estimate = rounds[j] + slope * (k - j)
        if not below:
            # Shorter than any round measured: a round's fixed part (the verify, the reading) costs
            # a plain step at least, so its cost lies on or above the line from a plain step at
            # K = 0 to the shortest round, where a steep, noisy slope would price it near a plain
            # step (and the policy trace and run rounds that cost twice that).
            estimate = max(estimate, plain + (rounds[j] - plain) * k / j)
        # A round with drafts costs at least a plain step (its verify is a forward of 2+ tokens).
        return max(plain, estimate)


class Measurements:
    """Costs by number of rows, the draft policy (its acceptance estimates) and what its rounds
    may still lose (`LossBudget`) for one (target, drafter) pair, kept for as long as both live,
    so that every answer of a chat, every batch and every request to the server starts from what
    earlier ones learned: an answer that opens with a few missed rounds spends what earlier
    answers banked instead of parking the policy for the rest of it."""

    def __init__(self):
        self.by_rows: dict[int, RowCosts] = {}
        self.policy = DraftPolicy()
        self.budget = LossBudget()
        self.store = None  # where they persist (engine/stored_costs.py): set by the first Decoder

    def rows(self, b: int) -> RowCosts:
        return self.by_rows.setdefault(b, RowCosts())


_KEPT: dict[tuple[int, int, bool], Measurements] = {}


def measurements_for(target, drafter, compile: bool) -> Measurements:
    """The one `Measurements` of this pair of model objects (drafter None: plain decoding) in
    this compile mode (compiled steps cost differently)."""
    key = (id(target), id(drafter), compile)
    if key not in _KEPT:
        _KEPT[key] = Measurements()
        for model in (target, drafter):
            if model is not None:
                weakref.finalize(model, _KEPT.pop, key, None)
    return _KEPT[key]
