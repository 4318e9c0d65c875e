"""Fast checks that the tiny HF checkpoint builders in fixtures/tiny_checkpoints.py work."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from fixtures import tiny_checkpoints as tc

W = 8  # sliding window of all fixtures
PROMPT = [tc.BOS_ID] + [int(x) for x in (np.arange(1, 20) * 37 + 11) % 480 + 24]  # 20 tokens > W


@pytest.fixture(scope="session")
def ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return tc.make_all(tmp_path_factory.mktemp("tiny"))


def _tensors(path: Path) -> dict[str, np.ndarray]:
    return tc._load_tensors(path)


# ------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize("shape", tc.SHAPES)
def test_target_config_roundtrip(ckpts, shape):
    from transformers import AutoConfig

    d = ckpts[f"target-{shape}"]
    raw = json.loads((d / "config.json").read_text())
    # transformers 5.24 writes the per_layer_config form, not the hub keys
    assert raw["model_type"] == "gemma4_text"
    assert "per_layer_config" in raw
    assert "global_head_dim" not in raw and "num_global_key_value_heads" not in raw
    full = [i for i, t in enumerate(raw["layer_types"]) if t == tc.FULL]
    assert sorted(int(k) for k in raw["per_layer_config"]) == full
    assert raw["eos_token_id"] == tc.EOS_TOKEN_IDS
    assert raw["final_logit_softcapping"] == 30.0
    cfg = AutoConfig.from_pretrained(d)
    assert cfg.model_type == "gemma4_text"
    assert cfg.layer_types == raw["layer_types"]
    expected = {"e2b": (32, 1), "e4b": (32, 2), "moe": (32, 1), "dense": (32, 1)}[shape]
    assert tc.global_attention(raw) == expected
    hub = tc.hub_style_text_config(raw)
    assert "per_layer_config" not in hub and hub["global_head_dim"] == 32
    assert hub["num_global_key_value_heads"] == (None if shape in ("e2b", "e4b") else 1)
    assert tc.global_attention(hub) == expected
    # HF resolves the hub form to the same per-layer geometry
    from transformers import Gemma4TextConfig

    hub.pop("model_type")
    re = Gemma4TextConfig(**hub)
    for i in range(re.num_hidden_layers):
        a, b = re.per_layer_config[i], cfg.per_layer_config[i]
        assert (a.head_dim, a.num_key_value_heads) == (b.head_dim, b.num_key_value_heads)


def test_target_shapes(ckpts):
    e2b = json.loads((ckpts["target-e2b"] / "config.json").read_text())
    assert e2b["num_kv_shared_layers"] == 2 and e2b["hidden_size_per_layer_input"] == 16
    assert e2b["use_double_wide_mlp"] and not e2b["attention_k_eq_v"]
    t = _tensors(ckpts["target-e2b"])
    assert t["model.layers.4.mlp.gate_proj.weight"].shape == (192, 64)  # double wide
    assert t["model.layers.3.mlp.gate_proj.weight"].shape == (96, 64)
    assert "model.layers.4.self_attn.k_proj.weight" not in t  # KV-shared: no k/v
    moe = _tensors(ckpts["target-moe"])
    assert moe["model.layers.0.experts.gate_up_proj"].shape == (8, 64, 64)
    assert moe["model.layers.0.experts.down_proj"].shape == (8, 64, 32)
    assert "model.layers.1.self_attn.v_proj.weight" not in moe  # k_eq_v full layer
    assert moe["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)  # 1 kv head x 32
    dense = _tensors(ckpts["target-dense"])
    assert dense["model.layers.0.self_attn.v_proj.weight"].shape == (32, 64)  # 2 kv heads x 16


def test_every_parameter_perturbed(ckpts):
    for name in ("target-e2b", "target-moe", "target-dense", "assistant-e2b"):
        for k, v in _tensors(ckpts[name]).items():
            if k.endswith("token_ordering"):
                assert v.dtype == np.int64
                assert sorted(v.tolist()) == list(range(v.size))
                assert (v != np.arange(v.size)).any()
            elif v.size == 1:
                assert v.item() != 1.0, k
            else:
                assert np.unique(v).size > 1, k
            if k.endswith("norm.weight"):
                assert not np.allclose(v, 1.0), k


def test_deterministic(tmp_path):
    a = tc.make_target(tmp_path / "a", "e2b")
    b = tc.make_target(tmp_path / "b", "e2b")
    for f in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f


# ------------------------------------------------------------------------------ HF references


@pytest.mark.parametrize("shape", tc.SHAPES)
def test_reference_logits_scale(ckpts, shape):
    logits = tc.reference_logits(ckpts[f"target-{shape}"], PROMPT)
    assert logits.shape == (len(PROMPT), 512)
    assert np.isfinite(logits).all()
    assert 1.0 < logits.std() < 10.0
    assert np.abs(logits).max() < 0.8 * 30.0  # not saturated by the softcap
    hidden = tc.reference_hidden(ckpts[f"target-{shape}"], PROMPT)
    assert hidden.shape == (len(PROMPT), 64) and np.isfinite(hidden).all()
    greedy = tc.reference_greedy(ckpts[f"target-{shape}"], PROMPT[:6], 12)
    assert len(set(greedy)) > 1  # not a constant continuation


@pytest.mark.parametrize("shape", ["e2b", "moe"])
def test_multimodal_layout(ckpts, shape):
    d = ckpts[f"target-{shape}-multimodal"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["model_type"] == "gemma4"
    tcfg = cfg["text_config"]
    assert "per_layer_config" not in tcfg and tcfg["global_head_dim"] == 32
    assert "num_global_key_value_heads" in tcfg
    t = _tensors(d)
    assert all(
        k.startswith(
            (
                "model.language_model.",
                "model.vision_tower.",
                "model.embed_vision.",
                "model.audio_tower.",
                "model.embed_audio.",
            )
        )
        for k in t
    )
    assert "model.vision_tower.encoder.dummy.weight" in t
    if shape == "e2b":
        assert (d / "model.safetensors.index.json").exists()
        assert "model.language_model.layers.4.self_attn.k_proj.weight" in t  # hub-style extras
    ref = tc.reference_logits(ckpts[f"target-{shape}"], PROMPT)
    np.testing.assert_array_equal(tc.reference_logits(d, PROMPT), ref)


@pytest.mark.parametrize("shape", tc.SHAPES)
def test_mlx_community_layout(ckpts, shape):
    d = ckpts[f"target-{shape}-mlx-community"]
    t = _tensors(d)
    assert all(k.startswith("language_model.model.") for k in t)
    if shape == "moe":
        assert t["language_model.model.layers.0.experts.switch_glu.gate_proj.weight"].shape == (
            8,
            32,
            64,
        )
        assert t["language_model.model.layers.0.experts.switch_glu.down_proj.weight"].shape == (
            8,
            64,
            32,
        )
        assert not any(k.endswith("gate_up_proj") for k in t)
    if shape == "e2b":
        assert not any(".layers.4.self_attn.k_" in k or ".layers.5.self_attn.k_" in k for k in t)
    mx = pytest.importorskip("mlx.core")
    mlx_lm = pytest.importorskip("mlx_lm")
    model, tok = mlx_lm.load(str(d))
    out = np.array(model(mx.array([PROMPT]))[0])
    ref = tc.reference_logits(ckpts[f"target-{shape}"], PROMPT)
    np.testing.assert_allclose(out, ref, atol=1e-3, rtol=0)
    assert set(tok.eos_token_ids) == set(tc.EOS_TOKEN_IDS)


# -------------------------------------------------------------------------------- assistants


@pytest.mark.parametrize(
    "name,target",
    [("assistant-e2b", "e2b"), ("assistant-moe", "moe"), ("assistant-dense", "dense")],
)
def test_assistant_config(ckpts, name, target):
    from transformers import AutoConfig

    a = json.loads((ckpts[name] / "config.json").read_text())
    t = json.loads((ckpts[f"target-{target}"] / "config.json").read_text())
    assert a["model_type"] == "gemma4_assistant" and a["backbone_hidden_size"] == t["hidden_size"]
    at = a["text_config"]
    assert at["num_kv_shared_layers"] == at["num_hidden_layers"] == 4
    for k in (
        "num_key_value_heads",
        "head_dim",
        "attention_k_eq_v",
        "sliding_window",
        "rope_parameters",
        "vocab_size",
    ):
        assert at[k] == t[k], k
    assert tc.global_attention(at) == tc.global_attention(t)
    assert at["num_attention_heads"] == 2 != t["num_attention_heads"]
    cfg = AutoConfig.from_pretrained(ckpts[name])
    assert cfg.model_type == "gemma4_assistant"
    assert cfg.use_ordered_embeddings == (name == "assistant-e2b")


@pytest.mark.parametrize("name,target", [("assistant-e2b", "e2b"), ("assistant-moe", "moe")])
def test_assistant_reference_and_window(ckpts, name, target):
    A, T = ckpts[name], ckpts[f"target-{target}"]
    ref = tc.assistant_reference_step(A, T, PROMPT, num_steps=3)
    L = len(PROMPT)
    k_s, v_s = ref.shared_kv_states[tc.SLIDING]
    k_f, _ = ref.shared_kv_states[tc.FULL]
    nkv = 1 if target == "e2b" else 2
    assert k_s.shape == v_s.shape == (1, nkv, L, 16)  # all L sliding entries handed over
    assert k_f.shape == (1, 1, L, 32)
    assert ref.position == L
    assert ref.logits.shape == (3, 512) and ref.projected.shape == (3, 64)
    assert ref.inputs_embeds.shape == (3, 128)
    assert ref.first_token == int(np.argmax(ref.target_logits))
    np.testing.assert_allclose(ref.target_hidden, tc.reference_hidden(T, PROMPT)[-1], atol=1e-4)
    assert ref.draft_tokens == [int(np.argmax(x)) for x in ref.logits]
    # the HF assistant's sliding layers see exactly the last W+1 entries
    same = tc.assistant_reference_step(A, T, PROMPT, num_steps=3, kv_window=W + 1)
    np.testing.assert_allclose(same.logits, ref.logits, atol=1e-4)
    fewer = tc.assistant_reference_step(A, T, PROMPT, num_steps=3, kv_window=W)
    assert np.abs(fewer.logits - ref.logits).max() > 1e-2
    nomask = tc.assistant_reference_step(A, T, PROMPT, num_steps=3, attention_mask=None)
    np.testing.assert_allclose(nomask.logits, ref.logits, atol=1e-5)
    if name == "assistant-e2b":  # centroid head: 4 of 16 clusters x 32 tokens = 128 candidates
        for row in ref.logits:
            assert (row == row.min()).sum() == 512 - 128


# -------------------------------------------------------------------------------- tokenizer


def test_tokenizer_roundtrip_and_template(ckpts):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ckpts["target-e2b"])
    assert len(tok) == 512
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (
        tc.BOS_ID,
        tc.EOS_ID,
        tc.PAD_ID,
    )
    for t, i in tc.TOKEN_IDS.items():
        assert tok.convert_tokens_to_ids(t) == i
    text = "Hello world! The capital of France is Paris. 3.14 <naïve> ünïcödé\n  code()"
    ids = tok.encode(text)
    assert ids[0] == tc.BOS_ID and ids.count(tc.BOS_ID) == 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok.encode("<|turn>user\n", add_special_tokens=False)[0] == tc.START_OF_TURN_ID

    msgs = [
        {"role": "system", "content": "Be brief. "},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "<|channel>thought\nhmm<channel|>Hello!"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    off = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert off == (
        "<bos><|turn>system\nBe brief.<turn|>\n<|turn>user\nHi there<turn|>\n"
        "<|turn>model\nHello!<turn|>\n<|turn>user\nWhat is 2+2?<turn|>\n"
        "<|turn>model\n<|channel>thought\n<channel|>"
    )
    on = tok.apply_chat_template(
        msgs, tokenize=False, add_generation_prompt=True, enable_thinking=True
    )
    assert on.startswith("<bos><|turn>system\n<|think|>\nBe brief.<turn|>\n")
    assert on.endswith("<|turn>user\nWhat is 2+2?<turn|>\n<|turn>model\n")
    plain = tok.apply_chat_template(msgs[1:2], tokenize=False)
    assert plain == "<bos><|turn>user\nHi there<turn|>\n"
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    assert enc[0] == tc.BOS_ID and enc.count(tc.BOS_ID) == 1
    assert enc == tok.encode(off, add_special_tokens=False)
    assert enc.count(tc.END_OF_TURN_ID) == 4  # system, user, model, user


def test_tokenizer_mlx_lm(ckpts):
    tokenizer_utils = pytest.importorskip("mlx_lm.tokenizer_utils")
    w = tokenizer_utils.load(Path(ckpts["target-e2b"]), eos_token_ids=tc.EOS_TOKEN_IDS)
    assert set(w.eos_token_ids) == set(tc.EOS_TOKEN_IDS)
    assert w.has_thinking and w.think_end_tokens == (tc.CHANNEL_CLOSE_ID,)
    msgs = [{"role": "user", "content": "Hi"}]
    # TokenizerWrapper defaults enable_thinking to has_thinking (True here)
    ids = w.apply_chat_template(msgs, add_generation_prompt=True)
    assert (
        w.decode(ids)
        == "<bos><|turn>system\n<|think|>\n<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    )
    ids = w.apply_chat_template(msgs, add_generation_prompt=True, enable_thinking=False)
    assert ids[0] == tc.BOS_ID and ids.count(tc.BOS_ID) == 1
    assert ids[-1] == tc.CHANNEL_CLOSE_ID
    d = w.detokenizer
    for t in w.encode("Hello, streaming world!", add_special_tokens=False):
        d.add_token(t)
    d.finalize()
    assert d.text == "Hello, streaming world!"
