"""One speculative round: draft K tokens, verify K+1 with one target forward, accept, commit.

State between rounds: `token`, the newest emitted token (not yet in the cache), and `hidden`,
the target's post-norm hidden state at the last cached position (the one that produced
`token`). A round with K = 0 is exactly one step of plain decoding.

Greedy: accept the longest prefix of drafts equal to the target's argmax, then the target's
token at the first mismatch (or the bonus after the last draft).
Sampling (Leviathan et al. 2023, Chen et al. 2023): draft d_j ~ q_j; accept with probability
min(1, p_j(d_j) / q_j(d_j)); at the first rejection emit a sample of normalize(max(p_j - q_j, 0));
if all pass, a bonus sample of p_K. Every emitted token is then distributed as the target's p.
Everything up to the acceptance count stays on the device; the round syncs with the host once
after drafting (to time it) and once to read what was accepted.
"""

import time
from dataclasses import dataclass

import mlx.core as mx

from ..models.assistant import Assistant
from .context import Context
from .sampling import SamplerSettings, probabilities, sample
from .stats import RoundStats


@dataclass
class RoundResult:
    tokens: list[int]  # emitted this round: accepted drafts, then the target's token
    token: mx.array  # the newest token, [1, 1] (== tokens[-1], not yet in the cache)
    hidden: mx.array  # post-norm hidden at the last cached position, [1, 1, H]
    stats: RoundStats


class KeyStream:
    """Independent PRNG keys for every draw, reproducible from one seed."""

    def __init__(self, seed: int | None):
        self.key = mx.random.key(seed if seed is not None else time.time_ns() % 2**32)

    def __call__(self) -> mx.array:
        self.key, sub = mx.random.split(self.key)
        return sub


def draft(
    ctx: Context,
    drafter: Assistant,
    token: mx.array,
    hidden: mx.array,
    k: int,
    settings: SamplerSettings,
    bias: mx.array | None,
    keys: KeyStream,
) -> tuple[mx.array, mx.array | None]:
    """K draft tokens [K] and, when sampling, the distributions they were drawn from [K, V]."""
    target = ctx.target
    kv = target.drafter_kv(ctx.cache, drafter.sliding_window)
    position = ctx.cache[0].offset  # the query sits at the newest token's position (spec §3.3)
    embedding, g = target.model.embed(token), hidden
    tokens, dists = [], []
    for _ in range(k):
        y, g = drafter(embedding, g, kv, position)
        ids, logits = drafter.candidate_logits(y[0, 0])
        if bias is not None:
            logits = logits + (bias if ids is None else bias[ids])
        if settings.greedy:
            choice = mx.argmax(logits)
            q = None
        else:
            q = probabilities(logits, settings)
            choice = sample(q, keys())
            if ids is not None:  # the centroid head's support is its candidates only
                q = mx.zeros((target.args.vocab_size,), mx.float32).at[ids].add(q)
            dists.append(q)
        tok = choice if ids is None else ids[choice]
        tokens.append(tok)
        embedding = target.model.embed(tok.reshape(1, 1))
    return mx.stack(tokens), (mx.stack(dists) if dists else None)


def accept_greedy(logits: mx.array, drafts: mx.array) -> tuple[mx.array, mx.array]:
    """(number of accepted drafts, the target's token after them)."""
    choices = mx.argmax(logits, axis=-1)
    k = drafts.shape[0]
    accepted = mx.cumprod(drafts == choices[:k]).sum() if k else mx.array(0)
    return accepted, choices[accepted]


def accept_sampled(
    p: mx.array, q: mx.array, drafts: mx.array, keys: KeyStream
) -> tuple[mx.array, mx.array]:
    """Exact rejection sampling over a block: p [K+1, V] target, q [K, V] drafter."""
    k = drafts.shape[0]
    rows = mx.arange(k)
    p_d, q_d = p[rows, drafts], q[rows, drafts]
    u = mx.random.uniform(shape=(k,), key=keys())
    accepted = mx.cumprod(u * q_d < p_d).sum()
    residual = mx.maximum(p[:k] - q, 0.0)
    mass = residual.sum(axis=-1, keepdims=True)
    # Where p == q the residual is empty, but then that position is never rejected.
    residual = mx.where(mass > 0, residual / mx.maximum(mass, 1e-30), p[:k])
    corrections = sample(mx.concatenate([residual, p[k:]]), keys())
    return accepted, corrections[accepted]


def run_round(
    ctx: Context,
    drafter: Assistant | None,
    token: mx.array,
    hidden: mx.array,
    k: int,
    settings: SamplerSettings,
    bias: mx.array | None,
    keys: KeyStream,
) -> RoundResult:
    start = time.perf_counter()
    drafts, q = mx.zeros((0,), mx.int32), None
    if k:
        drafts, q = draft(ctx, drafter, token, hidden, k, settings, bias, keys)
        mx.eval(drafts if q is None else [drafts, q])
    drafted = time.perf_counter()

    block = mx.concatenate([token.reshape(1), drafts.astype(token.dtype)])[None]
    logits, hiddens = ctx.target(block, ctx.cache, return_hidden=True)
    logits = logits[0] if bias is None else logits[0] + bias
    if settings.greedy:
        accepted, nxt = accept_greedy(logits, drafts)
    elif k:
        accepted, nxt = accept_sampled(probabilities(logits, settings), q, drafts, keys)
    else:
        accepted, nxt = mx.array(0), sample(probabilities(logits, settings), keys())[0]
    mx.eval(accepted, nxt)
    n = accepted.item()
    ctx.tokens += [int(t) for t in block[0, : n + 1].tolist()]
    # Drop the rejected drafts' K/V from every cache: later rounds (and the drafter) never see them.
    for c in ctx.cache:
        c.trim(k - n)
    emitted = drafts[:n].tolist() + [nxt.item()]
    end = time.perf_counter()
    stats = RoundStats(k, n, len(emitted), drafted - start, end - drafted, end - start)
    return RoundResult(emitted, nxt.reshape(1, 1), hiddens[:, n : n + 1], stats)
