"""The draft-length policy and the measurements behind it and the meter: costs learned from
real rounds (synthetic figures here), and what the decoder times, under a controlled clock."""

import dataclasses
import math
import re
from collections import deque

import numpy as np
import pytest

from gemma_mtp_mlx import generate
from gemma_mtp_mlx.engine.costs import DRIFT, POOL, SETTLE, Measurements, RowCosts, measurements_for
from gemma_mtp_mlx.engine.decode import (
    BASELINE_AFTER,
    BASELINE_EVERY,
    BASELINE_STEPS,
    SETTLING_STEPS,
)
from gemma_mtp_mlx.engine.policy import (
    EXPLORE_ALLOWANCE,
    PARKED_PROBE_START,
    REFRESH_EVERY,
    DraftPolicy,
    LossBudget,
    expected_tokens,
)
from gemma_mtp_mlx.engine.stored_costs import restore, snapshot
from gemma_mtp_mlx.tools.bench.simulated import Proposals, SimulatedDrafter

PROMPT = [2, 40, 77, 301, 12]


def measured(plain: float, rounds: dict[int, float]) -> RowCosts:
    return RowCosts(plain=plain, rounds=dict(rounds))


def test_expected_tokens():
    assert expected_tokens(0, [0.5, 0.5]) == 1.0
    assert expected_tokens(2, [0.5, 0.5]) == 1.75  # 1 + 0.5 + 0.25


def test_costs_interpolate_extrapolate_and_start_from_priors():
    costs = RowCosts()
    costs.observe_plain(1.0)
    assert costs.round_seconds(0) == 1.0
    assert costs.round_seconds(2) == pytest.approx(1.2 + 2 * 0.25)  # priors only
    costs.observe_round(2, 3.0)
    assert costs.round_seconds(2) == pytest.approx(3.0)
    assert costs.round_seconds(4) == pytest.approx(3.0 + 2 * 0.25)  # prior slope
    costs.observe_round(4, 4.0)
    assert costs.round_seconds(3) == pytest.approx(3.5)  # between the two measured
    assert costs.round_seconds(6) == pytest.approx(5.0)  # their slope, onwards
    assert costs.round_seconds(1) == pytest.approx(2.5)
    costs.observe_round(4, 6.0)  # a decayed average: the past weighs 0.8
    assert costs.round_seconds(4) == pytest.approx(4.4)
    costs.observe_plain(2.0)  # a decayed average too
    assert 1.0 < costs.plain < 2.0


def test_a_plain_step_goes_stale_when_rounds_no_longer_cost_what_they_did_after_it():
    costs = RowCosts()
    assert costs.stale  # nothing measured
    costs.observe_plain(1.0)
    for _ in range(SETTLE):
        costs.observe_round(3, 2.0)
    assert not costs.stale
    for _ in range(20):  # noise around the same cost is no change
        costs.observe_round(3, 2.0 * (1 + DRIFT / 2))
        costs.observe_round(3, 2.0 * (1 - DRIFT / 2))
    assert not costs.stale
    costs.observe_round(2, 9.0)  # a new K: its first rounds are what it is held to
    assert not costs.stale
    for _ in range(5):
        costs.observe_round(3, 2.0 * (1 + 2 * DRIFT))  # the machine slowed down
    assert costs.stale
    costs.start_measurement(provisional=False)
    costs.observe_plain(1.3)  # measured again, from scratch: the rounds after it go with it
    assert costs.plain == 1.3 and not costs.stale
    for _ in range(SETTLE + 20):  # even while the decayed average of all rounds catches up
        costs.observe_round(3, 2.4)
    assert not costs.stale
    for _ in range(5):
        costs.observe_round(3, 2.4 * (1 - 2 * DRIFT))  # faster now
    assert costs.stale
    costs.start_measurement(provisional=True)  # taken in an answer's first rounds
    costs.observe_plain(1.2)
    assert costs.stale  # until measured again


def settle(costs: RowCosts, k: int, seconds: float) -> None:
    for _ in range(SETTLE):
        costs.observe_round(k, seconds)


def test_a_measurement_is_the_median_of_its_steps_and_starts_over():
    """The first step after rounds runs slower than the rest, and one step may hit a hiccup:
    neither moves the measurement. Past its first steps (a long parked stretch) it follows the
    steps as a decayed average."""
    costs = RowCosts()
    for seconds in (1.1, 1.0, 1.0, 1.0):
        costs.observe_plain(seconds)
    assert costs.plain == pytest.approx(1.0)
    costs.observe_plain(9.0)  # a hiccup
    assert costs.plain == pytest.approx(1.0)
    costs.observe_plain(2.0)
    assert costs.plain == pytest.approx(1.2)
    costs.start_measurement(provisional=False)
    costs.observe_plain(3.0)
    assert costs.plain == 3.0


def measure(costs: RowCosts, plain: float, k: int, round_seconds: float) -> None:
    costs.start_measurement(provisional=False)
    costs.observe_plain(plain)
    settle(costs, k, round_seconds)


def test_the_plain_step_carries_over_as_a_pooled_ratio_to_the_rounds():
    """Per K, each measurement gives a plain/round ratio once the rounds after it settle; the
    median of the latest POOL stands, and the plain step now is that ratio times what the rounds
    cost now."""
    costs = RowCosts()
    costs.observe_plain(1.0)
    assert costs.plain_ratio(3) is None and costs.current_plain == 1.0  # no ratio yet
    settle(costs, 3, 2.0)
    assert costs.plain_ratio(3) == 0.5 and costs.current_plain == pytest.approx(1.0)
    measure(costs, 1.2, 3, 2.2)
    assert costs.plain_ratio(3) == pytest.approx((0.5 + 1.2 / 2.2) / 2)
    measure(costs, 0.9, 3, 1.8)
    assert costs.plain_ratio(3) == 0.5 and len(costs.ratios[3]) == POOL
    for _ in range(40):  # the machine turns 6 % slower: the plain step goes with it
        costs.observe_round(3, 1.8 * 1.06)
    assert costs.current_plain == pytest.approx(0.5 * 1.8 * 1.06, rel=1e-3) == costs.round_seconds(0)
    settle(costs, 2, 1.5)  # a K first run since then goes with the latest measurement
    assert costs.plain_ratio(2) == pytest.approx(0.9 / 1.5)
    assert costs.current_plain == pytest.approx((0.9 + 0.5 * 1.8 * 1.06) / 2, rel=1e-3)


