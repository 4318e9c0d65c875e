"""The first run of a real user, offline: tiny stand-ins for the published checkpoints (Google's
multimodal originals, their mlx-vlm conversions at every precision, the bf16 assistants) laid out
in a hub cache under the alias table's repo ids, run through `load` and the real CLI."""

import json
import re

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from typer.testing import CliRunner

from gemma_mtp_mlx import load, memory
from gemma_mtp_mlx.aliases import PRECISIONS, checkpoint, checkpoints
from gemma_mtp_mlx.cli import app
from gemma_mtp_mlx.hub import local_size
from tests.conftest import make_hub_cache

PROMPT = [2, 40, 77, 301, 12, 99, 250, 7, 18, 400]


def gemma(*args: str, env: dict):
    return CliRunner().invoke(app, list(args), env=env)


def logits(model) -> np.ndarray:
    return np.array(model(mx.array([PROMPT]))[0].astype(mx.float32))


@pytest.mark.parametrize("variant", ["plain", "4bit", "8bit", "mixed_4_8"])
def test_our_loader_equals_mlx_vlm_on_its_conversions(published, variant):
    from mlx_vlm.utils import load_model

    folder = published[f"e4b-{variant}"]
    ours = load(str(folder), drafter=str(published["e4b-assistant"]))
    theirs = load_model(folder).language_model(mx.array([PROMPT])).logits
    np.testing.assert_allclose(logits(ours.target), np.array(theirs[0]), atol=1e-5, rtol=0)
    assert ours.drafter is not None and ours.drafter.model.embed_tokens.weight.dtype == mx.bfloat16
    if variant != "plain":
        assert isinstance(ours.target.model.layers[0].self_attn.q_proj, nn.QuantizedLinear)


@pytest.fixture
def offline(monkeypatch, offline_env):
    for name, value in offline_env.items():
        monkeypatch.setenv(name, value)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_every_precision_of_an_alias_loads_from_the_cache(published, offline, precision):
    pair = load("e4b", precision=precision)
    q_proj = pair.target.model.layers[0].self_attn.q_proj
    bits = {"4bit": 4, "8bit": 8, "bf16": None}[precision]
    assert getattr(q_proj, "bits", None) == bits
    assert pair.drafter is not None and pair.drafter_note is None
    folder = published["e4b-original" if precision == "bf16" else f"e4b-{precision}"]
    np.testing.assert_array_equal(
        logits(pair.target), logits(load(str(folder), drafter=None).target)
    )


def test_default_runs_with_mtp_from_the_cache_and_equals_plain(offline_env):
    args = ("--prompt", "Hello there", "-n", "12", "--json", "--ignore-eos")
    mtp = gemma(*args, "-k", "2", env=offline_env)
    assert mtp.exit_code == 0, mtp.output
    assert mtp.stderr == ""  # cached already: no first-run line, no warning
    plain = gemma(*args, "--no-mtp", env=offline_env)
    assert plain.exit_code == 0, plain.output
    answer, reference = json.loads(mtp.stdout), json.loads(plain.stdout)
    assert answer["stats"]["drafted"] > 0 and reference["stats"]["drafted"] == 0
    assert answer["token_ids"] == reference["token_ids"] and len(answer["token_ids"]) == 12


