"""The peers, run on our weights: mlx-lm's plain decoding and mlx-vlm's MTP loop.

Both hold the very arrays of our target (and drafter): no copy, no file, no second load, so
every difference in speed is the code's. mlx-vlm is optional (gemma-chat never depends on it):
everything that needs it imports it inside, and `mlx_vlm_missing()` says why it cannot run.
"""

import dataclasses
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from ...engine.sampling import ban_bias
from ...errors import GemmaChatError
from ...models.assistant import Assistant
from ...models.gemma4 import Model
from ...models.moe import fused_module_path
from .measure import Run
from .simulated import Proposals

# mlx-vlm's gemma4 is the multimodal model: it builds a vision tower from its config. Text-only
# decoding never runs it, so a tiny one stands in for the real (random, a few KB).
TINY_VISION = {
    "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 1, "num_key_value_heads": 1, "head_dim": 32, "global_head_dim": 32,
}


def eos_bias(target: Model, tokenizer) -> mx.array | None:
    """The additive mask that keeps every implementation off end of sequence (ours as
    `ignore_eos` applies it), so that all decode exactly `max_tokens`."""
    return ban_bias(target.args.vocab_size, sorted(set(tokenizer.eos_token_ids)))


def mlx_lm_layout(target: Model) -> dict[str, mx.array]:
    """Our target's parameters under mlx-lm's names (mlx-vlm's language model uses the same):
    our fused expert gate/up rows are handed over as two views, everything else as is."""
    weights = {}
    for key, value in tree_flatten(target.parameters()):
        if ".experts.gate_up_proj." in key:
            gate, up = mx.split(value, 2, axis=1)
            split = key.replace(".experts.gate_up_proj.", ".experts.switch_glu.{}_proj.")
            weights[split.format("gate")], weights[split.format("up")] = gate, up
        else:
            weights[key.replace(".experts.down_proj.", ".experts.switch_glu.down_proj.")] = value
    return weights


def _hold_our_weights(module: nn.Module, target: Model, prefix: str = "") -> None:
    """Load our target's arrays into a peer's text model (quantised like ours, if ours is);
    every parameter under `prefix` must find its place."""
    ours = dict(target.named_modules())

    def quantized_like_ours(path, _module):
        m = ours.get(fused_module_path(path.removeprefix(prefix)))
        if m is None or not hasattr(m, "bits"):
            return False
        return {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}

    if any(hasattr(m, "bits") for m in ours.values()):
        nn.quantize(module, class_predicate=quantized_like_ours)
    weights = {prefix + k: v for k, v in mlx_lm_layout(target).items()}
    theirs = {k for k, _ in tree_flatten(module.parameters()) if k.startswith(prefix)}
    if theirs != set(weights):
        missing, extra = sorted(theirs - set(weights))[:3], sorted(set(weights) - theirs)[:3]
        raise GemmaChatError(f"{type(module).__module__} does not fit this target: {missing} {extra}")
    module.load_weights(list(weights.items()), strict=not prefix)


def _text_config(args) -> dict:
    return {k: v for k, v in dataclasses.asdict(args).items() if v is not None}


# -- mlx-lm ------------------------------------------------------------------------------------
def mlx_lm_twin(target: Model):
    """mlx-lm's own `gemma4_text` model holding our target's weights."""
    from mlx_lm.models import gemma4_text

    twin = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(_text_config(target.args)))
    _hold_our_weights(twin, target)
    return twin


def run_mlx_lm(twin, tokenizer, prompt: list[int], max_tokens: int) -> Run:
    """mlx-lm's plain greedy decode (`stream_generate`, its default argmax sampler) to exactly
    `max_tokens`, end of sequence masked by the same bias as ours."""
    from mlx_lm import stream_generate

    bias = eos_bias(twin, tokenizer)
    processors = [lambda _tokens, logits: logits + bias] if bias is not None else None
    tokens, first = [], None
    mx.reset_peak_memory()
    for response in stream_generate(
        twin, tokenizer, prompt, max_tokens=max_tokens, logits_processors=processors
    ):
        if first is None:
            first = time.perf_counter()
        tokens.append(int(response.token))
    end = time.perf_counter()
    return Run(tokens, end - first, mx.get_peak_memory())


