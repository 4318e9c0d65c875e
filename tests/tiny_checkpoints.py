"""Tiny random Gemma 4 checkpoints (targets + MTP assistants) built with HF transformers.

These are parity fixtures for the MLX port: every checkpoint is written by the real
``transformers`` 5.24 classes with ``save_pretrained`` (safetensors, fp32), so the on-disk layout,
the key names and the config.json are exactly what transformers produces, and the HF modules are the
numerical reference (:func:`reference_logits`, :func:`reference_hidden`,
:func:`assistant_reference_step`).

Everything is tiny (hidden 64, vocab 512, 4-6 layers, sliding window 8) and deterministic (fixed
seeds; building every checkpoint takes about two seconds on a 2-core CPU). After construction every
parameter and persistent buffer is re-drawn from a seeded generator (see :func:`_perturb`), so a port
that forgets a norm weight, ``layer_scalar``, router ``scale`` / ``per_expert_scale`` or the centroid
``token_ordering`` produces different logits. Weight scales are chosen so the target logits are
O(1)-O(10) (std about 3, max |logit| about 13: far from the +-30 softcap, but the cap still moves the
largest logits by up to ~0.8), hidden states are finite and greedy continuations are not constant.
fp32 noise floor for parity tests: HF eager vs sdpa differ by up to ~6e-5 in logits and mlx-lm
(0.32.2, CPU) vs HF eager by up to ~1.4e-4 on these fixtures, so compare with atol ~1e-3.

Public API (all builders return the :class:`pathlib.Path` of the folder they wrote)::

    make_tokenizer(out_dir, *, vocab_size=512) -> Path
    make_target(out_dir, shape, *, seed=0, vocab_size=512, sliding_window=8) -> Path   # "e2b" | "moe" | "dense"
    make_assistant(out_dir, target_dir, *, centroids, seed=0, hub_style_config=False, ...) -> Path
    to_multimodal_layout(text_dir, out_dir, *, num_shards=2, add_shared_kv_weights=True) -> Path
    to_mlx_community_layout(text_dir, out_dir) -> Path
    make_all(out_dir) -> dict[str, Path]               # also: python -m tests.tiny_checkpoints OUTDIR
    reference_logits(target_dir, token_ids) -> np.ndarray [L, vocab]
    reference_hidden(target_dir, token_ids) -> np.ndarray [L, hidden]   (post final norm)
    reference_greedy(target_dir, token_ids, max_new_tokens) -> list[int]
    assistant_reference_step(assistant_dir, target_dir, token_ids, ...) -> AssistantReference
    text_config_dict(config) / global_attention(text_config) / hub_style_text_config(text_config)

config.json written by transformers 5.24 (``Gemma4ForCausalLM(Gemma4TextConfig(...))``)
-----------------------------------------------------------------------------------------
``Gemma4TextConfig.__post_init__`` *pops* ``global_head_dim`` and ``num_global_key_value_heads`` and
replaces them by a ``per_layer_config`` dict keyed by the (stringified) index of every
``full_attention`` layer. ``num_key_value_heads`` only appears in an entry when
``attention_k_eq_v`` is true *and* ``num_global_key_value_heads`` is not None; otherwise full layers use
the top-level ``num_key_value_heads``. The "e2b" target is written as (complete, sorted as on disk)::

    {
      "architectures": ["Gemma4ForCausalLM"],
      "attention_bias": false, "attention_dropout": 0.0, "attention_k_eq_v": false,
      "bos_token_id": 2, "dtype": "float32", "enable_moe_block": false, "eos_token_id": [1, 6],
      "final_logit_softcapping": 30.0, "head_dim": 16, "hidden_activation": "gelu_pytorch_tanh",
      "hidden_size": 64, "hidden_size_per_layer_input": 16, "initializer_range": 0.02,
      "intermediate_size": 96,
      "layer_types": ["sliding_attention", "sliding_attention", "full_attention",
                      "sliding_attention", "sliding_attention", "full_attention"],
      "max_position_embeddings": 131072, "model_type": "gemma4_text", "moe_intermediate_size": null,
      "num_attention_heads": 4, "num_experts": null, "num_hidden_layers": 6,
      "num_key_value_heads": 1, "num_kv_shared_layers": 2, "pad_token_id": 0,
      "per_layer_config": {"2": {"head_dim": 32}, "5": {"head_dim": 32}},
      "rms_norm_eps": 1e-06,
      "rope_parameters": {
        "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0,
                           "rope_type": "proportional"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
      "sliding_window": 8, "tie_word_embeddings": true, "top_k_experts": null,
      "transformers_version": "5.24.0", "use_bidirectional_attention": null, "use_cache": true,
      "use_double_wide_mlp": true, "vocab_size": 512, "vocab_size_per_layer_input": 512
    }

For "moe"/"dense" (``attention_k_eq_v: true``, ``num_global_key_value_heads=1``) the entries are
``{"head_dim": 32, "num_key_value_heads": 1}``. Note: no ``global_head_dim`` and no
``num_global_key_value_heads`` key at all in this form. The assistant's config.json nests the same
form under ``text_config`` (``model_type: "gemma4_assistant"``, plus ``backbone_hidden_size``,
``use_ordered_embeddings``, ``num_centroids``, ``centroid_intermediate_top_k``,
``tie_word_embeddings``). Hub configs (and mlx-lm) use the other form: ``global_head_dim`` and
``num_global_key_value_heads`` inside the text config and no ``per_layer_config``
(:func:`hub_style_text_config` converts; HF reads both). A loader must accept both.

Other on-disk facts: ``generation_config.json`` is written too (bos/eos/pad copied from the config);
``lm_head.weight`` is not saved (tied); KV-shared ("reuse") layers have no ``k_proj``/``v_proj``/
``k_norm`` tensors in an HF-written checkpoint (hub E2B files do have them; the multimodal layout here
adds fake ones); ``layer_scalar`` ([1]) is saved like a weight; the assistant's
``masked_embedding.token_ordering`` is saved as int64; ``v_norm`` and the router norm have no weight.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SHAPES = ("e2b", "e4b", "moe", "dense")
SLIDING = "sliding_attention"
FULL = "full_attention"


def _quiet() -> None:
    """Silence transformers' progress bars ("Loading weights", "Writing model shards")."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

