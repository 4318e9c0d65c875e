"""Lossless: speculative output is the target's own, at every draft length, past the sliding
window, across reused contexts, with end-of-sequence and --ignore-eos."""

import pytest

from fixtures import tiny_checkpoints as tiny
from gemma_mtp_mlx import generate
from gemma_mtp_mlx.engine.context import Context

PROMPT = [2, 40, 77, 301, 12]
CASES = [(shape, centroids) for shape in tiny.SHAPES for centroids in (False, True)]


def ids_and_stats(pair, prompt, **options):
    ids, stats = [], None
    for chunk in generate(pair, prompt, **options):
        ids += chunk.token_ids
        stats = chunk.stats
    return ids, stats


@pytest.mark.parametrize("shape,centroids", CASES)
def test_greedy_speculative_equals_plain_past_the_window(echo_pairs, shape, centroids):
    """300 tokens with a window of 8: the sliding caches wrap ~40 times, with rollbacks."""
    pair = echo_pairs[(shape, centroids)]
    plain, _ = ids_and_stats(pair, PROMPT, max_tokens=300, ignore_eos=True, mtp=False)
    assert len(plain) == 300
    depths = set()
    for k in (1, 3, 8):  # the shortest block, a typical one, the deepest rollback
        ids, stats = ids_and_stats(pair, PROMPT, max_tokens=300, ignore_eos=True, draft_tokens=k)
        assert ids == plain, f"K={k} diverged at {next(i for i, (a, b) in enumerate(zip(ids, plain)) if a != b)}"
        assert stats.drafted > 0
        depths |= {i for i, a in enumerate(stats.accepted_by_position) if a}
    if shape == "dense":  # the echo drafter is right often here: partial and full acceptance
        assert depths >= set(range(8))


@pytest.mark.parametrize("shape", tiny.SHAPES)
def test_random_drafter_is_lossless_and_rejected(pairs, shape):
    pair = pairs[(shape, True)]
    plain, _ = ids_and_stats(pair, PROMPT, max_tokens=120, ignore_eos=True, mtp=False)
    ids, stats = ids_and_stats(pair, PROMPT, max_tokens=120, ignore_eos=True, draft_tokens=4)
    assert ids == plain
    assert stats.acceptance_rate < 0.2


@pytest.mark.parametrize("shape", tiny.SHAPES)
def test_end_of_sequence_stops_speculative_and_plain_alike(echo_pairs, ckpt, shape):
    pair = echo_pairs[(shape, False)]
    for prompt in ([2, 40, 77, 301, 12, 99, 250, 7, 18, 400, 33, 61, 5, 130, 222, 17, 90, 311, 45, 8], PROMPT):
        plain, _ = ids_and_stats(pair, prompt, max_tokens=80, mtp=False)
        assert plain == tiny.reference_greedy(ckpt[shape], prompt, 80)
        for k in (2, 5):
            assert ids_and_stats(pair, prompt, max_tokens=80, draft_tokens=k)[0] == plain


def test_ignore_eos_runs_to_max_tokens_without_end_of_sequence(echo_pairs):
    pair = echo_pairs[("e2b", False)]
    eos = set(pair.tokenizer.eos_token_ids)
    for mtp in (False, True):
        ids, _ = ids_and_stats(pair, PROMPT, max_tokens=150, ignore_eos=True, mtp=mtp)
        assert len(ids) == 150 and not eos & set(ids)


@pytest.mark.parametrize("shape", tiny.SHAPES)
def test_reused_context_across_prompts_is_lossless(echo_pairs, shape):
    """A chat: each prompt extends the last answer; only the new tokens are prefilled."""
    pair = echo_pairs[(shape, True)]
    ctx = Context(pair.target)
    history = list(PROMPT)
    for turn in range(3):
        ids, stats = ids_and_stats(pair, history, max_tokens=60, ignore_eos=True, draft_tokens=3, context=ctx)
        plain, _ = ids_and_stats(pair, history, max_tokens=60, ignore_eos=True, mtp=False)
        assert ids == plain
        if turn:
            assert stats.context_tokens > len(history) - 10
            assert stats.prompt_tokens == 5  # the last answer token (not cached yet) + 4 new
        history += ids + [6, 5, 100 + turn, 200 + turn]


def test_max_tokens_is_exact(echo_pairs):
    pair = echo_pairs[("dense", False)]
    for n in (1, 2, 7):
        assert len(ids_and_stats(pair, PROMPT, max_tokens=n, ignore_eos=True, draft_tokens=5)[0]) == n


def test_mtp_adds_no_kv_cache_only_the_drafter(echo_pairs):
    """The drafter reads the target's K/V in place: with MTP, peak memory grows by at most the
    drafter's weights plus a few activations, nothing per token of context."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    pair = echo_pairs[("e2b", True)]
    drafter_bytes = sum(v.nbytes for _, v in tree_flatten(pair.drafter.parameters()))
    peaks = {}
    for mtp in (False, True):
        mx.clear_cache()
        _, stats = ids_and_stats(pair, PROMPT * 20, max_tokens=200, ignore_eos=True, mtp=mtp, draft_tokens=3)
        peaks[mtp] = stats.peak_memory_bytes
    assert peaks[True] - peaks[False] <= drafter_bytes + 2 * 2**20


def test_cli_raw_json_greedy_equals_transformers(ckpt):
    """The held-out check of issue 3, through the command line."""
    import json

    from typer.testing import CliRunner

    from gemma_mtp_mlx.cli import app

    prompt = "the cat sat on the mat"
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(ckpt["dense"]).encode(prompt)
    expected = tiny.reference_greedy(ckpt["dense"], ids, 40)
    for extra in ([], ["--draft-tokens", "5"], ["--no-mtp"]):
        result = CliRunner().invoke(
            app,
            ["--model", str(ckpt["dense"]), "--drafter", str(ckpt["dense-centroids"]), "--raw",
             "--prompt", prompt, "--temp", "0", "--max-tokens", "40", "--json", *extra],
        )
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout.strip().splitlines()[-1])
        assert out["token_ids"] == expected
        assert out["stats"]["prompt_tokens"] == len(ids)


def test_grouped_expert_dispatch_equals_per_token_dispatch(pairs):
    """Verify blocks sort (token, expert) pairs by expert; the result must be the same numbers
    as running the tokens one at a time (routing and expert math are per token)."""
    import mlx.core as mx
    import numpy as np

    target = pairs[("moe", False)].target
    layer = target.model.layers[0]
    x = mx.random.normal((1, 5, target.args.hidden_size), key=mx.random.key(3))
    experts, weights = layer.router(x)
    block = layer.experts(x, experts, weights)
    single = mx.concatenate(
        [layer.experts(x[:, i : i + 1], experts[:, i : i + 1], weights[:, i : i + 1]) for i in range(5)],
        axis=1,
    )
    np.testing.assert_allclose(np.array(block), np.array(single), atol=1e-5)
