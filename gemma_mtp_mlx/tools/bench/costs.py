"""Isolated step costs: what one target forward of T tokens and one drafter step take alone.

They are what speculative decoding's arithmetic runs on: with per-position acceptance A, a round
of K drafts emits E(K) = 1 + A + ... + A^K tokens for K drafter steps and one verify of K + 1,
so the best a round can do against plain decoding is
ideal(K) = E(K) x plain_step / (verify(K + 1) + K x drafter_step).
"""

import functools
import statistics

import mlx.core as mx
import numpy as np

from ...engine.context import Context
from ...models.assistant import Assistant
from ...models.configs import TARGETS
from ...models.gemma4 import Model
from .machine import machine
from .measure import time_once
from .shapes import random_target

COST_TOKENS = 9  # verify blocks of T = 1..9 tokens (K = 0..8 drafts)


def cost_curve(
    target: Model,
    drafter: Assistant | None = None,
    *,
    context: int = 256,
    max_tokens: int = COST_TOKENS,
    reps: int = 5,
) -> dict:
    """Seconds of a target forward of T = 1..`max_tokens` tokens (logits and hidden states of
    every position, as a verify block) on a cache warm with `context` tokens, and of one drafter
    step (drafter layers, head, argmax, the next token's embedding) with the dense head and, when
    the drafter has one, the centroid head. Medians of `reps` passes after a warm-up pass; ratios
    are to the 1-token forward."""
    args = target.args
    ctx = Context(target, slack=max(64, max_tokens + 2))
    ids = mx.random.randint(3, args.vocab_size, (context + max_tokens,), key=mx.random.key(0))
    ids = ids.tolist()
    _, hidden, _ = ctx.prefill(ids[:context])
    mx.eval([(c.keys, c.values) for c in ctx.cache])

    def target_step(t):
        block = mx.array([ids[context : context + t]])
        return lambda: target(block, ctx.cache, return_hidden=True)

    heads = {}
    if drafter is not None:
        heads["dense_head"] = lambda y: drafter.model.embed_tokens.as_linear(y)
        if drafter.args.use_ordered_embeddings:
            heads["centroid_head"] = lambda y: drafter.candidate_logits(y)[1]

    def drafter_step(head):
        def step():
            kv = target.drafter_kv(ctx.cache, drafter.sliding_window)
            token = mx.array([[ids[context]]])
            y, g = drafter(target.model.embed(token), hidden, kv)
            choice = mx.argmax(head(y[0, 0]))
            return g, target.model.embed(choice.reshape(1, 1))

        return step

    samples: dict[str, list[float]] = {f"T{t}": [] for t in range(1, max_tokens + 1)}
    samples.update({name: [] for name in heads})
    for rep in range(reps + 1):  # the first pass warms up and is not kept
        for t in range(1, max_tokens + 1):
            seconds = time_once(target_step(t))
            for c in ctx.cache:
                c.trim(t)
            if rep:
                samples[f"T{t}"].append(seconds)
        for name, head in heads.items():
            seconds = time_once(drafter_step(head))
            if rep:
                samples[name].append(seconds)
    med = {k: statistics.median(v) for k, v in samples.items()}
    seconds = [med[f"T{t}"] for t in range(1, max_tokens + 1)]
    out = {
        "context": context,
        "tokens": list(range(1, max_tokens + 1)),
        "target_seconds": [round(s, 6) for s in seconds],
        "ratios": [1.0] + [round(s / seconds[0], 4) for s in seconds[1:]],
        "drafter_step_seconds": {
            name: round(med[name], 6) if name in med else None
            for name in ("dense_head", "centroid_head")
        },
        "drafter_step_ratio": {
            name: round(med[name] / seconds[0], 4) if name in med else None
            for name in ("dense_head", "centroid_head")
        },
    }
    return out


def expected_tokens(k: int, acceptance: float) -> float:
    """E(K) = 1 + A + ... + A^K: tokens a round of K drafts emits when each draft the
    verification reaches is accepted with probability A."""
    return sum(acceptance**j for j in range(k + 1))


def ideal_speedup(k: int, acceptance: float, curve: dict, head: str) -> float:
    """What isolated costs promise for K drafts per round over plain decoding (K = 0: 1.0), in
    the long run at acceptance A."""
    verify = curve["target_seconds"]
    round_seconds = verify[k] + k * curve["drafter_step_seconds"][head]
    return expected_tokens(k, acceptance) * verify[0] / round_seconds