#: Special tokens, in id order (id = index). Gemma 4 marker strings; compact ids (the real
#: tokenizer has pad 0, eos 1, bos 2, <|turn> 105, <turn|> 106, ...). Ports must read ids from the
#: tokenizer / config, never hard-code the real ones.
SPECIAL_TOKENS = (
    "<pad>",  # 0
    "<eos>",  # 1
    "<bos>",  # 2
    "<unk>",  # 3
    "<mask>",  # 4
    "<|turn>",  # 5   start of turn
    "<turn|>",  # 6   end of turn (a stop token)
    "<|think|>",  # 7   thinking switch, emitted into the system turn
    "<|channel>",  # 8   opens a channel, e.g. "<|channel>thought\n...<channel|>"
    "<channel|>",  # 9
    "<|tool>",  # 10
    "<tool|>",  # 11
    "<|tool_call>",  # 12
    "<tool_call|>",  # 13
    "<|tool_response>",  # 14
    "<tool_response|>",  # 15
    '<|"|>',  # 16  string quote used in tool syntax
    "<|image>",  # 17  begin of image
    "<image|>",  # 18  end of image
    "<|image|>",  # 19  image soft token
    "<|audio>",  # 20
    "<audio|>",  # 21
    "<|audio|>",  # 22
    "<|video|>",  # 23
)
TOKEN_IDS: dict[str, int] = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
PAD_ID = TOKEN_IDS["<pad>"]
EOS_ID = TOKEN_IDS["<eos>"]
BOS_ID = TOKEN_IDS["<bos>"]
UNK_ID = TOKEN_IDS["<unk>"]
MASK_ID = TOKEN_IDS["<mask>"]
START_OF_TURN_ID = TOKEN_IDS["<|turn>"]
END_OF_TURN_ID = TOKEN_IDS["<turn|>"]
THINK_ID = TOKEN_IDS["<|think|>"]
CHANNEL_OPEN_ID = TOKEN_IDS["<|channel>"]
CHANNEL_CLOSE_ID = TOKEN_IDS["<channel|>"]
#: What goes into config.json / generation_config.json ``eos_token_id`` (real models: [1, 106]).
EOS_TOKEN_IDS = [EOS_ID, END_OF_TURN_ID]

#: Gemma 4 style chat template (structure of the hub ``chat_template.jinja`` of the 26B/31B
#: instruction models, minus tools/multimodal parts):
#:
#:   <bos>[<|turn>system\n[<|think|>\n]{system}<turn|>\n]      system turn if a system message or
#:                                                             enable_thinking
#:   <|turn>user\n{content|trim}<turn|>\n
#:   <|turn>model\n{content with <|channel>...<channel|> stripped, trimmed}<turn|>\n
#:   [<|turn>model\n[<|channel>thought\n<channel|>]]          add_generation_prompt; the empty,
#:                                                             closed thought channel is pre-filled
#:                                                             only when thinking is off
#:
#: (Some hub variants, e.g. E2B's, end the generation prompt at ``<|turn>model\n`` in both modes.)
CHAT_TEMPLATE = (
    "{%- macro strip_thinking(text) -%}"
    "{%- set ns = namespace(result='') -%}"
    "{%- for part in text.split('<channel|>') -%}"
    "{%- if '<|channel>' in part -%}"
    "{%- set ns.result = ns.result + part.split('<|channel>')[0] -%}"
    "{%- else -%}"
    "{%- set ns.result = ns.result + part -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{{- ns.result | trim -}}"
    "{%- endmacro -%}"
    "{%- macro render_content(content, role) -%}"
    "{%- if content is string -%}"
    "{%- if role == 'model' -%}{{- strip_thinking(content) -}}"
    "{%- else -%}{{- content | trim -}}{%- endif -%}"
    "{%- elif content is sequence -%}"
    "{%- for item in content -%}"
    "{%- if item['type'] == 'text' -%}"
    "{%- if role == 'model' -%}{{- strip_thinking(item['text']) -}}"
    "{%- else -%}{{- item['text'] | trim -}}{%- endif -%}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{%- endmacro -%}"
    "{%- set loop_messages = messages -%}"
    "{{- bos_token -}}"
    "{%- if (enable_thinking is defined and enable_thinking)"
    " or messages[0]['role'] in ['system', 'developer'] -%}"
    "{{- '<|turn>system\\n' -}}"
    "{%- if enable_thinking is defined and enable_thinking -%}{{- '<|think|>\\n' -}}{%- endif -%}"
    "{%- if messages[0]['role'] in ['system', 'developer'] -%}"
    "{{- render_content(messages[0]['content'], 'system') -}}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- endif -%}"
    "{{- '<turn|>\\n' -}}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<|turn>' + role + '\\n' -}}"
    "{{- render_content(message['content'], role) -}}"
    "{{- '<turn|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|turn>model\\n' -}}"
    "{%- if not (enable_thinking | default(false)) -%}"
    "{{- '<|channel>thought\\n<channel|>' -}}"
    "{%- endif -%}"
    "{%- endif -%}"
)