def test_the_default_falls_back_to_e2b_when_e4b_does_not_fit(offline_env):
    e4b = load_estimate("e4b", offline_env)
    e2b = load_estimate("e2b", offline_env)
    assert e2b < e4b  # the tiny E4B stand-in stores more K/V than the E2B one
    between = str((e2b + e4b) // 2)
    rows = [json.loads(x) for x in gemma("models", "--json", "--max-memory", between, env=offline_env).stdout.splitlines()]
    assert [(r["alias"], r["precision"]) for r in rows if r["default"]] == [("e2b", "4bit")]
    # e4b at this limit is refused, so an answer means e2b was used.
    r = gemma("--prompt", "Hello", "-n", "4", "--json", "--max-memory", between, env=offline_env)
    assert r.exit_code == 0, r.output
    refused = gemma("-m", "e4b", "--prompt", "Hello", "--max-memory", between, env=offline_env)
    assert refused.exit_code == 1 and "the largest that fits: --model e2b --precision 4bit" in refused.stderr


def load_estimate(alias: str, env: dict) -> int:
    rows = [json.loads(x) for x in gemma("models", "--json", env=env).stdout.splitlines()]
    return next(r["memory_bytes"] for r in rows if (r["alias"], r["precision"]) == (alias, "4bit"))


def test_a_tiny_memory_limit_refuses_before_anything_loads(offline_env, hub_cache):
    before = sorted(p.name for p in hub_cache.rglob("*"))
    r = gemma("--prompt", "Hello", "--max-memory", "1K", env=offline_env)
    assert r.exit_code == 1 and r.stdout == "" and "Traceback" not in r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: e2b at 4bit needs about ")  # e4b did not fit either
    assert "over the 1.0 KiB limit (--max-memory 1K); no published Gemma 4 fits" in line
    assert sorted(p.name for p in hub_cache.rglob("*")) == before


def test_the_real_sizes_are_refused_before_any_download(tmp_path):
    """Online mode, empty cache: the preflight runs on models/configs.py and stops the run
    before the hub is asked for anything; the cache stays empty."""
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "GEMMA_CHAT_STATE_DIR": str(tmp_path / "state"),
           "HF_HUB_OFFLINE": "0"}
    r = gemma("-m", "31b", "--prompt", "Hello", "--max-memory", "8G", env=env)
    assert r.exit_code == 1, r.output
    (line,) = r.stderr.strip().splitlines()
    expected = memory.format_bytes(load_plan_estimate("31b", "4bit"))
    assert line.startswith(f"error: 31b at 4bit needs about {expected} (weights 16.1 GiB")
    assert line.endswith("the largest that fits: --model e4b --precision 4bit")
    assert not (tmp_path / "hub").exists()


def load_plan_estimate(alias: str, precision: str) -> int:
    from gemma_mtp_mlx.catalog import estimate_of

    return estimate_of(checkpoint(alias, precision)).total


def test_first_run_says_which_default_and_why(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "GEMMA_CHAT_STATE_DIR": str(tmp_path / "state")}
    r = gemma("--prompt", "Hello", "--max-memory", "64G", env=env)
    assert r.exit_code == 1
    first, error = r.stderr.strip().splitlines()
    assert first.startswith("using e4b at 4bit (mlx-community/gemma-4-e4b-it-4bit, about 6.1 GiB")
    assert "it fits in the 64.0 GiB limit (--max-memory 64G)" in first
    assert error == (
        "error: mlx-community/gemma-4-e4b-it-4bit is not in the local cache and offline mode "
        "(HF_HUB_OFFLINE) is on"
    )
    small = gemma("--prompt", "Hello", "--max-memory", "5G", env=env)
    assert small.stderr.startswith("using e2b at 4bit") and "e4b needs about 6.1 GiB, over the 5.0 GiB" in small.stderr


def test_a_missing_assistant_degrades_to_plain_decoding(published, tmp_path):
    only_target = {"mlx-community/gemma-4-e4b-it-4bit": "e4b-4bit"}
    cache = make_hub_cache(tmp_path / "hub", published, only_target)
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache), "GEMMA_CHAT_STATE_DIR": str(tmp_path)}
    r = gemma("--prompt", "Hello", "-n", "6", "--json", env=env)
    assert r.exit_code == 0, r.output
    assert r.stderr.strip() == (
        "warning: no MTP drafter for e4b (mlx-community/gemma-4-E4B-it-assistant-bf16 is not in "
        "the local cache and offline mode (HF_HUB_OFFLINE) is on): plain decoding"
    )
    assert len(json.loads(r.stdout)["token_ids"]) == 6


