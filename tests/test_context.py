"""`--context`: a conversation shorter than the model's context, so that its KV cache fits a
Mac the full context would not (Gemma 4 31B at 4-bit on a 48 GB Mac). The preflight counts the
KV cache at that context and, when only a shorter one fits, says which."""

import json

import pytest
from typer.testing import CliRunner

from gemma_mtp_mlx import load
from gemma_mtp_mlx.chat.session import Session
from gemma_mtp_mlx.cli import app
from gemma_mtp_mlx.errors import GemmaChatError
from gemma_mtp_mlx.loading import estimate, plan

# 75 % of a 48 GB Mac: 31B at 4-bit with its drafter fits at a shorter context only.
MAC_48GB = 36 * 2**30


def gemma(*args: str, env: dict | None = None):
    return CliRunner().invoke(app, list(args), env=env)


def test_the_refusal_names_the_longest_context_that_fits_and_that_context_passes(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub"),
           "GEMMA_CHAT_STATE_DIR": str(tmp_path / "state")}
    refused = gemma("-m", "31b", "--prompt", "Hello", "--max-memory", "36G", env=env)
    assert refused.exit_code == 1
    (line,) = refused.stderr.strip().splitlines()
    assert line.startswith("error: 31b at 4bit needs about ") and "at 262,144 tokens" in line
    assert line.endswith("fits (a shorter conversation); or the largest that fits: --model 26b --precision 8bit")
    fitting = int(line.rsplit("--context ", 1)[1].split(" fits")[0].replace(",", ""))

    # It is the longest multiple of 1,024 tokens that fits, by the estimate the preflight uses.
    assert estimate(plan("31b", "auto"), context=fitting).total <= MAC_48GB
    assert estimate(plan("31b", "auto"), context=fitting + 1024).total > MAC_48GB

    # At that context the preflight passes: what stops the run now is the empty offline cache.
    r = gemma("-m", "31b", "--prompt", "Hello", "--max-memory", "36G", "--context", str(fitting), env=env)
    assert r.exit_code == 1 and "needs about" not in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "hub").exists() or not any((tmp_path / "hub").rglob("*.safetensors"))


def test_a_conversation_holds_no_more_than_its_context():
    pair = load("demo", context=1024)
    session = Session(pair)
    assert session.context_limit == 1024 < pair.target.args.max_position_embeddings
    long_text = "the rest is silence " * 300  # well over 1,024 tokens
    with pytest.raises(GemmaChatError, match="the context holds 1024"):
        session.ask(long_text)
    r = gemma("-m", "demo", "--context", "1k", "--prompt", long_text, "--json")
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith("error: this message takes") and "the context holds 1024" in r.stderr
    ok = gemma("-m", "demo", "--context", "1k", "--prompt", "Good night", "-n", "8", "--json")
    assert ok.exit_code == 0, ok.output
    assert len(json.loads(ok.stdout)["token_ids"]) == 8


def test_bad_context_values_are_one_line_before_loading():
    for value, message in [
        ("lots", "error: --context takes a number of tokens (32768, 32k), not 'lots'"),
        ("100", "error: --context 100: at least 1024 tokens"),
        ("5000", "error: --context 5,000: demo holds at most 4,096 tokens"),
    ]:
        r = gemma("-m", "demo", "--prompt", "Hello", "--context", value)
        assert r.exit_code == 1 and r.stderr.strip() == message, r.output
    r = gemma("--endpoint", "http://127.0.0.1:9/v1", "--prompt", "Hello", "--context", "2k")
    assert r.exit_code == 1
    assert r.stderr.strip() == "error: --context is for a local model; with --endpoint the server decides"
