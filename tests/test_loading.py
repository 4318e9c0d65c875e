"""`load` through its real paths: local folders, hub ids offline, aliases, quantised MLX
checkpoints, and every kind of bad input as one clear GemmaChatError."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gemma_mtp_mlx import load
from gemma_mtp_mlx.errors import GemmaChatError
from gemma_mtp_mlx.loading import resolve

PROMPT = [2, 40, 77, 301, 12, 99, 250, 7, 18, 400]


def logits_of(pair):
    return np.array(pair.target(mx.array([PROMPT]))[0])


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty Hugging Face cache in offline mode."""
    import huggingface_hub.constants as c

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


def test_alias_offline_without_weights_is_one_clear_error(offline_hub):
    with pytest.raises(GemmaChatError, match="not in the local cache.*offline"):
        load("e2b")


def test_hub_repo_id_is_read_from_the_cache_offline(offline_hub, ckpt):
    """A snapshot laid out as huggingface_hub stores it loads by repo id with no network."""
    repo = offline_hub / "models--someone--tiny-gemma4"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(ckpt["dense"], snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    pair = load("someone/tiny-gemma4", drafter=None)
    assert pair.target.args.hidden_size == 64
    assert resolve("someone/tiny-gemma4") == snap


def test_auto_drafter_finds_a_sibling_assistant_folder(ckpt, tmp_path):
    shutil.copytree(ckpt["moe"], tmp_path / "moe")
    shutil.copytree(ckpt["moe-centroids"], tmp_path / "moe-assistant")
    assert load(str(tmp_path / "moe")).drafter is not None
    assert load(str(tmp_path / "moe"), drafter=None).drafter is None


@pytest.mark.parametrize(
    "name", ["no-such-model", "./missing-folder", "too/many/slashes"], ids=["word", "path", "id"]
)
def test_unknown_model_names(name):
    with pytest.raises(GemmaChatError, match="unknown model"):
        load(name)


def test_a_drafter_for_another_target_is_refused_with_what_differs(ckpt):
    with pytest.raises(GemmaChatError, match="does not fit the target: backbone_hidden_size|geometry"):
        load(str(ckpt["e2b"]), drafter=str(ckpt["moe-assistant"]))


def test_an_assistant_is_not_a_target(ckpt):
    with pytest.raises(GemmaChatError, match="MTP assistant, not a target"):
        load(str(ckpt["e2b-assistant"]))


def test_broken_and_missing_weights(ckpt, tmp_path):
    broken = shutil.copytree(ckpt["dense"], tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(GemmaChatError, match="cannot read model.safetensors"):
        load(str(broken), drafter=None)
    pickled = shutil.copytree(ckpt["dense"], tmp_path / "pickled")
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    with pytest.raises(GemmaChatError, match="only safetensors"):
        load(str(pickled), drafter=None)
    bad_config = shutil.copytree(ckpt["dense"], tmp_path / "bad-config")
    (bad_config / "config.json").write_text("{not json")
    with pytest.raises(GemmaChatError, match="not valid JSON"):
        load(str(bad_config), drafter=None)
    wrong_shape = shutil.copytree(ckpt["dense"], tmp_path / "wrong-shape")
    config = json.loads((wrong_shape / "config.json").read_text())
    config["hidden_size"] = 96
    (wrong_shape / "config.json").write_text(json.dumps(config))
    with pytest.raises(GemmaChatError, match="do not fit its config.json"):
        load(str(wrong_shape), drafter=None)


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_at_load_stays_close(ckpt, bits):
    moe = load(str(ckpt["moe"]), drafter=None, quantize=bits).target
    assert isinstance(moe.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    # The router keeps 8 bits whatever the rest uses (routing decisions are brittle).
    assert moe.model.layers[0].router.proj.bits == 8
    # Width-64 random matrices are a worst case for group-wise quantisation (one group per row,
    # no outlier structure): 8 bits must be near the fp32 function, 4 bits clearly related.
    full = logits_of(load(str(ckpt["dense"]), drafter=None))
    ours = logits_of(load(str(ckpt["dense"]), drafter=None, quantize=bits))
    assert not np.allclose(ours, full)
    corr = np.corrcoef(ours.ravel(), full.ravel())[0, 1]
    agree = (ours.argmax(-1) == full.argmax(-1)).mean()
    assert corr > (0.7 if bits == 4 else 0.99)
    assert agree >= (0.25 if bits == 4 else 0.8)


def test_mlx_community_quantised_checkpoint_with_per_module_overrides(ckpt, tmp_path):
    """Write a 4-bit MLX conversion (`language_model.` keys, a `quantization` block whose
    router override is 8-bit) and load it back: same numbers as quantising in memory."""
    pair = load(str(ckpt["moe"]), drafter=None, quantize=4)
    out = tmp_path / "moe-4bit"
    out.mkdir()
    weights = {f"language_model.{k}": v for k, v in tree_flatten(pair.target.parameters())}
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    config = json.loads((ckpt["moe"] / "config.json").read_text())
    overrides = {
        f"language_model.model.layers.{i}.router.proj": {"group_size": 64, "bits": 8}
        for i in range(config["num_hidden_layers"])
    }
    config["quantization"] = {"group_size": 64, "bits": 4, "mode": "affine", **overrides}
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (ckpt["moe"] / name).exists():
            shutil.copy(ckpt["moe"] / name, out / name)
    loaded = load(str(out), drafter=None)
    np.testing.assert_allclose(logits_of(loaded), logits_of(pair), atol=1e-5)
    with pytest.raises(GemmaChatError, match="already quantised"):
        load(str(out), drafter=None, quantize=8)