def test_models_json_lists_every_alias_and_precision(published, offline_env, hub_cache):
    r = gemma("models", "--json", "--max-memory", "40G", env=offline_env)
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(x["alias"], x["precision"]) for x in rows] == [(c.alias, c.precision) for c in checkpoints()]
    required = {"alias", "precision", "target_repo", "assistant_repo", "default", "cached", "fits", "bytes"}
    assert all(required <= set(x) for x in rows)
    by = {(x["alias"], x["precision"]): x for x in rows}
    default = by[("e4b", "4bit")]
    assert [x for x in rows if x["default"]] == [default]
    assert default["cached"] and default["fits"]
    assert default["bytes"] == local_size(published["e4b-4bit"]) + local_size(published["e4b-assistant"])
    assert default["target_repo"] == "mlx-community/gemma-4-e4b-it-4bit"
    assert by[("e4b", "bf16")]["target_repo"] == "google/gemma-4-E4B-it"
    assert by[("e4b", "bf16")]["cached"]
    # Not cached and offline: size unknown; the real 31B in bf16 does not fit in 40 GiB.
    big = by[("31b", "bf16")]
    assert not big["cached"] and big["bytes"] is None and big["fits"] is False
    assert default["vision"] is True and big["vision"] is None  # a config not seen offline
    assert by[("31b", "4bit")]["fits"] is True
    table = gemma("models", env=offline_env)
    assert table.exit_code == 0 and re.search(r"^e4b\* +4bit +mlx-community/gemma-4-e4b-it-4bit ", table.stdout, re.M)


def test_download_only_what_the_text_model_needs():
    from huggingface_hub.utils import filter_repo_objects

    from gemma_mtp_mlx.hub import TEXT_MODEL_FILES

    repo = [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
        "chat_template.jinja", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "README.md",
        "pytorch_model.bin", "model.gguf", "onnx/model.onnx", "model.onnx", "processor_config.json",
        "preprocessor_config.json", ".gitattributes", "original/consolidated.pth",
    ]
    kept = sorted(filter_repo_objects(repo, allow_patterns=TEXT_MODEL_FILES))
    assert kept == sorted([*repo[:8], "processor_config.json"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--precision", "3bit"), "unknown precision '3bit': use 4bit, 8bit, bf16"),
        (("-m", "demo", "--precision", "8bit"), "--precision picks among the published weights"),
        (("--max-memory", "lots"), "--max-memory lots: expected a size such as 12G"),
    ],
)
def test_bad_model_options_are_one_line_before_loading(offline_env, args, message):
    r = gemma(*args, "--prompt", "Hello", env=offline_env)
    assert r.exit_code == 1 and r.stdout == ""
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: ") and message in line


def test_checkpoint_names_the_published_combinations():
    from gemma_mtp_mlx.errors import GemmaChatError

    with pytest.raises(GemmaChatError, match=r"there is no e4b in 2bit; published: e2b 4bit, .*31b bf16$"):
        checkpoint("e4b", "2bit")


def test_a_cached_repo_id_loads_as_stored(offline, published):
    pair = load("someone/gemma-4-e4b-it-mixed_4_8", drafter=None)
    np.testing.assert_array_equal(
        logits(pair.target), logits(load(str(published["e4b-mixed_4_8"]), drafter=None).target)
    )


def test_the_estimate_is_what_the_loader_holds(published):
    from gemma_mtp_mlx.loading import estimate, plan

    for name in ("e4b-4bit", "e4b-8bit", "e4b-original", "e4b-mixed_4_8"):
        folder = str(published[name])
        found = estimate(plan(folder, str(published["e4b-assistant"])))
        pair = load(folder, str(published["e4b-assistant"]))
        assert found.target == memory.parameter_bytes(pair.target)
        assert found.drafter == memory.parameter_bytes(pair.drafter)


def test_quantize_on_a_quantised_alias_is_refused_before_downloading(tmp_path):
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "GEMMA_CHAT_STATE_DIR": str(tmp_path),
           "HF_HUB_OFFLINE": "0"}
    r = gemma("-m", "e4b", "--quantize", "8", "--prompt", "Hello", env=env)
    assert r.exit_code == 1
    assert r.stderr.strip() == (
        "error: e4b at 4bit is already quantised: drop --quantize, or quantise the originals "
        "with --precision bf16 --quantize 8"
    )
    assert not (tmp_path / "hub").exists()


def test_quantize_at_load_on_the_bf16_originals(offline):
    pair = load("e4b", precision="bf16", quantize=4)
    assert pair.target.model.layers[0].self_attn.q_proj.bits == 4
