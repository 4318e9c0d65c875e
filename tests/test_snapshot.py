"""The sliding rings' snapshots (engine/snapshot.py) and the chunked, stoppable prefill
(engine/context.py) on the tiny E2B-like target (sliding window 8), with a slack of 8 so that
a ring wraps after 16 tokens and rolls back at most 7."""

import mlx.core as mx
import numpy as np
import pytest

from gemma_mtp_mlx import load
from gemma_mtp_mlx.engine import context as context_module
from gemma_mtp_mlx.engine.context import Context, PrefillStopped
from gemma_mtp_mlx.models.cache import SlidingWindowCache
from tests.test_chat import build_tiny

SLACK = 8
rng = np.random.default_rng(0)
PROMPT = rng.integers(24, 512, 40).tolist()
ANSWER = rng.integers(24, 512, 20).tolist()
FOLLOW_UP = rng.integers(24, 512, 10).tolist()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return load(str(build_tiny(tmp_path_factory)), None).target


def rings(ctx: Context) -> dict[int, tuple[np.ndarray, np.ndarray, int, int]]:
    """Copies of every sliding ring's state (the slots in use)."""
    out = {}
    for i, c in enumerate(ctx.cache):
        if isinstance(c, SlidingWindowCache):
            keys, values, offset, written = c.state
            out[i] = (np.array(keys), np.array(values), offset, written)
    return out


def same_rings(a: dict, b: dict) -> bool:
    def same(x, y):
        return np.array_equal(x[0], y[0]) and np.array_equal(x[1], y[1]) and x[2:] == y[2:]

    return a.keys() == b.keys() and all(same(a[i], b[i]) for i in a)


def decode(ctx: Context, tokens: list[int]) -> None:
    """Write tokens one at a time, as plain decoding does (slice assignment into the rings)."""
    for t in tokens:
        mx.eval(ctx.target(mx.array([[t]]), ctx.cache))
        ctx.tokens.append(t)


def test_a_snapshot_survives_later_writes_and_restores_exactly(target):
    ctx = Context(target, slack=SLACK, keep_snapshot=True)
    ctx.prefill(PROMPT)
    at_prompt = rings(ctx)
    assert ctx.snapshot.position == len(PROMPT) and ctx.snapshot.rings.keys() == at_prompt.keys()
    decode(ctx, ANSWER)  # one token at a time: in-place writes into the wrapped rings
    assert not same_rings(rings(ctx), at_prompt)  # the live rings did change ...
    ctx.rewind(len(ANSWER))  # ... past the slack: back to the snapshot, exactly
    assert ctx.tokens == PROMPT and same_rings(rings(ctx), at_prompt)
    # the snapshot stays usable after a restore: write over it again and come back again
    decode(ctx, ANSWER[::-1])
    target(mx.array([FOLLOW_UP * 3]), ctx.cache)  # a long block replaces the ring arrays
    ctx.tokens += FOLLOW_UP * 3
    ctx.rewind(len(ANSWER) + 30)
    assert ctx.tokens == PROMPT and same_rings(rings(ctx), at_prompt)


def test_the_next_prompt_prefills_only_what_follows_the_snapshot(target):
    """A turn that drops the last answer rolls back 20 > 7 tokens: with the snapshot only the
    new tokens run, and the result is bit for bit the one of a context that never held the
    answer; without one the context starts over."""
    follow = PROMPT + FOLLOW_UP
    direct = Context(target, slack=SLACK)
    direct.prefill(PROMPT)
    expected_logits, expected_hidden, _ = direct.prefill(follow)
    for keep_snapshot, prefilled in ((True, len(FOLLOW_UP)), (False, len(follow))):
        ctx = Context(target, slack=SLACK, keep_snapshot=keep_snapshot)
        ctx.prefill(PROMPT)
        decode(ctx, ANSWER)
        logits, hidden, n = ctx.prefill(follow)
        assert n == prefilled and ctx.tokens == follow
        if keep_snapshot:
            assert np.array_equal(np.array(logits), np.array(expected_logits))
            assert np.array_equal(np.array(hidden), np.array(expected_hidden))
            assert same_rings(rings(ctx), rings(direct))
            assert ctx.snapshot.position == len(follow)  # the new turn's own snapshot


def test_a_snapshot_past_the_rollback_point_is_dropped(target):
    ctx = Context(target, slack=SLACK, keep_snapshot=True)
    ctx.prefill(PROMPT)
    decode(ctx, ANSWER)
    ctx.rewind(len(ANSWER) + 10)  # before the snapshot: only starting over is exact
    assert ctx.tokens == [] and ctx.snapshot is None


class StopAfter:
    """A stop request that is set from its n-th look on (the prefill looks after each chunk)."""

    def __init__(self, n: int):
        self.n, self.looks = n, 0

    def is_set(self) -> bool:
        self.looks += 1
        return self.looks >= self.n


def test_a_stopped_prefill_keeps_the_chunks_it_ran(target, monkeypatch):
    monkeypatch.setattr(context_module, "PREFILL_CHUNK", 16)
    reference = Context(target, slack=SLACK)
    expected, _, _ = reference.prefill(PROMPT)
    ctx = Context(target, slack=SLACK, keep_snapshot=True)
    ctx.stop_request = StopAfter(1)
    with pytest.raises(PrefillStopped):
        ctx.prefill(PROMPT)
    assert ctx.tokens == PROMPT[:16] and all(c.offset == 16 for c in ctx.cache)
    assert ctx.snapshot is None  # no answer starts here
    ctx.stop_request = None
    logits, _, n = ctx.prefill(PROMPT)  # goes on from the chunk it kept, in the same chunks
    assert n == len(PROMPT) - 16
    assert np.array_equal(np.array(logits), np.array(expected))
    late = Context(target, slack=SLACK, keep_snapshot=True)
    late.stop_request = StopAfter(3)  # noticed after the last chunk: the prompt is all in
    with pytest.raises(PrefillStopped):
        late.prefill(PROMPT)
    assert late.tokens == PROMPT and late.snapshot is None
