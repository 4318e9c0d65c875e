"""Compiled steps (engine/steps.py) against the eager path: the same tokens in every shape, past
the sliding window and in batches; the graphs traced stay few. (Sampling's distribution: test_sampling,
through the default, compiled path.)"""

import json

import mlx.core as mx
import pytest

from gemma_mtp_mlx import load
from gemma_mtp_mlx.engine import batch, costs
from gemma_mtp_mlx.engine.steps import steps_for
from gemma_mtp_mlx.models.cache import FullCache, full_slots
from tests.conftest import generated_ids
from tests.test_chat import build_tiny
from tests.test_cli import gemma

PROMPT = [2, 40, 77, 301, 12]


@pytest.mark.parametrize("shape,centroids", [("e2b", True), ("moe", False), ("dense", True)])
def test_compiled_steps_give_the_eager_tokens_past_the_window(echo_pairs, shape, centroids):
    """60 tokens through windows of 8, with drafts accepted and rejected (rollbacks). The
    compiled path against itself, at more lengths and further, is test_speculative's."""
    pair = echo_pairs[(shape, centroids)]
    options = dict(max_tokens=60, ignore_eos=True)
    eager = generated_ids(pair, PROMPT, mtp=False, compile=False, **options)
    assert generated_ids(pair, PROMPT, mtp=False, compile=True, **options) == eager
    assert generated_ids(pair, PROMPT, draft_tokens=3, compile=False, **options) == eager
    assert generated_ids(pair, PROMPT, draft_tokens=3, compile=True, **options) == eager


@pytest.mark.parametrize("k", [1, 3])
def test_rounds_queued_ahead_across_a_buffer_bucket_keep_every_position(echo_pairs, k):
    """A prompt that ends K + 1 slots before the full-attention buffer's end: the first round
    fills it to the brim and the round queued behind it, before the first is read, starts
    past it. That one must grow the buffer first (the caches' offsets bound the round in
    flight's positions), or it writes past the end and the tokens part from plain decoding."""
    pair = echo_pairs[("e2b", False)]
    prompt = [2] + [40 + i % 300 for i in range(full_slots(1) - k - 2)]
    assert len(prompt) + k + 1 == full_slots(1)
    options = dict(max_tokens=12, ignore_eos=True)
    plain = generated_ids(pair, prompt, mtp=False, compile=False, **options)
    assert generated_ids(pair, prompt, draft_tokens=k, compile=True, **options) == plain


def test_batch_rows_are_the_same_eager_and_compiled(echo_pairs):
    pair = echo_pairs[("e2b", False)]
    prompts = [PROMPT, [2, 9, 310], [2, 55, 56, 57, 58, 59, 60]]
    for mode in ({"draft_tokens": 3}, {"mtp": False}):
        answers = {
            compile: [a.token_ids for _, a in sorted(batch.generate_batch(
                pair, prompts, max_tokens=30, ignore_eos=True, compile=compile, **mode))]
            for compile in (False, True)
        }
        assert answers[False] == answers[True]


def test_eager_sampling_runs_the_same_functions(echo_pairs):
    """The eager path samples through the functions whose distribution test_sampling checks on
    the compiled path; here it runs and drafts."""
    pair = echo_pairs[("dense", False)]
    ids = generated_ids(pair, PROMPT, max_tokens=20, temperature=1.0, top_k=3, seed=1,
                        ignore_eos=True, draft_tokens=3, compile=False)
    assert len(ids) == 20


def test_a_step_is_traced_once_per_shape(ckpt, monkeypatch):
    """An answer replays the graphs an earlier one traced; a context that grows into a larger
    full-attention buffer traces each step once more. (A pair of its own: compiled steps are
    kept per pair, and other tests' answers trace theirs. Measurements kept from going stale:
    each answer then runs the same steps.)"""
    monkeypatch.setattr(costs, "DRIFT", float("inf"))
    pair = load(str(ckpt["dense"]), str(ckpt["dense-centroids"]))
    steps = steps_for(pair.target, pair.drafter, True)
    assert steps.traces == 0
    options = dict(max_tokens=24, ignore_eos=True, draft_tokens=3)
    for _ in range(2):  # the first answer measures the plain step twice (a cold start)
        generated_ids(pair, PROMPT, **options)
    traced = steps.traces
    generated_ids(pair, PROMPT, **options)
    assert steps.traces == traced
    long_prompt = PROMPT * 50  # 250 tokens: the answer crosses 256, the first bucket's end
    generated_ids(pair, long_prompt, **options)
    assert traced < steps.traces <= 2 * traced