def test_a_ratio_far_from_the_pool_is_taken_once_more_before_it_counts():
    """A burst of plain steps in a slow moment the rounds after it did not share (seen on a busy
    2-core VM: plain steps at twice their cost, rounds as before) is doubted and measured again;
    a ratio that really moved (the context grew) counts from its second measurement."""
    costs = RowCosts()
    measure(costs, 1.0, 3, 2.0)
    measure(costs, 2.0, 3, 2.0)  # twice the ratio: doubted
    assert costs.plain_ratio(3) == 0.5 and costs.stale
    measure(costs, 1.0, 3, 2.0)  # as before: the doubt is dropped
    assert list(costs.ratios[3]) == [0.5, 0.5] and not costs.stale
    measure(costs, 1.4, 3, 2.0)
    assert costs.stale and list(costs.ratios[3]) == [0.5, 0.5]
    measure(costs, 1.4, 3, 2.0)  # again: both count
    assert not costs.stale and costs.plain_ratio(3) == pytest.approx(0.7)


def test_rounds_right_after_a_prefill_are_not_held_against_the_plain_step():
    """An answer's first rounds run slower: they cost what they cost (the policy sees them) but
    neither set what the plain step goes with nor pass for a slower machine."""
    costs = RowCosts()
    costs.observe_plain(1.0)
    for _ in range(SETTLE):
        costs.observe_round(3, 3.0, warm=False)
    assert costs.rounds[3] == 3.0 and costs.plain_ratio(3) is None and not costs.stale
    settle(costs, 3, 2.0)
    assert costs.plain_ratio(3) == 0.5
    for _ in range(4):
        costs.observe_round(3, 3.0, warm=False)
    assert not costs.stale


def test_a_provisional_measurement_stands_in_but_goes_into_no_ratio():
    costs = RowCosts()
    costs.start_measurement(provisional=True)  # right after a prefill: slow steps
    costs.observe_plain(2.0)
    settle(costs, 3, 2.0)
    assert costs.plain_ratio(3) is None and costs.current_plain == 2.0 and costs.stale
    costs.start_measurement(provisional=False)
    costs.observe_plain(1.0)
    settle(costs, 3, 2.0)
    assert costs.plain_ratio(3) == 0.5 and not costs.stale


def test_a_steep_measured_slope_never_prices_a_round_below_a_plain_step():
    """Seen in a batch run: rounds of K = 2 and 3 measured 1.1 and 2.9 plain steps (noise), so
    the line through them reaches zero at K = 1.4 and the policy divided by zero below it."""
    costs = RowCosts()
    costs.observe_plain(1.0)
    costs.observe_round(3, 2.9)
    costs.observe_round(2, 1.1)
    assert costs.round_seconds(1) == pytest.approx(1.05)  # halfway from a plain step to K = 2
    policy = DraftPolicy()
    assert policy.choose(costs, limit=6) in range(7)


def test_a_shorter_round_is_never_priced_below_the_line_from_a_plain_step():
    """Recorded in a fresh answer on the development VM: rounds of 2 and 3 drafts measured 2.3
    and 3.39 plain steps (a slope of 1.09 against about 0.6 in steady runs), the line through them
    priced a round of one draft at 1.21 plain steps, and after one round of 3 that missed the
    policy traced and ran rounds of one draft, which cost 2.1 plain steps there. A round's fixed
    part costs a plain step at least, so a shorter round costs no less than the line from a plain
    step (K = 0) to the shortest round measured."""
    costs = RowCosts()
    costs.observe_plain(1.0)
    costs.observe_round(2, 2.3)
    costs.observe_round(3, 3.39)
    assert costs.round_seconds(1) == pytest.approx(1.65)
    policy = DraftPolicy()
    policy.accepted = [0.77 * 20, 0.94 * 20, 0.96 * 20, 0.0, 0.0, 0.0]
    policy.seen = [20.0, 20.0, 20.0, 0.0, 0.0, 0.0]
    assert policy.best(costs) == 0  # 1.77 tokens for 1.65 plain steps: under MIN_GAIN


def test_a_longer_round_measured_cheaper_does_not_make_deeper_drafts_free():
    """Seen on a tiny pair: rounds of 2 drafts measured cheaper than rounds of 1 (noise), and a
    slope of zero past them priced 6 drafts at a plain step, so with a drafter that never hits
    (its acceptance estimate near zero but not zero) the policy drafted 6 a round."""
    costs = RowCosts()
    costs.observe_plain(1.0)
    costs.observe_round(1, 1.6)
    costs.observe_round(2, 1.1)
    assert costs.round_seconds(6) == pytest.approx(1.1 + 4 * 0.25)  # the prior's slope
    policy = DraftPolicy()
    for _ in range(12):
        policy.observe(2, 0)
    assert policy.best(costs) == 0


def test_policy_drafts_deep_when_verify_is_cheap_and_drafts_hit():
    costs = measured(1.0, {k: 1.0 + 0.07 * k for k in range(1, 5)})
    policy = DraftPolicy(max_draft=4)
    for _ in range(30):
        policy.observe(4, 4)
    assert policy.choose(costs, limit=10) == 4
    assert policy.choose(costs, limit=2) == 2


