"""Random-weight fp32 models with Gemma 4's real shapes (models/configs.py), sized to memory.

A full E2B in fp32 holds ~18 GB (its per-layer-embedding table alone 9.4 GB), a 26B-A4B layer
~3.2 GB, so a machine keeps only some layers. The kept layers are the first N of the real stack,
the last one full-attention as in every Gemma 4, and KV sharing (E2B, E4B) keeps its share of
the stack: the last round(N x shared / layers) layers reuse the K/V of the last non-shared
layer of their type, as the real model's do. Every other dimension is the real one: widths,
heads, head dims, the double-wide MLP of E2B's shared layers, per-layer embeddings, experts,
k_eq_v, the sliding window, the 262144-token vocabulary (the LM head is a large part of a
small model's step) and the real assistant, centroid head included. The vocabulary shrinks
only when not even two layers fit; the centroid head then keeps its 4096 candidates.

The weights are Normal(0, fan_in^-1/2) (vectors keep their init; the token table smaller, see
EMBEDDING_SCALE), so the model decodes a varied sequence and a random router picks experts
independently per token (the diverse case for a mixture of experts). A tokenizer with one word per id stands in for the real one.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ...errors import GemmaChatError
from ...loading import Pair
from ...models.assistant import Assistant, AssistantArgs, pairing_problems
from ...models.configs import ASSISTANTS, FULL, SLIDING, TARGETS
from ...models.gemma4 import Model, ModelArgs

SHAPES = tuple(TARGETS)
MIN_VOCAB = 32768
CLUSTER = 128  # tokens per centroid cluster in the real E2B/E4B heads (262144 / 2048)
# Share of the memory available at start that the weights may take: the run also needs a copy
# of the largest array while drawing it, caches, activations and room for whatever else runs.
MEMORY_SHARE = 0.6
EOS, BOS, PAD = 1, 2, 0
# The token table's scale relative to the other matrices. The embedding enters the residual
# stream scaled by sqrt(hidden) and the tied head reads it back, so at full scale a random
# model's top logit is the input token's own: greedy decoding repeats one token forever (and a
# mixture of experts routes every verified token alike). At 1/20 it decodes a varied sequence.
EMBEDDING_SCALE = 0.05


@dataclass
class Shape:
    """One random model to build: which real shape, and how much of it."""

    name: str
    target: dict  # config.json-style, for ModelArgs.from_config
    assistant: dict
    note: str  # what differs from the real model

    @property
    def layers(self) -> int:
        return self.target["num_hidden_layers"]

    @property
    def vocab(self) -> int:
        return self.target["vocab_size"]


def kept_layers(name: str, layers: int) -> tuple[list[str], int]:
    """(layer types, KV-shared layer count) of the first `layers` layers of a real stack."""
    _known(name)
    real = TARGETS[name]
    if not 2 <= layers <= real["num_hidden_layers"]:
        raise GemmaChatError(
            f"{name} has {real['num_hidden_layers']} layers; keep between 2 and that many"
        )
    types = list(real["layer_types"][:layers])
    types[-1] = FULL
    shared = round(layers * real.get("num_kv_shared_layers", 0) / real["num_hidden_layers"])
    # The layers that keep their own K/V must include a sliding and a full one (the drafter
    # reads the last of each; shared layers read them too).
    while shared and not {SLIDING, FULL} <= set(types[: layers - shared]):
        shared -= 1
    return types, shared


def _known(name: str) -> None:
    if name not in TARGETS:
        raise GemmaChatError(f"unknown shape {name!r}: one of {', '.join(SHAPES)}")


def shape(name: str, layers: int | None = None, vocab: int | None = None) -> Shape:
    """The real configs of `name`, cut to `layers` (default: all) and `vocab` (default: real)."""
    _known(name)
    real_layers, real_vocab = TARGETS[name]["num_hidden_layers"], TARGETS[name]["vocab_size"]
    layers = layers or real_layers
    vocab = vocab or real_vocab
    types, shared = kept_layers(name, layers)
    target = dict(TARGETS[name], num_hidden_layers=layers, layer_types=types, vocab_size=vocab)
    if target.get("num_kv_shared_layers"):
        target["num_kv_shared_layers"] = shared
    if target.get("vocab_size_per_layer_input"):
        target["vocab_size_per_layer_input"] = vocab
    assistant = dict(ASSISTANTS[name])
    assistant["text_config"] = dict(assistant["text_config"], vocab_size=vocab)
    if assistant["use_ordered_embeddings"]:
        assistant["num_centroids"] = vocab // CLUSTER
    note = f"{layers} of {real_layers} layers"
    if target.get("num_kv_shared_layers"):
        note += f" ({shared} KV-shared)"
    note += ", real vocabulary" if vocab == real_vocab else f", vocabulary {vocab} (real {real_vocab})"
    return Shape(name, target, assistant, note)


# A deep, narrow pair: the whole layer stack of a real shape at tiny widths, the regime of a Mac
# running E2B/E4B, where a step is short on the device and the host's work per layer shows.
NARROW_TARGET = {"hidden_size": 64, "intermediate_size": 128, "head_dim": 16, "global_head_dim": 32}
NARROW_ASSISTANT = {"hidden_size": 32, "intermediate_size": 64, "head_dim": 16, "global_head_dim": 32}
NARROW_VOCAB = 8192


def narrow(name: str) -> Shape:
    """Every layer of `name` (its sliding/full pattern, KV sharing, per-layer embeddings, its
    experts and their top-k, k_eq_v) at the widths of NARROW_TARGET, with its assistant."""
    real = shape(name, vocab=NARROW_VOCAB)
    target = real.target | NARROW_TARGET
    if target.get("hidden_size_per_layer_input"):
        target["hidden_size_per_layer_input"] = 16
    if target.get("enable_moe_block"):
        target["moe_intermediate_size"] = 16
    assistant = dict(real.assistant, backbone_hidden_size=target["hidden_size"])
    assistant["text_config"] = real.assistant["text_config"] | NARROW_ASSISTANT
    note = f"all {real.layers} layers at widths {target['hidden_size']}/{target['intermediate_size']}"
    return Shape(name, target, assistant, note + f", vocabulary {NARROW_VOCAB}")


def weight_bytes(s: Shape) -> tuple[int, int]:
    """(bytes of all fp32 weights, bytes of the largest array) of the target and drafter:
    counted on unevaluated modules (MLX allocates nothing until evaluation)."""
    arrays = [v for m in _modules(s) for _, v in tree_flatten(m.parameters())]
    return sum(v.size * 4 for v in arrays), max(v.size * 4 for v in arrays)


def step_bytes(s: Shape) -> dict[str, int]:
    """Bytes of fp32 target weights one decoded token reads, by arithmetic on the shape (not a
    measurement): the LM head (the tied token table) and the layers, a mixture of experts'
    expert weights at top_k / experts (per-layer embeddings: one row per token, left out).
    Says how far a truncated model's step is from the full one's."""
    target, _ = _modules(s)
    args = target.args
    head = layers = 0
    for key, value in tree_flatten(target.parameters()):
        size = value.size * 4
        if key == "model.embed_tokens.weight":
            head += size
        elif key.startswith("model.embed_tokens_per_layer."):
            continue
        elif ".experts." in key:
            layers += size * args.top_k_experts // args.num_experts
        else:
            layers += size
    return {"lm_head": head, "layers": layers}


def available_memory() -> int:
    """Bytes of memory free for this run: MemAvailable on Linux, physical memory elsewhere."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def fit(name: str, layers: int | None, budget: int) -> Shape:
    """`layers` as asked, else as many as `budget` bytes hold, at the real vocabulary if two
    layers fit there and halved until they do otherwise."""
    _known(name)
    vocab = TARGETS[name]["vocab_size"]
    while True:
        s = _fit_layers(name, layers, vocab, budget)
        if s is not None:
            return s
        if vocab // 2 < MIN_VOCAB:
            total, _ = weight_bytes(shape(name, layers or 2, vocab))
            raise GemmaChatError(
                f"{name} needs {total / 2**30:.1f} GiB for {layers or 2} layers; "
                f"{budget / 2**30:.1f} GiB are free for weights"
            )
        vocab //= 2


