"""The draft-length policy: measured costs x running acceptance; parks when drafting loses."""

from gemma_mtp_mlx import generate
from gemma_mtp_mlx.engine.policy import PROBE_EVERY, CostModel, DraftPolicy, expected_tokens
from gemma_mtp_mlx.engine.stats import RoundStats

PROMPT = [2, 40, 77, 301, 12]


def drafting_round(k: int, accepted: int, seconds: float = 1.0) -> RoundStats:
    return RoundStats(k, accepted, accepted + 1, 0.0, seconds, seconds)


def test_expected_tokens_and_round_costs():
    assert expected_tokens(0, [0.5, 0.5]) == 1.0
    assert expected_tokens(2, [0.5, 0.5]) == 1.75  # 1 + 0.5 + 0.25
    costs = CostModel(verify_seconds=[1.0, 1.5, 2.0], draft_step_seconds=0.25, plain_step_seconds=0.8)
    assert costs.round_seconds(0) == 0.8 and costs.round_seconds(2) == 2.5


def test_policy_drafts_deep_when_verify_is_cheap_and_drafts_hit():
    policy = DraftPolicy(CostModel([1.0, 1.05, 1.1, 1.15, 1.2], 0.02, 1.0))
    for _ in range(30):
        policy.observe(drafting_round(4, 4, seconds=1.2))
    assert policy.choose(limit=10) == 4
    assert policy.choose(limit=2) == 2


def test_policy_parks_when_drafts_miss_and_probes_now_and_then():
    policy = DraftPolicy(CostModel([1.0, 1.6, 2.2], 0.2, 1.0))
    for _ in range(30):
        policy.observe(drafting_round(1, 0, seconds=1.6))
    assert policy.parked
    # Probes after PROBE_EVERY parked rounds, then after twice as many, and so on.
    choices = [policy.choose(limit=2) for _ in range(7 * PROBE_EVERY)]
    probes = [i + 1 for i, k in enumerate(choices) if k]
    assert probes == [PROBE_EVERY, 3 * PROBE_EVERY, 7 * PROBE_EVERY]


def test_policy_learns_what_rounds_really_cost():
    """The start-up model says drafting 2 that are always accepted wins (3 tokens in 1.2 s
    against 1 in 1.0 s plain); rounds that really take 3x the modelled time make it park."""
    policy = DraftPolicy(CostModel([1.0, 1.1, 1.2], 0.0, 1.0))
    for _ in range(30):
        policy.observe(drafting_round(2, 2, seconds=1.2))
    assert policy.choose(limit=2) == 2
    for _ in range(30):
        policy.observe(drafting_round(2, 2, seconds=3.6))
        policy.observe(RoundStats(0, 0, 1, 0.0, 0.9, 0.9))
    assert policy.parked


def test_policy_rounds_are_lossless_and_cost_measurement_leaves_no_trace(echo_pairs):
    pair = echo_pairs[("moe", True)]
    pair.costs = {}
    plain = [t for c in generate(pair, PROMPT, max_tokens=200, ignore_eos=True, mtp=False) for t in c.token_ids]
    ids, stats = [], None
    for chunk in generate(pair, PROMPT, max_tokens=200, ignore_eos=True):
        ids += chunk.token_ids
        stats = chunk.stats
    assert len(pair.costs[1].verify_seconds) == 7
    assert ids == plain
    # Whether drafting pays for these tiny models depends on this machine's timings; parked or
    # not, the policy drafts at least its probes (a K = 1 round after 16 parked rounds).
    assert stats.drafted > 0


def test_a_drafter_that_never_hits_gets_parked(pairs):
    pair = pairs[("dense", False)]
    ids, stats = [], None
    for chunk in generate(pair, PROMPT, max_tokens=200, ignore_eos=True):
        ids += chunk.token_ids
        stats = chunk.stats
    assert stats.drafted < 0.5 * stats.rounds
