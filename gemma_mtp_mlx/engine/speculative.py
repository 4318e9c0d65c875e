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
from typing import NamedTuple

import mlx.core as mx

from ..models.assistant import Assistant
from ..models.cache import RowsCache, RowsView
from .context import Context
from .sampling import Sampler


@dataclass(eq=False)
class Row:
    """One sequence between rounds: its context, its sampler, its newest token [1, 1] and the
    hidden state [1, 1, H] that produced it (compared by identity)."""

    ctx: Context
    sampler: Sampler
    token: mx.array
    hidden: mx.array


@dataclass
class RoundResult:
    tokens: list[int]  # emitted this round: accepted drafts, then the target's token
    accepted: int


class RoundOutputs(NamedTuple):
    """A round's device work, queued: per row the accepted count [B], the target's token after
    the accepted drafts [B], the drafts [B, K] and the hidden states of the block [B, K + 1, H]."""

    accepted: mx.array
    next_tokens: mx.array
    drafts: mx.array
    hiddens: mx.array


def batched(caches: list[list]) -> list:
    """The cache argument for one target forward over rows with these layer caches (one list
    per row; see models/cache.RowsCache)."""
    if len(caches) == 1:
        return caches[0]
    return [RowsCache([row[i] for row in caches]) for i in range(len(caches[0]))]


def draft(
    target, drafter: Assistant, k: int, tokens: mx.array, hidden: mx.array, caches: list[list],
    samplers: list[Sampler],
) -> list[tuple[mx.array, mx.array | None]]:
    """Per row: K draft tokens [K] and, when that row samples, the distributions they were
    drawn from [K, V]. All rows (`tokens` [B, 1], `hidden` [B, 1, H]) go through each drafter
    step together; each row's drafter attends over its own caches (one view per row)."""
    vocab = target.args.vocab_size
    kvs = [target.drafter_kv(c, drafter.sliding_window) for c in caches]
    kv = kvs[0] if len(kvs) == 1 else {kind: RowsView([v[kind] for v in kvs]) for kind in kvs[0]}
    embedding, g = target.model.embed(tokens), hidden
    drafted, dists = [], [[] for _ in samplers]
    for _ in range(k):
        y, g = drafter(embedding, g, kv)
        ids, logits = drafter.candidate_logits(y[:, 0])  # [B, n] (or [B, V]: ids None)
        choices = []
        for b, sampler in enumerate(samplers):
            row_ids = None if ids is None else ids[b]
            if sampler.greedy:
                choices.append(sampler.pick(logits[b], row_ids))
                continue
            q = sampler.probs(logits[b], row_ids)
            choices.append(sampler.draw(q))
            if row_ids is not None:  # the centroid head's support is its candidates only
                q = mx.zeros((vocab,), mx.float32).at[row_ids].add(q)
            dists[b].append(q)
        choice = mx.stack(choices)
        tok = choice if ids is None else mx.take_along_axis(ids, choice[:, None], axis=-1)[:, 0]
        drafted.append(tok)
        embedding = target.model.embed(tok[:, None])
    drafts = mx.stack(drafted, axis=1)  # [B, K]
    return [(drafts[b], mx.stack(dists[b]) if dists[b] else None) for b in range(len(samplers))]


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


def verify(
    target, k: int, tokens: mx.array, drafts: list, caches: list[list], samplers: list[Sampler]
) -> RoundOutputs:
    """One target forward over each row's newest token and its K drafts (`drafts` as `draft`
    returns them), which writes all K + 1 into the caches; then each row accepts on its own."""
    block = mx.concatenate([tokens, mx.stack([d for d, _ in drafts]).astype(tokens.dtype)], axis=1)
    logits, hiddens = target(block, batched(caches), return_hidden=True)
    outcomes = [accept(logits[b], d, q, s) for b, ((d, q), s) in enumerate(zip(drafts, samplers))]
    return RoundOutputs(
        mx.stack([a for a, _ in outcomes]), mx.stack([t for _, t in outcomes]), block[:, 1:], hiddens
    )


def run_round(rows: list[Row], steps, k: int) -> list[RoundResult]:
    """One round for every row (K >= 1; K = 0 is plain decoding, engine/plain.py): each row
    drafts K, one target forward verifies all rows' blocks, each row accepts and commits on its
    own: its rejected drafts leave its cache and `token`/`hidden` move on. Rows stay
    independent: a row's tokens are those of its own run. `steps` runs the device work, eager or
    compiled (engine/steps.py)."""
    out = steps.speculate(rows, k)
    mx.eval(out.accepted, out.next_tokens, out.drafts)
    accepted, nxt, drafts = out.accepted.tolist(), out.next_tokens.tolist(), out.drafts.tolist()
    results = []
    for b, (r, n) in enumerate(zip(rows, accepted)):
        r.ctx.tokens += [r.token.item()] + drafts[b][:n]
        # Drop the rejected drafts' K/V: later rounds (and the drafter) never see them.
        for c in r.ctx.cache:
            c.trim(k - n)
        r.token, r.hidden = out.next_tokens[b].reshape(1, 1), out.hiddens[b : b + 1, n : n + 1]
        results.append(RoundResult(drafts[b][:n] + [nxt[b]], n))
    return results
