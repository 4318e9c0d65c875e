"""Batched answers: every row is exactly its own run, whatever the other rows accept."""

import pytest

from gemma_mtp_mlx.engine import batch, costs
from tests.conftest import generated_ids


def generate_batch(pair, prompts, **options) -> list:
    """The answers in input order (the engine gives them as they finish)."""
    return [a for _, a in sorted(batch.generate_batch(pair, prompts, **options), key=lambda x: x[0])]

# Different lengths, so the rows sit at different positions from the first round on.
PROMPTS = [
    [2, 40, 77, 301, 12],
    [2, 9, 310],
    [2, 55, 56, 57, 58, 59, 60, 61, 62, 63, 64],
    [2, 401, 7, 7],
]


@pytest.mark.parametrize(
    "shape, centroids", [("e2b", True), ("e4b", False), ("moe", False), ("dense", True)]
)
@pytest.mark.parametrize(
    "mode", [{"draft_tokens": 3}, {}, {"mtp": False}], ids=["k3", "policy", "plain"]
)
def test_greedy_rows_equal_their_own_runs_past_the_window(echo_pairs, shape, centroids, mode):
    pair = echo_pairs[(shape, centroids)]
    options = dict(max_tokens=40, ignore_eos=True)  # 40 tokens: well past the window of 8
    answers = generate_batch(pair, PROMPTS, **options, **mode)
    expected = [generated_ids(pair, p, **options, mtp=False) for p in PROMPTS]
    assert [a.token_ids for a in answers] == expected
    assert all(a.finish_reason == "length" for a in answers)
    if mode.get("draft_tokens"):
        assert max(a.stats.accepted for a in answers) > 0  # drafts were accepted and rolled back


@pytest.mark.parametrize("mode", [{"draft_tokens": 4}, {}], ids=["k4", "policy"])
def test_rows_end_on_their_own(echo_pairs, mode):
    """End-of-sequence and per-row limits: a finished row leaves, the others go on unchanged."""
    pair = echo_pairs[("moe", True)]
    limits = [3, 60, 1, 45]
    answers = generate_batch(pair, PROMPTS, max_tokens=limits, **mode)
    if mode:
        assert len({a.stats.accepted for a in answers}) > 1  # rows at different acceptance
    for prompt, limit, answer in zip(PROMPTS, limits, answers):
        assert answer.token_ids == generated_ids(pair, prompt, max_tokens=limit, mtp=False)
        assert answer.finish_reason == ("stop" if len(answer.token_ids) < limit else "length")


@pytest.mark.parametrize("first", [14, 25])
def test_a_row_leaving_while_a_round_is_in_flight_hands_over_to_costs_not_measured_yet(
    echo_pairs, clock, monkeypatch, first
):
    """The policy drafts for two rows (plain steps cost 50 ms, rounds a tick, acceptance seen
    high); one row ends while the next round is in flight, and the one left has no plain step
    measured for a single row: that round is read, the lone row measures, then drafts on, with
    every token its own run's."""
    from gemma_mtp_mlx.engine.costs import measurements_for
    from gemma_mtp_mlx.engine.plain import PlainSteps
    from gemma_mtp_mlx.engine.policy import DraftPolicy, LossBudget

    step = PlainSteps.step

    def slow_step(self):
        clock.now += 0.05
        return step(self)

    monkeypatch.setattr(PlainSteps, "step", slow_step)
    pair = echo_pairs[("e2b", False)]
    measurements = measurements_for(pair.target, pair.drafter, True)
    monkeypatch.setattr(measurements, "by_rows", {})
    monkeypatch.setattr(measurements, "policy", DraftPolicy())
    monkeypatch.setattr(measurements, "budget", LossBudget())
    for _ in range(100):
        measurements.policy.observe(4, 4)
    limits = [first, 60]
    answers = generate_batch(pair, PROMPTS[:2], max_tokens=limits, ignore_eos=True)
    assert answers[0].stats.drafted > 0 and answers[1].stats.drafted > answers[0].stats.drafted
    assert measurements.by_rows[1].plain is not None  # the lone row measured its own
    for prompt, limit, answer in zip(PROMPTS, limits, answers):
        assert answer.token_ids == generated_ids(
            pair, prompt, max_tokens=limit, ignore_eos=True, mtp=False
        )


def test_a_finished_row_makes_room_for_the_next_prompt(echo_pairs):
    """Two rows at a time over six prompts: each answer is still its own run's."""
    pair = echo_pairs[("e2b", False)]
    prompts = PROMPTS + [[2, 17, 18], [2, 300, 301, 302, 303]]
    limits = [5, 40, 12, 25, 9, 33]
    answers = generate_batch(pair, prompts, batch=2, max_tokens=limits, ignore_eos=True)
    for prompt, limit, answer in zip(prompts, limits, answers):
        assert answer.token_ids == generated_ids(
            pair, prompt, max_tokens=limit, ignore_eos=True, mtp=False
        )


def test_sampled_rows_equal_their_own_seeded_runs(echo_pairs, monkeypatch):
    """Row b draws from its own key stream (seed + b), the draws a single run with that seed
    makes: with the same draft length every round, batched sampling must reproduce those runs
    token for token. Same rounds means no run pauses to measure the baseline where another
    does not: the engine's measurements are warmed for every batch size first (twice: the first
    is provisional), and kept from going stale. (With the policy the draft lengths follow this
    machine's timings; sampled rows are compared in distribution in test_sampling.) Near its
    limit a row drafts as little as the longest row in the batch needs, a single run as it
    needs itself: the last rounds may differ, so the first 30 of 40 tokens are compared."""
    monkeypatch.setattr(costs, "DRIFT", float("inf"))
    for centroids in (False, True):
        pair = echo_pairs[("e2b", centroids)]
        options = dict(temperature=1.0, top_k=50, ignore_eos=True, draft_tokens=2, max_tokens=40)
        for _ in range(2):  # the first measurements, right after a prefill, are provisional
            for width in range(1, len(PROMPTS) + 1):
                generate_batch(pair, PROMPTS[:width], seed=7, **options)
        answers = generate_batch(pair, PROMPTS, seed=7, **options)
        expected = [generated_ids(pair, p, seed=7 + b, **options) for b, p in enumerate(PROMPTS)]
        assert [a.token_ids[:30] for a in answers] == [e[:30] for e in expected]
        assert sum(a.stats.drafted for a in answers) > 0
