"""The target's KV cache together with the token ids it holds, reusable across prompts.

A chat sends the whole conversation every turn; only the tokens after the longest common
prefix with what the cache already holds are prefilled. The next turn drops the last answer's
thoughts (as Gemma 4's template does), so it parts from the cache where that answer began,
usually deeper than the sliding rings can roll back once they have wrapped. A context that
keeps a snapshot (`keep_snapshot`, the chat's) takes one of the rings at the end of every
prefill, where an answer begins, and rolls back to it (engine/snapshot.py) instead of
prefilling everything again.

Memory bound: one snapshot at most, the latest, since only the start of the latest answer is
ever rolled back to; it costs one copy of the sliding rings (E4B in bf16: 20 rings of 576
slots x 2 KV heads x 256 x K and V x 2 bytes = 22.5 MiB), however long the conversation.

The prefill runs in chunks, each evaluated before the next, so at every chunk boundary the
cache and `tokens` agree: a stop request honoured there (Ctrl-C) leaves a context the next
prompt reuses.

Pictures (an `ImagePrompt`): their soft tokens enter as the vision tower's output instead of
token embeddings, and a chunk never ends inside one, so that where the checkpoint says
`use_bidirectional_attention: "vision"` each soft token can see all of its image on the
sliding layers (spec §7). The context remembers which picture (by digest) sits where, so that
another picture with the same token count is never mistaken for the cached one.
"""

import mlx.core as mx

from ..errors import GemmaChatError
from ..images.prompt import images_of
from ..models.cache import FullCache, SlidingWindowCache, full_slots
from ..models.gemma4 import Model
from ..models.rollback import DEFAULT_SLACK
from .snapshot import Snapshot, restore, take

# Tokens per prefill chunk: also how long a Ctrl-C waits. Measured on the demo pair on a 2-core
# CPU (a 1,200-token prompt): 512-token chunks take 4-5 s each, 128-token ones under 1 s, for
# the same total time (with OpenBLAS: 0.56 s and 0.22 s). Not measured on a Mac GPU, where
# larger chunks may prefill a little faster.
PREFILL_CHUNK = 128


class PrefillStopped(Exception):
    """A stop was requested during a prefill: the context holds the chunks run so far."""


