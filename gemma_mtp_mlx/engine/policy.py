"""How many tokens to draft each round, from the costs measured on this machine (engine/costs.py,
`RowCosts`) and the acceptance seen so far; K = 0 ("parked") when drafting cannot beat plain
decoding. Both are kept per model pair, across answers.

With a_i the running probability that draft i is accepted once drafts 1..i-1 were, a round of
K drafts emits E(K) = 1 + sum_{j<=K} prod_{i<=j} a_i tokens in C(K) seconds (costs.py); plain
decoding emits 1 per pipelined plain step. The policy picks the K with the highest E(K) / C(K),
a K whose compiled step is not traced yet charged its trace over the tokens it has to pay it back
and a margin for its rate being a guess.
K goes at most one draft past the longest round measured: further out its cost is a guess.
What a length costs is what its rounds took when it last ran, so now and then a round drafts a
length next to the chosen one, already measured and traced: one timed in a slow spell of the
machine would otherwise never be drafted again.

While parked, a round now and then drafts again so that a workload that turns predictable
unparks: a probe drafts the length the policy drafted last (does it pay again?), or the length
its estimates favour where that is longer. A probe that misses doubles the wait for the next
(PARKED_PROBE_START rounds up to PARKED_PROBE_MAX), so a drafter that never hits costs next to
nothing; a probe that hits is followed by another at once and the wait starts over: hits pay
their own way and lift the acceptance estimate until drafting wins again, where probes spaced
out by a wait that doubled at every probe took most of an answer to unpark.

What drafting may lose is bounded (`LossBudget`): a pair with no history (a fresh process, no
stored costs) starts from priors and has to try draft lengths to learn what they cost and how
often they hit; a round that turns out worse than plain decoding spends from a budget that grows
by EXPLORE_SHARE of a plain step per token emitted, and the policy parks while it is spent. Its
probes go on while parked so, each once the budget has earned back what it could lose: those that
hit bank what they gain, and drafting comes back with the budget.
"""


POLICY_MAX_DRAFT = 6  # the most drafts the policy considers (a fixed K may ask for more)
PARKED_PROBE_START = 8  # a probe that misses costs about one plain step more than it brings
PARKED_PROBE_MAX = 128
# Acceptance estimates start optimistic-but-uncertain and follow recent rounds (exponential decay).
# The first position's prior is PRIOR_ACCEPTED; a deeper one's is the estimate one position up,
# so positions never reached yet (no round has drafted that deep) look like those that were: with
# a fixed 0.6 there, a drafter hitting 90 % never tried a fifth draft that would have paid.
PRIOR_ACCEPTED, PRIOR_SEEN, DECAY = 0.6, 2.0, 0.95
# What the policy's rounds may lose against plain decoding: EXPLORE_SHARE of the plain steps an
# answer's tokens are worth, beyond EXPLORE_ALLOWANCE plain steps that let its first rounds try
# drafting. Over a pair's first answer of N tokens: at most ALLOWANCE + SHARE x N plain steps, and
# the one round that overdraws; for 300 tokens 3 + 6 steps and a round, about 3-4 % of the
# answer (the balance is the pair's, so later answers start from what earlier ones banked). The
# benchmark holds the policy to 0.97x plain: the 2 % leaves room for the rest. Winning rounds
# bank what they gain, up to BANKED_MOST plain steps: a few bad rounds in a good answer (a
# passage the drafter cannot guess) do not park it for the rest, and a long-lived decoder (the
# server's) does not let hours of winning pay for a long losing stretch.
EXPLORE_SHARE, EXPLORE_ALLOWANCE, BANKED_MOST = 0.02, 3.0, 32.0
# Drafting has to promise this much more than plain decoding: where a round of one draft costs
# about a plain step, an acceptance estimate still held up by its prior (a drafter that never
# hits reads 0.05-0.1 for a dozen rounds) made every round look a few percent ahead.
MIN_GAIN = 0.1
# A draft length whose step is not traced yet (compiled steps, engine/steps.py) pays the trace
# once: it has to win it back within the next TRACE_HORIZON tokens (or the rest of the answer).
# A first answer that tried every length traced each, a tenth of a 300-token answer here.
TRACE_HORIZON = 256
# ...and promise TRACE_MARGIN more than its rate with the trace paid: that rate is a guess (a cost
# extrapolated from other lengths, acceptance at positions not reached yet taken from those
# reached), the highest of several guesses is the one most likely to be too high, and the trace is
# certain. Without it a fresh answer traced lengths for rounds that won nothing: a shorter one
# while a few drafts missed, a longer one a percent ahead by its guesses.
TRACE_MARGIN = 0.05
# Every REFRESH_EVERY drafting rounds one drafts a length next to the chosen one (shorter and
# longer by turns) where that length is measured and traced: on a shared machine a round of 3
# timed in a slow spell (26 ms, next to 19 for rounds of 2) kept a fresh answer drafting 2 for
# 14 rounds. One round in 16: a neighbour 20 % slower than the chosen length costs 1.3 %.
REFRESH_EVERY = 16


