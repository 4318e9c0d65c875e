"""Session-wide tiny checkpoints, written once by HF transformers and loaded through `load`."""

from pathlib import Path

import numpy as np
import pytest

from fixtures import tiny_checkpoints as tiny


def generated_ids(pair, prompt, **options) -> list[int]:
    """Every token id `generate` streams for `prompt`."""
    from gemma_mtp_mlx import generate

    return [t for chunk in generate(pair, prompt, **options) for t in chunk.token_ids]


def assert_close(ours: np.ndarray, ref: np.ndarray, tol: float = 1e-4):
    """fp32 parity: max error within `tol` of the reference's scale (max(1, max|ref|)). These
    fixtures have O(10) logits and states, so this is ~1e-3 absolute; a wrong mask, position or
    weight moves values by whole units."""
    err = np.abs(ours - ref).max() / max(1.0, np.abs(ref).max())
    assert err < tol, f"relative error {err:.2e}"


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory) -> dict[str, Path]:
    """targets: "e2b" | "moe" | "dense"; drafters: "<shape>-assistant" (dense head) and
    "<shape>-centroids" (centroid head)."""
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for shape in tiny.SHAPES:
        out[shape] = tiny.make_target(root / shape, shape)
        out[f"{shape}-assistant"] = tiny.make_assistant(
            root / f"{shape}-assistant", out[shape], centroids=False
        )
        out[f"{shape}-centroids"] = tiny.make_assistant(
            root / f"{shape}-centroids", out[shape], centroids=True, hub_style_config=True
        )
    return out


@pytest.fixture(scope="session")
def pairs(ckpt):
    """Loaded (target, drafter) pairs keyed by (shape, centroids)."""
    from gemma_mtp_mlx import load

    return {
        (shape, centroids): load(
            str(ckpt[shape]), str(ckpt[f"{shape}-{'centroids' if centroids else 'assistant'}"])
        )
        for shape in tiny.SHAPES
        for centroids in (False, True)
    }


def make_echo_drafter(pair, noise: float = 0.0, seed: int = 0) -> None:
    """Turn a (hidden = target hidden) assistant into one that proposes the target's previous
    argmax again (its layers pass the target's hidden state through to a copy of the target's
    head), plus `noise` on that head. Random drafters almost never agree with a random target;
    this one agrees whenever the target repeats itself, which gives rounds with every
    acceptance length, so rollback is exercised at every depth."""
    import mlx.core as mx

    drafter, target = pair.drafter, pair.target
    h = target.args.hidden_size
    eye = mx.eye(h)
    drafter.pre_projection.weight = mx.concatenate([mx.zeros((h, h)), eye], axis=1)
    drafter.post_projection.weight = eye
    for layer in drafter.model.layers:
        layer.self_attn.o_proj.weight = mx.zeros_like(layer.self_attn.o_proj.weight)
        layer.mlp.down_proj.weight = mx.zeros_like(layer.mlp.down_proj.weight)
        layer.layer_scalar = mx.ones((1,))
    drafter.model.norm.weight = mx.ones((h,))
    table = target.model.embed_tokens.weight
    jitter = mx.random.normal(table.shape, key=mx.random.key(seed)) * mx.abs(table).mean()
    drafter.model.embed_tokens.weight = table + noise * jitter
    if drafter.args.use_ordered_embeddings:
        head = drafter.masked_embedding
        clusters = head.token_ordering.reshape(head.num_centroids, -1)
        head.centroids.weight = drafter.model.embed_tokens.weight[clusters].mean(axis=1) * 4


@pytest.fixture(scope="session")
def echo_pairs(tmp_path_factory, ckpt):
    """Pairs keyed by (shape, centroids) whose drafters agree with the target often."""
    from gemma_mtp_mlx import load

    root = tmp_path_factory.mktemp("echo")
    out = {}
    for shape in tiny.SHAPES:
        for centroids in (False, True):
            folder = tiny.make_assistant(
                root / f"{shape}-{centroids}", ckpt[shape], centroids=centroids, hidden_size=64
            )
            pair = load(str(ckpt[shape]), str(folder))
            make_echo_drafter(pair)
            out[(shape, centroids)] = pair
    return out