_CORPUS = """\
The small village sat at the edge of a quiet forest, where the river turned slowly toward the sea.
Every morning the baker opened the shop before the sun was up, and the smell of fresh bread moved
through the narrow streets. Children walked to school in pairs, talking about the weather, the
games they would play, and the stories their grandparents told them at night.
In the spring the fields were green and the farmers worked from dawn until the evening light faded.
They planted wheat, barley, potatoes and beans, and they watched the sky for rain. When the rain
came, the whole valley seemed to breathe again. When it did not, the people carried water from the
river in heavy buckets, one step after another, because the work had to be done.
A good answer is short, clear and correct. If you do not know the answer, say so, and then explain
how you would find it. Questions about numbers should be answered with numbers: two plus two is four,
ten times ten is one hundred, and the square root of sixty four is eight.
The model reads a prompt, thinks about the question, and then writes a response one token at a time.
A token can be a whole word, a part of a word, a single letter, a space, or a punctuation mark.
The tokenizer turns text into token ids, and the decoder turns token ids back into text.
Speculative decoding lets a small draft model propose several tokens, and the large target model
checks all of them in a single forward pass. Tokens that match are accepted; the first token that
does not match is replaced by the target's own choice, so the output is exactly the same as plain
greedy decoding, only faster.
def add(a, b):
    return a + b

for i in range(10):
    print(i, add(i, i))
What is the capital of France? The capital of France is Paris.
What is the capital of Japan? The capital of Japan is Tokyo.
Write a haiku about the ocean. Waves fold into foam, the tide pulls the moon along, salt wind in
my hair.
Hello! How are you today? I am fine, thank you. What would you like to talk about?
Please summarize the following text in one sentence. The meeting was moved to Thursday because
several people were travelling, and the new agenda will be sent out on Monday morning.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, Sunday. January, February, March, April,
May, June, July, August, September, October, November, December.
Zero, one, two, three, four, five, six, seven, eight, nine, ten, eleven, twelve, 2024, 3.14159.
"""


@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int, corpus=None) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = corpus if corpus is not None else _CORPUS.splitlines(keepends=True) * 4
    tok.train_from_iterator(lines, trainer=trainer)
    n = tok.get_vocab_size()
    if n < vocab_size:  # pad with unused special tokens so the vocab matches the model exactly
        tok.add_special_tokens([f"<unused{i}>" for i in range(vocab_size - n)])
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer vocab {tok.get_vocab_size()} != {vocab_size}")
    for t, i in TOKEN_IDS.items():
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t), i)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A",
        pair="<bos> $A $B",
        special_tokens=[("<bos>", BOS_ID)],
    )
    return tok.to_str()