def expected_tokens(k: int, acceptance: list[float]) -> float:
    """E(K): tokens a round of K drafts emits, given acceptance by position."""
    expected, survive = 1.0, 1.0
    for a in acceptance[:k]:
        survive *= a
        expected += survive
    return expected


class DraftPolicy:
    def __init__(self, max_draft: int = POLICY_MAX_DRAFT):
        self.max_draft = max_draft
        # Per position: decayed counts of rounds that reached it and that accepted it.
        self.accepted = [0.0] * max_draft
        self.seen = [0.0] * max_draft
        self.parked_rounds = 0
        self.probe_interval = PARKED_PROBE_START  # parked rounds before the next probe
        self.probing = False  # the latest choice is a parked policy's probe
        self.probe_again = False  # the latest probe hit: the next parked round probes too
        self.drafted_last = 0  # the K of the policy's latest drafting round (probes aside)
        self.drafting_rounds = 0  # the policy's drafting rounds, for REFRESH_EVERY

    @property
    def acceptance(self) -> list[float]:
        out, prior = [], PRIOR_ACCEPTED
        for a, s in zip(self.accepted, self.seen):
            # After n observations seen = (1 - DECAY^n) / (1 - DECAY): the prior's weight,
            # PRIOR_SEEN x DECAY^n, decays with them.
            w = PRIOR_SEEN * max(0.0, 1.0 - (1.0 - DECAY) * s)
            prior = (a + w * prior) / (s + w)
            out.append(prior)
        return out

    def rates(self, costs, limit: int = TRACE_HORIZON, tracing=None) -> list[float]:
        """Tokens per second of a round of each K up to `limit` (0: a plain step); `tracing(k)`:
        the seconds a step of K would first spend tracing, spread over the tokens it has to win
        them back in."""
        acceptance = self.acceptance
        plain = costs.round_seconds(0)
        horizon = max(1, min(limit, TRACE_HORIZON))
        rates = []
        # One draft beyond the longest round measured: further out the cost is a guess along a
        # prior slope, and each length tried pays its trace and its rounds. None past `limit`:
        # near an answer's end a longer round would run as one of `limit` drafts, a length
        # that may need a trace of its own for the last few tokens.
        longest = min(self.max_draft, max(costs.rounds, default=1) + 1, limit)
        for k in range(longest + 1):
            emitted = expected_tokens(k, acceptance)
            # A round verifies two tokens or more: it costs a plain step at least, whatever the
            # interval of a pipelined round read late (nearly none) says.
            seconds = max(plain, costs.round_seconds(k))
            trace = tracing(k) if tracing is not None else 0.0
            if trace:
                seconds = (seconds + trace * emitted / horizon) * (1 + TRACE_MARGIN)
            rates.append(emitted / seconds)
        return rates

    def best(self, costs, limit: int = TRACE_HORIZON, tracing=None) -> int:
        """The K with the most tokens per second, 0 unless drafting promises MIN_GAIN more."""
        return _winner(self.rates(costs, limit, tracing))

    def probe_length(self, costs, limit: int = TRACE_HORIZON, tracing=None) -> int:
        """The drafts a parked policy's probe tries: the longer of the length it drafted last
        and the one its estimates favour (see `_favoured`); 0: none fits (`_probe`)."""
        return self._probe(self.rates(costs, limit, tracing), limit)

    def choose(self, costs, limit: int, tracing=None) -> int:
        """The draft length for the next round, at most `limit` (see `best`)."""
        rates = self.rates(costs, limit, tracing)
        k = _winner(rates)
        if k == 0:
            return self.parked(limit, probe=self._probe(rates, limit))
        self.drafted_last = k
        self.probing, self.probe_again = False, False
        self.parked_rounds, self.probe_interval = 0, PARKED_PROBE_START
        self.drafting_rounds += 1
        if self.drafting_rounds % REFRESH_EVERY:
            return k
        return self._neighbour(k, len(rates) - 1, costs, tracing)

    def _neighbour(self, k: int, longest: int, costs, tracing) -> int:
        """A length next to `k` (shorter and longer by turns) measured and traced, else `k`."""
        longer = self.drafting_rounds // REFRESH_EVERY % 2
        for j in (k + 1, k - 1) if longer else (k - 1, k + 1):
            if 1 <= j <= longest and j in costs.rounds and not (tracing and tracing(j)):
                return j
        return k

    def _probe(self, rates: list[float], limit: int) -> int:
        """The longer of the length drafted last and the one the estimates favour: after a bad
        stretch they favour one draft, which pays little even when it hits; after a round of one
        (near an answer's end, or while a few drafts missed) the length drafted last is that one,
        and probes of it could not bring drafting back where a round of one costs nearly two
        plain steps. None (0) where the length drafted last does not fit before the answer's end:
        a shorter probe would ask nothing about it, and could trace a step for a few tokens."""
        if self.drafted_last > limit:
            return 0
        return max(self.drafted_last, _favoured(rates))

    def parked(self, limit: int, may_probe: bool = True, probe: int = 1) -> int:
        """A parked round: a plain step (0), or once the wait is over a probe of `probe` drafts;
        `may_probe`: what a probe could lose is affordable now (a probe waits for it); `probe`
        0: none fits before the answer's end."""
        self.probing = False
        self.parked_rounds += 1
        due = self.probe_again or self.parked_rounds >= self.probe_interval
        if not due or not may_probe or not probe:
            return 0
        self.parked_rounds, self.probing, self.probe_again = 0, True, False
        return min(probe, limit)

    def observe(self, drafted: int, accepted: int) -> None:
        """Learn the acceptance of a drafting round. Draft i was tried iff drafts 1..i-1 were
        accepted, so each tried position is one Bernoulli observation of a_i (a fixed K may
        draft beyond the positions the policy considers)."""
        for i in range(min(drafted, self.max_draft)):
            self.accepted[i] = self.accepted[i] * DECAY + (1.0 if i < accepted else 0.0)
            self.seen[i] = self.seen[i] * DECAY + 1.0
            if i >= accepted:
                break
        # A probe's rows report one by one (a batch): one that hit makes the probe a hit.
        if self.probing and accepted:
            self.probe_again, self.probe_interval = True, PARKED_PROBE_START
        elif self.probing and not self.probe_again:
            self.probe_interval = min(2 * self.probe_interval, PARKED_PROBE_MAX)


