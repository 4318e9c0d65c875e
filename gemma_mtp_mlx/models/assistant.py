"""Gemma 4's MTP "assistant" drafter (`gemma4_assistant`), spec §3.

One draft step: x = pre_projection([target_embed(token) ; g]) -> 4 Gemma 4 decoder layers that
project queries only and attend to the target's own K/V (its last sliding and last full layer:
the drafter has no cache) -> final norm y -> logits from y (tied head or the centroid head) and
g_next = post_projection(y), fed back as g for the next draft.

Conventions follow transformers (the reference, spec §3.3-3.4): the query sits at the position
of the token being fed (the bonus token's own position: the target's cache offset), and the
sliding layers see the last `sliding_window + 1` committed positions. Rejected drafts are never
visible: the drafter reads the target caches after rollback.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .gemma4 import FULL, SLIDING, DecoderLayer, ModelArgs


@dataclass
class AssistantArgs:
    text: ModelArgs
    backbone_hidden_size: int
    use_ordered_embeddings: bool = False
    num_centroids: int = 2048
    centroid_intermediate_top_k: int = 32

    @classmethod
    def from_config(cls, config: dict) -> "AssistantArgs":
        text = dict(config.get("text_config") or {})
        # Every assistant layer reads the target's K/V (HF forces num_kv_shared_layers = layers).
        text["num_kv_shared_layers"] = text.get("num_hidden_layers", 4)
        text.setdefault("hidden_size_per_layer_input", 0)
        return cls(
            text=ModelArgs.from_config(text),
            backbone_hidden_size=config.get("backbone_hidden_size", 1536),
            use_ordered_embeddings=bool(config.get("use_ordered_embeddings", False)),
            num_centroids=config.get("num_centroids", 2048),
            centroid_intermediate_top_k=config.get("centroid_intermediate_top_k", 32),
        )


def pairing_problems(target: ModelArgs, drafter: AssistantArgs) -> list[str]:
    """Why a drafter cannot read this target's K/V or embeddings (empty when it fits)."""
    t, d = target, drafter.text
    problems = []
    if drafter.backbone_hidden_size != t.hidden_size:
        problems.append(
            f"backbone_hidden_size {drafter.backbone_hidden_size} != target hidden_size {t.hidden_size}"
        )
    if d.vocab_size != t.vocab_size:
        problems.append(f"vocabulary {d.vocab_size} != target vocabulary {t.vocab_size}")
    for kind in (SLIDING, FULL):
        tl = t.store_layer(kind)
        dl = d.layer_types.index(kind) if kind in d.layer_types else None
        if dl is None:
            continue
        if d.head_dim_of(dl) != t.head_dim_of(tl) or d.kv_heads_of(dl) != t.kv_heads_of(tl):
            problems.append(
                f"{kind} K/V geometry {d.kv_heads_of(dl)}x{d.head_dim_of(dl)} != target's "
                f"{t.kv_heads_of(tl)}x{t.head_dim_of(tl)}"
            )
        elif d.num_attention_heads % t.kv_heads_of(tl):
            problems.append(
                f"{d.num_attention_heads} query heads cannot group over {t.kv_heads_of(tl)} KV heads"
            )
    if d.sliding_window > t.sliding_window:
        problems.append(f"sliding window {d.sliding_window} > target's {t.sliding_window}")
    return problems


class MaskedEmbedding(nn.Module):
    """The centroid ("ordered embedding") head of the E2B/E4B assistants (spec §3.5): score
    clusters, keep the top-k, compute logits only for the tokens of those clusters."""

    def __init__(self, args: AssistantArgs):
        super().__init__()
        vocab = args.text.vocab_size
        self.top_k = args.centroid_intermediate_top_k
        self.num_centroids = args.num_centroids
        self.centroids = nn.Linear(args.text.hidden_size, args.num_centroids, bias=False)
        # A permutation of token ids; row c of its [centroids, vocab/centroids] view is cluster c.
        self.token_ordering = mx.zeros((vocab,), dtype=mx.int32)

    def candidates(self, y: mx.array, embed_tokens: nn.Module) -> tuple[mx.array, mx.array]:
        """Candidate token ids [..., top_k * cluster] and their logits."""
        scores = self.centroids(y)
        top = mx.argpartition(-scores, kth=self.top_k - 1, axis=-1)[..., : self.top_k]
        clusters = self.token_ordering.reshape(self.num_centroids, -1)
        ids = clusters[top].reshape(*y.shape[:-1], -1)
        rows = embed_tokens(ids)  # [..., n, hidden]; dequantises quantised tables too
        logits = (rows @ y[..., :, None])[..., 0]
        return ids, logits


class Assistant(nn.Module):
    def __init__(self, args: AssistantArgs):
        super().__init__()
        self.args = args
        text = args.text
        self.model = _AssistantBody(text)
        self.pre_projection = nn.Linear(2 * args.backbone_hidden_size, text.hidden_size, bias=False)
        self.post_projection = nn.Linear(text.hidden_size, args.backbone_hidden_size, bias=False)
        if args.use_ordered_embeddings:
            self.masked_embedding = MaskedEmbedding(args)

    @property
    def sliding_window(self) -> int:
        return self.args.text.sliding_window

    def __call__(self, embedding: mx.array, hidden: mx.array, kv: dict):
        """One draft step. `embedding` = the target's scaled embedding of the newest token,
        `hidden` = the target's post-norm hidden state (first step) or the previous g_next;
        `kv` = {layer type: view} read from the target caches (`Model.drafter_kv`); the views
        also carry the query's position. Returns (y, g_next): the drafter's normed state (for
        logits) and the recurrent state."""
        x = self.pre_projection(mx.concatenate([embedding, hidden], axis=-1))
        for layer in self.model.layers:
            x, _ = layer(x, None, kv[layer.layer_type])
        y = self.model.norm(x)
        return y, self.post_projection(y)

    def logits(self, y: mx.array) -> mx.array:
        """Full-vocabulary logits (no softcap: HF applies none to the drafter, pitfall 11).
        With the centroid head, tokens outside the candidates get min(candidates) - 1, as HF."""
        if not self.args.use_ordered_embeddings:
            return self.model.embed_tokens.as_linear(y)
        ids, cand = self.masked_embedding.candidates(y, self.model.embed_tokens)
        floor = cand.min(axis=-1, keepdims=True) - 1
        full = mx.broadcast_to(floor, (*y.shape[:-1], self.args.text.vocab_size))
        return mx.put_along_axis(full, ids, cand, axis=-1)

    def candidate_logits(self, y: mx.array) -> tuple[mx.array | None, mx.array]:
        """(token ids or None for the whole vocabulary, their logits): the drafter's support."""
        if not self.args.use_ordered_embeddings:
            return None, self.model.embed_tokens.as_linear(y)
        return self.masked_embedding.candidates(y, self.model.embed_tokens)

    def sanitize(self, weights: dict) -> dict:
        out = {}
        for key, value in weights.items():
            if key.startswith("lm_head.") and self.args.text.tie_word_embeddings:
                continue
            if key.endswith("token_ordering"):
                value = value.astype(mx.int32)
            out[key] = value
        return out


class _AssistantBody(nn.Module):
    """The drafter's decoder stack; its `embed_tokens` is the LM head, not an input (pitfall 12)."""

    def __init__(self, text: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(text.vocab_size, text.hidden_size)
        self.layers = [DecoderLayer(text, i) for i in range(text.num_hidden_layers)]
        self.norm = nn.RMSNorm(text.hidden_size, eps=text.rms_norm_eps)