def make_tokenizer(out_dir: str | Path, *, vocab_size: int = 512, corpus=None) -> Path:
    """Write a byte-level BPE tokenizer with Gemma 4 special tokens and chat template.

    Files: ``tokenizer.json``, ``tokenizer_config.json`` (``tokenizer_class``
    ``PreTrainedTokenizerFast``), ``chat_template.jinja`` (transformers 5 writes the template to its
    own file, not into tokenizer_config.json). Ids: see :data:`TOKEN_IDS` (pad 0, eos 1, bos 2, unk 3,
    mask 4, ``<|turn>`` 5, ``<turn|>`` 6, ``<|think|>`` 7, ``<|channel>`` 8, ``<channel|>`` 9).
    ``encode(text)`` (add_special_tokens=True) prepends ``<bos>``; the chat template starts with the
    bos token, so encode chat output with ``add_special_tokens=False``. ``corpus`` (an iterable
    of strings) replaces the built-in training text (the demo pair trains on Shakespeare).
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size, corpus)),
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        mask_token="<mask>",
        extra_special_tokens=[t for t in SPECIAL_TOKENS[5:]],
        chat_template=CHAT_TEMPLATE,
        padding_side="left",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
    )
    tok.save_pretrained(out)
    # transformers 5 writes its internal class name "TokenizersBackend"; the portable name (also
    # understood by transformers 4.x and by the hub tooling) is PreTrainedTokenizerFast.
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return out


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def _rope_parameters() -> dict[str, dict[str, Any]]:
    return {
        SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
        FULL: {
            "rope_type": "proportional",
            "partial_rotary_factor": 0.25,
            "rope_theta": 1_000_000.0,
        },
    }


def _target_kwargs(shape: str, vocab_size: int, sliding_window: int) -> dict[str, Any]:
    S, F = SLIDING, FULL
    common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        num_attention_heads=4,
        head_dim=16,
        global_head_dim=32,
        sliding_window=sliding_window,
        final_logit_softcapping=30.0,
        rope_parameters=_rope_parameters(),
        tie_word_embeddings=True,
        rms_norm_eps=1e-6,
        hidden_activation="gelu_pytorch_tanh",
        bos_token_id=BOS_ID,
        eos_token_id=list(EOS_TOKEN_IDS),
        pad_token_id=PAD_ID,
        use_bidirectional_attention=None,
    )
    if shape == "e2b":
        # 2:1 sliding:full; layers 4,5 reuse the K/V of layer 3 (sliding) and 2 (full).
        common.update(
            num_hidden_layers=6,
            layer_types=[S, S, F, S, S, F],
            intermediate_size=96,  # KV-shared layers get 2x = 192 (use_double_wide_mlp)
            num_key_value_heads=1,
            num_global_key_value_heads=None,
            attention_k_eq_v=False,
            hidden_size_per_layer_input=16,
            vocab_size_per_layer_input=vocab_size,
            num_kv_shared_layers=2,
            use_double_wide_mlp=True,
            enable_moe_block=False,
        )
    elif shape == "e4b":
        # 5:1 like E4B, per-layer embeddings, the last S and F layers reuse layers 4 and 5;
        # no double-wide MLP.
        common.update(
            num_hidden_layers=8,
            layer_types=[S, S, S, S, S, F, S, F],
            intermediate_size=96,
            num_key_value_heads=2,
            num_global_key_value_heads=None,
            attention_k_eq_v=False,
            hidden_size_per_layer_input=16,
            vocab_size_per_layer_input=vocab_size,
            num_kv_shared_layers=2,
            use_double_wide_mlp=False,
            enable_moe_block=False,
        )
    elif shape == "moe":
        # irregular pattern on purpose: a port must read layer_types, not assume a period.
        common.update(
            num_hidden_layers=6,
            layer_types=[S, F, S, S, S, F],
            intermediate_size=64,  # the dense "shared expert" MLP
            num_key_value_heads=2,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=vocab_size,
            num_kv_shared_layers=0,
            use_double_wide_mlp=False,
            enable_moe_block=True,
            num_experts=8,
            top_k_experts=2,
            moe_intermediate_size=32,
        )
    elif shape == "dense":
        common.update(
            num_hidden_layers=6,
            layer_types=[S, S, S, S, S, F],
            intermediate_size=128,
            num_key_value_heads=2,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            hidden_size_per_layer_input=0,
            vocab_size_per_layer_input=vocab_size,
            num_kv_shared_layers=0,
            use_double_wide_mlp=False,
            enable_moe_block=False,
        )
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return common


def text_config_dict(config: dict[str, Any]) -> dict[str, Any]:
    """The text-decoder part of a config.json dict (nested ``text_config`` or top level)."""
    return config.get("text_config") or config


def global_attention(text_cfg: dict[str, Any]) -> tuple[int, int]:
    """``(head_dim, num_key_value_heads)`` of full-attention layers, from either config form.

    Mirrors HF: ``head_dim`` = ``global_head_dim`` (default 512); kv heads =
    ``num_global_key_value_heads`` only if ``attention_k_eq_v`` and it is not None, else
    ``num_key_value_heads``. The ``per_layer_config`` form stores exactly those resolved values.
    """
    plc = text_cfg.get("per_layer_config")
    if plc is not None:
        full = [i for i, t in enumerate(text_cfg["layer_types"]) if t == FULL]
        entry = plc.get(str(full[0]), plc.get(full[0], {})) if full else {}
        return (
            int(entry.get("head_dim", text_cfg["head_dim"])),
            int(entry.get("num_key_value_heads", text_cfg["num_key_value_heads"])),
        )
    head_dim = text_cfg.get("global_head_dim") or 512
    kv = text_cfg.get("num_global_key_value_heads")
    if not text_cfg.get("attention_k_eq_v") or kv is None:
        kv = text_cfg["num_key_value_heads"]
    return int(head_dim), int(kv)


def hub_style_text_config(text_cfg: dict[str, Any]) -> dict[str, Any]:
    """Convert a transformers-5.24 text config dict to the hub form (no ``per_layer_config``).

    Writes ``global_head_dim`` and ``num_global_key_value_heads`` (null when full layers use the
    regular kv-head count, as in the E2B hub config).
    """
    out = copy.deepcopy(text_cfg)
    plc = out.pop("per_layer_config", None)
    if plc is None:
        return out
    head_dim, kv = global_attention(text_cfg)
    out["global_head_dim"] = head_dim
    full = [i for i, t in enumerate(text_cfg["layer_types"]) if t == FULL]
    entry = plc.get(str(full[0]), plc.get(full[0], {})) if full else {}
    out["num_global_key_value_heads"] = kv if "num_key_value_heads" in entry else None
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------------------------
# Weight perturbation
# ----------------------------------------------------------------------------------------------


def _perturb(model: Any, seed: int) -> None:
    """Re-draw every parameter and persistent buffer from a seeded generator (in place).

    * RMSNorm weights (``*norm*.weight``, 1-D): ``1 + 0.1 * randn``; the final ``model.norm``:
      ``4 * (1 + 0.1 * randn)`` (with the small embedding below: logits std ~3, max ~10-15, and the
      token embedding does not dominate the residual stream, so greedy continuations are diverse)
    * ``layer_scalar``: uniform [0.5, 1.5]; router ``scale`` / ``per_expert_scale``: uniform [0.5, 1.5]
    * embeddings: ``0.1 * randn`` (input rms 0.1*sqrt(hidden)); PLE table ``0.25 * randn``
    * Linear / expert weights: ``randn / sqrt(fan_in)`` (unit-scale activations, so gelu is non-linear)
    * ``masked_embedding.token_ordering``: a random permutation of the vocabulary (int64)
    Non-persistent buffers (``embed_scale``, RoPE ``inv_freq``) are left alone.
    """
    import torch

    g = torch.Generator().manual_seed(seed)

    def randn(shape: torch.Size) -> torch.Tensor:
        return torch.randn(shape, generator=g, dtype=torch.float32)

    def uniform(shape: torch.Size, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=g, dtype=torch.float32)

    with torch.no_grad():
        for name, p in model.named_parameters():
            module, leaf = (["", ""] + name.rsplit(".", 2))[-2:]
            if name == "model.norm.weight":  # final norm: sets the logit scale (tied head)
                new = 4.0 * (1.0 + 0.1 * randn(p.shape))
            elif "norm" in module and leaf == "weight" and p.dim() == 1:
                new = 1.0 + 0.1 * randn(p.shape)
            elif leaf in ("scale", "per_expert_scale"):  # router
                new = uniform(p.shape, 0.5, 1.5)
            elif name.endswith("embed_tokens_per_layer.weight"):
                new = 0.25 * randn(p.shape)
            elif name.endswith("embed_tokens.weight"):
                new = 0.1 * randn(p.shape)
            elif p.dim() >= 2:
                new = randn(p.shape) / math.sqrt(p.shape[-1])
            else:
                raise RuntimeError(f"no perturbation rule for parameter {name} {tuple(p.shape)}")
            p.copy_(new.to(p.dtype))
        persistent = set(model.state_dict().keys())
        for name, b in model.named_buffers():
            if name not in persistent:
                continue
            if name.endswith("layer_scalar"):
                b.copy_(uniform(b.shape, 0.5, 1.5))
            elif name.endswith("token_ordering"):
                b.copy_(torch.randperm(b.numel(), generator=g).to(b.dtype))
            else:
                raise RuntimeError(f"no perturbation rule for buffer {name}")
    # Guard: nothing may stay at a trivial constant.
    for name, t in model.state_dict().items():
        if t.numel() > 1 and bool((t == t.reshape(-1)[0]).all()):
            raise RuntimeError(f"{name} is constant after perturbation")
        if t.numel() == 1 and float(t) == 1.0:
            raise RuntimeError(f"{name} is 1.0 after perturbation")


def _check_scale(model: Any, vocab_size: int) -> None:
    import torch

    ids = torch.arange(1, 40).unsqueeze(0) * 7 % vocab_size
    with torch.no_grad():
        out = model(input_ids=ids)
    logits = out.logits
    if not torch.isfinite(logits).all():
        raise RuntimeError("non-finite logits")
    amax = float(logits.abs().max())
    if not 2.0 < amax < 27.0:
        raise RuntimeError(f"logit scale off: max |logit| = {amax:.2f}")


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------


def make_target(
    out_dir: str | Path,
    shape: str,
    *,
    seed: int = 0,
    vocab_size: int = 512,
    sliding_window: int = 8,
) -> Path:
    """Build and save a tiny ``Gemma4ForCausalLM`` target (text-only layout) plus the tokenizer.

    ``shape``: ``"e2b"`` (PLE 16, KV sharing of the last 2 of 6 layers, double-wide MLP in them,
    1 kv head, no k_eq_v, layer_types S S F S S F), ``"moe"`` (8 experts, top-2, moe_intermediate 32,
    k_eq_v, kv heads 2 sliding / 1 full, layer_types S F S S S F) or ``"dense"`` (31B-like: k_eq_v,
    kv heads 2 / 1, S S S S S F). All: hidden 64, 4 heads, head_dim 16 / global_head_dim 32,
    softcap 30, tied embeddings, rope sliding default 1e4 / full proportional 1e6 factor 0.25.
    """
    import torch
    from transformers import Gemma4ForCausalLM, Gemma4TextConfig

    _quiet()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = Gemma4TextConfig(**_target_kwargs(shape, vocab_size, sliding_window))
    model = Gemma4ForCausalLM(config).eval()
    _perturb(model, 10_000 + 100 * SHAPES.index(shape) + seed)
    _check_scale(model, vocab_size)
    model.save_pretrained(out)
    make_tokenizer(out, vocab_size=vocab_size)
    return out


def make_assistant(
    out_dir: str | Path,
    target_dir: str | Path,
    *,
    centroids: bool,
    seed: int = 0,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_attention_heads: int = 2,
    num_centroids: int = 16,
    centroid_intermediate_top_k: int = 4,
    hub_style_config: bool = False,
) -> Path:
    """Build and save a tiny ``Gemma4AssistantForCausalLM`` (MTP drafter) for ``target_dir``.

    The text_config copies the target's K/V geometry (kv heads, head_dim / global_head_dim,
    attention_k_eq_v, num_global_key_value_heads), sliding_window, rope_parameters and vocab, with its
    own hidden_size (32), intermediate_size (64), 2 query heads (target has 4) and 4 layers
    [S, S, S, F], all KV-shared (num_kv_shared_layers = 4), no softcap. ``centroids`` selects the
    ordered-embedding ("centroid") LM head: 16 centroids x 32 tokens, top-4 clusters -> 128 candidates.
    ``hub_style_config`` rewrites text_config to the hub form (global_head_dim /
    num_global_key_value_heads instead of per_layer_config).
    """
    import torch
    from transformers import Gemma4AssistantConfig, Gemma4AssistantForCausalLM, Gemma4TextConfig

    _quiet()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tcfg = text_config_dict(json.loads((Path(target_dir) / "config.json").read_text()))
    global_head_dim, global_kv = global_attention(tcfg)
    nkv = tcfg["num_key_value_heads"]
    if num_attention_heads % nkv or num_attention_heads % global_kv:
        raise ValueError("num_attention_heads must be divisible by the target's kv head counts")
    vocab = tcfg["vocab_size"]
    if centroids and vocab % num_centroids:
        raise ValueError("vocab_size must be divisible by num_centroids")
    S, F = SLIDING, FULL
    text_config = Gemma4TextConfig(
        vocab_size=vocab,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=4,
        layer_types=[S, S, S, F],
        num_attention_heads=num_attention_heads,
        num_key_value_heads=nkv,
        head_dim=tcfg["head_dim"],
        global_head_dim=global_head_dim,
        num_global_key_value_heads=global_kv if tcfg.get("attention_k_eq_v") else None,
        attention_k_eq_v=bool(tcfg.get("attention_k_eq_v")),
        sliding_window=tcfg["sliding_window"],
        rope_parameters=copy.deepcopy(tcfg["rope_parameters"]),
        hidden_size_per_layer_input=0,
        vocab_size_per_layer_input=0,
        num_kv_shared_layers=4,
        use_double_wide_mlp=False,
        enable_moe_block=False,
        final_logit_softcapping=None,
        tie_word_embeddings=True,
        rms_norm_eps=tcfg.get("rms_norm_eps", 1e-6),
        bos_token_id=tcfg.get("bos_token_id"),
        eos_token_id=tcfg.get("eos_token_id"),
        pad_token_id=tcfg.get("pad_token_id"),
    )
    config = Gemma4AssistantConfig(
        text_config=text_config,
        backbone_hidden_size=tcfg["hidden_size"],
        use_ordered_embeddings=centroids,
        num_centroids=num_centroids,
        centroid_intermediate_top_k=centroid_intermediate_top_k,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Gemma4AssistantForCausalLM(config).eval()
    _perturb(model, 20_000 + seed)
    model.save_pretrained(out)
    if hub_style_config:
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["text_config"] = hub_style_text_config(cfg["text_config"])
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out


_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)


def _copy_side_files(src: Path, dst: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def _load_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    index = model_dir / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values()))
        if index.exists()
        else ["model.safetensors"]
    )
    tensors: dict[str, np.ndarray] = {}
    for f in files:
        tensors.update(load_file(str(model_dir / f)))
    return tensors


def _save_sharded(
    tensors: dict[str, np.ndarray], out: Path, num_shards: int, metadata: dict[str, str]
) -> None:
    from safetensors.numpy import save_file

    keys = sorted(tensors)
    if num_shards <= 1:
        save_file({k: tensors[k] for k in keys}, str(out / "model.safetensors"), metadata=metadata)
        return
    total = sum(tensors[k].nbytes for k in keys)
    per_shard = total / num_shards
    shards: list[list[str]] = [[]]
    acc = 0
    for k in keys:
        if acc >= per_shard * len(shards) and len(shards) < num_shards:
            shards.append([])
        shards[-1].append(k)
        acc += tensors[k].nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        fname = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in shard}, str(out / fname), metadata=metadata)
        weight_map.update(dict.fromkeys(shard, fname))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _kv_shared_layers(text_cfg: dict[str, Any]) -> list[int]:
    n = text_cfg["num_hidden_layers"]
    return list(range(n - (text_cfg.get("num_kv_shared_layers") or 0), n))


def _clean_text_config(text_cfg: dict[str, Any]) -> dict[str, Any]:
    out = hub_style_text_config(text_cfg)
    for k in ("architectures", "transformers_version", "dtype"):
        out.pop(k, None)
    return out


def to_multimodal_layout(
    text_dir: str | Path,
    out_dir: str | Path,
    *,
    num_shards: int = 2,
    add_shared_kv_weights: bool = True,
) -> Path:
    """Rewrite a text-only target into the layout of the hub ``Gemma4ForConditionalGeneration`` files.

    * ``model.X`` -> ``model.language_model.X`` (``lm_head.weight`` is not stored: tied).
    * Fake non-text tensors a text loader must skip: ``model.vision_tower.encoder.dummy.weight``,
      ``model.embed_vision.embedding_projection.weight``, ``model.audio_tower.dummy.weight``,
      ``model.embed_audio.embedding_projection.weight``.
    * ``add_shared_kv_weights``: like the hub E2B/E4B files, KV-shared layers also carry (random,
      unused) ``self_attn.k_proj`` / ``v_proj`` / ``k_norm`` weights that HF and mlx-lm ignore.
    * config.json: ``model_type: "gemma4"``, ``architectures: ["Gemma4ForConditionalGeneration"]``,
      the text config nested under ``text_config`` in hub form (``global_head_dim``,
      ``num_global_key_value_heads``, no ``per_layer_config``), ``vision_config``/``audio_config``
      null, multimodal token ids, eos/bos/pad. No top-level ``vocab_size`` (hub configs have none).
    * ``num_shards`` > 1: ``model-0000i-of-0000n.safetensors`` + ``model.safetensors.index.json``.
    Loadable by HF ``Gemma4ForConditionalGeneration.from_pretrained`` (text-only).
    """
    src, out = Path(text_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text_cfg = json.loads((src / "config.json").read_text())
    tensors = _load_tensors(src)
    new: dict[str, np.ndarray] = {}
    for k, v in tensors.items():
        if k == "lm_head.weight":
            continue
        if not k.startswith("model."):
            raise ValueError(f"unexpected key {k}")
        new["model.language_model." + k[len("model.") :]] = v
    rng = np.random.default_rng(1234)
    H = text_cfg["hidden_size"]
    if add_shared_kv_weights:
        global_head_dim, global_kv = global_attention(text_cfg)
        for i in _kv_shared_layers(text_cfg):
            full = text_cfg["layer_types"][i] == FULL
            hd = global_head_dim if full else text_cfg["head_dim"]
            kv = global_kv if full else text_cfg["num_key_value_heads"]
            p = f"model.language_model.layers.{i}.self_attn."
            new[p + "k_proj.weight"] = rng.standard_normal((kv * hd, H), dtype=np.float32)
            if not (full and text_cfg.get("attention_k_eq_v")):
                new[p + "v_proj.weight"] = rng.standard_normal((kv * hd, H), dtype=np.float32)
            new[p + "k_norm.weight"] = rng.standard_normal((hd,), dtype=np.float32)
    new["model.vision_tower.encoder.dummy.weight"] = rng.standard_normal((4, 4), dtype=np.float32)
    new["model.embed_vision.embedding_projection.weight"] = rng.standard_normal(
        (H, 8), dtype=np.float32
    )
    new["model.audio_tower.dummy.weight"] = rng.standard_normal((4,), dtype=np.float32)
    new["model.embed_audio.embedding_projection.weight"] = rng.standard_normal(
        (H, 8), dtype=np.float32
    )
    _save_sharded(new, out, num_shards, {"format": "pt"})
    config = {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": _clean_text_config(text_cfg),
        "vision_config": None,
        "audio_config": None,
        "boi_token_id": TOKEN_IDS["<|image>"],
        "eoi_token_id": TOKEN_IDS["<image|>"],
        "image_token_id": TOKEN_IDS["<|image|>"],
        "video_token_id": TOKEN_IDS["<|video|>"],
        "boa_token_id": TOKEN_IDS["<|audio>"],
        "eoa_token_index": TOKEN_IDS["<audio|>"],
        "audio_token_id": TOKEN_IDS["<|audio|>"],
        "bos_token_id": text_cfg.get("bos_token_id"),
        "eos_token_id": text_cfg.get("eos_token_id"),
        "pad_token_id": text_cfg.get("pad_token_id"),
        "initializer_range": 0.02,
        "tie_word_embeddings": True,
        "dtype": "float32",
        "transformers_version": "5.24.0",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _copy_side_files(src, out)
    return out


def to_mlx_community_layout(text_dir: str | Path, out_dir: str | Path) -> Path:
    """Rewrite a text-only target into the layout of mlx-community / mlx-vlm Gemma 4 conversions.

    Keys are what ``mlx_lm.models.gemma4.Model`` holds after ``sanitize``:
    ``language_model.model.X`` (no lm_head), MoE experts pre-split into
    ``...experts.switch_glu.{gate_proj,up_proj,down_proj}.weight`` (gate/up = HF
    ``experts.gate_up_proj`` [E, 2I, H] split in two on axis -2; down = ``experts.down_proj``
    [E, H, I]), and no ``k_proj``/``v_proj``/``k_norm`` for KV-shared layers. One
    ``model.safetensors`` (fp32, metadata ``format: mlx``). config.json: ``model_type: "gemma4"``,
    top-level ``vocab_size`` (mlx-lm's gemma4 ModelArgs overrides text_config.vocab_size with it,
    default 262144), hub-form ``text_config``. Loads with ``mlx_lm.load(out_dir)``.
    """
    from safetensors.numpy import save_file

    src, out = Path(text_dir), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text_cfg = json.loads((src / "config.json").read_text())
    shared = set(_kv_shared_layers(text_cfg))
    new: dict[str, np.ndarray] = {}
    for k, v in _load_tensors(src).items():
        if k == "lm_head.weight":
            continue
        k = "language_model.model." + k[len("model.") :]
        if ".layers." in k and any(s in k for s in (".k_proj.", ".v_proj.", ".k_norm.")):
            if int(k.split(".layers.")[1].split(".")[0]) in shared:
                continue
        if k.endswith(".experts.gate_up_proj"):
            base = k[: -len(".gate_up_proj")]
            gate, up = np.split(v, 2, axis=-2)
            new[base + ".switch_glu.gate_proj.weight"] = np.ascontiguousarray(gate)
            new[base + ".switch_glu.up_proj.weight"] = np.ascontiguousarray(up)
            continue
        if k.endswith(".experts.down_proj"):
            new[k[: -len(".down_proj")] + ".switch_glu.down_proj.weight"] = v
            continue
        new[k] = v
    save_file(dict(sorted(new.items())), str(out / "model.safetensors"), metadata={"format": "mlx"})
    tc = _clean_text_config(text_cfg)
    config = {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "vocab_size": tc["vocab_size"],
        "text_config": tc,
        "bos_token_id": text_cfg.get("bos_token_id"),
        "eos_token_id": text_cfg.get("eos_token_id"),
        "pad_token_id": text_cfg.get("pad_token_id"),
        "tie_word_embeddings": True,
    }
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _copy_side_files(src, out)
    return out


def make_all(out_dir: str | Path) -> dict[str, Path]:
    """Write every fixture under ``out_dir``; returns name -> folder.

    ``target-{e2b,moe,dense}``, ``assistant-e2b`` (centroid head), ``assistant-e2b-dense-head``,
    ``assistant-moe`` (hub-form config), ``assistant-dense``, ``target-e2b-multimodal`` (2 shards),
    ``target-moe-multimodal`` (1 shard), ``target-{e2b,moe,dense}-mlx-community``.
    """
    root = Path(out_dir)
    paths: dict[str, Path] = {}
    for shape in SHAPES:
        paths[f"target-{shape}"] = make_target(root / f"target-{shape}", shape)
    paths["assistant-e2b"] = make_assistant(
        root / "assistant-e2b", paths["target-e2b"], centroids=True
    )
    paths["assistant-e2b-dense-head"] = make_assistant(
        root / "assistant-e2b-dense-head", paths["target-e2b"], centroids=False, seed=1
    )
    paths["assistant-moe"] = make_assistant(
        root / "assistant-moe", paths["target-moe"], centroids=False, hub_style_config=True
    )
    paths["assistant-dense"] = make_assistant(
        root / "assistant-dense", paths["target-dense"], centroids=False
    )
    paths["target-e2b-multimodal"] = to_multimodal_layout(
        paths["target-e2b"], root / "target-e2b-multimodal", num_shards=2
    )
    paths["target-moe-multimodal"] = to_multimodal_layout(
        paths["target-moe"], root / "target-moe-multimodal", num_shards=1
    )
    for shape in SHAPES:
        paths[f"target-{shape}-mlx-community"] = to_mlx_community_layout(
            paths[f"target-{shape}"], root / f"target-{shape}-mlx-community"
        )
    return paths


# ----------------------------------------------------------------------------------------------
# HF references
# ----------------------------------------------------------------------------------------------


def _load_target(target_dir: str | Path, attn_implementation: str = "eager") -> Any:
    import torch
    from transformers import AutoConfig, Gemma4ForCausalLM, Gemma4ForConditionalGeneration

    _quiet()
    cfg = AutoConfig.from_pretrained(target_dir)
    cls = Gemma4ForConditionalGeneration if cfg.model_type == "gemma4" else Gemma4ForCausalLM
    model = cls.from_pretrained(
        target_dir, dtype=torch.float32, attn_implementation=attn_implementation
    )
    return model.eval()


def reference_logits(
    target_dir: str | Path, token_ids: list[int], *, attn_implementation: str = "eager"
) -> np.ndarray:
    """HF fp32 logits ``[L, vocab]`` (softcapped) for one sequence, no cache, positions 0..L-1."""
    import torch

    model = _load_target(target_dir, attn_implementation)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(token_ids)]), use_cache=False)
    return out.logits[0].float().numpy()


def reference_hidden(
    target_dir: str | Path, token_ids: list[int], *, attn_implementation: str = "eager"
) -> np.ndarray:
    """HF post-final-norm hidden states ``[L, hidden]`` (``hidden_states[-1]``; asserted to equal
    ``last_hidden_state``) -- what the assistant consumes as the backbone activation."""
    import torch

    model = _load_target(target_dir, attn_implementation)
    base = model.model.language_model if hasattr(model.model, "language_model") else model.model
    with torch.no_grad():
        out = base(
            input_ids=torch.tensor([list(token_ids)]), use_cache=False, output_hidden_states=True
        )
    last = out.hidden_states[-1]
    if not torch.equal(last, out.last_hidden_state):
        raise AssertionError("hidden_states[-1] != last_hidden_state")
    return last[0].float().numpy()


def reference_greedy(
    target_dir: str | Path, token_ids: list[int], max_new_tokens: int
) -> list[int]:
    """Plain HF greedy continuation (new tokens only; stops at an eos id from the config)."""
    import torch

    model = _load_target(target_dir)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([list(token_ids)]),
            attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
        )
    return out[0, len(token_ids) :].tolist()


@dataclass
class AssistantReference:
    """What :func:`assistant_reference_step` computed (numpy, batch dim dropped unless noted)."""

    shared_kv_states: dict[str, tuple[np.ndarray, np.ndarray]]  # type -> (K, V) [1, kv, T, d]
    target_hidden: np.ndarray  # [H_backbone] post-norm hidden of the last prompt token
    target_logits: np.ndarray  # [vocab] target logits at the last prompt token
    first_token: int  # token fed to the assistant in step 0
    position: int  # assistant query position (constant over the steps)
    inputs_embeds: np.ndarray  # [steps, 2*H_backbone] = cat(E_t[tok]*sqrt(Hb), hidden)
    logits: np.ndarray  # [steps, vocab] assistant logits (no softcap; centroid head if enabled)
    projected: np.ndarray  # [steps, H_backbone] post_projection(norm(x)) fed back as hidden
    draft_tokens: list[int]  # argmax of each step's logits


def assistant_reference_step(
    assistant_dir: str | Path,
    target_dir: str | Path,
    token_ids: list[int],
    *,
    next_token: int | None = None,
    position: int | None = None,
    num_steps: int = 1,
    attention_mask: str | None = "generate",
    attn_implementation: str = "sdpa",
    kv_window: int | None = None,
) -> AssistantReference:
    """Run the HF target over ``token_ids`` (a prefill) and then the HF assistant for ``num_steps``.

    Mirrors ``SinglePositionMultiTokenCandidateGenerator.get_candidates`` (transformers 5.24,
    ``generation/candidate_generator.py``) right after the prefill of assisted ``generate``:

    * The target runs with a ``DynamicCache`` with ``activate_past_recording()`` (as
      ``_assisted_decoding`` does), ``output_hidden_states=True, return_shared_kv_states=True``.
    * ``shared_kv_states`` = ``{"sliding_attention": (K, V), "full_attention": (K, V)}`` of the last
      non-shared layer of each type ("store" layers), shape ``[1, kv_heads(type), T, head_dim(type)]``,
      K already k_norm'ed and RoPE'd at its absolute position, V v_norm'ed.
    * ``hidden`` = ``hidden_states[-1][:, -1:]`` (post final norm, last prompt position).
    * ``first_token`` = ``next_token`` or the target's argmax at the last prompt position (the token
      generate appends before drafting); ``position`` defaults to ``len(token_ids)`` (HF uses
      ``input_ids.shape[1] - 1`` with input_ids = prompt + that token).
    * each step: ``inputs_embeds = cat([target.embed_tokens(tok) (= E[tok] * sqrt(H_backbone)),
      hidden], -1)``; assistant called with ``position_ids=[[position]]``, the same shared K/V and
      ``attention_mask`` (``"generate"`` = ones of length len(token_ids)+1, what generate's
      model_kwargs hold at that point; ``None`` = no mask); next ``tok`` = argmax of its logits,
      next ``hidden`` = its ``last_hidden_state`` (= post_projection output).
    * ``kv_window``: if set, hand the assistant only the last ``kv_window`` sliding entries (to
      compare conventions); the default hands everything, like HF.

    K/V visibility (verified empirically by ``tests/test_tiny_checkpoints.py``):

    * After a prefill of ``L`` tokens HF hands the assistant **all L** sliding entries (positions
      0..L-1), even when L > sliding_window W: during prefill ``DynamicSlidingWindowLayer.update``
      returns the full ``cat(past, new)`` (with or without past recording), and
      ``_slice(:current_length)`` with current_length = L+1 cuts nothing. Full-attention K/V: all L.
    * The assistant's sliding mask is ``create_bidirectional_sliding_window_mask`` with q_idx = 0,
      ``|0 - kv_idx| <= W`` -> the first W+1 entries, then flipped on the kv axis -> the query sees
      the **last W+1 entries** of whatever sliding K/V it gets, i.e. positions L-W-1..L-1 after a
      prefill (W+1 keys; the target's own sliding layer at query position L would see L-W+1..L,
      i.e. only W-1 cached keys plus itself). With sdpa the mask is skipped when T < W (all T
      visible); with T == W all are visible anyway. The full-attention layer sees all entries.
      Passing ``attention_mask=None`` or the all-ones generate mask gives identical results.
    * After a verify round (not modelled here) the sliding tensor returned by the verify forward is
      the last ``W - 1 + (K + 1)`` entries (``record_past`` path of ``update``), positions up to the
      last draft, and ``[:current_length]`` does not drop rejected entries from it; the assistant
      then sees the last W+1 of those, which include the rejected drafts' K/V (full attention: the
      slice keeps entries < len(input_ids), so one rejected entry at index q+1 can remain).
    """
    import torch
    from transformers import DynamicCache, Gemma4AssistantForCausalLM

    target = _load_target(target_dir, attn_implementation)
    assistant = Gemma4AssistantForCausalLM.from_pretrained(
        assistant_dir, dtype=torch.float32, attn_implementation=attn_implementation
    ).eval()
    ids = torch.tensor([list(token_ids)])
    cache = DynamicCache(config=target.config.get_text_config())
    cache.activate_past_recording()
    with torch.no_grad():
        out = target(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            cache=cache,
            use_cache=True,
            output_hidden_states=True,
            return_shared_kv_states=True,
        )
    tok = int(out.logits[0, -1].argmax()) if next_token is None else int(next_token)
    pos = len(token_ids) if position is None else int(position)
    current_length = len(token_ids) + 1
    shared = {
        k: (v[0][:, :, :current_length, :], v[1][:, :, :current_length, :])
        for k, v in out.shared_kv_states.items()
    }
    if kv_window is not None:
        k_, v_ = shared[SLIDING]
        shared[SLIDING] = (k_[:, :, -kv_window:, :], v_[:, :, -kv_window:, :])
    hidden = out.hidden_states[-1][:, -1:]
    target_hidden = hidden[0, 0].float().numpy().copy()
    mask = torch.ones(1, current_length, dtype=torch.long) if attention_mask == "generate" else None
    embed = target.get_input_embeddings()
    position_ids = torch.tensor([[pos]], dtype=torch.long)
    first = tok
    cur = torch.tensor([[tok]])
    embeds, logits, projected, drafts = [], [], [], []
    with torch.no_grad():
        for _ in range(num_steps):
            inputs_embeds = torch.cat([embed(cur), hidden], dim=-1)
            a = assistant(
                inputs_embeds=inputs_embeds,
                attention_mask=mask,
                position_ids=position_ids,
                shared_kv_states=shared,
                use_cache=False,
            )
            cur = a.logits.argmax(dim=-1)
            hidden = a.last_hidden_state
            embeds.append(inputs_embeds[0, 0].numpy())
            logits.append(a.logits[0, 0].numpy())
            projected.append(hidden[0, 0].numpy())
            drafts.append(int(cur[0, 0]))
    return AssistantReference(
        shared_kv_states={
            k: (v[0].float().numpy().copy(), v[1].float().numpy().copy()) for k, v in shared.items()
        },
        target_hidden=target_hidden,
        target_logits=out.logits[0, -1].float().numpy().copy(),
        first_token=first,
        position=pos,
        inputs_embeds=np.stack(embeds),
        logits=np.stack(logits),
        projected=np.stack(projected),
        draft_tokens=drafts,
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m tests.tiny_checkpoints OUTDIR", file=sys.stderr)
        return 2
    for name, path in make_all(argv[0]).items():
        print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
