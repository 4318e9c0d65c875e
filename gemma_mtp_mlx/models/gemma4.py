"""The Gemma 4 text decoder in MLX (E2B, E4B, 26B-A4B, 31B shapes).

Module names follow mlx-lm's `gemma4_text` so that HF and mlx-community checkpoints load by
name after `sanitize`. The math follows HF transformers' `modeling_gemma4.py`, the reference:
spec/gemma4-mtp.md §1 has the formulas and §6 the pitfalls referred to below.
"""

import math
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.rope_utils import initialize_rope

from .cache import FullCache, KVView, SlidingWindowCache, uncached_view
from .moe import Experts, Router, sanitize_experts

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass
class ModelArgs:
    # Defaults are HF `Gemma4TextConfig`'s (the reference), not mlx-lm's (pitfalls 6, 8).
    hidden_size: int = 2304
    num_hidden_layers: int = 30
    intermediate_size: int = 9216
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 256
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    vocab_size: int = 262144
    vocab_size_per_layer_input: int = 262144
    hidden_size_per_layer_input: int = 256
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    layer_types: list[str] = field(default_factory=list)
    rope_parameters: dict = field(default_factory=dict)
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    max_position_embeddings: int = 131072
    # "vision": during prefill an image's soft tokens see each other both ways on sliding layers.
    use_bidirectional_attention: str | None = None
    # Per full-attention layer overrides as transformers 5.24 writes them: {"i": {head_dim, num_key_value_heads}}.
    per_layer_config: dict | None = None

    @classmethod
    def from_config(cls, config: dict) -> "ModelArgs":
        """Build from a config.json dict: text-only, multimodal (`text_config`) or an assistant's."""
        config = dict(config.get("text_config") or config)
        names = cls.__dataclass_fields__
        if config.get("use_bidirectional_attention") == "all":
            raise ValueError("use_bidirectional_attention='all' is not a causal Gemma 4 decoder")
        args = cls(**{k: v for k, v in config.items() if k in names and v is not None})
        args._complete()
        return args

    def _complete(self):
        """Fill what HF derives at load time: layer pattern, RoPE defaults, full-layer geometry."""
        if not self.layer_types:
            self.layer_types = [
                FULL if (i + 1) % 6 == 0 else SLIDING for i in range(self.num_hidden_layers)
            ]
        self.layer_types = list(self.layer_types)
        self.layer_types[-1] = FULL
        defaults = {
            SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
        }
        self.rope_parameters = {**defaults, **(self.rope_parameters or {})}
        if self.per_layer_config:
            # transformers 5.24 stores the full-layer geometry per layer instead of the two globals.
            full = next(
                (v for k, v in self.per_layer_config.items() if self.layer_types[int(k)] == FULL),
                {},
            )
            self.global_head_dim = full.get("head_dim", self.global_head_dim)
            if "num_key_value_heads" in full and self.attention_k_eq_v:
                self.num_global_key_value_heads = full["num_key_value_heads"]

    # -- per-layer geometry (spec §1.1) ----------------------------------------------------
    def head_dim_of(self, layer: int) -> int:
        return self.global_head_dim if self.layer_types[layer] == FULL else self.head_dim

    def kv_heads_of(self, layer: int) -> int:
        if (
            self.layer_types[layer] == FULL
            and self.attention_k_eq_v
            and self.num_global_key_value_heads is not None
        ):
            return self.num_global_key_value_heads
        return self.num_key_value_heads

    @property
    def first_shared_layer(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def kv_source_of(self, layer: int) -> int:
        """The layer whose K/V `layer` attends to: itself, or for a shared layer the last
        non-shared layer of the same type (pitfall 7)."""
        if layer < self.first_shared_layer:
            return layer
        return self.store_layer(self.layer_types[layer])

    def store_layer(self, layer_type: str) -> int:
        """The last non-shared layer of a type: its K/V is what the drafter reads (spec §1.1)."""
        candidates = [i for i in range(self.first_shared_layer) if self.layer_types[i] == layer_type]
        if not candidates:
            raise ValueError(f"no non-shared {layer_type} layer in this target")
        return candidates[-1]


class RMSNormNoScale(nn.Module):
    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def __call__(self, x):
        return mx.fast.rms_norm(x, None, self.eps)


def make_rope(args: ModelArgs, layer_type: str, head_dim: int):
    params = args.rope_parameters[layer_type]
    return initialize_rope(
        dims=head_dim,
        base=params.get("rope_theta", 10_000.0),
        traditional=False,
        scaling_config=params,
        max_position_embeddings=args.max_position_embeddings,
    )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer_type = args.layer_types[layer]
        self.head_dim = args.head_dim_of(layer)
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.kv_heads_of(layer)
        self.has_kv = layer < args.first_shared_layer
        # k_eq_v: full layers have no v_proj; values come from the raw key projection (pitfall 3).
        self.k_eq_v = args.attention_k_eq_v and self.layer_type == FULL
        h, eps = args.hidden_size, args.rms_norm_eps

        self.q_proj = nn.Linear(h, self.n_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, h, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps)
        if self.has_kv:
            self.k_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
            if not self.k_eq_v:
                self.v_proj = nn.Linear(h, self.n_kv_heads * self.head_dim, bias=False)
            self.k_norm = nn.RMSNorm(self.head_dim, eps=eps)
            self.v_norm = RMSNormNoScale(eps)
        self.rope = make_rope(args, self.layer_type, self.head_dim)
        self.window = args.sliding_window if self.layer_type == SLIDING else None

    def __call__(self, x: mx.array, cache=None, shared_kv=None):
        """Returns the output and the view of the K/V attended to, which KV-shared layers of
        the same type reuse. `cache` is one layer cache, a `RowsCache` (independent sequences,
        each at its own position) or None (no cache: positions from 0)."""
        B, L, _ = x.shape
        q = heads(self.q_norm, self.q_proj(x), self.n_heads, self.head_dim)
        view = shared_kv
        if self.has_kv:
            k = self.k_proj(x)
            # k_eq_v: values are the raw key projection, before k_norm and RoPE (pitfall 3).
            v = k if self.k_eq_v else self.v_proj(x)
            k = heads(self.k_norm, k, self.n_kv_heads, self.head_dim)
            v = heads(self.v_norm, v, self.n_kv_heads, self.head_dim)
            if cache is None:
                view = uncached_view(k, v, self.rope, self.window)
            else:
                view = cache.store(k, v, self.rope)
        out = view.attend(q, self.rope)
        out = out.reshape(B, L, -1) if L == 1 else out.transpose(0, 2, 1, 3).reshape(B, L, -1)
        return self.o_proj(out), view


def heads(norm, x: mx.array, n: int, head_dim: int) -> mx.array:
    """[B, L, n * head_dim] -> normed per head, [B, n, L, head_dim]. One token (a decoding
    step's usual case) needs no transpose: a reshape puts its heads in place."""
    B, L, _ = x.shape
    if L == 1:
        return norm(x.reshape(B, n, 1, head_dim))
    return norm(x.reshape(B, L, n, head_dim)).transpose(0, 2, 1, 3)


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        h, eps = args.hidden_size, args.rms_norm_eps
        self.layer_type = args.layer_types[layer]
        self.self_attn = Attention(args, layer)
        shared = layer >= args.first_shared_layer > 0
        wide = 2 if (args.use_double_wide_mlp and shared) else 1
        self.mlp = MLP(h, args.intermediate_size * wide)
        self.input_layernorm = nn.RMSNorm(h, eps=eps)
        self.post_attention_layernorm = nn.RMSNorm(h, eps=eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(h, eps=eps)
        self.post_feedforward_layernorm = nn.RMSNorm(h, eps=eps)
        self.enable_moe = args.enable_moe_block
        if self.enable_moe:
            self.router = Router(args)
            self.experts = Experts(args)
            self.pre_feedforward_layernorm_2 = nn.RMSNorm(h, eps=eps)
            self.post_feedforward_layernorm_1 = nn.RMSNorm(h, eps=eps)
            self.post_feedforward_layernorm_2 = nn.RMSNorm(h, eps=eps)
        self.has_ple = bool(args.hidden_size_per_layer_input)
        if self.has_ple:
            p = args.hidden_size_per_layer_input
            self.per_layer_input_gate = nn.Linear(h, p, bias=False)
            self.per_layer_projection = nn.Linear(p, h, bias=False)
            self.post_per_layer_input_norm = nn.RMSNorm(h, eps=eps)
        self.layer_scalar = mx.ones((1,))

    def __call__(self, x, cache=None, shared_kv=None, per_layer_input=None):
        attn, kv = self.self_attn(self.input_layernorm(x), cache, shared_kv)
        h = x + self.post_attention_layernorm(attn)
        if self.enable_moe:
            # The router reads the residual stream itself, not the pre-FF-normed tensor (pitfall 21).
            dense = self.post_feedforward_layernorm_1(self.mlp(self.pre_feedforward_layernorm(h)))
            experts = self.experts(self.pre_feedforward_layernorm_2(h), *self.router(h))
            ff = dense + self.post_feedforward_layernorm_2(experts)
        else:
            ff = self.mlp(self.pre_feedforward_layernorm(h))
        h = h + self.post_feedforward_layernorm(ff)
        if self.has_ple:
            gate = nn.gelu_approx(self.per_layer_input_gate(h)) * per_layer_input
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(gate))
        return h * self.layer_scalar, kv


class Gemma4TextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        if args.hidden_size_per_layer_input:
            n, p = args.num_hidden_layers, args.hidden_size_per_layer_input
            self.embed_tokens_per_layer = nn.Embedding(args.vocab_size_per_layer_input, n * p)
            self.per_layer_model_projection = nn.Linear(args.hidden_size, n * p, bias=False)
            self.per_layer_projection_norm = nn.RMSNorm(p, eps=args.rms_norm_eps)

    def embed(self, tokens: mx.array) -> mx.array:
        """The scaled input embedding; the scale is rounded to the weight dtype first (pitfall 10).
        The drafter takes its input embedding from here too."""
        h = self.embed_tokens(tokens)
        return h * mx.array(math.sqrt(self.args.hidden_size), dtype=h.dtype)

    def per_layer_inputs(self, tokens: mx.array, h0: mx.array) -> list[mx.array]:
        """Each layer's [B, L, p]: token PLE + projection of the scaled embedding (spec §1.3,
        pitfall 9). Split along the last axis, a layer's input is one slice of one array."""
        a = self.args
        n, p = a.num_hidden_layers, a.hidden_size_per_layer_input
        tok = self.embed_tokens_per_layer(tokens)
        tok = (tok * mx.array(math.sqrt(p), dtype=tok.dtype)).reshape(*tokens.shape, n, p)
        ctx = self.per_layer_model_projection(h0) * (a.hidden_size**-0.5)
        ctx = self.per_layer_projection_norm(ctx.reshape(*tokens.shape, n, p))
        return mx.split(((ctx + tok) * (2.0**-0.5)).reshape(*tokens.shape, n * p), n, axis=-1)

    def __call__(
        self, tokens: mx.array, cache: list | None = None, embeddings: mx.array | None = None
    ) -> mx.array:
        """Post-final-norm hidden states [B, L, hidden]; caches of the non-shared layers updated.
        With `RowsCache`s the B rows are independent sequences, each at its own position.
        `embeddings` replaces the input embedding of `tokens` (a prompt with images in it)."""
        a = self.args
        h = self.embed(tokens) if embeddings is None else embeddings
        ple = self.per_layer_inputs(tokens, h) if a.hidden_size_per_layer_input else None

        views: list = [None] * len(self.layers)
        for i, layer in enumerate(self.layers):
            layer_cache = cache[i] if cache and i < len(cache) else None
            layer_ple = ple[i] if ple is not None else None
            h, views[i] = layer(h, layer_cache, views[a.kv_source_of(i)], layer_ple)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Gemma4TextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def logits(self, hidden: mx.array) -> mx.array:
        if self.args.tie_word_embeddings:
            out = self.model.embed_tokens.as_linear(hidden)
        else:
            out = self.lm_head(hidden)
        cap = self.args.final_logit_softcapping
        return mx.tanh(out / cap) * cap if cap else out

    def __call__(
        self,
        tokens: mx.array,
        cache: list | None = None,
        *,
        return_hidden: bool = False,
        last_only: bool = False,
        embeddings: mx.array | None = None,
    ) -> Any:
        """Logits [B, L, vocab] (mlx-lm convention); with `return_hidden`, also the post-norm
        hidden states the drafter conditions on; `last_only` keeps only the final position."""
        hidden = self.model(tokens, cache, embeddings)
        if last_only:
            hidden = hidden[:, -1:, :]
        logits = self.logits(hidden)
        return (logits, hidden) if return_hidden else logits

    def drafter_kv(self, cache: list, window: int) -> dict[str, KVView]:
        """The K/V the drafter attends to, read in place from the caches of the last sliding and
        the last full layer: every committed position for full attention, the last `window + 1`
        for sliding attention (transformers' assistant mask, spec §3.4). The drafter's query
        sits at the newest token's position, the cache's offset (spec §3.3)."""
        return {
            SLIDING: cache[self.args.store_layer(SLIDING)].drafter_view(window + 1),
            FULL: cache[self.args.store_layer(FULL)].drafter_view(),
        }

    def make_cache(self, slack: int = 64, limit: int | None = None) -> list:
        """One cache per non-shared layer. `slack` bounds how many tokens can be rolled back
        on sliding layers once the window has wrapped (`SlidingWindowCache.max_rollback`);
        `limit` caps the full-attention buffers (the context, as the memory preflight counts)."""
        return [
            SlidingWindowCache(self.args.sliding_window, slack)
            if self.args.layer_types[i] == SLIDING
            else FullCache(limit)
            for i in range(self.args.first_shared_layer)
        ]

    # -- checkpoint quirks -----------------------------------------------------------------
    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Map HF text-only, HF multimodal and mlx-community key layouts onto ours (spec §2)."""
        out = {}
        shared_from = self.args.first_shared_layer
        for key, value in weights.items():
            key = canonical_key(key)
            if key is None or any(s in key for s in _DROPPED):
                continue
            if self.args.tie_word_embeddings and key.startswith("lm_head."):
                continue
            if _is_shared_kv_weight(key, shared_from):
                continue
            out[key] = value
        return sanitize_experts(out)  # HF fused or mlx-community split experts -> ours

    @staticmethod
    def quant_predicate(path: str, module: nn.Module):
        """The router stays at 8 bits when quantizing (as mlx-lm does, spec §2.3); layers whose
        input width is not a multiple of the group size stay as they are."""
        if not hasattr(module, "to_quantized") or module.weight.shape[-1] % 64:
            return False
        if path.endswith("router.proj"):
            return {"group_size": 64, "bits": 8}
        return True


_DROPPED = ("self_attn.rotary_emb", "input_max", "input_min", "output_max", "output_min")
_NON_TEXT = ("vision", "audio", "multi_modal_projector", "embed_vision", "embed_audio")


def canonical_key(key: str) -> str | None:
    """`model.language_model.X` (HF multimodal) and `language_model.model.X` (mlx-community)
    become `model.X`; vision/audio towers are skipped (None)."""
    if key.startswith("model.language_model."):
        return "model." + key.removeprefix("model.language_model.")
    if key.startswith("language_model."):
        return key.removeprefix("language_model.")
    if key.startswith("model.") and key.split(".")[1].startswith(_NON_TEXT):
        return None
    if key.startswith(_NON_TEXT):
        return None
    return key


def _is_shared_kv_weight(key: str, first_shared: int) -> bool:
    """KV-shared layers reuse an earlier layer's K/V: their k/v weights in a checkpoint are unused."""
    if not any(s in key for s in (".self_attn.k_proj", ".self_attn.v_proj", ".self_attn.k_norm")):
        return False
    return int(key.split("layers.")[1].split(".")[0]) >= first_shared
