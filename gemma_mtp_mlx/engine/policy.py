"""How many tokens to draft each round, from the costs measured on this machine (engine/costs.py,
`RowCosts`) and the acceptance seen so far; K = 0 ("parked") when drafting cannot beat plain
decoding. Both are kept per model pair, across answers.

With a_i the running probability that draft i is accepted once drafts 1..i-1 were, a round of
K drafts emits E(K) = 1 + sum_{j<=K} prod_{i<=j} a_i tokens in C(K) seconds (costs.py); plain
decoding emits 1 per pipelined plain step. The policy picks the K with the highest E(K) / C(K).

While parked, a round now and then drafts once more so that a workload that turns predictable
unparks; each probe that does not unpark doubles the wait for the next (PARKED_PROBE_START
rounds up to PARKED_PROBE_MAX), so a drafter that never hits costs next to nothing.
"""


POLICY_MAX_DRAFT = 6  # the most drafts the policy considers (a fixed K may ask for more)
PARKED_PROBE_START = 16  # a probe that misses costs about one plain step more than it brings
PARKED_PROBE_MAX = 128
# Acceptance estimates start optimistic-but-uncertain and follow recent rounds (exponential decay).
# The first position's prior is PRIOR_ACCEPTED; a deeper one's is the estimate one position up,
# so positions never reached yet (no round has drafted that deep) look like those that were: with
# a fixed 0.6 there, a drafter hitting 90 % never tried a fifth draft that would have paid.
PRIOR_ACCEPTED, PRIOR_SEEN, DECAY = 0.6, 2.0, 0.95


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
        k = self.best(costs)
        if k == 0:
            self.parked_rounds += 1
            if self.parked_rounds >= self.probe_interval:
                k, self.parked_rounds = 1, 0
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
