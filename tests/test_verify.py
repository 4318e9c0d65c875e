"""/verify's verdict through the real engine on a tiny pair, with a perturbation injected into the
verify pass (as a kernel that sums in another order would): a near-tie, two tokens the target
scores alike nudged apart by less than rounding, is told from a bug, a token the target scores
far below its choice; the one-shot `--verify` puts the verdict in its JSON."""

import json
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from typer.testing import CliRunner

from gemma_mtp_mlx import load
from gemma_mtp_mlx.chat.session import Session, Settings
from gemma_mtp_mlx.cli import app
from gemma_mtp_mlx.engine import speculative
from tests.test_chat import build_tiny

PROMPT = "Tell me a story"
SETTINGS = Settings(max_tokens=24, draft_tokens=2, ignore_eos=True)


@pytest.fixture
def tiny_pair(tmp_path_factory):
    return load(str(build_tiny(tmp_path_factory)))  # its own: a test edits its weights


def perturb_verify(monkeypatch, pair, tokens: list[int], amount: float):
    """Add `amount` to these tokens' logits in every verify pass (not in prefills or plain
    steps)."""
    accept = speculative.accept
    bump = mx.array(np.isin(np.arange(pair.target.args.vocab_size), tokens) * amount, dtype=mx.float32)

    def perturbed(logits, drafts, q, sampler):
        return accept(logits + bump, drafts, q, sampler)

    monkeypatch.setattr(speculative, "accept", perturbed)


def plain_answer(pair) -> list[int]:
    return Session(pair, replace(SETTINGS, mtp=False)).ask(PROMPT).run().token_ids


def test_a_token_far_below_the_targets_choice_is_a_bug(tiny_pair, monkeypatch):
    plain = plain_answer(tiny_pair)
    unused = max(set(range(tiny_pair.target.args.vocab_size)) - set(plain))
    perturb_verify(monkeypatch, tiny_pair, [unused], 100.0)
    session = Session(tiny_pair, SETTINGS)
    answer = session.ask(PROMPT).run().token_ids
    result = session.verify()
    d = result.difference
    assert result.verdict == "bug" and d.position == answer.index(unused) >= 1
    assert (d.answer_token, d.plain_token) == (unused, plain[d.position])
    assert d.margin > 100 * d.tolerance and "beyond rounding" in result.message


def test_two_tokens_the_target_scores_alike_are_a_near_tie(tiny_pair, monkeypatch):
    plain = plain_answer(tiny_pair)
    # Each token of the answer gets a twin: the same row of the tied embedding at a higher id,
    # so the same logit everywhere; greedy keeps the lower id. Whichever position a verify pass
    # decides first (the first few are plain steps that measure the baseline), its token has
    # a twin there.
    unused = sorted(set(range(tiny_pair.target.args.vocab_size)) - set(plain), reverse=True)
    twins = dict(zip(sorted(set(plain), reverse=True), unused))
    twins = {token: twin for token, twin in twins.items() if twin > token}
    embed = tiny_pair.target.model.embed_tokens
    weights = np.array(embed.weight)
    for token, twin in twins.items():
        weights[twin] = weights[token]
    embed.weight = mx.array(weights)
    assert plain_answer(tiny_pair) == plain
    perturb_verify(monkeypatch, tiny_pair, list(twins.values()), 1e-6)  # what another summation order moves
    session = Session(tiny_pair, SETTINGS)
    answer = session.ask(PROMPT).run().token_ids
    result = session.verify()
    d = result.difference
    assert result.verdict == "near-tie" and result.identical is False
    assert d.position >= 1 and answer[: d.position] == plain[: d.position]
    assert (d.answer_token, d.plain_token) == (twins[plain[d.position]], plain[d.position])
    assert abs(d.margin) <= d.tolerance < 1e-4 and "within rounding" in result.message


def test_one_shot_verify_puts_the_verdict_in_its_json(tmp_path_factory, monkeypatch):
    target = build_tiny(tmp_path_factory)
    monkeypatch.setenv("GEMMA_CHAT_STATE_DIR", str(tmp_path_factory.mktemp("state")))
    runner = CliRunner()
    args = ["--model", str(target), "--prompt", PROMPT, "-n", "12", "--json"]
    out = runner.invoke(app, [*args, "--verify"])
    assert out.exit_code == 0, out.output
    verdict = json.loads(out.stdout.strip().splitlines()[-1])["verify"]
    assert verdict["verdict"] == "identical" and verdict["tokens"] == 12
    assert "verify" not in json.loads(runner.invoke(app, args).stdout.strip().splitlines()[-1])
    refused = runner.invoke(app, ["--model", str(target), "--verify"], input="hello\n")
    assert refused.exit_code == 1 and "--verify needs --prompt" in refused.output