def test_a_draft_length_not_traced_yet_must_win_its_trace_back():
    """A first answer that tried every draft length traced each (a tenth of a 300-token answer
    on the development VM). A length not traced yet is charged its trace over the tokens left
    to win it back: taken where it pays, not for a few percent over a short rest."""
    costs = measured(1.0, {k: 1.0 + 0.07 * k for k in range(1, 5)})
    policy = DraftPolicy(max_draft=4)
    for _ in range(30):
        policy.observe(4, 4)

    def tracing(seconds):
        return lambda k: 0.0 if k in (0, 2) else seconds  # plain and K = 2 are traced

    assert policy.choose(costs, limit=300, tracing=tracing(0.0)) == 4
    assert policy.choose(costs, limit=300, tracing=tracing(5.0)) == 4  # 5 steps over 256 tokens
    assert policy.choose(costs, limit=12, tracing=tracing(5.0)) == 2  # ... over 12 it does not
    assert policy.choose(costs, limit=300, tracing=tracing(500.0)) == 2


def test_a_length_not_traced_yet_must_promise_more_than_its_guess_may_be_off():
    """A length not run yet is priced by guesses (a cost extrapolated from other lengths,
    acceptance taken from the positions reached), and its trace is certain: a few percent ahead
    by those guesses does not trace it (TRACE_MARGIN); traced, it is drafted."""
    costs = measured(1.0, {2: 1.14, 3: 1.475})  # every draft hits: rounds of 3 are 3 % ahead
    policy = DraftPolicy(max_draft=3)
    for _ in range(30):
        policy.observe(3, 3)
    assert policy.choose(costs, limit=300, tracing=lambda k: 0.0) == 3
    assert policy.choose(costs, limit=300, tracing=lambda k: 0.01 if k == 3 else 0.0) == 2


def test_positions_never_reached_look_like_the_deepest_reached():
    """Rounds of 4 drafts that all hit say nothing about a fifth; it is taken to be as likely as
    the fourth, so the policy tries 5 when the costs say a fifth draft is nearly free (and
    learns), where a fixed prior of 0.6 kept it at 4."""
    policy = DraftPolicy(max_draft=6)
    for _ in range(30):
        policy.observe(4, 4)
    acceptance = policy.acceptance
    assert acceptance[3] > 0.9 and acceptance[4] == pytest.approx(acceptance[3], abs=0.02)
    costs = measured(1.0, {k: 1.0 + 0.05 * k for k in range(1, 7)})
    assert policy.best(costs) == 6
    for _ in range(30):  # the fifth draft turns out to miss every time
        policy.observe(6, 4)
    assert policy.acceptance[4] < 0.1 and policy.best(costs) == 4


def test_the_policy_tries_one_draft_beyond_the_longest_round_measured():
    """Past the rounds measured a cost is a guess along a prior slope; a first answer that
    jumped on it (2, then 4, then 6 drafts on the demo pair) paid a trace and losing rounds at
    every length. A drafter that always hits climbs one draft at a time as rounds are timed."""
    policy = DraftPolicy(max_draft=6)
    for _ in range(30):
        policy.observe(6, 6)
    costs = measured(1.0, {1: 1.05, 2: 1.1})
    assert policy.best(costs) == 3
    costs.rounds[3] = 1.15
    assert policy.best(costs) == 4
    costs.rounds.update({4: 1.2, 5: 1.25})
    assert policy.best(costs) == 6


def test_a_parked_policy_probes_the_draft_length_that_would_pay_best():
    """Where a drafter step costs most of a plain step, a round of one draft loses even when it
    hits: probes of one draft never lifted the estimates to where deeper rounds pay. A probe
    drafts the length the estimates favour among those that draft."""
    costs = measured(1.0, {1: 1.7, 2: 2.1, 3: 2.5})
    policy = DraftPolicy(max_draft=3)
    for _ in range(30):  # half the rounds miss the first draft, the others hit all three
        policy.observe(3, 3)
        policy.observe(3, 0)
    # 1.5, 2.0 and 2.5 tokens in 1.7, 2.1 and 2.5 plain steps: no round wins 10 %, 3 is best
    assert policy.best(costs) == 0 and policy.probe_length(costs) == 3
    choices = [policy.choose(costs, limit=10) for _ in range(PARKED_PROBE_START)]
    assert choices == [0] * (PARKED_PROBE_START - 1) + [3]
    assert policy.parked(2, probe=3) == 0 and policy.probe_length(costs, limit=2) == 2


def test_policy_parks_when_drafts_miss_and_probes_now_and_then():
    costs = measured(1.0, {1: 1.6, 2: 2.0})
    policy = DraftPolicy(max_draft=2)
    for _ in range(30):
        policy.observe(1, 0)
    assert policy.best(costs) == 0
    # Probes after PARKED_PROBE_START parked rounds, then after twice as many, and so on.
    probes = []
    for i in range(7 * PARKED_PROBE_START):
        if policy.choose(costs, limit=2):
            policy.observe(1, 0)
            probes.append(i + 1)
    assert probes == [PARKED_PROBE_START, 3 * PARKED_PROBE_START, 7 * PARKED_PROBE_START]
    # One that hits is followed by another at once, and the wait starts over.
    assert policy.choose(costs, limit=2) == 0
    policy.parked_rounds = policy.probe_interval - 1
    assert policy.choose(costs, limit=2) == 1
    policy.observe(1, 1)
    assert policy.choose(costs, limit=2) == 1
    policy.observe(1, 0)
    choices = [policy.choose(costs, limit=2) for _ in range(2 * PARKED_PROBE_START)]
    assert choices.index(1) + 1 == 2 * PARKED_PROBE_START


def test_a_probe_in_a_batch_hits_when_any_row_hits_whatever_the_order():
    costs = measured(1.0, {1: 1.6, 2: 2.0})
    for rows in ([(1, 1), (1, 0)], [(1, 0), (1, 1)]):
        policy = DraftPolicy(max_draft=2)
        for _ in range(30):
            policy.observe(1, 0)
        policy.parked_rounds = PARKED_PROBE_START - 1
        assert policy.choose(costs, limit=2) == 1
        for drafted, accepted in rows:
            policy.observe(drafted, accepted)
        assert policy.choose(costs, limit=2) == 1  # another probe at once
        assert policy.probe_interval == PARKED_PROBE_START, rows