# -- mlx-vlm -----------------------------------------------------------------------------------
def mlx_vlm_missing() -> str | None:
    """Why mlx-vlm's MTP cannot run here, or None."""
    try:
        import mlx_vlm  # noqa: F401
    except ImportError:
        return "mlx-vlm is not importable (it is optional: pip install mlx-vlm)"
    return None


def vlm_target(target: Model, bias: mx.array | None):
    """mlx-vlm's multimodal `gemma4` model (what its MTP loop needs) holding our target's
    weights, with a tiny vision tower. mlx-vlm's MTP verification applies no logits processors,
    so the end-of-sequence mask is added where its language model makes logits
    (`logits_from_hidden`, which its plain and speculative paths share): the same add as ours."""
    from mlx_vlm.models.gemma4 import Model as VlmModel
    from mlx_vlm.models.gemma4 import ModelConfig
    from mlx_vlm.models.gemma4.config import TextConfig, VisionConfig

    args = target.args
    config = ModelConfig(
        text_config=TextConfig.from_dict(_text_config(args)),
        vision_config=VisionConfig(**TINY_VISION),
        vocab_size=args.vocab_size,
        hidden_size=args.hidden_size,
    )
    model = VlmModel(config)
    _hold_our_weights(model, target, prefix="language_model.")
    mx.eval(model.parameters())  # the stand-in vision tower's init
    if bias is not None:
        lm = model.language_model
        make_logits = lm.logits_from_hidden
        lm.logits_from_hidden = lambda hidden: make_logits(hidden) + bias
    return model


def vlm_drafter(drafter: Assistant, proposals: Proposals | None = None):
    """mlx-vlm's Gemma 4 assistant holding our drafter's weights; with `proposals`, its
    network runs in full and its drafts are then replaced as our simulated drafter's are."""
    from mlx_vlm.speculative.drafters.gemma4_assistant.config import Gemma4AssistantConfig
    from mlx_vlm.speculative.drafters.gemma4_assistant.gemma4_assistant import (
        Gemma4AssistantDraftModel,
    )

    class SimulatedVlmDrafter(Gemma4AssistantDraftModel):
        def draft_block(self, last_bonus, hidden, cache, block_size, sampler, token_dtype=mx.int32, greedy=False):
            real = super().draft_block(last_bonus, hidden, cache, block_size, sampler, token_dtype, greedy)
            # `_kv_offset` tokens are cached; the bonus token sits at that position, so the
            # drafts are for the positions after it.
            first = self._kv_offset + 1
            tokens = mx.array([[proposals.token(first + j) for j in range(block_size - 1)]])
            return tokens.astype(real.dtype) + 0 * real  # keeps the real drafts' work queued

    a = drafter.args
    config = Gemma4AssistantConfig(
        backbone_hidden_size=a.backbone_hidden_size,
        use_ordered_embeddings=a.use_ordered_embeddings,
        num_centroids=a.num_centroids,
        centroid_intermediate_top_k=a.centroid_intermediate_top_k,
        text_config=_text_config(a.text),
    )
    model = (Gemma4AssistantDraftModel if proposals is None else SimulatedVlmDrafter)(config)
    model.load_weights(list(tree_flatten(drafter.parameters())), strict=True)
    return model


def run_mlx_vlm(model, drafter, prompt: list[int], max_tokens: int, block: int) -> Run:
    """mlx-vlm's greedy MTP decode (`generate_step` with `draft_kind="mtp"`) to `max_tokens`.
    `block` counts the bonus token (mlx-vlm's `draft_block_size`): K = block - 1 drafts."""
    from mlx_vlm.generate import generate_step

    tokens, first = [], None
    mx.reset_peak_memory()
    steps = generate_step(
        mx.array([prompt]), model, None, None, max_tokens=max_tokens, temperature=0.0,
        draft_model=drafter, draft_kind="mtp", draft_block_size=block,
    )
    for token, _ in steps:
        if first is None:
            first = time.perf_counter()
        tokens.append(int(token.item() if hasattr(token, "item") else token))
        if len(tokens) >= max_tokens:
            break
    end = time.perf_counter()
    rounds = list(zip(drafter.draft_lens, drafter.accept_lens))  # its own per-round record
    return Run(tokens, end - first, mx.get_peak_memory(), rounds=rounds)
