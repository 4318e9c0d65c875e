"""The identity of a model's numbers, to tell whether something saved for a model still fits it
(a conversation's KV cache, chat/saved_cache.py; the costs learned on it, engine/stored_costs.py)."""

import hashlib
from collections import Counter

import mlx.core as mx
from mlx.utils import tree_flatten

_SAMPLES = 64  # values sampled from each tensor


def fingerprint(model, chat_template: str | None = None) -> str:
    """Every parameter's name, shape, dtype and a strided sample of its values (hashing all of
    an 8 GB model would take seconds), and the chat template when given. Two checkpoints of the
    same shape differ, and so do two quantisations of the same model."""
    named = sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0])
    samples = [p.reshape(-1)[:: max(1, p.size // _SAMPLES)] for _, p in named]
    samples = [mx.contiguous(s) for s in samples]
    mx.eval(samples)
    h = hashlib.sha256((chat_template or "").encode())
    for (name, p), sample in zip(named, samples):
        h.update(f"{name}:{p.shape}:{p.dtype};".encode())
        h.update(memoryview(sample))
    return h.hexdigest()


def precision(model) -> str:
    """How a model's weights are stored, in words: "4-bit" (quantised layers; "4/8-bit" when
    mixed), else the dtype most of its values have ("bfloat16", "float32")."""
    bits = sorted({m.bits for _, m in model.named_modules() if hasattr(m, "bits")})
    if bits:
        return "/".join(str(b) for b in bits) + "-bit"
    sizes = Counter()
    for _, p in tree_flatten(model.parameters()):
        sizes[p.dtype] += p.size
    return str(max(sizes, key=sizes.get)).removeprefix("mlx.core.")