def test_policy_follows_what_rounds_really_cost():
    """Drafting 2 that are always accepted wins at 1.2 s a round (3 tokens against 1 per 1.0 s
    plain step); rounds that really take 3.6 s make it park, and cheap ones unpark it."""
    costs = measured(1.0, {2: 1.2})
    policy = DraftPolicy(max_draft=2)
    for _ in range(30):
        policy.observe(2, 2)
    assert policy.choose(costs, limit=2) == 2
    for _ in range(30):
        costs.observe_round(2, 3.6)
        costs.observe_round(1, 2.6)
    assert policy.best(costs) == 0
    for _ in range(30):
        costs.observe_round(2, 1.2)
    assert policy.best(costs) == 2


def test_lengths_stored_by_an_earlier_process_move_with_the_machine_s_pace_now():
    """Round costs carried from an earlier process were timed in its moment. Where the length
    this process drafts costs 15 % more than stored, the machine runs 15 % slower: so do the
    lengths it has not run yet and the plain step. Held at their stored figures, rounds of 1 and
    2 would look cheap next to rounds of 3 timed now, and the policy would leave 3 for them."""
    earlier = Measurements()
    stored = {1: 1.5, 2: 2.0, 3: 2.4}
    earlier.by_rows[1] = RowCosts(
        plain=1.0, rounds=dict(stored), ratios={k: deque([1.0 / s]) for k, s in stored.items()}
    )
    earlier.policy.accepted, earlier.policy.seen = [16.0] * 6, [20.0] * 6  # 0.8 at every position
    now = Measurements()
    restore(now, snapshot(earlier))
    costs = now.rows(1)
    assert now.policy.best(costs) == 3 and costs.current_plain == pytest.approx(1.0)
    for _ in range(30):
        costs.observe_round(3, 2.4 * 1.15)
    assert costs.pace == pytest.approx(1.15, rel=1e-3)
    assert costs.round_seconds(1) == pytest.approx(1.5 * 1.15, rel=1e-3)
    assert costs.current_plain == pytest.approx(1.15, rel=1e-3)
    assert now.policy.best(costs) == 3
    # A length run here is its own measure; the next process starts from this one's pace.
    costs.observe_round(1, 1.5 * 1.15)
    assert costs.round_seconds(1) == pytest.approx(1.5 * 1.15, rel=1e-3)
    later = Measurements()
    restore(later, snapshot(now))
    assert later.rows(1).rounds == pytest.approx({1: 1.5 * 1.15, 2: 2.0 * 1.15, 3: 2.4 * 1.15}, rel=1e-3)


def test_a_length_timed_in_a_slow_spell_is_timed_again_now_and_then():
    """A length's cost is what its rounds took when it last ran: a round of 3 timed in a slow
    spell (2.1 s, truly 1.7) made rounds of 2 look best, and the policy drafted 2 for good.
    Every REFRESH_EVERY drafting rounds one drafts a length next to the chosen one that is
    measured and traced (never 1 here, whose step is not traced), and its fresh times bring the
    policy to 3."""
    costs = measured(1.0, {1: 1.4, 2: 1.5, 3: 2.1})
    policy = DraftPolicy(max_draft=3)
    for _ in range(30):
        policy.observe(4, 4)

    def traced(k):
        return 0.0 if k in (0, 2, 3) else 5.0

    chosen = []
    for _ in range(8 * REFRESH_EVERY - 1):  # up to the eighth refresh, not past it
        k = policy.choose(costs, limit=300, tracing=traced)
        costs.observe_round(k, {2: 1.5, 3: 1.7}[k])
        policy.observe(k, k)
        chosen.append(k)
    assert chosen[: REFRESH_EVERY - 1] == [2] * (REFRESH_EVERY - 1)
    assert set(chosen) == {2, 3}
    assert chosen[-REFRESH_EVERY + 1 :] == [3] * (REFRESH_EVERY - 1)


def read(clock, chunks, reader_seconds: float):
    """Every chunk, the reader spending `reader_seconds` on each before asking for the next."""
    out = []
    for chunk in chunks:
        out.append(chunk)
        clock.now += reader_seconds
    return out


def hitting(pair, text: list[int], hits: np.ndarray):
    """`pair` with a simulated drafter that proposes `text`'s next token where `hits` says, and
    misses elsewhere."""
    proposals = Proposals(text, 1.0, pair.target.args.vocab_size, hits=hits)
    return dataclasses.replace(pair, drafter=SimulatedDrafter(pair.drafter, proposals))


def test_plain_decoding_times_what_its_reader_waits_and_measures_its_own_baseline(pairs, clock):
    """Each step's time runs from the previous tokens out to these (the reader's time
    included, as --no-mtp would measure it); every step but those that fill and settle the
    pipeline is a baseline sample, so plain decoding shows no speedup over itself."""
    chunks = read(clock, generate(pairs[("e2b", False)], PROMPT, max_tokens=30, ignore_eos=True, mtp=False), 0.1)
    rounds = [c.round for c in chunks[1:]]
    stats = chunks[-1].stats
    untimed = 1 + SETTLING_STEPS
    assert [r.plain_steps for r in rounds] == [0] * untimed + [1] * (29 - untimed)
    assert all(0.1 < r.seconds < 0.11 for r in rounds)
    assert stats.decode_seconds == pytest.approx(sum(r.seconds for r in rounds))
    assert stats.baseline_steps == 29 - untimed
    assert stats.speedup == pytest.approx(1.0, abs=0.01)


