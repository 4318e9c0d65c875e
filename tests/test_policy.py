"""The draft-length policy: measured costs x running acceptance; parks when drafting loses."""

from gemma_mtp_mlx import generate
from gemma_mtp_mlx.engine.policy import PROBE_EVERY, CostModel, DraftPolicy

PROMPT = [2, 40, 77, 301, 12]


def test_expected_tokens_per_second():
    costs = CostModel(verify_seconds=[1.0, 1.0, 1.0], draft_step_seconds=0.0, plain_step_seconds=1.0)
    assert costs.tokens_per_second(0, [0.5, 0.5]) == 1.0
    assert costs.tokens_per_second(2, [0.5, 0.5]) == 1.75  # 1 + 0.5 + 0.25


def test_policy_drafts_deep_when_verify_is_cheap_and_drafts_hit():
    policy = DraftPolicy(CostModel([1.0, 1.05, 1.1, 1.15, 1.2], 0.02, 1.0))
    for _ in range(30):
        policy.update(4, 4)
    assert policy.choose(limit=10) == 4
    assert policy.choose(limit=2) == 2


def test_policy_parks_when_drafts_miss_and_probes_now_and_then():
    policy = DraftPolicy(CostModel([1.0, 1.6, 2.2], 0.2, 1.0))
    for _ in range(30):
        policy.update(1, 0)
    assert policy.parked
    # Probes after PROBE_EVERY parked rounds, then after twice as many, and so on.
    choices = [policy.choose(limit=2) for _ in range(7 * PROBE_EVERY)]
    probes = [i + 1 for i, k in enumerate(choices) if k]
    assert probes == [PROBE_EVERY, 3 * PROBE_EVERY, 7 * PROBE_EVERY]


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
    assert stats.rounds < 200  # it drafted, and drafts were accepted


def test_a_drafter_that_never_hits_gets_parked(pairs):
    pair = pairs[("dense", False)]
    ids, stats = [], None
    for chunk in generate(pair, PROMPT, max_tokens=200, ignore_eos=True):
        ids += chunk.token_ids
        stats = chunk.stats
    assert stats.drafted < 0.5 * stats.rounds
