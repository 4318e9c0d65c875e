"""The demo pair shipped in the package: answers offline from an empty home, and its drafter
keeps up with its target on text neither was trained on (The Tempest is held out)."""

import json

from typer.testing import CliRunner

from fixtures.demo_prompts import HELD_OUT_CHAT_PROMPTS
from gemma_mtp_mlx import generate, load
from gemma_mtp_mlx.cli import app

HELD_OUT = HELD_OUT_CHAT_PROMPTS[:4]


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


def test_demo_drafter_acceptance_on_held_out_prompts():
    pair = load("demo")
    drafted = accepted = 0
    for prompt in HELD_OUT:
        plain = [t for c in generate(pair, prompt, max_tokens=64, mtp=False) for t in c.token_ids]
        ids, stats = [], None
        for chunk in generate(pair, prompt, max_tokens=64, draft_tokens=3):
            ids += chunk.token_ids
            stats = chunk.stats
        assert ids == plain
        drafted += stats.drafted
        accepted += stats.accepted
    assert accepted / drafted >= 0.7
