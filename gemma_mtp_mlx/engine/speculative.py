"""One speculative round: draft K tokens, verify K+1 with one target forward, accept, commit.

State between rounds: `token`, the newest emitted token (not yet in the cache), and `hidden`,
the target's post-norm hidden state at the last cached position (the one that produced
`token`). A round with K = 0 is exactly one step of plain decoding.

Greedy: accept the longest prefix of drafts equal to the target's argmax, then the target's
token at the first mismatch (or the bonus after the last draft).
Sampling (Leviathan et al. 2023, Chen et al. 2023): draft d_j ~ q_j; accept with probability
min(1, p_j(d_j) / q_j(d_j)); at the first rejection emit a sample of normalize(max(p_j - q_j, 0));
if all pass, a bonus sample of p_K. Every emitted token is then distributed as the target's p.
Everything up to the acceptance count stays on the device: the drafts are queued, the verify
pass is built while they compute and queued behind them, and the host then reads when the drafts
were done (the draft/verify time split) and what was accepted. Several independent sequences
(rows, a batch of prompts) can share a round: one target forward verifies all their drafts.
"""

import time
from dataclasses import dataclass

import mlx.core as mx

from ..models.assistant import Assistant
from ..models.cache import RowsCache
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


@dataclass
class Row:
    """One sequence between rounds: its context, its newest token and hidden state, its keys."""

    ctx: Context
    token: mx.array
    hidden: mx.array
    keys: KeyStream


def drafter_inputs(rows: list[Row], window: int) -> tuple:
    """(embedding, hidden, kv, position) for the first draft step of all rows at once. The
    query sits at the newest token's position (spec §3.3); with several rows, kv and position
    are per row (the drafter's attention then goes row by row, like the target's)."""
    target = rows[0].ctx.target
    kvs = [target.drafter_kv(r.ctx.cache, window) for r in rows]
    positions = [r.ctx.cache[0].offset for r in rows]
    embedding = target.model.embed(mx.concatenate([r.token.reshape(1, 1) for r in rows]))
    hidden = mx.concatenate([r.hidden for r in rows])
    if len(rows) == 1:
        return embedding, hidden, kvs[0], positions[0]
    return embedding, hidden, {kind: [kv[kind] for kv in kvs] for kind in kvs[0]}, positions


def draft(
    rows: list[Row],
    drafter: Assistant,
    k: int,
    settings: SamplerSettings,
    bias: mx.array | None,
) -> list[tuple[mx.array, mx.array | None]]:
    """Per row: K draft tokens [K] and, when sampling, the distributions they were drawn from
    [K, V]. All rows go through each drafter step together."""
    target = rows[0].ctx.target
    embedding, g, kv, position = drafter_inputs(rows, drafter.sliding_window)
    tokens, dists = [], []
    for _ in range(k):
        y, g = drafter(embedding, g, kv, position)
        ids, logits = drafter.candidate_logits(y[:, 0])  # [B, n] (or [B, V]: ids None)
        if bias is not None:
            logits = logits + (bias if ids is None else bias[ids])
        if settings.greedy:
            choice = mx.argmax(logits, axis=-1)
        else:
            q = probabilities(logits, settings)
            choice = mx.concatenate([sample(q[b : b + 1], r.keys()) for b, r in enumerate(rows)])
            if ids is not None:  # the centroid head's support is its candidates only
                full = mx.zeros((target.args.vocab_size,), mx.float32)
                q = mx.stack([full.at[ids[b]].add(q[b]) for b in range(len(rows))])
            dists.append(q)
        tok = choice if ids is None else mx.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
        tokens.append(tok)
        embedding = target.model.embed(tok[:, None])
    drafts = mx.stack(tokens, axis=1)  # [B, K]
    qs = mx.stack(dists, axis=1) if dists else None  # [B, K, V]
    return [(drafts[b], None if qs is None else qs[b]) for b in range(len(rows))]


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


def rows_cache(rows: list[Row]) -> list:
    """The cache argument for one target forward over `rows` (see models/cache.RowsCache)."""
    if len(rows) == 1:
        return rows[0].ctx.cache
    return [RowsCache([r.ctx.cache[i] for r in rows]) for i in range(len(rows[0].ctx.cache))]


def accept(
    logits, drafts, q, settings: SamplerSettings, keys: KeyStream
) -> tuple[mx.array, mx.array]:
    """(number of accepted drafts, the target's token after them) for one row."""
    if settings.greedy:
        return accept_greedy(logits, drafts)
    p = probabilities(logits, settings)
    if q is not None:
        return accept_sampled(p, q, drafts, keys)
    return mx.array(0), sample(p, keys())[0]


def run_rows(
    rows: list[Row],
    drafter: Assistant | None,
    k: int,
    settings: SamplerSettings,
    bias: mx.array | None,
) -> list[RoundResult]:
    """One round for every row: each row drafts K, one target forward verifies all rows'
    blocks (so a batch reads the target's weights once per round), each row accepts and rolls
    its own cache back. Rows stay independent: a row's tokens are those of its own run."""
    start = time.perf_counter()
    drafts = [(mx.zeros((0,), mx.int32), None)] * len(rows)
    if k:
        drafts = draft(rows, drafter, k, settings, bias)
        # Drafting starts now; the verify pass is built while it runs (no idle gap between).
        mx.async_eval([d if q is None else [d, q] for d, q in drafts])

    block = mx.stack(
        [
            mx.concatenate([r.token.reshape(1), d.astype(r.token.dtype)])
            for r, (d, _) in zip(rows, drafts)
        ]
    )
    logits, hiddens = rows[0].ctx.target(block, rows_cache(rows), return_hidden=True)
    if bias is not None:
        logits = logits + bias
    outcomes = [
        accept(logits[b], d, q, settings, r.keys) for b, (r, (d, q)) in enumerate(zip(rows, drafts))
    ]
    mx.async_eval(outcomes)  # the verify pass is queued behind the drafts: no idle gap
    if k:
        mx.eval([d for d, _ in drafts])  # only reads when the drafts were done (the time split)
    drafted = time.perf_counter()
    mx.eval(outcomes)
    committed = []
    for b, (r, (d, _), (accepted, nxt)) in enumerate(zip(rows, drafts, outcomes)):
        n = accepted.item()
        r.ctx.tokens += block[b, : n + 1].tolist()
        # Drop the rejected drafts' K/V: later rounds (and the drafter) never see them.
        for c in r.ctx.cache:
            c.trim(k - n)
        committed.append(
            (d[:n].tolist() + [nxt.item()], nxt.reshape(1, 1), hiddens[b : b + 1, n : n + 1])
        )
    end = time.perf_counter()
    return [
        RoundResult(
            emitted,
            token,
            hidden,
            RoundStats(
                k, len(emitted) - 1, len(emitted), drafted - start, end - drafted, end - start
            ),
        )
        for emitted, token, hidden in committed
    ]


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
    return run_rows([Row(ctx, token, hidden, keys)], drafter, k, settings, bias)[0]
