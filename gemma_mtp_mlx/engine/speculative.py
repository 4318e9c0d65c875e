"""One speculative round: draft K tokens, verify K+1 with one target forward, accept, commit.

State between rounds (`Row`): `token`, the newest emitted token (not yet in the cache), and
`hidden`, the target's post-norm hidden state at the last cached position (the one that
produced `token`). A round with K = 0 is exactly one step of plain decoding.

Greedy: accept the longest prefix of drafts equal to the target's argmax, then the target's
token at the first mismatch (or the bonus after the last draft).
Sampling (Leviathan et al. 2023, Chen et al. 2023): draft d_j ~ q_j; accept with probability
min(1, p_j(d_j) / q_j(d_j)); at the first rejection emit a sample of normalize(max(p_j - q_j, 0));
if all pass, a bonus sample of p_K. Every emitted token is then distributed as the target's p.

Everything up to the acceptance count stays on the device: the drafts are queued, the verify
pass is built while they compute and queued behind them, and the host reads only what was
accepted. Several independent sequences (rows:
a batch of prompts) share a round: one target forward verifies all their drafts, so the
target's weights are read once per round for the whole batch.
"""

from dataclasses import dataclass

import mlx.core as mx

from ..models.assistant import Assistant
from ..models.cache import RowsCache, RowsView
from .context import Context
from .sampling import Sampler


@dataclass
class Row:
    """One sequence between rounds: its context, its sampler, its newest token [1, 1] and the
    hidden state [1, 1, H] that produced it."""

    ctx: Context
    sampler: Sampler
    token: mx.array
    hidden: mx.array


@dataclass
class RoundResult:
    tokens: list[int]  # emitted this round: accepted drafts, then the target's token
    accepted: int


def rows_cache(rows: list[Row]) -> list:
    """The cache argument for one target forward over `rows` (see models/cache.RowsCache)."""
    if len(rows) == 1:
        return rows[0].ctx.cache
    return [RowsCache([r.ctx.cache[i] for r in rows]) for i in range(len(rows[0].ctx.cache))]


def drafter_inputs(rows: list[Row], window: int) -> tuple:
    """(embedding, hidden, kv) for the first draft step of all rows at once; kv holds one view
    per row (the drafter's attention then goes row by row, like the target's)."""
    target = rows[0].ctx.target
    kvs = [target.drafter_kv(r.ctx.cache, window) for r in rows]
    embedding = target.model.embed(mx.concatenate([r.token.reshape(1, 1) for r in rows]))
    hidden = mx.concatenate([r.hidden for r in rows])
    if len(rows) == 1:
        return embedding, hidden, kvs[0]
    return embedding, hidden, {kind: RowsView([kv[kind] for kv in kvs]) for kind in kvs[0]}


def draft(rows: list[Row], drafter: Assistant, k: int) -> list[tuple[mx.array, mx.array | None]]:
    """Per row: K draft tokens [K] and, when that row samples, the distributions they were
    drawn from [K, V]. All rows go through each drafter step together."""
    target = rows[0].ctx.target
    vocab = target.args.vocab_size
    embedding, g, kv = drafter_inputs(rows, drafter.sliding_window)
    tokens, dists = [], [[] for _ in rows]
    for _ in range(k):
        y, g = drafter(embedding, g, kv)
        ids, logits = drafter.candidate_logits(y[:, 0])  # [B, n] (or [B, V]: ids None)
        choices = []
        for b, r in enumerate(rows):
            row_ids = None if ids is None else ids[b]
            if r.sampler.greedy:
                choices.append(r.sampler.pick(logits[b], row_ids))
                continue
            q = r.sampler.probs(logits[b], row_ids)
            choices.append(r.sampler.draw(q))
            if row_ids is not None:  # the centroid head's support is its candidates only
                q = mx.zeros((vocab,), mx.float32).at[row_ids].add(q)
            dists[b].append(q)
        choice = mx.stack(choices)
        tok = choice if ids is None else mx.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
        tokens.append(tok)
        embedding = target.model.embed(tok[:, None])
    drafts = mx.stack(tokens, axis=1)  # [B, K]
    return [(drafts[b], mx.stack(dists[b]) if dists[b] else None) for b in range(len(rows))]


def accept_greedy(logits: mx.array, drafts: mx.array) -> tuple[mx.array, mx.array]:
    """(number of accepted drafts, the target's token after them)."""
    choices = mx.argmax(logits, axis=-1)
    k = drafts.shape[0]
    accepted = mx.cumprod(drafts == choices[:k]).sum() if k else mx.array(0)
    return accepted, choices[accepted]


def accept_sampled(
    p: mx.array, q: mx.array, drafts: mx.array, sampler: Sampler
) -> tuple[mx.array, mx.array]:
    """Exact rejection sampling over a block: p [K+1, V] target, q [K, V] drafter."""
    k = drafts.shape[0]
    rows = mx.arange(k)
    p_d, q_d = p[rows, drafts], q[rows, drafts]
    u = mx.random.uniform(shape=(k,), key=sampler.key())
    accepted = mx.cumprod(u * q_d < p_d).sum()
    residual = mx.maximum(p[:k] - q, 0.0)
    mass = residual.sum(axis=-1, keepdims=True)
    # Where p == q the residual is empty, but then that position is never rejected.
    residual = mx.where(mass > 0, residual / mx.maximum(mass, 1e-30), p[:k])
    corrections = sampler.draw(mx.concatenate([residual, p[k:]]))
    return accepted, corrections[accepted]


def accept(logits: mx.array, drafts: mx.array, q, sampler: Sampler) -> tuple[mx.array, mx.array]:
    """(number of accepted drafts, the target's token after them) for one row."""
    if sampler.greedy:
        return accept_greedy(sampler.biased(logits), drafts)
    return accept_sampled(sampler.probs(logits), q, drafts, sampler)


def run_round(rows: list[Row], drafter: Assistant, k: int) -> list[RoundResult]:
    """One round for every row (K >= 1; K = 0 is plain decoding, engine/plain.py): each row
    drafts K, one target forward verifies all rows'
    blocks, each row accepts and commits on its own: its rejected drafts leave its cache and
    `token`/`hidden` move on. Rows stay independent: a row's tokens are those of its own run."""
    drafts = draft(rows, drafter, k)
    # Drafting starts now; the verify pass is built while it runs (no idle gap between).
    mx.async_eval([d if q is None else [d, q] for d, q in drafts])

    block = mx.stack(
        [
            mx.concatenate([r.token.reshape(1), d.astype(r.token.dtype)])
            for r, (d, _) in zip(rows, drafts)
        ]
    )
    logits, hiddens = rows[0].ctx.target(block, rows_cache(rows), return_hidden=True)
    outcomes = [
        accept(logits[b], d, q, r.sampler) for b, (r, (d, q)) in enumerate(zip(rows, drafts))
    ]
    mx.eval(outcomes)
    results = []
    for b, (r, (d, _), (accepted, nxt)) in enumerate(zip(rows, drafts, outcomes)):
        n = accepted.item()
        r.ctx.tokens += block[b, : n + 1].tolist()
        # Drop the rejected drafts' K/V: later rounds (and the drafter) never see them.
        for c in r.ctx.cache:
            c.trim(k - n)
        r.token, r.hidden = nxt.reshape(1, 1), hiddens[b : b + 1, n : n + 1]
        results.append(RoundResult(d[:n].tolist() + [nxt.item()], n))
    return results
