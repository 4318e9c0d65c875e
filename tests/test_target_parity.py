"""The MLX target gives transformers' logits for every shape and checkpoint layout."""

import mlx.core as mx
import numpy as np
import pytest

from fixtures import tiny_checkpoints as tiny
from gemma_mtp_mlx import load
from gemma_mtp_mlx.engine.context import Context
from tests.conftest import assert_close

PROMPT = [2, 40, 77, 301, 12, 99, 250, 7, 18, 400, 33, 61, 5, 130, 222, 17, 90, 311, 45, 8]


@pytest.mark.parametrize("shape", tiny.SHAPES)
def test_logits_match_transformers(ckpt, shape):
    pair = load(str(ckpt[shape]), drafter=None)
    ours = np.array(pair.target(mx.array([PROMPT]))[0])
    ref = tiny.reference_logits(ckpt[shape], PROMPT)
    assert_close(ours, ref)


@pytest.mark.parametrize("shape", tiny.SHAPES)
def test_cached_decode_past_the_window_matches_transformers(ckpt, shape):
    """Prefill, then one token at a time well past the sliding window (8): the ring wraps."""
    pair = load(str(ckpt[shape]), drafter=None)
    ctx = Context(pair.target, slack=4)
    logits, hidden, _ = ctx.prefill(PROMPT[:6])
    rows = [np.array(logits[0, 0])]
    for t in PROMPT[6:]:
        rows.append(np.array(pair.target(mx.array([[t]]), ctx.cache)[0, 0]))
    ref = tiny.reference_logits(ckpt[shape], PROMPT)
    assert_close(np.stack(rows), ref[5:])
    assert_close(np.array(hidden[0, 0]), tiny.reference_hidden(ckpt[shape], PROMPT[:6])[-1])


@pytest.mark.parametrize("shape", tiny.SHAPES)
def test_multimodal_and_mlx_community_layouts_load(ckpt, shape, tmp_path):
    ref = np.array(load(str(ckpt[shape]), drafter=None).target(mx.array([PROMPT]))[0])
    for make in (tiny.to_multimodal_layout, tiny.to_mlx_community_layout):
        folder = make(ckpt[shape], tmp_path / make.__name__)
        ours = np.array(load(str(folder), drafter=None).target(mx.array([PROMPT]))[0])
        np.testing.assert_allclose(ours, ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", tiny.SHAPES)
def test_greedy_decoding_matches_transformers_generate(ckpt, shape):
    from gemma_mtp_mlx import generate

    pair = load(str(ckpt[shape]), drafter=None)
    for prompt in (PROMPT, PROMPT[3:11]):
        ids = [t for c in generate(pair, prompt, max_tokens=24, mtp=False) for t in c.token_ids]
        assert ids == tiny.reference_greedy(ckpt[shape], prompt, 24)
