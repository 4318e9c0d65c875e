"""The demo pair shipped in the package: answers offline from an empty home, answers a chat
prompt with a short speech that ends its turn, and its drafter keeps up with its target on
prompts neither was trained on (The Tempest is held out)."""

import json

from typer.testing import CliRunner

from fixtures.demo_prompts import HELD_OUT_CHAT_PROMPTS
from gemma_mtp_mlx import generate, load
from gemma_mtp_mlx.cli import app
from gemma_mtp_mlx.tools.distill import measure_acceptance

HELD_OUT = HELD_OUT_CHAT_PROMPTS[:4]
ACCEPTANCE = 0.76  # the pair before the chat retrain reached 0.7599; this one 0.8741


def test_demo_answers_offline_from_an_empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (tmp_path / "demo").mkdir()  # an unrelated folder named like the alias does not shadow it
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["--model", "demo", "--prompt", HELD_OUT[0], "--json", "--max-tokens", "32"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["text"].strip() and out["stats"]["generated_tokens"] > 0


def test_demo_answers_are_short_speeches_that_end_their_turn():
    pair = load("demo")
    lines = []
    for prompt in HELD_OUT_CHAT_PROMPTS:
        chunks = list(generate(pair, prompt, max_tokens=256, mtp=False))
        answer = "".join(c.text for c in chunks).removesuffix("<turn|>")
        assert chunks[-1].finish_reason == "stop", answer  # ended, not cut off by the limit
        assert "<|turn>" not in answer, answer  # no run-on into a turn of its own
        lines.append(len([line for line in answer.splitlines() if line.strip()]))
    assert sum(lines) / len(lines) >= 3, lines
    assert max(lines) <= 12, lines  # a speech, not a loop


def test_demo_drafter_keeps_up_on_held_out_prompts():
    pair = load("demo")
    for prompt in HELD_OUT:  # speculative answers are the target's own, token for token
        plain = [t for c in generate(pair, prompt, max_tokens=64, mtp=False) for t in c.token_ids]
        drafted = [t for c in generate(pair, prompt, max_tokens=64, draft_tokens=3) for t in c.token_ids]
        assert drafted == plain
    # The acceptance scripts/make_demo.py's evaluate stage reports (64 tokens past each prompt).
    assert measure_acceptance(pair, HELD_OUT_CHAT_PROMPTS, draft_tokens=3, max_tokens=64) >= ACCEPTANCE
