"""Logits -> tokens, applied identically to the target and the drafter.

Exact speculative sampling needs the drafter's *actual* proposal distribution q, so drafts are
sampled from `Sampler.probs` of the drafter's logits with the very same settings and bias that
turn the target's logits into p (spec pitfall 18).
"""

import copy
import time
from dataclasses import dataclass

import mlx.core as mx


@dataclass(frozen=True)
class SamplerSettings:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def ban_bias(vocab: int, banned: list[int]) -> mx.array | None:
    """An additive logit bias that makes `banned` ids (end-of-sequence under --ignore-eos)
    impossible."""
    if not banned:
        return None
    bias = mx.zeros((vocab,), dtype=mx.float32)
    bias[mx.array(banned)] = -mx.inf
    return bias


def probabilities(logits: mx.array, s: SamplerSettings) -> mx.array:
    """fp32 probabilities after temperature, top-k and top-p (nucleus) filtering."""
    logits = logits.astype(mx.float32) / s.temperature
    vocab = logits.shape[-1]
    if 0 < s.top_k < vocab:
        kth = mx.sort(logits, axis=-1)[..., vocab - s.top_k][..., None]
        logits = mx.where(logits < kth, -mx.inf, logits)
    probs = mx.softmax(logits, axis=-1)
    if s.top_p < 1.0:
        order = mx.argsort(-probs, axis=-1)
        sorted_probs = mx.take_along_axis(probs, order, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the token that crosses it included).
        before = mx.cumsum(sorted_probs, axis=-1) - sorted_probs
        keep_sorted = before < s.top_p
        keep = mx.put_along_axis(mx.zeros_like(keep_sorted), order, keep_sorted, axis=-1)
        probs = mx.where(keep, probs, 0.0)
        probs = probs / probs.sum(axis=-1, keepdims=True)
    return probs


def sample(probs: mx.array, key: mx.array) -> mx.array:
    """One token id per row of `probs` (zero-probability tokens are never drawn)."""
    return mx.random.categorical(mx.log(probs), axis=-1, key=key)


class Sampler:
    """How one sequence turns logits into tokens: its settings, an additive bias over the
    vocabulary (None, or end of sequence banned under --ignore-eos) and its own stream of
    random keys, reproducible from one seed. `ids` restrict logits to a subset of the
    vocabulary (the drafter's centroid head scores only its candidates)."""

    def __init__(
        self,
        settings: SamplerSettings = SamplerSettings(),
        bias: mx.array | None = None,
        seed: int | None = None,
    ):
        self.settings = settings
        self.bias = bias
        self._key = mx.random.key(seed if seed is not None else time.time_ns() % 2**32)

    @property
    def greedy(self) -> bool:
        return self.settings.greedy

    def replica(self, key: mx.array | None, bias: mx.array | None) -> "Sampler":
        """The same settings, drawing from `key` and adding `bias`: how a compiled step
        (engine/steps.py) samples, with both as arrays it takes in."""
        out = copy.copy(self)
        out._key, out.bias = key, bias
        return out

    def key(self) -> mx.array:
        """A fresh key for one draw."""
        self._key, sub = mx.random.split(self._key)
        return sub

    def biased(self, logits: mx.array, ids: mx.array | None = None) -> mx.array:
        if self.bias is None:
            return logits
        return logits + (self.bias if ids is None else self.bias[ids])

    def probs(self, logits: mx.array, ids: mx.array | None = None) -> mx.array:
        return probabilities(self.biased(logits, ids), self.settings)

    def draw(self, probs: mx.array) -> mx.array:
        return sample(probs, self.key())

    def pick(self, logits: mx.array, ids: mx.array | None = None) -> mx.array:
        """The next token (as an index into `logits`' last axis): the argmax, or a draw."""
        logits = self.biased(logits, ids)
        if self.greedy:
            return mx.argmax(logits, axis=-1)
        return self.draw(probabilities(logits, self.settings))
