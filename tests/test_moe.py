"""Expert dispatch (models/moe.py): fused gate/up experts, grouped by expert for blocks of
tokens, give the numbers of a plain per-token, per-expert reference; routing does not depend on
how many tokens share a forward; mlx-community's split expert layout loads to the same model as
HF's fused one (also quantised, with per-module overrides)."""

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from fixtures import tiny_checkpoints as tiny
from gemma_mtp_mlx import load
from gemma_mtp_mlx.models import moe


@pytest.fixture(scope="module")
def layer(pairs):
    return pairs[("moe", False)].target.model.layers[0]


def reference(experts: moe.Experts, x, top, weights):
    """Σ_k w_k · down_e(gelu(gate_e x) ⊙ up_e x), one token and one expert at a time."""
    gate_up, down = experts.gate_up_proj.weight, experts.down_proj.weight
    width = down.shape[-1]
    out = np.zeros(x.shape, np.float32)
    for pos in np.ndindex(*x.shape[:-1]):
        row = x[pos]
        for e, w in zip(np.array(top[pos]).tolist(), np.array(weights[pos]).tolist()):
            h = gate_up[e] @ row
            y = down[e] @ (nn.gelu_approx(h[:width]) * h[width:])
            out[pos] += w * np.array(y)
    return out


@pytest.mark.parametrize("shape", [(1, 1), (1, 2), (1, 5), (3, 4)])
@pytest.mark.parametrize("on_host", [True, False], ids=["host-grouped", "sorted-gather"])
def test_dispatch_equals_per_token_reference(layer, monkeypatch, shape, on_host):
    monkeypatch.setattr(moe, "on_cpu", lambda: on_host)
    x = mx.random.normal((*shape, layer.experts.down_proj.weight.shape[1]), key=mx.random.key(7))
    top, weights = layer.router(x)
    ours = layer.experts(x, top, weights)
    np.testing.assert_allclose(np.array(ours), reference(layer.experts, x, top, weights), atol=1e-5)


def test_routing_of_a_block_is_the_routing_of_its_tokens(layer):
    x = mx.random.normal((3, 4, layer.experts.down_proj.weight.shape[1]), key=mx.random.key(8))
    top, weights = layer.router(x)
    for b, t in np.ndindex(3, 4):
        one_top, one_weights = layer.router(x[b : b + 1, t : t + 1])
        assert np.array_equal(np.array(one_top[0, 0]), np.array(top[b, t]))
        assert np.array_equal(np.array(one_weights[0, 0]), np.array(weights[b, t]))


def _params(model) -> dict:
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


def _logits(pair):
    return np.array(pair.target(mx.array([[2, 40, 77, 301, 12, 9]])))


def test_mlx_community_split_experts_load_like_hf_fused(ckpt, tmp_path):
    hf = load(str(ckpt["moe"]), drafter=None)
    split = load(str(tiny.to_mlx_community_layout(ckpt["moe"], tmp_path / "mlx")), drafter=None)
    ours, theirs = _params(hf.target), _params(split.target)
    assert ours.keys() == theirs.keys()
    assert "model.layers.0.experts.gate_up_proj.weight" in ours
    for key in ours:
        assert np.array_equal(ours[key], theirs[key]), key
    np.testing.assert_array_equal(_logits(hf), _logits(split))


def test_quantised_split_experts_with_overrides(ckpt, tmp_path):
    """A quantised mlx-community checkpoint: split gate/up/down with weight, scales and biases,
    layer 0's experts at 8 bits through per-module overrides keyed by mlx-lm's names."""
    pair = load(str(ckpt["moe"]), drafter=None)
    eight = ("layers.0.experts.gate_up_proj", "router.proj")
    nn.quantize(
        pair.target, group_size=64, bits=4,
        class_predicate=lambda p, m: pair.target.quant_predicate(p, m)
        and ({"group_size": 64, "bits": 8} if p.endswith(eight) else True),
    )
    assert pair.target.model.layers[0].experts.gate_up_proj.bits == 8
    assert pair.target.model.layers[1].experts.gate_up_proj.bits == 4
    weights = {}
    for key, value in tree_flatten(pair.target.parameters()):
        key = "language_model." + key
        if ".experts.gate_up_proj." in key:
            gate, up = mx.split(value, 2, axis=1)
            weights[key.replace("gate_up_proj", "switch_glu.gate_proj")] = gate
            weights[key.replace("gate_up_proj", "switch_glu.up_proj")] = up
        else:
            weights[key.replace("experts.down_proj", "experts.switch_glu.down_proj")] = value
    out = tmp_path / "moe-4bit-split"
    out.mkdir()
    mx.save_safetensors(str(out / "model.safetensors"), weights)
    config = json.loads((ckpt["moe"] / "config.json").read_text())
    quant = {"group_size": 64, "bits": 4, "mode": "affine"}
    prefix = "language_model.model.layers"
    for i in range(config["num_hidden_layers"]):
        quant[f"{prefix}.{i}.router.proj"] = {"group_size": 64, "bits": 8}
    for name in ("gate_proj", "up_proj"):
        quant[f"{prefix}.0.experts.switch_glu.{name}"] = {"group_size": 64, "bits": 8}
    config["quantization"] = quant
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (ckpt["moe"] / name).exists():
            shutil.copy(ckpt["moe"] / name, out / name)
    loaded = load(str(out), drafter=None)
    assert loaded.target.model.layers[0].experts.gate_up_proj.bits == 8
    np.testing.assert_allclose(_logits(loaded), _logits(pair), atol=1e-5)


def test_compiled_forward_falls_back_to_the_sorted_gather(layer):
    """Under mx.compile (distillation's teacher) the routing cannot be read on the host."""
    x = mx.random.normal((2, 3, layer.experts.down_proj.weight.shape[1]), key=mx.random.key(9))
    top, weights = layer.router(x)
    compiled = mx.compile(lambda x, top, weights: layer.experts(x, top, weights))
    np.testing.assert_allclose(
        np.array(compiled(x, top, weights)), reference(layer.experts, x, top, weights), atol=1e-5
    )