def _fit_layers(name: str, layers: int | None, vocab: int, budget: int) -> Shape | None:
    def fits(n):
        total, largest = weight_bytes(shape(name, n, vocab))
        return total + largest <= budget

    if layers is not None:
        return shape(name, layers, vocab) if fits(layers) else None
    best = None
    for n in range(2, TARGETS[name]["num_hidden_layers"] + 1):
        if not fits(n):
            break
        best = n
    return None if best is None else shape(name, best, vocab)


def _modules(s: Shape) -> tuple[Model, Assistant]:
    target = Model(ModelArgs.from_config(s.target))
    drafter = Assistant(AssistantArgs.from_config(s.assistant))
    problems = pairing_problems(target.args, drafter.args)
    if problems:  # a wrong value in models/configs.py would show here
        raise GemmaChatError(f"{s.name}: the assistant does not fit the target: {problems}")
    return target, drafter


def build(s: Shape, seed: int = 0) -> Pair:
    """The random-weight pair of shape `s`, evaluated, with a one-word-per-id tokenizer."""
    rng = np.random.default_rng(seed)
    target, drafter = _modules(s)
    randomize(target, rng)
    target.model.embed_tokens.weight = target.model.embed_tokens.weight * EMBEDDING_SCALE
    randomize(drafter, rng)
    if drafter.args.use_ordered_embeddings:
        order = rng.permutation(drafter.args.text.vocab_size).astype(np.int32)
        drafter.masked_embedding.token_ordering = mx.array(order)
    mx.eval(target.parameters(), drafter.parameters())
    path = Path(f"random-{s.name}")
    return Pair(target, drafter, id_tokenizer(s.vocab), path, path / "assistant")


def randomize(module, rng: np.random.Generator) -> None:
    """Normal(0, fan_in^-1/2) matrices drawn with numpy (several times faster than MLX's CPU
    generator for gigabytes), one array at a time; vectors (norms, scales) keep their init."""
    new = []
    for key, value in tree_flatten(module.parameters()):
        if value.ndim >= 2 and mx.issubdtype(value.dtype, mx.floating):
            w = rng.standard_normal(value.shape, dtype=np.float32)
            w *= np.float32(value.shape[-1] ** -0.5)
            new.append((key, mx.array(w)))
            del w
    module.load_weights(new, strict=False)


def id_tokenizer(vocab: int):
    """mlx-lm's tokenizer wrapper over a word-level tokenizer with one word per id (pad 0,
    end of sequence 1, begin 2, then t3, t4, ...): random weights have no language."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": PAD, "<eos>": EOS, "<bos>": BOS} | {f"t{i}": i for i in range(3, vocab)}
    tokenizer = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<eos>", bos_token="<bos>", pad_token="<pad>"
    )
    return TokenizerWrapper(hf, eos_token_ids=[EOS])


def random_target(config: dict, seed: int = 0) -> Model:
    """A random-weight fp32 target of a config.json-style dict (evaluated)."""
    target = Model(ModelArgs.from_config(config))
    randomize(target, np.random.default_rng(seed))
    mx.eval(target.parameters())
    return target