def replayed_rounds(hits, first: int, tokens: int, k: int) -> list[int]:
    """The draft length of each round that fixed K makes for an answer of `tokens` tokens whose
    first (the prefill's) sits at sequence position `first`, when the draft for position p is
    accepted iff hits[p]: as the engine drafts, never past the answer's end (K = 0 at the very
    end: a plain step)."""
    rounds, emitted = [], 1
    while emitted < tokens:
        drafts = max(0, min(k, tokens - emitted - 1))
        start = first + emitted  # the first draft's position
        accepted = 0
        while accepted < drafts and hits[start + accepted]:
            accepted += 1
        rounds.append(drafts)
        emitted += accepted + 1
    return rounds


def ideal_for_hits(k: int, hits, first: int, tokens: int, curve: dict, head: str) -> float:
    """What isolated costs promise for fixed K over plain decoding for this very answer: the
    same hits and misses, so the same rounds. A short run's luck can sit well away from A (in 63
    positions at A = 0.8, 0.7 is common), and the long-run formula would then count that luck as
    the engine's loss or gain."""
    verify, step = curve["target_seconds"], curve["drafter_step_seconds"][head]
    spent = sum(verify[d] + d * step for d in replayed_rounds(hits, first, tokens, k))
    return (tokens - 1) * verify[0] / spent


# -- MoE verify cost curve (issue 7) -----------------------------------------------------------
MOE_GOAL = 0.75  # ours T(8)/T(1) over mlx-lm's T(8)/T(1), same weights, same run (reported only)


def moe_config(layers: int = 4, **dims) -> dict:
    """The 26B-A4B core (hidden 2816, 128 experts top-8 of width 704, dense MLP 2112, a
    32768-token vocabulary) with `layers` layers (sliding, full, sliding, ...); `dims`
    overrides any key (tests shrink it)."""
    config = dict(TARGETS["26b"], num_hidden_layers=layers, vocab_size=32768)
    config["layer_types"] = [("full" if i % 2 else "sliding") + "_attention" for i in range(layers)]
    return {**config, **dims}


def moe_curve(config: dict | None = None, *, context: int = 256, reps: int = 5) -> dict:
    """Milliseconds of one forward of T = 1..COST_TOKENS distinct random tokens on a cache warm
    with `context` tokens, ours and mlx-lm's `gemma4_text` holding the same weight arrays,
    timed alternately (median of `reps` passes after a warm-up pass). Distinct tokens route
    independently; repeated ones would route alike and flatter grouping by expert."""
    from .peers import mlx_lm_twin

    config = config or moe_config()
    target = random_target(config)
    twin = mlx_lm_twin(target)
    vocab, top = config["vocab_size"], COST_TOKENS
    ids = np.random.default_rng(1).permutation(np.arange(3, vocab))[: context + top].tolist()
    ctx = Context(target, slack=max(64, top + 2))
    ctx.prefill(ids[:context])
    theirs = twin.make_cache()
    twin(mx.array([ids[:context]]), cache=theirs)
    mx.eval([(c.keys, c.values) for c in ctx.cache], [c.state for c in theirs])
    block = {t: mx.array([ids[context : context + t]]) for t in range(1, top + 1)}
    models = {"ours": (target, ctx.cache), "mlx_lm": (twin, theirs)}
    samples = {(name, t): [] for name in models for t in block}
    for rep in range(reps + 1):  # the first pass warms up and is not kept
        for t in block:
            for name, (model, cache) in models.items():
                seconds = time_once(functools.partial(model, block[t], cache=cache))
                for c in cache:
                    c.trim(t)
                if rep:
                    samples[name, t].append(seconds)
    ms = {n: [round(1e3 * statistics.median(samples[n, t]), 2) for t in block] for n in models}
    ratio = {n: round(v[7] / v[0], 3) for n, v in ms.items()}
    del target, twin, ctx, theirs, models
    mx.clear_cache()
    return {
        "tokens": list(block),
        "ours_ms": ms["ours"],
        "mlx_lm_ms": ms["mlx_lm"],
        "ratio_8_over_1": ratio,
        "ours_over_mlx_lm_8_over_1": round(ratio["ours"] / ratio["mlx_lm"], 3),
        "goal": MOE_GOAL,
        "layers": config["num_hidden_layers"],
        "context": context,
        "dims": {k: config[k] for k in ("hidden_size", "num_experts", "top_k_experts",
                                        "moe_intermediate_size", "intermediate_size", "vocab_size")},
        "machine": machine(),
    }
