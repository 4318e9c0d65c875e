"""The chat layer on tiny random Gemma 4 checkpoints: session (template, KV cache carried
across turns, overflow, interrupts, /verify, save/load), thinking channel, view, REPL."""

from __future__ import annotations

import io
import json
import os
import signal
import stat
from pathlib import Path

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from fixtures import tiny_checkpoints as tc
from gemma_mtp_mlx import load
from gemma_mtp_mlx.chat import repl as repl_module
from gemma_mtp_mlx.chat import session as session_module
from gemma_mtp_mlx.chat.repl import SlashCompleter, open_history, run_repl, state_dir
from gemma_mtp_mlx.chat.session import Session, Settings
from gemma_mtp_mlx.chat.thinking import ChannelSplitter, strip_channels
from gemma_mtp_mlx.chat.view import AnswerView, meter_text, stable_prefix
from gemma_mtp_mlx.engine import context as context_module
from gemma_mtp_mlx.engine.generate import Chunk, generate
from gemma_mtp_mlx.engine.stats import GenerationStats
from gemma_mtp_mlx.errors import GemmaChatError

QUESTIONS = ["Hello there", "What is the capital of France?", "Write a haiku about the ocean."]


def build_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An E2B-like target with its centroid-head assistant in `assistant/` (found by
    drafter="auto"); built once per test session, shared by test_chat and test_cli."""
    target = tmp_path_factory.getbasetemp() / "chat-tiny" / "target"
    if not (target / "assistant" / "config.json").is_file():
        tc.make_target(target, "e2b")
        tc.make_assistant(target / "assistant", target, centroids=True)
    return target


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory)


@pytest.fixture(scope="session")
def pair(tiny):
    p = load(str(tiny))
    assert p.drafter is not None
    return p


def ids(pair, text: str) -> list[int]:
    return pair.tokenizer.encode(text, add_special_tokens=False)


def chat(pair, settings: Settings, questions=QUESTIONS) -> tuple[Session, list]:
    session = Session(pair, settings)
    return session, [session.ask(q).run() for q in questions]


# ------------------------------------------------------------------------------ thinking channel


def test_splitter_routes_channels_by_id_and_hides_special_tokens(pair):
    thought = ids(pair, "thought\n") + ids(pair, "Let me think about it")
    answer = ids(pair, "über café")
    stream = [tc.CHANNEL_OPEN_ID, *thought, tc.CHANNEL_CLOSE_ID, *answer, tc.END_OF_TURN_ID]
    for step in (1, 3, len(stream)):  # token by token, in bursts, all at once
        splitter = ChannelSplitter(pair.tokenizer)
        thinking, text = "", ""
        for i in range(0, len(stream), step):
            dt, da = splitter.feed(stream[i : i + step])
            thinking, text = thinking + dt, text + da
        dt, da = splitter.finish()
        thinking, text = thinking + dt, text + da
        assert text == "über café" == splitter.answer
        assert thinking == "Let me think about it" == splitter.thinking
        assert splitter.thinking_tokens == len(thought)
        assert splitter.answer_tokens == len(answer)
    # the detokenizer alone would print the markers
    raw = pair.tokenizer.detokenizer
    for t in stream:
        raw.add_token(t)
    raw.finalize()
    assert "<|channel>" in raw.text and "<turn|>" in raw.text


def test_splitter_unclosed_channel_and_strip_channels(pair):
    splitter = ChannelSplitter(pair.tokenizer)
    splitter.feed([tc.CHANNEL_OPEN_ID, *ids(pair, "thought\nThe answer is four.")])
    splitter.finish()
    assert splitter.answer == "" and splitter.thinking == "The answer is four."
    o, c = tc.CHANNEL_OPEN_ID, tc.CHANNEL_CLOSE_ID
    assert strip_channels([1, o, 2, 3, c, 4, o, 5], o, c) == [1, 4]
    assert strip_channels([1, 2], None, None) == [1, 2]


# ------------------------------------------------------------------------------------- session


def test_three_turn_chat_is_lossless_and_prefills_only_new_tokens(pair):
    _, with_mtp = chat(pair, Settings(max_tokens=24, mtp=True, draft_tokens=3))
    _, plain = chat(pair, Settings(max_tokens=24, mtp=False))
    assert [t.token_ids for t in with_mtp] == [t.token_ids for t in plain]
    assert with_mtp[-1].stats.drafted > 0  # MTP really drafted
    for turns in (with_mtp, plain):
        first, *later = turns
        assert first.stats.context_tokens == 0 and first.stats.prompt_tokens == len(first.prompt)
        for before, turn in zip(turns, later):
            st = turn.stats
            # the cache held the previous prompt and answer (all but its newest token) ...
            assert st.context_tokens == len(before.prompt) + len(before.token_ids) - 1
            assert turn.prompt[: len(before.prompt)] == before.prompt
            # ... so only the closing of that answer and the new user turn are prefilled
            assert st.prompt_tokens == len(turn.prompt) - st.context_tokens
            assert st.prompt_tokens < 45 < st.context_tokens
    # each answer is what plain decoding of the same whole prompt gives, from an empty cache
    for turn in with_mtp:
        fresh = [
            t for c in generate(pair, turn.prompt, max_tokens=24, mtp=False) for t in c.token_ids
        ]
        assert fresh == turn.token_ids


def test_messages_follow_the_chat_template(pair):
    session, turns = chat(pair, Settings(max_tokens=10), QUESTIONS[:2])
    assert [m["role"] for m in session.messages] == ["user", "assistant"] * 2
    assert session.messages[1]["content"] == turns[0].text.strip()
    rendered = pair.tokenizer.apply_chat_template(
        session.messages, tokenize=False, add_generation_prompt=False, enable_thinking=False
    )
    assert rendered.startswith("<bos><|turn>user\nHello there<turn|>\n<|turn>model\n")


def test_system_prompt_and_thinking_switch_reach_the_template(pair):
    session = Session(pair, Settings(max_tokens=4), system="Be brief.")
    turn = session.ask("Hello there")
    text = pair.tokenizer.decode(turn.prompt)
    assert text.startswith("<bos><|turn>system\nBe brief.<turn|>")
    assert text.endswith("<|turn>model\n<|channel>thought\n<channel|>")
    session.set_think(True)
    text = pair.tokenizer.decode(session.ask("Hello there").prompt)
    assert "<|think|>" in text and text.endswith("<|turn>model\n")


def fake_generate(token_ids):
    def fake(pair, prompt, **kw):
        stats = GenerationStats(prompt_tokens=len(prompt))
        stats.generated_tokens = len(token_ids)
        yield Chunk("", token_ids[:3], stats)
        yield Chunk("", token_ids[3:], stats, "stop")

    return fake


def test_thinking_is_kept_out_of_the_answer_and_the_next_prompt(pair, monkeypatch):
    thought = ids(pair, "thought\nLet me think about it")
    answer = ids(pair, "The answer is four.")
    out = [tc.CHANNEL_OPEN_ID, *thought, tc.CHANNEL_CLOSE_ID, *answer, tc.END_OF_TURN_ID]
    monkeypatch.setattr(session_module, "generate", fake_generate(out))
    session = Session(pair, Settings(max_tokens=50, think=True))
    turn = session.ask("What is 2+2?").run()
    assert turn.text == "The answer is four." and turn.thinking == "Let me think about it"
    assert turn.thinking_tokens == len(thought)
    assert session.messages[-1] == {"role": "assistant", "content": "The answer is four."}
    monkeypatch.undo()
    following = session.ask("And 3+3?")
    after = following.prompt[len(turn.prompt) :]
    # the answer's own tokens, then the template's end of turn; the thinking is gone
    assert after[: len(answer) + 2] == answer + ids(pair, "<turn|>\n")
    assert tc.CHANNEL_OPEN_ID not in after


def test_overflow_drops_the_oldest_turns_and_keeps_the_system_prompt(pair, monkeypatch):
    monkeypatch.setattr(pair.target.args, "max_position_embeddings", 150)
    session = Session(pair, Settings(max_tokens=16), system="Be brief.")
    dropped = []
    for q in QUESTIONS * 2:
        turn = session.ask(q)
        dropped.append(turn.dropped)
        turn.run()
        assert len(turn.prompt) + turn.max_tokens < 150
        assert pair.tokenizer.decode(turn.prompt).startswith("<bos><|turn>system\nBe brief.")
        assert session.messages[-2]["content"] == q
    assert sum(dropped) > 0 and dropped[0] == 0
    assert len(session.messages) < 2 * len(QUESTIONS) * 2
    with pytest.raises(GemmaChatError, match="context holds 150"):
        session.ask("the village " * 100)
    assert session.messages[-2]["content"] == QUESTIONS[-1]  # the conversation goes on


def test_stopping_an_answer_keeps_the_partial_answer_and_the_cache(pair):
    session = Session(pair, Settings(max_tokens=30))
    turn = session.ask(QUESTIONS[0])
    for _ in turn:
        if turn.token_ids:
            break
    turn.close()
    assert turn.finish_reason == "interrupted"
    assert 0 < len(turn.token_ids) < 30
    assert session.messages[-1]["content"] == turn.text.strip()
    nxt = session.ask(QUESTIONS[1]).run()
    assert 0 < nxt.stats.prompt_tokens < 45 and nxt.stats.context_tokens > 0
    fresh = [t for c in generate(pair, nxt.prompt, max_tokens=30, mtp=False) for t in c.token_ids]
    assert fresh == nxt.token_ids


def test_interrupt_inside_a_round_resets_the_cache(pair, monkeypatch):
    real = session_module.generate

    def interrupted(*args, **kw):
        for i, chunk in enumerate(real(*args, **kw)):
            if i == 2:
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(session_module, "generate", interrupted)
    session = Session(pair, Settings(max_tokens=30))
    turn = session.ask(QUESTIONS[0])
    with pytest.raises(KeyboardInterrupt):
        turn.run()
    assert turn.finish_reason == "interrupted" and session.context.tokens == []
    assert session.messages[-1]["content"] == turn.text.strip()
    monkeypatch.undo()
    nxt = session.ask(QUESTIONS[1]).run()
    assert nxt.stats.prompt_tokens == len(nxt.prompt)  # everything again, from a clean cache


def test_verify_greedy_and_sampled(pair):
    session, turns = chat(pair, Settings(max_tokens=20), QUESTIONS[:2])
    cached = list(session.context.tokens)
    result = session.verify()
    assert session.context.tokens == cached  # the replay has its own cache
    assert result.identical is True and result.tokens == len(turns[-1].token_ids)
    assert "identical" in result.message and "with MTP" in result.message
    # the conversation is undisturbed: the next answer is the one a session without /verify gives
    after = session.ask(QUESTIONS[2]).run()
    _, reference = chat(pair, Settings(max_tokens=20))
    assert after.token_ids == reference[2].token_ids
    sampled = Session(pair, Settings(max_tokens=8, temperature=0.8, seed=1))
    sampled.ask("Hello there").run()
    result = sampled.verify()
    assert result.identical is None and "distributed exactly" in result.message
    with pytest.raises(GemmaChatError, match="nothing to verify"):
        Session(pair).verify()


def test_mtp_settings(pair):
    session = Session(pair, Settings(max_tokens=6))
    assert session.mtp_on and session.mtp_state().startswith("MTP on, K auto")
    assert session.set_mtp("0") == "MTP parked (K = 0)"
    assert session.set_mtp("off") == "MTP off" and not session.mtp_on
    assert session.set_mtp("5") == "MTP on, K = 5" and session.mtp_on
    for bad in ("fast", "-1", "99"):
        with pytest.raises(GemmaChatError):
            session.set_mtp(bad)
    session.set_mtp("0")
    parked = session.ask("Hello there").run()
    assert parked.stats.drafted == 0 and parked.draft_now == 0
    session.set_mtp("2")
    fixed = session.ask("Hello there").run()
    assert fixed.draft_now == 2 and fixed.stats.drafted > 0
    session.set_mtp("auto")
    auto = session.ask("Hello there").run()
    assert auto.used_mtp and auto.settings.draft_tokens is None and auto.draft_now is not None
    session.set_mtp("off")
    assert session.ask("Hello there").run().draft_now is None


def test_save_and_load_resume_with_the_kv_cache(pair, tmp_path):
    session = Session(pair, Settings(max_tokens=8), system="Be brief.")
    for q in QUESTIONS[:2]:
        session.ask(q).run()
    saved = session.save(tmp_path / "chat.json")
    kv = tmp_path / "chat.json.kv.safetensors"
    assert saved.path == tmp_path / "chat.json" and saved.messages == 4
    assert saved.cached_tokens == len(session.context.tokens) > 0
    for f in (saved.path, kv):
        assert stat.S_IMODE(f.stat().st_mode) == 0o600
    data = json.loads(saved.path.read_text())
    assert data["format"] == "gemma-chat.session" and data["system"] == "Be brief."
    assert data["messages"] == session.messages and data["think"] is False
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chat.json", kv.name]  # no temporary

    other = Session(pair, Settings(max_tokens=8))
    loaded = other.load(saved.path)
    assert (loaded.messages, loaded.cached_tokens, loaded.refused) == (4, saved.cached_tokens, None)
    assert other.messages == session.messages and other.system == "Be brief."
    resumed, uninterrupted = other.ask(QUESTIONS[2]).run(), session.ask(QUESTIONS[2]).run()
    assert resumed.token_ids == uninterrupted.token_ids
    assert resumed.stats.context_tokens == saved.cached_tokens
    assert resumed.stats.prompt_tokens == uninterrupted.stats.prompt_tokens < 45

    # an existing file is replaced, still private; without a cache, a stale one goes
    saved.path.chmod(0o644)
    session.reset()
    assert session.save(saved.path).cached_tokens == 0
    assert stat.S_IMODE(saved.path.stat().st_mode) == 0o600 and not kv.exists()
    assert other.load(saved.path) == session_module.Loaded(0, 0, None)


def test_a_save_cleans_the_temporaries_of_killed_saves(pair, tmp_path):
    session, _ = chat(pair, Settings(max_tokens=4), QUESTIONS[:1])
    killed = [  # as mkstemp names them: 8 random characters
        tmp_path / ".chat.json.k1ll3d_x.tmp",
        tmp_path / ".chat.json.kv.safetensors.a1b2c3d4.tmp",
    ]
    others = [tmp_path / ".chat.json.not-ours.tmp", tmp_path / ".other.json.abcdefgh.tmp"]
    for f in killed + others:
        f.write_text("half a file")
    session.save(tmp_path / "chat.json")
    assert not any(f.exists() for f in killed) and all(f.exists() for f in others)
    assert session.load(tmp_path / "chat.json").cached_tokens > 0


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not JSON"),
        ('{"messages": [{"role": "robot", "content": "x"}]}', "role 'robot'"),
        (
            '{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
            "message 1 is a second user turn in a row",
        ),
        ('{"messages": [{"role": "assistant", "content": "a"}]}', "message 0 is a second"),
        ('{"messages": [{"role": "user", "content": "a"}]}', "has no answer"),
        ('{"think": "yes", "messages": []}', "think is 'yes', not true or false"),
        ('{"messages": [{"role": "user", "content": "\\udcff"}]}', "not valid Unicode"),
        ('{"version": 2, "messages": []}', "version 2"),
        ('{"messages": [{"role": "user"}]}', "no text content"),
        ("[1, 2]", "no message list"),
        ('{"format": "other", "messages": []}', "format"),
        (b"\xff\xfe\x00", "not JSON"),
    ],
)
def test_load_rejects_a_corrupt_session(pair, tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    session, _ = chat(pair, Settings(max_tokens=4), QUESTIONS[:1])
    messages, cached = list(session.messages), list(session.context.tokens)
    with pytest.raises(GemmaChatError, match=match):
        session.load(path)
    assert session.messages == messages and session.context.tokens == cached  # nothing lost


def test_save_to_an_unwritable_place(pair, tmp_path):
    session, _ = chat(pair, Settings(max_tokens=4), QUESTIONS[:1])
    with pytest.raises(GemmaChatError, match="cannot write"):
        session.save(tmp_path / "missing" / "chat.json")
    with pytest.raises(GemmaChatError, match="cannot write .* folder"):
        session.save(tmp_path)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(GemmaChatError, match="no session file"):
        session.load(tmp_path / "nothing.json")


# ---------------------------------------------------------------------------------------- view


def test_stable_prefix_only_takes_finished_blocks():
    assert stable_prefix("Hello wor") == 0
    assert stable_prefix("Para one.\n\nPara") == 0  # the next block's first line is unfinished
    assert stable_prefix("Para one.\n\nPara two.\n") == len("Para one.\n\n")
    # a list stays open while items may follow; a closed code fence is final
    assert stable_prefix("Intro\n\n- a\n- b\n\n- c\n") == 0
    code = "```python\nx = 1\n\ny = 2\n```\n"
    assert stable_prefix(code[:-5]) == 0
    assert stable_prefix(code) == len(code)
    assert stable_prefix("Text\n```py\nx\n") == len("Text\n")


def test_meter_shows_measured_figures_only():
    stats = GenerationStats(
        decoded_tokens=40, decode_seconds=2.0, rounds=20, drafted=60, accepted=30
    )
    line = meter_text(stats, mtp=True, draft=3, context_used=1234, context_limit=131072).plain
    assert "20.0 tok/s" in line and "measuring baseline…" in line and "×" not in line
    assert "accepted 50%" in line and "2.00 tok/forward" in line and "draft K=3" in line
    assert "context 1,234/131,072" in line
    stats.baseline_steps, stats.baseline_seconds = 3, 0.3
    line = meter_text(
        stats, mtp=True, draft=0, auto=True, context_used=1, context_limit=2, thinking_tokens=7
    ).plain
    assert "baseline 10.0 tok/s measured" in line and "2.00×" in line
    assert "drafting parked" in line and "thinking 7 tok" in line
    earlier = GenerationStats(decoded_tokens=10, decode_seconds=1.0, earlier_baseline_seconds=0.2)
    line = meter_text(earlier, mtp=True, draft=None, context_used=1, context_limit=2).plain
    assert "baseline 5.0 tok/s measured earlier" in line and "draft K=auto" in line
    assert "2.00×" in line
    line = meter_text(stats, mtp=True, draft=4, auto=True, context_used=1, context_limit=2).plain
    assert "draft K=4 (auto)" in line
    line = meter_text(stats, mtp=False, draft=None, context_used=1, context_limit=2).plain
    assert "MTP off" in line and "baseline" not in line
    assert meter_text(None, mtp=True, draft=3, context_used=0, context_limit=2).plain.startswith(
        "prefilling"
    )


def stream(view: AnswerView, text: str, thinking: str = "", step: int = 5):
    with view:
        for i in range(0, len(thinking), step):
            view.update(thinking[i : i + step], "", None)
        for i in range(0, len(text), step):
            view.update("", text[i : i + step], None)
        view.finish(None, note="done")


ANSWER = "Some **bold** text.\n\n```python\ndef add(a, b):\n    return a + b\n```\n\n- one\n- two\n\nThe end."


def test_view_on_a_terminal_renders_markdown_with_the_meter():
    console = Console(record=True, force_terminal=True, width=70, height=12, file=io.StringIO())
    view = AnswerView(
        console,
        meter=lambda stats: meter_text(stats, mtp=True, draft=3, context_used=5, context_limit=9),
        fps=1e9,
    )
    stream(view, ANSWER, thinking="weighing options\nstill thinking")
    out = console.file.getvalue()
    assert "\x1b[" in out  # styled, live
    text = console.export_text()
    # rendered, not raw Markdown (frames of an unfinished block may show an unclosed `**`)
    assert "**bold**" not in text and "```" not in text and "Some bold text." in text
    assert "def add(a, b):" in text and "• one" in text and "The end." in text
    assert "weighing options" in text and "still thinking" in text and "thinking" in text
    assert "<|channel>" not in text and "done" in text and "context 5/9" in text


def test_view_in_a_pipe_is_plain_text():
    out, err = io.StringIO(), io.StringIO()
    view = AnswerView(
        Console(file=out, width=70), err=Console(file=err, width=70), meter=lambda s: "meter"
    )
    stream(view, ANSWER, thinking="hmm")
    assert out.getvalue() == ANSWER + "\n"  # exactly the answer, no escapes, no meter
    assert "hmm" in err.getvalue() and "\x1b" not in err.getvalue()


# ---------------------------------------------------------------------------------------- REPL


def test_slash_completion():
    completer = SlashCompleter()

    def complete(text):
        return [c.text for c in completer.get_completions(Document(text), CompleteEvent())]

    assert complete("/he") == ["/help"]
    assert set(complete("/")) >= {
        "/help",
        "/reset",
        "/system",
        "/mtp",
        "/stats",
        "/save",
        "/load",
        "/verify",
        "/think",
        "/quit",
    }
    assert complete("/mtp o") == ["on", "off"]
    assert complete("/think of") == ["off"]
    assert complete("hello /he") == []


def run(pair, keys: str, settings: Settings | None = None, width: int = 240):
    session = Session(pair, settings or Settings(max_tokens=12), model_name="tiny")
    console = Console(record=True, force_terminal=True, width=width, height=40, file=io.StringIO())
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        code = run_repl(
            session, console, input=pipe, output=DummyOutput(), history=InMemoryHistory()
        )
    return code, session, console.export_text()


def test_repl_chat_commands_and_keys(pair, tmp_path):
    saved = tmp_path / "s.json"
    keys = (
        "Hello there\r"  # Enter sends
        "line one\x1b\rline two\r"  # Esc-Enter adds a line
        "\x1b[200~pasted a\npasted b\x1b[201~\r"  # a bracketed paste keeps its lines
        "/stats\r/verify\r/mtp 0\r/mtp\r/think on\r/system Be brief.\r/system\r"
        "/frobnicate\r"  # unknown: a message, the session goes on
        f"/save {tmp_path / 'no' / 'such.json'}\r/save {saved}\r/load {tmp_path / 'nothing.json'}\r"
        "typed then cleared\x03"  # Ctrl-C at the prompt clears the line
        "\x04"  # Ctrl-D quits
    )
    code, session, out = run(pair, keys)
    assert code == 0
    users = [m["content"] for m in session.messages if m["role"] == "user"]
    assert users == ["Hello there", "line one\nline two", "pasted a\npasted b"]
    assert "gemma-chat · tiny · MTP on" in out
    assert "prefilled" in out and "acceptance" in out  # /stats
    assert "identical: all" in out  # /verify
    assert "MTP parked (K = 0)" in out and "thinking on" in out
    assert "system prompt set" in out and "system prompt: Be brief." in out
    assert "unknown command /frobnicate" in out
    assert "cannot write" in out and f"saved 6 messages to {saved}" in out
    assert "no session file" in out
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    assert "typed then cleared" not in users
    assert session.settings.think and session.settings.draft_tokens == 0


def test_repl_load_quit_and_errors(pair, tmp_path):
    path = tmp_path / "c.json"
    path.write_text(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "yo"},
                ]
            }
        )
    )
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    code, session, out = run(
        pair, f"/load {bad}\r/load {path}\r/verify\r//slash text\r/reset\r/quit\r"
    )
    assert code == 0
    assert "not a gemma-chat session" in out and "loaded 2 messages" in out
    assert "nothing to verify" in out
    assert session.messages == []  # /reset after the slash message
    code, session, out = run(pair, "Hello there\r/exit\r")
    assert len(session.messages) == 2


def test_repl_over_long_message_and_overflow(pair, monkeypatch):
    monkeypatch.setattr(pair.target.args, "max_position_embeddings", 120)
    keys = (
        "Hello there\rWhat is the capital of France?\rWrite a haiku about the ocean.\r"
        + "the village " * 60
        + "\r\x04"
    )
    code, session, out = run(pair, keys, Settings(max_tokens=16))
    assert code == 0
    assert "dropped the" in out and "oldest exchange" in out
    assert "error:" in out and "context holds 120" in out
    assert session.messages[-2]["content"] == "Write a haiku about the ocean."


def test_repl_ctrl_c_during_an_answer_keeps_the_conversation(pair, monkeypatch):
    real = AnswerView.update
    calls = []

    def update(self, thinking, text, stats):
        calls.append(1)
        real(self, thinking, text, stats)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(AnswerView, "update", update)
    code, session, out = run(
        pair, "Hello there\rWhat is the capital of France?\r\x04", Settings(max_tokens=30)
    )
    assert code == 0
    assert "stopped; the partial answer stays in the conversation" in out
    first, second = session.messages[1], session.messages[3]
    assert first["role"] == second["role"] == "assistant"
    assert session.last.finish_reason in ("length", "stop")  # the second answer ran to its end


def test_repl_stop_request_between_chunks(pair, monkeypatch):
    """The first Ctrl-C during an answer only asks it to stop at the next chunk."""

    class Requested:  # set from the second look on: after the prefill, by the first chunk
        looks = 0

        def is_set(self):
            self.looks += 1
            return self.looks > 1

    class Fake:
        def __init__(self, at_once=False):
            assert not at_once  # a local answer stops where its cache is consistent

        def __enter__(self):
            return Requested()

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(repl_module, "sigint_as_request", Fake)
    code, session, out = run(pair, "Hello there\r\x04", Settings(max_tokens=30))
    assert session.last.finish_reason == "interrupted" and 0 < len(session.last.token_ids) < 30
    assert len(session.context.tokens) > 0  # stopped between chunks: the cache is kept


def test_repl_ctrl_c_during_the_prefill_stops_it_within_a_chunk(pair, monkeypatch):
    """One real Ctrl-C (SIGINT) while the model runs the first chunk of a long message: the
    prefill stops at the end of that chunk, nothing of the answer is kept, the meter goes, and
    the conversation goes on."""
    monkeypatch.setattr(context_module, "PREFILL_CHUNK", 16)
    model = type(pair.target.model)
    forward, forwards = model.__call__, []

    def interrupted_once(self, *args, **kw):
        forwards.append(1)
        if len(forwards) == 1:
            signal.raise_signal(signal.SIGINT)
        return forward(self, *args, **kw)

    monkeypatch.setattr(model, "__call__", interrupted_once)
    long_message = "the village " * 20  # 4 chunks of 16 with the template
    code, session, out = run(pair, f"{long_message}\r\x04", Settings(max_tokens=8))
    assert code == 0 and len(forwards) == 1  # one chunk ran
    assert session.messages == [] and session.last is None  # nothing of it kept
    assert "prefilling" not in out[out.index("stopped") :]  # no stale meter
    monkeypatch.undo()
    after = session.ask("Hello there").run()
    assert after.stats.context_tokens == 16  # the chunk it ran, kept and consistent
    assert after.token_ids == chat(pair, Settings(max_tokens=8), ["Hello there"])[1][0].token_ids


def test_history_file_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("GEMMA_CHAT_STATE_DIR", str(tmp_path / "state"))
    assert state_dir() == tmp_path / "state"
    history, problem = open_history()
    assert problem is None
    history.store_string("hello")
    assert stat.S_IMODE((tmp_path / "state").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "state" / "history").stat().st_mode) == 0o600
    assert "hello" in (tmp_path / "state" / "history").read_text()
    monkeypatch.delenv("GEMMA_CHAT_STATE_DIR")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir() == tmp_path / "xdg" / "gemma-chat"
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        monkeypatch.setenv("GEMMA_CHAT_STATE_DIR", str(tmp_path / "ro" / "state"))
        history, problem = open_history()
        assert "not kept" in problem


def test_repl_shows_thinking_dimmed_without_markers(pair, monkeypatch):
    thought = ids(pair, "thought\nLet me think about it")
    answer = ids(pair, "The answer is four.")
    out = [tc.CHANNEL_OPEN_ID, *thought, tc.CHANNEL_CLOSE_ID, *answer, tc.END_OF_TURN_ID]
    monkeypatch.setattr(session_module, "generate", fake_generate(out))
    code, session, text = run(pair, "/think on\rWhat is 2+2?\r\x04")
    assert "Let me think about it" in text and "The answer is four." in text
    assert f"thinking {len(thought)} tok" in text
    assert "<|channel>" not in text and "<channel|>" not in text and "thought\n" not in text
    assert session.messages[-1]["content"] == "The answer is four."


def test_repl_ctrl_c_in_a_command_keeps_the_session(pair, monkeypatch):
    def verify(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Session, "verify", verify)
    code, session, text = run(pair, "/verify\r/mtp\r\x04")
    assert code == 0 and "stopped" in text and "MTP on, K auto" in text