def test_an_answer_holds_the_buffer_it_ends_in_from_its_start(ckpt):
    """A 300-token answer after a short prompt ends past the first bucket's 256 slots: its
    buffers hold where it may end from the start, so each step shape traces once, at one buffer
    size, not again midway; an answer that would more than double them grows them as it goes."""
    pair = load(str(ckpt["dense"]), str(ckpt["dense-centroids"]))
    steps = steps_for(pair.target, pair.drafter, True)
    ids = generated_ids(pair, PROMPT, max_tokens=300, ignore_eos=True, draft_tokens=3)
    assert ids == generated_ids(pair, PROMPT, max_tokens=300, ignore_eos=True, mtp=False)
    mtp = [signature for signature in steps.functions if signature[0] == "round"]
    assert {signature[-1] for signature in mtp} == {(512,)}
    assert len(steps.functions) == steps.traces  # nothing traced twice
    generated_ids(pair, PROMPT, max_tokens=600, ignore_eos=True, draft_tokens=3)
    assert {signature[-1] for signature in steps.functions if signature[0] == "round"} > {(512,)}


def test_a_fixed_k_answer_ends_without_tracing_a_shorter_round(ckpt):
    """The last round of a `-k 3` answer may have room for fewer drafts. A step of that length,
    not traced yet, would trace a graph (several plain steps' time) for its last few tokens: it
    ends in plain steps, or rounds of a length traced already, with the same tokens."""
    pair = load(str(ckpt["dense"]), str(ckpt["dense-assistant"]))
    steps = steps_for(pair.target, pair.drafter, True)
    for n in range(17, 25):
        options = dict(max_tokens=n, ignore_eos=True)
        plain = generated_ids(pair, PROMPT, mtp=False, **options)
        assert generated_ids(pair, PROMPT, draft_tokens=3, **options) == plain
    assert {signature[1] for signature in steps.functions if signature[0] == "round"} == {3}


def test_a_fixed_k_answer_s_last_plain_steps_are_no_baseline_sample(ckpt, monkeypatch):
    """The plain steps that finish a `-k 3` answer are not its baseline's measurements: taken as
    samples, each answer's restarted the rounds held against the plain step (engine/costs.py),
    so that a chat's later answers pooled ratios against a plain step measured long before."""
    monkeypatch.setattr(costs, "DRIFT", float("inf"))  # no measurement but the first
    pair = load(str(ckpt["dense"]), str(ckpt["dense-assistant"]))
    generated_ids(pair, PROMPT, max_tokens=40, ignore_eos=True, draft_tokens=3)
    row_costs = costs.measurements_for(pair.target, pair.drafter, True).rows(1)
    measured = row_costs.plain_count
    for n in range(41, 46):
        generated_ids(pair, PROMPT, max_tokens=n, ignore_eos=True, draft_tokens=3)
    assert row_costs.plain_count == measured


def test_full_attention_buffers_grow_in_few_buckets():
    sizes = [full_slots(n) for n in range(1, 300_000, 97)]
    assert all(s >= n for s, n in zip(sizes, range(1, 300_000, 97)))
    assert all(s - n < 0.25 * s + 256 for s, n in zip(sizes, range(1, 300_000, 97)))
    assert len(set(sizes)) <= 40  # traces per step shape over a 256k-token context
    cache, like = FullCache(limit=1000), mx.zeros((1, 1, 1, 4))
    cache.reserve(900, like, like)  # a bucket of 1024 slots, held to the context's 1000
    assert cache.keys.shape[2] == 1000


def test_no_compile_gives_the_same_answer(tmp_path_factory):
    tiny = build_tiny(tmp_path_factory)
    answers = []
    for flags in ((), ("--no-compile",)):
        r = gemma("--model", str(tiny), "--prompt", "Hello there", "-n", "16", "--json", *flags)
        assert r.exit_code == 0, r.output
        answers.append(json.loads(r.stdout)["token_ids"])
    assert answers[0] == answers[1] and len(answers[0]) > 1


def test_kept_compiled_steps_let_their_models_go(ckpt):
    """Compiled steps are kept per pair while its models live; they must not keep them alive."""
    import gc
    import weakref

    from gemma_mtp_mlx.engine import steps as steps_module

    pair = load(str(ckpt["e2b"]), str(ckpt["e2b-assistant"]))
    generated_ids(pair, PROMPT, max_tokens=8, draft_tokens=2)
    key = (id(pair.target), id(pair.drafter))
    assert key in steps_module._COMPILED
    target = weakref.ref(pair.target)
    del pair
    gc.collect()
    assert target() is None and key not in steps_module._COMPILED


