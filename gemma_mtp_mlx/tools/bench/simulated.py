"""A drafter with a chosen acceptance: the real network's cost, a simulated proposal.

Real acceptance depends on Google's trained drafter weights, which cannot be fetched here, and a
random-weight drafter almost never agrees with a random-weight target. So the benchmark keeps
the drafter's work and replaces only its answer: the network runs every step in full (layers,
head, the reduction that picks a token), then the proposal for sequence position p becomes the
target's own greedy token there with probability A, otherwise a token the target does not
choose. Greedy verification then accepts exactly the hits, so the acceptance is A by
construction: simulated, never measured.

The hit or miss of each sequence position is drawn once (seeded) and shared by every variant
that uses the same `Proposals`: ours at any K and mlx-vlm's loop meet the same luck.
"""

import mlx.core as mx
import numpy as np


class Proposals:
    """What a simulated drafter proposes for each sequence position (prompt included)."""

    def __init__(
        self, sequence: list[int], acceptance: float, vocab: int, seed: int = 0,
        hits: np.ndarray | None = None,
    ):
        """`sequence`: the prompt followed by the target's greedy continuation (ours plain).
        `hits`: which positions hit, where the caller knows them (scripts/policy_sim.py: the
        demo drafter's own); `acceptance` is not drawn then."""
        if not 0.0 <= acceptance <= 1.0:
            raise ValueError(f"acceptance {acceptance} is not in [0, 1]")
        self.sequence = sequence
        self.acceptance = acceptance
        self.vocab = vocab
        # One draw per position, independent; a position drafted twice (an untried draft of one
        # round is drafted again in the next) keeps its outcome.
        if hits is None:
            hits = np.random.default_rng(seed).random(len(sequence)) < acceptance
        self.hits = hits
        # The same proposals as an array, for a drafter inside a compiled step (its positions
        # are arrays there), and one more entry for every position past the reference.
        table = [self.token(p) for p in range(len(sequence))] + [0]
        self.table = mx.array(table, dtype=mx.int32)

    def token(self, position: int) -> int:
        """The proposal for `position`: the target's token on a hit, its successor otherwise
        (never the target's choice). Past the reference the target's choice is unknown; a run
        ends before a draft there could count, so any token will do."""
        if position >= len(self.sequence):
            return 0
        target = self.sequence[position]
        return target if self.hits[position] else (target + 1) % self.vocab


class SimulatedDrafter:
    """Wraps a real `Assistant` for our engine (B = 1, greedy).

    The engine calls `drafter(embedding, hidden, kv)` then `candidate_logits(y[:, 0])` once per
    draft step. The views in `kv` carry the query's position, the cache offset (an int, or an
    array inside a compiled step): the newest emitted token (not yet cached) sits there, so
    draft step j of a round proposes the token at `position + 1 + j`, looked up in the graph.
    A round's later steps are fed back the `g` the previous step returned, which is how step j
    is counted (a call with any other hidden state starts a round: the engine's own cost
    measurements too); a compiled step is traced per draft length, so its steps count alike.
    """

    def __init__(self, drafter, proposals: Proposals):
        self.drafter = drafter
        self.proposals = proposals
        self._last_g = None
        self._position = 0
        self._step = 0

    def __getattr__(self, name):  # sliding_window, args, ...: the real drafter's
        return getattr(self.drafter, name)

    def __call__(self, embedding: mx.array, hidden: mx.array, kv):
        if embedding.shape[0] != 1:
            raise ValueError("the simulated drafter drafts one sequence at a time")
        self._step = self._step + 1 if hidden is self._last_g else 0
        self._position = next(iter(kv.values())).offset
        y, g = self.drafter(embedding, hidden, kv)
        self._last_g = g
        return y, g

    def candidate_logits(self, y: mx.array) -> tuple[mx.array, mx.array]:
        """The simulated proposal as the only candidate id, twice, scored with the max of the
        real head's logits: the head and a full reduction over them still run. MLX evaluates
        lazily, so what no output depends on is never computed, and it folds an argmax over a
        single candidate into a constant at graph construction: hence two (equal) ones, so
        the engine's pick depends on the scores."""
        _, logits = self.drafter.candidate_logits(y)
        score = logits.max(axis=-1, keepdims=True)  # [1, 1]
        table = self.proposals.table
        position = mx.minimum(mx.array(self._position) + 1 + self._step, table.size - 1)
        token = table[position].reshape(1, 1)
        return mx.concatenate([token, token], axis=-1), mx.concatenate([score, score], axis=-1)
