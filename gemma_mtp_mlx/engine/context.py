"""The target's KV cache together with the token ids it holds, reusable across prompts.

A chat sends the whole conversation every turn; only the tokens after the longest common
prefix with what the cache already holds are prefilled.
"""

import mlx.core as mx

from ..errors import GemmaChatError
from ..models.gemma4 import Model
from .rollback import DEFAULT_SLACK

PREFILL_CHUNK = 512
class Context:
    def __init__(self, target: Model, slack: int = DEFAULT_SLACK):
        self.target = target
        self.slack = slack
        self.cache = target.make_cache(slack)
        self.tokens: list[int] = []

    @property
    def limit(self) -> int:
        return self.target.args.max_position_embeddings

    def rewind(self, n: int) -> None:
        """Forget the last n cached tokens (a rejected draft, or a diverging prompt)."""
        if n <= 0:
            return
        if all(n <= c.max_rollback() for c in self.cache):
            for c in self.cache:
                c.trim(n)
            del self.tokens[-n:]
        else:
            self.reset()

    def reset(self) -> None:
        self.cache = self.target.make_cache(self.slack)
        self.tokens = []

    def prefill(self, tokens: list[int]) -> tuple[mx.array, mx.array, int]:
        """Make the cache hold `tokens`; return (logits, post-norm hidden) of the last position,
        each [1, 1, ...], and how many tokens were actually run through the model."""
        if not tokens:
            raise GemmaChatError("empty prompt")
        if len(tokens) >= self.limit:
            raise GemmaChatError(
                f"the prompt is {len(tokens)} tokens; this model's context is {self.limit}"
            )
        common = 0
        for a, b in zip(self.tokens, tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # the last token must run to give logits
        self.rewind(len(self.tokens) - common)
        new = tokens[len(self.tokens) :]
        while len(new) > PREFILL_CHUNK:
            self.target.model(mx.array([new[:PREFILL_CHUNK]]), self.cache)
            mx.eval([(c.keys, c.values) for c in self.cache])
            self.tokens += new[:PREFILL_CHUNK]
            new = new[PREFILL_CHUNK:]
        logits, hidden = self.target(mx.array([new]), self.cache, return_hidden=True, last_only=True)
        self.tokens += new
        return logits, hidden, len(tokens) - common