def test_a_ring_write_is_one_scatter_per_buffer_and_wraps_around():
    """A compiled step writes each sliding ring with one scatter along its slots: an indexed
    assignment would build index arrays for every other axis too, a dozen primitives per write
    in every layer of every step."""
    from gemma_mtp_mlx.models.traced_cache import RowPositions, TracedRing
    from gemma_mtp_mlx.tools.bench.host import primitives

    slots, length = 8, 3
    positions = RowPositions(mx.array([6], dtype=mx.int32), length, window=4, ring_slots=slots,
                             full_slots=256)
    ring = TracedRing(mx.zeros((1, 2, slots, 4)), mx.zeros((1, 2, slots, 4)), positions)
    keys = mx.arange(1, 1 + 2 * length * 4, dtype=mx.float32).reshape(1, 2, length, 4)
    ring.store(keys, -keys, rope=lambda x, offset: x)
    counts = primitives([ring.keys, ring.values])
    assert counts["ScatterAxis"] == 2 and counts["Scatter"] == 0, counts
    written = [6, 7, 0]  # positions 6, 7, 8 of a ring of 8 slots
    assert mx.array_equal(ring.keys[:, :, written], keys)
    assert mx.array_equal(ring.values[:, :, written], -keys)
    untouched = [1, 2, 3, 4, 5]
    assert not mx.any(ring.keys[:, :, untouched]).item()


def test_one_token_s_heads_are_placed_without_a_transpose():
    """A decoding step's attention (one token) splits and joins heads with reshapes alone; a
    block of tokens transposes. Both give the same heads."""
    from gemma_mtp_mlx.models.gemma4 import heads
    from gemma_mtp_mlx.tools.bench.host import primitives

    def norm(x):
        return x * 2

    for length in (1, 3):
        x = mx.arange(2 * length * 12, dtype=mx.float32).reshape(2, length, 12)
        h = heads(norm, x, 3, 4)
        assert (primitives([h])["Transpose"] == 0) == (length == 1)
        assert mx.array_equal(h, 2 * x.reshape(2, length, 3, 4).transpose(0, 2, 1, 3))


def test_a_shape_not_traced_is_charged_what_traces_of_its_length_cost(ckpt):
    """What the policy is told a step would first spend tracing: nothing for a shape traced
    already; for one that is not, what its length's trace took for other rows, else the line
    through the traces of the other lengths (a round's graph grows with its drafts), or their
    mean where it does not grow; nothing on the eager path."""
    from gemma_mtp_mlx.engine.context import Context
    from gemma_mtp_mlx.engine.sampling import Sampler, SamplerSettings
    from gemma_mtp_mlx.engine.speculative import Row
    from gemma_mtp_mlx.engine.steps import CompiledSteps, EagerSteps

    pair = load(str(ckpt["dense"]), str(ckpt["dense-centroids"]))
    ctx = Context(pair.target)
    logits, hidden, _ = ctx.prefill(PROMPT)
    token = mx.argmax(logits[0, 0]).reshape(1, 1)
    rows = [Row(ctx, Sampler(), token, hidden)]
    sampled = [Row(ctx, Sampler(SamplerSettings(temperature=0.7)), token, hidden)]
    steps = CompiledSteps(pair.target, pair.drafter)
    assert steps.trace_seconds_before(rows, 3) == 0.0  # nothing traced: nothing known yet
    mx.eval(steps.speculate(rows, 3).accepted)
    assert steps.traces == 1 and steps.trace_seconds > 0
    assert steps.traced_drafts == {3: steps.trace_seconds}
    assert steps.trace_seconds_before(rows, 3) == 0.0
    assert steps.trace_seconds_before(sampled, 3) == steps.trace_seconds  # another shape of 3
    assert steps.trace_seconds_before(rows, 2) == steps.trace_seconds  # one length known: its time
    assert steps.trace_seconds_before(rows, 0) == steps.trace_seconds
    steps.traced_drafts = {0: 0.006, 3: 0.018}
    assert steps.trace_seconds_before(rows, 3) == 0.0
    assert steps.trace_seconds_before(rows, 1) == pytest.approx(0.010)
    assert steps.trace_seconds_before(rows, 6) == pytest.approx(0.030)
    steps.traced_drafts = {1: 0.012, 2: 0.010}  # a longer round traced faster: noise
    assert steps.trace_seconds_before(rows, 4) == pytest.approx(0.011)
    assert EagerSteps(pair.target, pair.drafter).trace_seconds_before(rows, 2) == 0.0
