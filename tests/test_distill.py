"""Drafter distillation: the unrolled training forward is the inference path, the loss goes
down, checkpoints load (here and in transformers), resume, and stay lossless."""

import io
import json

import mlx.core as mx
import numpy as np
import pytest

from fixtures import tiny_checkpoints as tiny
from gemma_mtp_mlx import load
from gemma_mtp_mlx.engine.context import Context
from gemma_mtp_mlx.loading import load_drafter, load_target
from gemma_mtp_mlx.tools.distill import (
    drafter_config,
    measure_acceptance,
    new_drafter,
    teacher_batch,
    train_drafter,
    unrolled_logits,
)
from tests.conftest import generated_ids

SMALL = dict(
    hidden_size=32,
    intermediate_size=64,
    seq_len=24,
    batch=4,
    depth=3,
    self_distill_pool=8,
    eval_windows=4,
    acceptance_prompts=0,
    log_every=10,
    checkpoint_every=10,
)


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return {shape: tiny.make_target(root / shape, shape) for shape in ("dense", "e2b")}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    file = tmp_path_factory.mktemp("data") / "corpus.txt"
    file.write_text(tiny._CORPUS.replace("\n", "\n\n") * 3)
    return file


@pytest.fixture(scope="module")
def trained(targets, corpus, tmp_path_factory):
    """A dense-target drafter trained for 30 steps (with a Rich console), then resumed to 40."""
    from rich.console import Console

    out = tmp_path_factory.mktemp("drafter") / "assistant"
    console = Console(file=io.StringIO(), force_terminal=True, width=120)
    first = train_drafter(targets["dense"], [corpus], out, steps=30, progress=console, **SMALL)
    saved = {k: np.array(v) for k, v in mx.load(str(out / "model.safetensors")).items()}
    second = train_drafter(targets["dense"], [corpus], out, steps=40, **SMALL)
    return out, first, second, saved, console.file.getvalue()


def mean(xs):
    return sum(xs) / len(xs)


def test_loss_decreases_and_progress_is_shown(trained):
    _, first, _, _, shown = trained
    losses = first["loss_history"]
    assert first["steps"] == 30 and len(losses) == 30
    assert mean(losses[-10:]) < 0.85 * mean(losses[:3])
    assert len(first["accuracy"]) == 3 and len(first["held_out_accuracy"]) == 3
    assert "distilling" in shown and "loss" in shown


def test_resume_continues_from_the_checkpoint(trained):
    out, first, second, _, _ = trained
    assert second["steps"] == 40 and len(second["loss_history"]) == 10
    assert second["tokens"] == 40 * 4 * (24 + 3 + 1)
    assert json.loads((out / "progress.json").read_text())["step"] == 40
    optimizer = mx.load(str(out / "progress" / "optimizer.safetensors"))
    assert optimizer["step"].item() == 40  # AdamW's moments and counter carried over
    # No re-initialisation: right after resuming the loss is where it was, not where it started.
    initial, before = mean(first["loss_history"][:3]), mean(first["loss_history"][-10:])
    after = mean(second["loss_history"][:3])
    assert after < initial - 0.25 * (initial - before)
    assert second["held_out_loss"] < first["held_out_loss"] * 1.05


def test_checkpoint_loads_and_speculative_output_is_lossless(trained, targets):
    out, *_ = trained
    target = load_target(targets["dense"])
    drafter = load_drafter(out, target)
    assert drafter.args.text.layer_types[-1] == "full_attention"
    pair = load(str(targets["dense"]), drafter=str(out))
    prompt = [2, 40, 77, 301, 12]

    def ids(**options):
        return generated_ids(pair, prompt, max_tokens=60, ignore_eos=True, **options)

    plain = ids(mtp=False)
    assert len(plain) == 60
    assert ids(draft_tokens=3) == plain
    rate = measure_acceptance(pair, [prompt], draft_tokens=3, max_tokens=30)
    assert 0.0 <= rate <= 1.0


