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
"""

import mlx.core as mx

from ..errors import GemmaChatError
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
        self.cache = target.make_cache(slack)
        self.tokens: list[int] = []
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

    def reset(self) -> None:
        self.cache = self.target.make_cache(self.slack)
        self.tokens = []
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
        common = min(common, len(tokens) - 1)  # the last token must run to give logits
        self.rewind(len(self.tokens) - common)
        start = len(self.tokens)  # before `common` when the rollback went back to the snapshot
        for i in range(start, len(tokens), PREFILL_CHUNK):
            chunk = tokens[i : i + PREFILL_CHUNK]
            if i + len(chunk) < len(tokens):
                self.target.model(mx.array([chunk]), self.cache)
                mx.eval(self._arrays())
            else:
                logits, hidden = self.target(
                    mx.array([chunk]), self.cache, return_hidden=True, last_only=True
                )
                mx.eval(logits, hidden, self._arrays())
            self.tokens += chunk
            if self.stop_request is not None and self.stop_request.is_set():
                raise PrefillStopped
        if self.keep_snapshot:
            self.snapshot = take(self.cache, len(self.tokens))
        return logits, hidden, len(tokens) - start

    def _arrays(self) -> list:
        return [(c.keys, c.values) for c in self.cache]
