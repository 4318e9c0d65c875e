"""Sampled speculative output follows the target's distribution exactly (Leviathan/Chen)."""

import mlx.core as mx
import numpy as np

from gemma_mtp_mlx import generate
from gemma_mtp_mlx.engine.context import Context
from gemma_mtp_mlx.engine.sampling import Sampler, SamplerSettings, probabilities, sample
from gemma_mtp_mlx.engine.speculative import accept_sampled


def test_probabilities_apply_temperature_top_k_and_top_p():
    logits = mx.array([2.0, 1.0, 0.5, -1.0, -3.0])
    full = np.array(probabilities(logits, SamplerSettings(1.0)))
    np.testing.assert_allclose(full, np.exp([2, 1, 0.5, -1, -3]) / np.exp([2, 1, 0.5, -1, -3]).sum(), rtol=1e-5)
    top2 = np.array(probabilities(logits, SamplerSettings(1.0, top_k=2)))
    assert (top2[2:] == 0).all() and abs(top2.sum() - 1) < 1e-6
    nucleus = np.array(probabilities(logits, SamplerSettings(1.0, top_p=0.7)))
    assert nucleus[0] > 0 and nucleus[1] > 0 and (nucleus[2:] == 0).all()
    hot = np.array(probabilities(logits, SamplerSettings(0.5)))
    assert hot[0] > full[0]


def test_rejection_sampling_emits_the_target_distribution():
    """p and q disagree strongly; the first emitted token must follow p0 and, given the first
    draft was accepted, the second must follow p1 — whatever q proposed."""
    p = mx.array([[0.5, 0.3, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6], [0.25, 0.25, 0.25, 0.25]])
    q = mx.array([[0.1, 0.2, 0.6, 0.1], [0.7, 0.1, 0.1, 0.1]])
    sampler = Sampler(SamplerSettings(1.0), seed=0)
    n = 20000
    first, second = np.zeros(4), np.zeros(4)
    for _ in range(n):
        drafts = sample(q, sampler.key())
        accepted, nxt = accept_sampled(p, q, drafts, sampler)
        a = accepted.item()
        emitted = drafts[:a].tolist() + [nxt.item()]
        first[emitted[0]] += 1
        if a >= 1:
            second[emitted[1]] += 1
    for counts, target in ((first, p[0]), (second, p[1])):
        freq = counts / counts.sum()
        sigma = np.sqrt(np.array(target) * (1 - np.array(target)) / counts.sum())
        assert (np.abs(freq - np.array(target)) < 4.5 * sigma + 1e-3).all(), (freq, target)


def exact_two_token_distribution(pair, prompt, settings):
    """P(x1, x2) of the target alone, enumerated."""
    ctx = Context(pair.target)
    logits, _, _ = ctx.prefill(prompt)
    p1 = np.array(probabilities(logits[0, 0], settings))
    joint = {}
    for x1 in np.nonzero(p1)[0]:
        logits2 = pair.target(mx.array([prompt + [int(x1)]]))[0, -1]
        p2 = np.array(probabilities(logits2, settings))
        for x2 in np.nonzero(p2)[0]:
            joint[(int(x1), int(x2))] = p1[x1] * p2[x2]
    return joint


def test_speculative_sampling_matches_the_target_end_to_end(echo_pairs):
    """The echo drafter proposes the previous token with high confidence: a loop that took the
    drafter's proposals (or matched them wrongly) would skew P(x1, x2) far from the target's."""
    pair = echo_pairs[("dense", False)]
    prompt = [2, 40, 77, 301, 12]
    settings = SamplerSettings(temperature=1.5, top_k=3)
    exact = exact_two_token_distribution(pair, prompt, settings)
    runs = 500
    counts: dict[tuple[int, int], int] = {}
    accepted = 0
    for seed in range(runs):
        ids, stats = [], None
        # Five tokens: after the prefill's, room for a whole round of 3 drafts (a compiled
        # answer's last rounds run no shorter length that is not traced yet).
        for chunk in generate(pair, prompt, max_tokens=5, temperature=1.5, top_k=3, seed=seed,
                              ignore_eos=True, draft_tokens=3):
            ids += chunk.token_ids
            stats = chunk.stats
        accepted += stats.accepted
        counts[tuple(ids[:2])] = counts.get(tuple(ids[:2]), 0) + 1
    assert accepted > runs * 0.1  # the drafter's proposals really were accepted sometimes
    tv = 0.5 * sum(abs(counts.get(k, 0) / runs - exact.get(k, 0.0)) for k in set(exact) | set(counts))
    assert set(counts) <= set(exact)
    assert tv < 0.09, tv