def test_rows_of_a_batch_are_not_timed_for_the_prefills_of_rows_joining_them(pairs, clock, monkeypatch):
    """A batch's rows join one after another: while a newcomer prefills, the rows already in
    do not decode. That time is the newcomer's prefill, not the others' decoding, so a plain
    row shows no speedup over itself and its tok/s is its decoding's."""
    from gemma_mtp_mlx.engine.batch import generate_batch
    from gemma_mtp_mlx.engine.context import Context

    prefill = Context.prefill

    def slow_prefill(self, tokens):
        out = prefill(self, tokens)
        clock.now += 0.5  # a prefill of half a second; decoding steps take the clock's ticks
        return out

    monkeypatch.setattr(Context, "prefill", slow_prefill)
    prompts = [PROMPT, [2, 9, 310], [2, 401, 7, 7]]
    batch = generate_batch(pairs[("e2b", False)], prompts, max_tokens=30, mtp=False, ignore_eos=True)
    answers = [a for _, a in batch]
    assert len(answers) == 3
    for a in answers:
        assert a.stats.prefill_seconds >= 0.5
        assert a.stats.decode_seconds < 0.1
        assert a.stats.speedup == pytest.approx(1.0, abs=0.1)


def test_speculative_rounds_measure_the_baseline_first_then_now_and_then(echo_pairs, clock):
    """A pair with nothing measured, at a fixed K, drafts through the answer's first rounds, then
    measures until two measurements agree (no baseline samples before: the meter shows none),
    then drafts; the round after the pipeline hands over its token is timed from the hand-over;
    costs learned for later answers of the same pair."""
    pair = echo_pairs[("dense", True)]
    measurements_for(pair.target, pair.drafter, pair.compile).by_rows.clear()
    chunks = read(clock, generate(pair, PROMPT, max_tokens=50, ignore_eos=True, draft_tokens=3), 0.05)
    rounds = [c.round for c in chunks[1:]]
    # + the round in flight when the measurement was decided (compiled steps queue each round
    # before the previous one is read, engine/rounds.py)
    drafting = BASELINE_AFTER + 1
    assert [r.drafted for r in rounds[:drafting]] == [3] * drafting
    # two measurements that agree, and the steps filling and settling the pipeline
    plain = 2 * BASELINE_STEPS + 1 + SETTLING_STEPS
    measured, rounds = rounds[drafting : drafting + plain], rounds[drafting + plain :]
    assert all(r.measuring for r in measured)
    assert [r.plain_steps for r in measured] == [0] * (plain - 1) + [1]  # trusted at the last
    handed = rounds[0]
    assert handed.drafted == 0 and not handed.plain_steps  # the pipeline's last token
    assert rounds[1].drafted == 3 and not any(r.measuring for r in rounds[1:])
    stats = chunks[-1].stats
    assert stats.baseline_tokens_per_second == pytest.approx(20, rel=0.05)
    costs = measurements_for(pair.target, pair.drafter, pair.compile).rows(1)
    assert costs.plain == pytest.approx(0.05, rel=0.05) and 3 in costs.rounds
    assert costs.trusted and not costs.provisional
    # The next answer drafts from its first round; once its rounds settled after that
    # measurement (every chunk takes the reader's 0.05 s), a round of 3 is worth one plain step.
    again = read(clock, generate(pair, PROMPT, max_tokens=40, ignore_eos=True, draft_tokens=3), 0.05)
    assert again[1].round.drafted == 3 and not any(c.round.measuring for c in again[1:])
    assert costs.plain_ratio(3) == pytest.approx(1.0, rel=0.05)
    assert again[-1].stats.baseline_tokens_per_second == pytest.approx(20, rel=0.05)
    # Hours later, still the same cost per round: the next answer drafts throughout, its rounds
    # worth what the ratio says.
    clock.now += 3600
    later = read(clock, generate(pair, PROMPT, max_tokens=40, ignore_eos=True, draft_tokens=3), 0.05)
    assert all(c.round.drafted for c in later[1:-2])
    assert not later[-1].stats.baseline_is_earlier
    assert later[-1].stats.baseline_tokens_per_second == pytest.approx(1 / costs.current_plain, rel=0.05)
    # A busier machine: every step takes 0.08 s. The meter follows at once (the rounds are worth
    # what the ratio says); the first rounds after a prefill, slow anyway, do not count as drift,
    # so the plain step is measured again at the next check, once warm rounds show the change.
    slower = read(clock, generate(pair, PROMPT, max_tokens=200, ignore_eos=True, draft_tokens=3), 0.08)
    rounds = [c.round for c in slower[1:]]
    measured = [i for i, r in enumerate(rounds) if r.measuring and r.plain_steps == 1]
    assert len(measured) == BASELINE_STEPS
    # (+ the round in flight, then the steps that fill and settle the plain pipeline)
    assert BASELINE_AFTER < measured[0] <= BASELINE_AFTER + BASELINE_EVERY + 2 + SETTLING_STEPS
    assert slower[-1].stats.baseline_tokens_per_second == pytest.approx(12.5, rel=0.05)
    # A new measurement starts over: the stale figure is not averaged in.
    assert costs.plain == pytest.approx(0.08, rel=0.05) and not costs.stale


