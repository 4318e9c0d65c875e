"""Which round a pipelined step timed (engine/round_timing.py): synthetic steps, and the decoder
on a controlled clock under both readings of a step's interval (the round it reads, as on a
device that runs ahead of the host; the round it queues, as on MLX's CPU backend)."""

import numpy as np
import pytest

from gemma_mtp_mlx import generate
from gemma_mtp_mlx.engine.costs import measurements_for
from gemma_mtp_mlx.engine.plain import PlainSteps
from gemma_mtp_mlx.engine.policy import REFRESH_EVERY, DraftPolicy, LossBudget
from gemma_mtp_mlx.engine.round_timing import EARLY_READ, PipelineStep, RoundTiming
from gemma_mtp_mlx.engine.rounds import RoundPipeline

from .test_policy import PROMPT, hitting

COSTS = {1: 1.4, 2: 1.5, 3: 1.7, 4: 2.0}


def step(read: int, queued: int, seconds: float, *, first=False, timed=True, traced=False):
    return PipelineStep(read, queued, seconds, first, timed, traced)


def timings(steps, plain=1.0, costs=COSTS):
    timing = RoundTiming()
    return [timing.round_of(s, costs.get, plain) for s in steps]


def test_a_step_that_reads_and_queues_one_length_times_it():
    assert timings([step(3, 3, 1.7, first=True), step(3, 3, 1.72), step(3, 3, 1.68)]) == [
        None, (3, 1.72), (3, 1.68)
    ]


def test_a_change_of_length_is_timed_by_the_rounds_after_it():
    # Its interval holds a round of 3 (a device ahead of the host) or of 4 (the CPU backend).
    assert timings([step(3, 3, 1.7), step(3, 4, 1.85), step(4, 4, 2.0)]) == [
        (3, 1.7), None, (4, 2.0)
    ]


@pytest.mark.parametrize("holds", ["read", "queued"])
def test_a_round_between_two_of_another_length_costs_their_two_intervals_less_the_other(holds):
    """A refresh round of 4 between rounds of 3: read-first the intervals are 1.7 then 2.0,
    queued-first 2.0 then 1.7; either way the round of 4 costs 3.7 - 1.7."""
    first, second = (1.7, 2.0) if holds == "read" else (2.0, 1.7)
    out = timings([step(3, 3, 1.7), step(3, 4, first), step(4, 3, second), step(3, 3, 1.7)])
    assert out[1] is None and out[3] == (3, 1.7)
    assert out[2][0] == 4 and out[2][1] == pytest.approx(2.0)
    # ...unless the other length has no cost to take away, or either step traced
    assert timings([step(3, 3, 1.7), step(3, 4, first), step(4, 3, second)], costs={})[2] is None
    assert timings([step(3, 3, 1.7), step(3, 4, 9.0, traced=True), step(4, 3, 1.7)])[2] is None


def test_a_pipeline_s_last_round_is_timed_unless_its_read_came_early():
    late = step(3, 0, 1.7)
    early = step(3, 0, EARLY_READ * 1.0 - 0.01)  # the round ran within the step before
    assert timings([step(3, 3, 1.7), late]) == [(3, 1.7), (3, 1.7)]
    assert timings([step(3, 3, 1.7), early]) == [(3, 1.7), None]
    # without a plain step to tell them apart, neither
    assert timings([step(3, 3, 1.7), late], plain=None) == [(3, 1.7), None]


def test_a_pipeline_s_first_step_times_a_lone_round_only():
    """A pipeline's first step built its round while the device waited: alone (a probe), that
    is the round whole; with a second queued behind it, the CPU backend's interval holds both."""
    assert timings([step(2, 0, 1.9, first=True)]) == [(2, 1.9)]
    assert timings([step(2, 0, 1.9, first=True)], plain=None) == [(2, 1.9)]
    assert timings([step(2, 2, 3.0, first=True)]) == [None]
    assert timings([step(2, 0, 1.9, first=True, timed=False)]) == [None]  # after a hand-over


def test_a_trace_and_an_early_read_time_nothing():
    assert timings([step(3, 3, 1.7), step(3, 3, 9.0, traced=True), step(3, 3, 0.3), step(3, 3, 1.7)]) == [
        (3, 1.7), None, None, (3, 1.7)
    ]


