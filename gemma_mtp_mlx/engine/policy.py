"""How many tokens to draft each round, from the costs measured on this machine (engine/costs.py,
`RowCosts`) and the acceptance seen so far; K = 0 ("parked") when drafting cannot beat plain
decoding. Both are kept per model pair, across answers.

With a_i the running probability that draft i is accepted once drafts 1..i-1 were, a round of
K drafts emits E(K) = 1 + sum_{j<=K} prod_{i<=j} a_i tokens in C(K) seconds (costs.py); plain
decoding emits 1 per pipelined plain step. The policy picks the K with the highest E(K) / C(K).

While parked, a round now and then drafts once more so that a workload that turns predictable
unparks; each probe that does not unpark doubles the wait for the next (PARKED_PROBE_START
rounds up to PARKED_PROBE_MAX), so a drafter that never hits costs next to nothing.

What drafting may lose is bounded (`LossBudget`): a pair with no history (a fresh process, no
stored costs) starts from priors and has to try draft lengths to learn what they cost and how
often they hit; a round that turns out worse than plain decoding spends from a budget that grows
by EXPLORE_SHARE of a plain step per token emitted, and the policy parks while it is spent.
"""


POLICY_MAX_DRAFT = 6  # the most drafts the policy considers (a fixed K may ask for more)
PARKED_PROBE_START = 16  # a probe that misses costs about one plain step more than it brings
PARKED_PROBE_MAX = 128
# Acceptance estimates start optimistic-but-uncertain and follow recent rounds (exponential decay).
# The first position's prior is PRIOR_ACCEPTED; a deeper one's is the estimate one position up,
# so positions never reached yet (no round has drafted that deep) look like those that were: with
# a fixed 0.6 there, a drafter hitting 90 % never tried a fifth draft that would have paid.
PRIOR_ACCEPTED, PRIOR_SEEN, DECAY = 0.6, 2.0, 0.95
# What the policy's rounds may lose against plain decoding: EXPLORE_SHARE of the plain steps an
# answer's tokens are worth, beyond EXPLORE_ALLOWANCE plain steps that let its first rounds try
# drafting (and cap what winning rounds bank, so that a long good stretch does not pay for a
# long bad one). Over an answer of N tokens: at most ALLOWANCE + SHARE x N plain steps, and the
# one round that overdraws; for 300 tokens 3 + 6 steps and a round, about 3-4 % of the answer.
# The benchmark holds the policy to 0.97x plain: the 2 % leaves room for the rest.
EXPLORE_SHARE, EXPLORE_ALLOWANCE = 0.02, 3.0


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
        self.probe_interval = PARKED_PROBE_START
        self.probing = False  # the latest choice is a parked policy's probe

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

    def best(self, costs) -> int:
        acceptance = self.acceptance
        rates = [
            expected_tokens(k, acceptance) / costs.round_seconds(k)
            for k in range(self.max_draft + 1)
        ]
        return max(range(len(rates)), key=rates.__getitem__)

    def choose(self, costs, limit: int) -> int:
        """The draft length for the next round, at most `limit`."""
        k, self.probing = self.best(costs), False
        if k == 0:
            self.parked_rounds += 1
            if self.parked_rounds >= self.probe_interval:
                k, self.parked_rounds, self.probing = 1, 0, True
                self.probe_interval = min(2 * self.probe_interval, PARKED_PROBE_MAX)
        else:
            self.parked_rounds, self.probe_interval = 0, PARKED_PROBE_START
        return min(k, limit)

    def observe(self, drafted: int, accepted: int) -> None:
        """Learn the acceptance of a drafting round. Draft i was tried iff drafts 1..i-1 were
        accepted, so each tried position is one Bernoulli observation of a_i (a fixed K may
        draft beyond the positions the policy considers)."""
        for i in range(min(drafted, self.max_draft)):
            self.accepted[i] = self.accepted[i] * DECAY + (1.0 if i < accepted else 0.0)
            self.seen[i] = self.seen[i] * DECAY + 1.0
            if i >= accepted:
                break


class LossBudget:
    """What one decoder's drafting rounds may still lose against plain decoding, in plain steps."""

    def __init__(self):
        self.balance = EXPLORE_ALLOWANCE

    @property
    def spent(self) -> bool:
        return self.balance < 0

    def settle(self, tokens: float, lost: float = 0.0) -> None:
        """A round emitted `tokens` per row, each earning EXPLORE_SHARE; `lost`: its time
        beyond the plain steps those tokens would have taken, in plain steps (a gain is
        negative; a plain step loses nothing)."""
        self.balance = min(EXPLORE_ALLOWANCE, self.balance + EXPLORE_SHARE * tokens - lost)