def test_the_first_answer_shows_no_speedup_until_a_baseline_it_trusts(echo_pairs, clock):
    """Without history the meter says it is measuring, shows no baseline and no speedup while
    the answer's first (slow) steps run, and shows both from the first trusted plain step on."""
    from gemma_mtp_mlx.chat.view import meter_text

    pair = echo_pairs[("dense", False)]
    measurements_for(pair.target, pair.drafter, pair.compile).by_rows.clear()
    shown = []
    for chunk in generate(pair, PROMPT, max_tokens=40, ignore_eos=True, draft_tokens=2):
        line = meter_text(chunk.stats, mtp=True, draft=2, context_used=0, context_limit=100).plain
        shown.append((chunk.round.plain_steps if chunk.round else 0, line))
        clock.now += 0.02
    # The prefill's token, the answer's first rounds and the round in flight after them
    # (engine/rounds.py), the steps filling and settling the pipeline and two measurements, but
    # for their last step.
    untrusted = 1 + BASELINE_AFTER + 1 + SETTLING_STEPS + 2 * BASELINE_STEPS
    assert all("measuring baseline" in line and "×" not in line for _, line in shown[:untrusted])
    assert shown[untrusted][0] == 1  # the first trusted plain step
    assert all(re.search(r"baseline [\d.]+ tok/s measured · [\d.]+×", line) for _, line in shown[untrusted:])
    # Every step and round takes the reader's 0.02 s: the rounds' extra tokens are the speedup.
    tokens_per_round = chunk.stats.decoded_tokens / chunk.stats.rounds
    assert f"{tokens_per_round:.2f}×" in shown[-1][1] and tokens_per_round > 1.2


def test_a_long_answer_measures_again_when_round_costs_drift(echo_pairs, clock):
    """Rounds that keep their cost never call a measurement; when they drift mid-answer (the
    context grew, the machine got busier) it is taken again at the next check (every
    BASELINE_EVERY rounds), and only then."""
    pair = echo_pairs[("moe", False)]
    measurements_for(pair.target, pair.drafter, pair.compile).by_rows.clear()
    chunks = []
    for i, chunk in enumerate(generate(pair, PROMPT, max_tokens=900, ignore_eos=True, draft_tokens=2)):
        chunks.append(chunk)
        clock.now += 0.05 if i < 300 else 0.07
    measuring = [c.round.measuring for c in chunks[1:]]
    starts = [i for i, m in enumerate(measuring) if m and (i == 0 or not measuring[i - 1])]
    # Once the first rounds are over (nothing measured yet: two measurements in a row, that
    # agree), then once after the drift; each after the round in flight when it was decided
    # (engine/rounds.py).
    first = BASELINE_AFTER + 1
    assert len(starts) == 2 and starts[0] == first, starts
    assert all(measuring[first : first + 2 * BASELINE_STEPS + 1 + SETTLING_STEPS])
    assert 300 < starts[1] <= 300 + BASELINE_EVERY + 2


@pytest.fixture
def round_cost(clock, monkeypatch):
    """`round_cost(seconds_for_k)`: every speculative round of K drafts also takes
    `seconds_for_k(k)` on the controlled clock (its verify and drafter, made dear), read
    eagerly (`run_round`) or from the compiled steps' pipeline (`RoundPipeline.step`)."""
    from gemma_mtp_mlx.engine import decode
    from gemma_mtp_mlx.engine.rounds import RoundPipeline

    def set_cost(seconds_for_k):
        real_round, real_step = decode.run_round, RoundPipeline.step

        def run_round(rows, steps, k):
            out = real_round(rows, steps, k)
            clock.now += seconds_for_k(k)
            return out

        def step(pipeline, k_next):
            k, results = real_step(pipeline, k_next)
            clock.now += seconds_for_k(k)
            return k, results

        monkeypatch.setattr(decode, "run_round", run_round)
        monkeypatch.setattr(RoundPipeline, "step", step)

    return set_cost


def test_a_cold_start_is_measured_until_two_measurements_agree(echo_pairs, clock, monkeypatch):
    """A fresh process's first plain steps run slow, for longer than an answer's first rounds:
    measurements follow one another until two agree, and only that plain step is trusted (the
    meter's baseline, the policy's yardstick)."""
    from gemma_mtp_mlx.engine.plain import PlainSteps

    pair = echo_pairs[("moe", True)]
    # Every graph this answer runs traced beforehand (a step that traces is not timed).
    read(clock, generate(pair, PROMPT, max_tokens=40, ignore_eos=True), 0.01)
    steps, step = [], PlainSteps.step

    def cold_step(self):
        steps.append(None)
        clock.now += 0.04 * 0.6 ** len(steps)
        return step(self)

    monkeypatch.setattr(PlainSteps, "step", cold_step)
    m = measurements_for(pair.target, pair.drafter, pair.compile)
    m.by_rows.clear()
    m.policy, m.budget = DraftPolicy(), LossBudget()
    chunks = read(clock, generate(pair, PROMPT, max_tokens=40, ignore_eos=True), 0.01)
    rounds = [c.round for c in chunks[1:]]
    measured = next(i for i, r in enumerate(rounds) if not r.measuring)
    # The fill and the settling steps, then steps of 13.5, 11.3 and 11.0 ms by measurement
    # (medians: reader's 10 ms, a tick, and what is left of the cold start): the second and
    # third agree within DRIFT; the hand-over.
    assert measured == 3 * BASELINE_STEPS + 2 + SETTLING_STEPS
    costs = measurements_for(pair.target, pair.drafter, pair.compile).rows(1)
    assert costs.trusted and costs.plain == pytest.approx(0.0111, rel=0.01)
    assert sum(r.plain_steps for r in rounds[:measured]) == 1


@pytest.mark.parametrize("bounded", [True, False])
def test_what_exploring_loses_against_plain_decoding_is_bounded(pairs, clock, round_cost, monkeypatch, bounded):
    """A pair with no history and a drafter that never hits, whose rounds cost 5-7 plain steps:
    the policy's priors make it try drafting, and parked, it probes now and then. Over a
    200-token answer it loses at most EXPLORE_ALLOWANCE + EXPLORE_SHARE x tokens plain steps
    against plain decoding, and the one round that overdraws; without the budget, twice that."""
    from gemma_mtp_mlx.engine import policy

    allowance = policy.EXPLORE_ALLOWANCE
    if not bounded:
        monkeypatch.setattr(policy, "EXPLORE_ALLOWANCE", math.inf)
        monkeypatch.setattr(policy, "BANKED_MOST", math.inf)
    pair = pairs[("dense", False)]
    m = measurements_for(pair.target, pair.drafter, pair.compile)
    m.by_rows.clear()
    m.policy, m.budget = DraftPolicy(), LossBudget()
    step = 0.011  # the reader's 0.01 s per chunk and a tick of the clock: a plain step
    dearest = 7  # plain steps of the dearest round this policy runs (K = 2)
    round_cost(lambda k: step * (4 + k))
    stats = read(clock, generate(pair, PROMPT, max_tokens=200, ignore_eos=True), 0.01)[-1].stats
    lost = stats.decode_seconds / step - stats.decoded_tokens  # in plain steps
    bound = allowance + policy.EXPLORE_SHARE * stats.decoded_tokens + dearest - 1
    assert stats.drafted > 0  # it did explore
    assert (lost <= bound) == bounded, (lost, bound)