@pytest.fixture
def device(clock, monkeypatch):
    """`device(reading, plain, round_seconds)`: plain steps and rounds take device time on the
    controlled clock, spent where a step's interval holds it: `"read"`, the round each step
    reads (a device that runs ahead of the host); `"queued"`, the round each step queues, with
    a pipeline's start holding the two rounds it queues and its last step only a round's tail
    (MLX's CPU backend)."""

    def set_device(reading, plain, round_seconds):
        real_plain, real_queue, real_step = PlainSteps.step, RoundPipeline._queue, RoundPipeline.step

        def plain_step(steps):
            clock.now += plain
            return real_plain(steps)

        def queue(pipeline, k, start):
            if reading == "queued":
                clock.now += round_seconds(k)
            return real_queue(pipeline, k, start)

        def round_step(pipeline, k_next):
            k, results = real_step(pipeline, k_next)
            if reading == "read":
                clock.now += round_seconds(k)
            elif not k_next:
                clock.now += plain / 5
            return k, results

        monkeypatch.setattr(PlainSteps, "step", plain_step)
        monkeypatch.setattr(RoundPipeline, "_queue", queue)
        monkeypatch.setattr(RoundPipeline, "step", round_step)

    return set_device


def fresh_hitting_pair(pairs, n: int):
    """The dense pair with a drafter whose every draft hits in an `n`-token answer to PROMPT,
    and nothing learned for it yet."""
    pair = pairs[("dense", False)]
    plain = [t for c in generate(pair, PROMPT, max_tokens=n, ignore_eos=True, mtp=False) for t in c.token_ids]
    pair = hitting(pair, PROMPT + plain, np.ones(len(PROMPT) + n, dtype=bool))
    m = measurements_for(pair.target, pair.drafter, pair.compile)
    m.by_rows.clear()
    m.policy, m.budget = DraftPolicy(), LossBudget()
    return pair


@pytest.mark.parametrize("reading", ["read", "queued"])
def test_the_policy_learns_each_length_s_own_cost_whichever_round_an_interval_holds(pairs, clock, device, reading):
    """Every draft hits, and longer rounds pay: the policy climbs length by length and, once
    there, drafts a shorter neighbour now and then (REFRESH_EVERY). Whichever round a step's
    interval holds, every length it ran costs what its rounds take. (Held against the round
    read alone, the CPU backend's reading gave each new length the old one's time and swapped
    the neighbour's with the chosen length's.)"""
    n = 400
    pair = fresh_hitting_pair(pairs, n)
    clock.tick = 0.0  # the device's time alone

    def round_seconds(k):
        return 0.01 * (1.2 + 0.3 * k)

    device(reading, 0.01, round_seconds)
    chunks = list(generate(pair, PROMPT, max_tokens=n, ignore_eos=True))
    drafted = [c.round.drafted for c in chunks[1:] if c.round.drafted]
    longest = max(drafted)
    assert longest >= 4 and drafted.count(longest - 1) >= n // (8 * REFRESH_EVERY)
    costs = measurements_for(pair.target, pair.drafter, pair.compile).rows(1)
    assert set(costs.rounds) >= set(range(2, longest + 1))
    for k, seconds in costs.rounds.items():
        assert seconds == pytest.approx(round_seconds(k), rel=0.01), (k, costs.rounds)


@pytest.mark.parametrize("reading", ["read", "queued"])
@pytest.mark.parametrize("n, k", [(48, 1), (120, 3)])
def test_a_short_first_answer_s_meter_holds_its_rounds_against_the_plain_step(pairs, clock, device, reading, n, k):
    """Nothing learned yet: a fixed K measures its plain step after its first rounds, and its
    plain/round ratio is known only some rounds into the pipeline after that. The meter's
    baseline is plain decoding's speed all the same. (Credited from the ratio's coming on, the
    rounds held a round's work less than they were credited under the CPU backend's reading:
    the round read then ran in the step before, and a pipeline's last read is early; here the
    baseline read 23 % and 7 % high.)"""
    pair = fresh_hitting_pair(pairs, n)
    clock.tick = 0.0
    device(reading, 0.01, lambda drafts: 0.01 * (1.2 + 0.3 * drafts))
    stats = list(generate(pair, PROMPT, max_tokens=n, ignore_eos=True, draft_tokens=k))[-1].stats
    assert stats.baseline_tokens_per_second == pytest.approx(100.0, rel=0.02)