def test_checkpoint_matches_transformers(trained, targets):
    """HF's Gemma4AssistantForCausalLM reads the checkpoint (names, config) and computes the same
    draft chain as our drafter, so the file is a real `gemma4_assistant` checkpoint."""
    out, *_ = trained
    prompt = [2, 40, 77, 301, 12, 99, 250, 7, 18, 400, 33, 61]
    ref = tiny.assistant_reference_step(out, targets["dense"], prompt, num_steps=2)
    pair = load(str(targets["dense"]), drafter=str(out))
    ctx = Context(pair.target, slack=4)
    _, hidden, _ = ctx.prefill(prompt)
    kv = pair.target.drafter_kv(ctx.cache, pair.drafter.sliding_window)
    token, g = ref.first_token, hidden
    for step in range(2):
        y, g = pair.drafter(pair.target.model.embed(mx.array([[token]])), g, kv)
        np.testing.assert_allclose(
            np.array(pair.drafter.logits(y)[0, 0]), ref.logits[step], atol=2e-3
        )
        token = ref.draft_tokens[step]


@pytest.mark.parametrize("shape", ["dense", "e2b"])
def test_unrolled_training_forward_is_the_inference_path(targets, shape):
    """Row i of the batched training forward == drafting after a prefill of x[:i+1] (query at
    position i + 1, full keys <= i, sliding keys i - W .. i), at every depth, inside and past
    the sliding window (8) and once the target's ring buffer (8 + 4 slots) has wrapped."""
    target = load_target(targets[shape])
    mx.random.seed(1)
    drafter = new_drafter(
        drafter_config(target.args, hidden_size=32, intermediate_size=64), target.args
    )
    depth, T = 3, 40
    x = np.random.default_rng(0).integers(10, target.args.vocab_size, T).tolist()
    batch = teacher_batch(target, mx.array([x]), depth, drafter.sliding_window)
    trained = unrolled_logits(drafter, batch, depth)
    for i in (3, 20, 33):
        ctx = Context(target, slack=4)
        _, hidden, _ = ctx.prefill(x[: i + 1])
        assert ctx.cache[0].offset == i + 1
        kv = target.drafter_kv(ctx.cache, drafter.sliding_window)
        g = hidden
        for s in range(1, depth + 1):
            if i + s >= T:
                break
            emb = target.model.embed(mx.array([[x[i + s]]]))
            y, g = drafter(emb, g, kv)
            np.testing.assert_allclose(
                np.array(trained[s - 1][0, i]), np.array(drafter.logits(y)[0, 0]), atol=1e-4
            )


def test_kv_shared_target_trains_and_stays_lossless(targets, corpus, tmp_path):
    """E2B-like target (per-layer embeddings, KV-shared layers): a short run loads and is lossless."""
    out = tmp_path / "e2b-assistant"
    result = train_drafter(
        targets["e2b"], [corpus], out, steps=6, **{**SMALL, "checkpoint_every": 3}
    )
    assert result["steps"] == 6
    assert all(np.isfinite(result["loss_history"]))
    pair = load(str(targets["e2b"]), drafter=str(out))
    prompt = [2, 40, 77, 301, 12]

    def ids(**options):
        return generated_ids(pair, prompt, max_tokens=60, ignore_eos=True, **options)

    assert ids(draft_tokens=3) == ids(mtp=False)


def test_refuses_to_overwrite_a_model_that_is_not_a_checkpoint(targets, corpus, tmp_path):
    from gemma_mtp_mlx.errors import GemmaChatError

    out = tmp_path / "released"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(GemmaChatError, match="not overwriting"):
        train_drafter(targets["dense"], [corpus], out, steps=1, **SMALL)
    assert (out / "config.json").read_text() == "{}"


def test_train_drafter_command(targets, corpus, tmp_path):
    from typer.testing import CliRunner

    from gemma_mtp_mlx.cli import app

    out = tmp_path / "cli-assistant"
    args = ["train-drafter", "--target", str(targets["dense"]), "--data", str(corpus), "--out", str(out),
            "--steps", "3", "--hidden-size", "32", "--intermediate-size", "64", "--seq-len", "24", "--batch", "2"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "3 steps" in result.stderr
    assert load(str(targets["dense"]), drafter=str(out)).drafter is not None
    missing = CliRunner().invoke(app, [*args[:4], str(tmp_path / "nope.txt"), *args[5:]])
    assert missing.exit_code == 1 and "no such data file" in missing.stderr