def test_the_budget_never_parks_drafting_that_wins(pairs, clock):
    """Rounds that cost a plain step and emit more (every draft hits): every policy round
    gains, so after the first measurement the policy drafts every round."""
    pair = pairs[("dense", False)]
    n = 120
    plain = [t for c in generate(pair, PROMPT, max_tokens=n, ignore_eos=True, mtp=False) for t in c.token_ids]
    pair = hitting(pair, PROMPT + plain, np.ones(len(PROMPT) + n, dtype=bool))
    chunks = read(clock, generate(pair, PROMPT, max_tokens=n, ignore_eos=True), 0.01)
    rounds = [c.round for c in chunks[1:]]
    first = next(i for i, r in enumerate(rounds) if r.drafted)
    assert all(r.drafted for r in rounds[first:-2]), [r.drafted for r in rounds]


def test_a_stretch_the_drafter_misses_does_not_park_a_good_answer_for_the_rest(pairs, clock, round_cost):
    """Every draft hits but for 24 positions mid-answer that all miss; a round of K costs a plain
    step and 0.3 K more. The rounds before the stretch bank what they gain, so the policy drafts
    on once the stretch is over: a budget that banked no more than its allowance was spent in
    the stretch and parked the policy for the rest of the answer."""
    pair = pairs[("dense", False)]
    n = 240
    plain = [t for c in generate(pair, PROMPT, max_tokens=n, ignore_eos=True, mtp=False) for t in c.token_ids]
    hits = np.ones(len(PROMPT) + n, dtype=bool)
    stretch_end = len(PROMPT) + 124
    hits[stretch_end - 24 : stretch_end] = False
    simulated = hitting(pair, PROMPT + plain, hits)
    round_cost(lambda k: 0.011 * 0.3 * k)
    chunks = read(clock, generate(simulated, PROMPT, max_tokens=n, ignore_eos=True), 0.01)
    assert [t for c in chunks for t in c.token_ids] == plain
    position, parked_after = len(PROMPT), []
    for c in chunks[1:]:
        near_the_end = position > len(PROMPT) + n - 8  # rounds that would draft past it
        if position > stretch_end + 16 and not near_the_end and not c.round.drafted and not c.round.measuring:
            parked_after.append(position)
        position += len(c.token_ids)
    assert any(c.round.drafted for c in chunks[1:]) and not parked_after, parked_after


def test_an_answer_that_opens_with_misses_drafts_on_what_earlier_answers_banked(pairs, clock, round_cost):
    """The loss budget is the pair's, not an answer's: an answer whose first drafts miss spends
    what the answer before it banked and drafts on. With a budget of its own (3 plain steps) its
    first missed rounds spent it, and the policy stayed parked until the answer had earned back
    a probe (some 45 tokens), here the rest of it. (The second answer continues the first's
    text, so one drafter, hitting by position, serves both.)"""
    pair = pairs[("dense", False)]
    n = 60
    first = [t for c in generate(pair, PROMPT, max_tokens=n, ignore_eos=True, mtp=False) for t in c.token_ids]
    follow_up = PROMPT + first
    second = [t for c in generate(pair, follow_up, max_tokens=n, ignore_eos=True, mtp=False) for t in c.token_ids]
    hits = np.ones(len(follow_up) + n, dtype=bool)
    hits[len(follow_up) : len(follow_up) + 8] = False  # the second answer's first eight positions
    simulated = hitting(pair, follow_up + second, hits)
    round_cost(lambda k: 0.011 * 0.3 * k)
    read(clock, generate(simulated, PROMPT, max_tokens=n, ignore_eos=True), 0.01)
    budget = measurements_for(simulated.target, simulated.drafter, simulated.compile).budget
    assert budget.balance > 2 * EXPLORE_ALLOWANCE  # its rounds won
    chunks = read(clock, generate(simulated, follow_up, max_tokens=n, ignore_eos=True), 0.01)
    assert [t for c in chunks for t in c.token_ids] == second
    rounds = [c.round for c in chunks[1:] if not c.round.measuring]
    assert rounds[0].drafted and not rounds[0].accepted  # it opened drafting, and missed
    assert all(r.drafted for r in rounds[:-4]), [r.drafted for r in rounds]


def test_policy_rounds_are_lossless(echo_pairs):
    pair = echo_pairs[("moe", True)]
    plain = [t for c in generate(pair, PROMPT, max_tokens=200, ignore_eos=True, mtp=False) for t in c.token_ids]
    ids, stats = [], None
    for chunk in generate(pair, PROMPT, max_tokens=200, ignore_eos=True):
        ids += chunk.token_ids
        stats = chunk.stats
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