def _winner(rates: list[float]) -> int:
    """The K of the highest rate, 0 unless it beats a plain step's by MIN_GAIN."""
    k = max(range(len(rates)), key=rates.__getitem__)
    return k if rates[k] >= rates[0] * (1 + MIN_GAIN) else 0


def _favoured(rates: list[float]) -> int:
    """The drafting K (1 or more) of the highest rate: what a probe tries before the policy has
    drafted. Where a drafter step costs much of a plain step only deep rounds pay, and probes of
    one draft, even hitting, never made drafting look worth it and kept the policy parked."""
    return max(range(1, len(rates)), key=rates.__getitem__)


class LossBudget:
    """What a pair's drafting rounds may still lose against plain decoding, in plain steps."""

    def __init__(self):
        self.balance = EXPLORE_ALLOWANCE
        self.lowest = 0.0  # the lowest the balance went (below zero: the round that overdrew)

    @property
    def spent(self) -> bool:
        return self.balance < 0

    def affords(self, loss: float) -> bool:
        """Whether a round that may lose `loss` plain steps keeps the balance above the lowest it
        went: a spent budget's probes are paid for by what it earned back since."""
        return self.balance - loss >= self.lowest

    def settle(self, tokens: float, lost: float = 0.0) -> None:
        """A round emitted `tokens` per row, each earning EXPLORE_SHARE; `lost`: its time
        beyond the plain steps those tokens would have taken, in plain steps (a gain is
        negative; a plain step loses nothing)."""
        self.balance = min(BANKED_MOST, self.balance + EXPLORE_SHARE * tokens - lost)
        self.lowest = min(self.lowest, self.balance)