class Context:
    def __init__(
        self, target: Model, slack: int = DEFAULT_SLACK, *, keep_snapshot: bool = False,
        limit: int | None = None,
    ):
        self.target = target
        # Tokens this context may hold: the model's own context, or less (`--context`, so that
        # the KV cache fits the memory the preflight allowed).
        self.limit = min(limit or target.args.max_position_embeddings,
                         target.args.max_position_embeddings)
        self.slack = slack
        self.keep_snapshot = keep_snapshot
        self.cache = target.make_cache(slack, self.limit)
        self.tokens: list[int] = []
        self.images: list[tuple[int, int, str]] = []  # (start, length, digest) of held pictures
        self.snapshot: Snapshot | None = None
        # Anything with `is_set()` (a threading.Event): when set, the prefill stops at the end
        # of its current chunk by raising PrefillStopped.
        self.stop_request = None

    def rewind(self, n: int) -> None:
        """Forget the last n cached tokens (a rejected draft, a diverging prompt). Deeper than
        the sliding rings can roll back, go back to the snapshot if it lies at or before that
        point (forgetting more than n tokens), else start over."""
        if n <= 0:
            return
        keep = len(self.tokens) - n
        if all(n <= c.max_rollback() for c in self.cache):
            for c in self.cache:
                c.trim(n)
            del self.tokens[keep:]
        elif self.snapshot is not None and self.snapshot.position <= keep:
            restore(self.cache, self.snapshot)
            del self.tokens[self.snapshot.position :]
        else:
            self.reset()
        if self.snapshot is not None and self.snapshot.position > len(self.tokens):
            self.snapshot = None  # the tokens it was taken after are gone
        self.images = [b for b in self.images if b[0] < len(self.tokens)]

    def make_room(self, end: int) -> None:
        """Grow the full-attention buffers now to hold `end` positions (where an answer may end),
        unless that would more than double them. A compiled step's shape includes its buffers, so
        a buffer that grows during an answer traces every step shape the answer runs once more
        (a 300-token answer after a short prompt: two to four traces, 10-40 ms each on the demo
        pair); the slots held early cost a step masked reads of at most as many slots again."""
        end = min(end, self.limit)
        for c in self.cache:
            if isinstance(c, FullCache) and c.keys is not None and full_slots(end) <= 2 * c.keys.shape[2]:
                c.reserve(end, c.keys, c.values)

    def reset(self) -> None:
        self.cache = self.target.make_cache(self.slack, self.limit)
        self.tokens = []
        self.images = []
        self.snapshot = None

    def prefill(self, tokens: list[int]) -> tuple[mx.array, mx.array, int]:
        """Make the cache hold `tokens`; return (logits, post-norm hidden) of the last position,
        each [1, 1, ...], and how many tokens were actually run through the model."""
        if not tokens:
            raise GemmaChatError("empty prompt")
        if len(tokens) >= self.limit:
            raise GemmaChatError(
                f"the prompt is {len(tokens)} tokens; the context holds {self.limit}"
            )
        common = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            common += 1
        blocks = images_of(tokens)
        common = min(common, self._same_pictures_until(blocks))
        common = min(common, len(tokens) - 1)  # the last token must run to give logits
        self.rewind(len(self.tokens) - common)
        start = len(self.tokens)  # before `common` when the rollback went back to the snapshot
        features: dict[int, mx.array] = {}
        i = start
        while i < len(tokens):
            end = chunk_end(i, len(tokens), blocks)
            chunk = tokens[i:end]
            ids, cache, extra = self.model_inputs(tokens, i, end, features)
            if end < len(tokens):
                self.target.model(ids, cache, **extra)
                mx.eval(self._arrays())
            else:
                logits, hidden = self.target(
                    ids, cache, return_hidden=True, last_only=True, **extra
                )
                mx.eval(logits, hidden, self._arrays())
            self.tokens += chunk
            self.images = [b for b in blocks if b[0] < len(self.tokens)]
            i = end
            if self.stop_request is not None and self.stop_request.is_set():
                raise PrefillStopped
        if self.keep_snapshot:
            self.snapshot = take(self.cache, len(self.tokens))
        return logits, hidden, len(tokens) - start

    def _same_pictures_until(self, blocks: list[tuple[int, int, str]]) -> int:
        """Where what the context holds and a prompt part ways because of pictures: the first
        picture in one that the other does not hold at the same place."""
        held, new = set(self.images), set(blocks)
        differ = [b[0] for b in blocks if b not in held] + [b[0] for b in self.images if b not in new]
        return min(differ, default=len(self.tokens))

    def model_inputs(self, tokens, i: int, end: int, features: dict):
        """The model's inputs for tokens[i:end]: ids, caches, and for a chunk with pictures in
        it the embeddings (soft tokens where the pictures are) and, where the checkpoint asks,
        sliding caches that let each picture see itself both ways."""
        chunk = tokens[i:end]
        inside = [(k, s, n) for k, (s, n, _) in enumerate(images_of(tokens)) if s < end and s + n > i]
        if not inside:
            return mx.array([chunk]), self.cache, {}
        marks = tokens.marks
        ids, blocks = list(chunk), [-1] * len(chunk)
        for k, s, n in inside:
            for p in range(max(s, i), min(s + n, end)):
                ids[p - i], blocks[p - i] = marks.pad, k  # the per-layer inputs read padding there
        ids = mx.array([ids])
        h = self.target.model.embed(ids)
        pieces, at = [], i
        for k, s, n in inside:
            a, b = max(s, i), min(s + n, end)
            if k not in features:
                features[k] = tokens.encode(tokens.images[k])
            pieces += [h[:, at - i : a - i], features[k][a - s : b - s][None].astype(h.dtype)]
            at = b
        pieces.append(h[:, at - i :])
        cache = self.cache
        if self.target.args.use_bidirectional_attention == "vision":
            both_ways = mx.array(blocks)
            cache = [
                PictureBlocks(c, both_ways) if isinstance(c, SlidingWindowCache) else c
                for c in self.cache
            ]
        return ids, cache, {"embeddings": mx.concatenate(pieces, axis=1)}

    def _arrays(self) -> list:
        return [(c.keys, c.values) for c in self.cache]


def chunk_end(i: int, total: int, blocks: list[tuple[int, int, str]]) -> int:
    """Where the prefill chunk from i ends: PREFILL_CHUNK tokens on, but before a picture that
    would be cut (or after it, when the chunk starts with it)."""
    end = min(i + PREFILL_CHUNK, total)
    for s, n, _ in blocks:
        if s < end < s + n:
            end = s if s > i else s + n
    return end


class PictureBlocks:
    """A sliding layer's cache during one prefill chunk: the queries of a picture's soft tokens
    also see that picture's later soft tokens (models/cache.py `block_overlay`)."""

    def __init__(self, cache: SlidingWindowCache, blocks: mx.array):
        self.cache, self.blocks = cache, blocks

    def store(self, keys: mx.array, values: mx.array, rope):
        return self.cache.store(keys, values, rope, self.blocks)

    def __getattr__(self, name):
        return getattr(self.cache, name)