def test_an_answer_joining_a_running_decoder_takes_its_recent_measurement(echo_pairs, clock):
    """A refilled batch or a server adds answers to a decoder that measured a moment ago at
    this many rows: they go by that measurement instead of calling a plain burst of their own."""
    from gemma_mtp_mlx.engine.batch import generate_batch
    from gemma_mtp_mlx.engine.decode import Decoder
    from gemma_mtp_mlx.engine.generate import make_sampler

    pair = echo_pairs[("dense", False)]
    options = dict(max_tokens=30, draft_tokens=2, ignore_eos=True)
    for _ in range(2):  # 2 rows measured, and their ratios pooled
        list(generate_batch(pair, [PROMPT, [2, 9, 310]], **options))
    decoder = Decoder(pair, draft_tokens=2)
    sampler, stop = make_sampler(pair, ignore_eos=True)
    decoder.add(PROMPT, sampler, max_tokens=400, stop=stop)
    for _ in range(20):  # past a measurement of its own at 1 row
        decoder.step()
    late = decoder.add([2, 9, 310], make_sampler(pair, ignore_eos=True)[0], max_tokens=400, stop=stop)
    rounds = [e.round for _ in range(2 * BASELINE_AFTER) for e in decoder.step()]
    assert not any(r.measuring for r in rounds)
    # Its rounds count by the plain/round ratio measured at 2 rows: its meter says what plain
    # steps would have cost meanwhile.
    costs = measurements_for(pair.target, pair.drafter, pair.compile).rows(2)
    assert costs.plain_ratio(2) and not late.stream.stats.baseline_is_earlier
    assert late.stream.stats.baseline_tokens_per_second == pytest.approx(1 / costs.current_plain, rel=0.1)
    decoder.close()


def test_a_round_s_trace_is_time_plain_decoding_would_have_decoded_through(ckpt, clock, monkeypatch):
    """A context that grows into a larger full-attention buffer traces its round again; plain
    decoding traces no round, so the meter counts that trace as plain steps it would have
    taken: the baseline stays plain's speed (uncredited, here it read a sixth low)."""
    from gemma_mtp_mlx import load
    from gemma_mtp_mlx.engine.steps import CompiledSteps, steps_for

    pair = load(str(ckpt["dense"]), str(ckpt["dense-centroids"]))  # a fixed K drafts on, hit or not
    function = CompiledSteps._function

    def slow_to_trace_a_round(steps, signature, *args):
        if signature in steps.functions or signature[0] != "round":
            return function(steps, signature, *args)
        compiled = function(steps, signature, *args)

        def first_call(*inputs):
            clock.now += 0.5
            return compiled(*inputs)

        return first_call

    monkeypatch.setattr(CompiledSteps, "_function", slow_to_trace_a_round)
    read(clock, generate(pair, PROMPT, max_tokens=50, ignore_eos=True, draft_tokens=3), 0.05)
    steps = steps_for(pair.target, pair.drafter, True)
    traced = steps.traces
    long_prompt = [2] + [40 + i % 300 for i in range(229)]  # the answer crosses slot 256
    chunks = read(clock, generate(pair, long_prompt, max_tokens=60, ignore_eos=True, draft_tokens=3), 0.05)
    assert steps.traces > traced and any(s[:2] == ("round", 3) and s[-1] == (512,) for s in steps.functions)
    assert chunks[-1].stats.baseline_tokens_per_second == pytest.approx(20, rel=0.05)


def test_near_an_answer_s_end_no_round_longer_than_the_room_is_weighed():
    """With room for two drafts, a round of 4 runs as a round of 2: weighed as 4 (traced, so
    free), it was taken and then traced a step of 2 for the answer's last three tokens."""
    costs = measured(1.0, {k: 1.0 + 0.07 * k for k in range(1, 5)})
    policy = DraftPolicy(max_draft=4)
    for _ in range(30):
        policy.observe(4, 4)

    def tracing(k):
        return 0.0 if k in (0, 4) else 5.0  # plain and K = 4 are traced

    assert policy.choose(costs, limit=300, tracing=tracing) == 4
    assert len(policy.rates(costs, limit=2, tracing=tracing)) == 3
    assert policy.choose(costs, limit=2, tracing=tracing) == 0


def test_a_parked_policy_probes_the_length_it_drafted_last():
    """After a bad stretch parks a policy that drafted 3, its estimates favour probes of one
    draft, which on a pair whose round of one costs 1.6 plain steps pays little even when it
    hits and lifts nothing but the first position: a probe asks whether rounds of 3 pay again."""
    from gemma_mtp_mlx.engine.policy import _favoured

    costs = measured(1.0, {1: 1.6, 2: 2.1, 3: 2.6})
    policy = DraftPolicy(max_draft=3)
    for _ in range(30):
        policy.observe(3, 3)
    assert policy.choose(costs, limit=10) == 3
    for _ in range(30):
        policy.observe(3, 0)
    assert policy.best(costs) == 0 and _favoured(policy.rates(costs)) == 1
    choices = [policy.choose(costs, limit=10) for _ in range(PARKED_PROBE_START)]
    assert choices == [0] * (PARKED_PROBE_START - 1) + [3]
    # Near an answer's end, with no room for 3 drafts, no probe: one of 2 would ask nothing about
    # rounds of 3, and could trace a step for the last few tokens.
    assert policy.probe_length(costs, limit=2) == 0
    policy.parked_rounds = PARKED_PROBE_START
    assert policy.choose(costs, limit=2) == 0 and not policy.probing


def test_a_parked_policy_probes_a_longer_length_its_estimates_favour():
    """A policy whose last drafting round had room for one draft only (near an answer's end),
    parked once rounds got dearer: its probes ask about rounds of 3, which its estimates favour.
    Probes of one draft, a round that costs nearly two plain steps here, could never bring
    drafting back."""
    policy = DraftPolicy(max_draft=3)
    for _ in range(30):
        policy.observe(3, 3)
    assert policy.choose(measured(1.0, {1: 1.6, 2: 2.1, 3: 2.6}), limit=1) == 1
    dearer = measured(1.0, {1: 1.9, 2: 2.9, 3: 3.7})
    assert policy.best(dearer) == 0
    choices = [policy.choose(dearer, limit=10) for _ in range(PARKED_PROBE_START)]
    assert choices == [0] * (PARKED_PROBE_START - 1) + [3]
