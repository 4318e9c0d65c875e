"""`gemma-chat` through typer's CliRunner: one-shots, scripted chats, JSON, errors, exit codes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fixtures import tiny_checkpoints as tc
from gemma_mtp_mlx import __version__
from gemma_mtp_mlx.chat import session as session_module
from gemma_mtp_mlx.cli import app, stderr_console, stdout_console
from gemma_mtp_mlx.loading import load_tokenizer
from tests.test_chat import build_tiny

STATS_KEYS = {
    "prompt_tokens",
    "context_tokens",
    "generated_tokens",
    "rounds",
    "drafted",
    "accepted",
    "acceptance_rate",
    "mean_accepted_length",
    "tokens_per_second",
    "baseline_tokens_per_second",
    "speedup",
    "peak_memory_bytes",
}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory)


@pytest.fixture(scope="session")
def short_context(tiny, tmp_path_factory) -> Path:
    """The tiny target with a 120-token context (and its drafter)."""
    out = tmp_path_factory.mktemp("short") / "target"
    shutil.copytree(tiny, out)
    config = json.loads((out / "config.json").read_text())
    config["max_position_embeddings"] = 120
    (out / "config.json").write_text(json.dumps(config))
    return out


def gemma(*args: str, input: str | None = None, env: dict | None = None):
    return CliRunner().invoke(app, list(args), input=input, env=env)


def test_one_shot_answer_on_stdout_stats_on_stderr(tiny):
    r = gemma("--model", str(tiny), "--prompt", "Hello there", "-n", "12")
    assert r.exit_code == 0, r.output
    assert r.stdout.endswith("\n") and len(r.stdout.strip()) > 0
    assert "\x1b" not in r.stdout and "<|channel>" not in r.stdout and "<turn|>" not in r.stdout
    summary = r.stderr.strip().splitlines()[-1]
    assert "12 tokens" in summary and "tok/s" in summary and "prompt 26 tokens" in summary
    plain = gemma("--model", str(tiny), "--prompt", "Hello there", "-n", "12", "--no-mtp")
    assert plain.stdout == r.stdout and "MTP off" in plain.stderr


def test_one_shot_json_and_stdin(tiny):
    r = gemma("-m", str(tiny), "-p", "-", "-n", "10", "--json", input="Hello there\n")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert set(data) >= {"text", "token_ids", "stats", "finish_reason"}
    assert STATS_KEYS <= set(data["stats"]) and "thinking_tokens" in data["stats"]
    assert len(data["token_ids"]) == data["stats"]["generated_tokens"] == 10
    assert data["stats"]["context_tokens"] == 0 and data["stats"]["prompt_tokens"] == 26
    raw = gemma("-m", str(tiny), "-p", "The quick brown fox", "-n", "5", "--raw", "--json")
    assert raw.exit_code == 0, raw.output
    expected = load_tokenizer(tiny).encode("The quick brown fox")  # <bos> + text, no template
    assert expected[0] == tc.BOS_ID
    assert json.loads(raw.stdout)["stats"]["prompt_tokens"] == len(expected)


def test_scripted_chat_json_lines_carry_the_cache(tiny):
    lines = "Hello there\n\nWhat is the capital of France?\nWrite a haiku about the ocean.\n"
    r = gemma("-m", str(tiny), "-n", "16", "--json", input=lines)
    assert r.exit_code == 0, r.output
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(answers) == 3
    first, *later = answers
    assert first["stats"]["context_tokens"] == 0
    for a in later:
        assert a["stats"]["context_tokens"] > 0 and 0 < a["stats"]["prompt_tokens"] < 45
    plain = gemma("-m", str(tiny), "-n", "16", "--json", "--no-mtp", input=lines)
    assert [json.loads(x)["token_ids"] for x in plain.stdout.splitlines()] == [
        a["token_ids"] for a in answers
    ]


def test_scripted_chat_plain_text(tiny):
    r = gemma("-m", str(tiny), "-n", "8", input="Hello there\nWhat is 2+2?\n")
    assert r.exit_code == 0, r.output
    one = gemma("-m", str(tiny), "-n", "8", "-p", "Hello there").stdout
    assert r.stdout.startswith(one + "\n")  # answers separated by a blank line
    assert len(r.stderr.strip().splitlines()) == 2  # a stats line per answer


def test_scripted_chat_overflow_and_over_long_line(short_context):
    lines = (
        "Hello there\nWhat is the capital of France?\n" + "the village " * 60 + "\nWrite a haiku.\n"
    )
    r = gemma("-m", str(short_context), "-n", "16", "--json", input=lines)
    assert r.exit_code == 1  # one turn failed; the others ran
    assert len(r.stdout.splitlines()) == 3
    assert "dropped the" in r.stderr and "error: this message takes" in r.stderr


def test_over_long_prompt(short_context):
    r = gemma("-m", str(short_context), "-p", "the village " * 60)
    assert r.exit_code == 1 and r.stdout == ""
    assert r.stderr.startswith("error: this message takes") and "context holds 120" in r.stderr
    assert "Traceback" not in r.stderr


def fail(*args: str, env: dict | None = None) -> str:
    r = gemma(*args, env=env)
    assert r.exit_code == 1, r.output
    assert r.stdout == "" and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    return lines[0]


def test_missing_model_offline(tmp_path):
    env = {
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf"),
        "HF_HUB_CACHE": str(tmp_path / "hf" / "hub"),
    }
    line = fail("-m", "e4b", "-p", "hi", env=env)
    assert "mlx-community/gemma-4-e4b-it-4bit" in line and "offline" in line
    line = fail("-m", "e4b", "--precision", "bf16", "-p", "hi", env=env)
    assert "google/gemma-4-E4B-it is not in the local cache" in line
    assert "unknown model" in fail("-m", "./no/such/folder", "-p", "hi")


def test_drafter_that_does_not_fit(tiny, tmp_path):
    bad = shutil.copytree(tiny / "assistant", tmp_path / "bad-assistant")
    config = json.loads((bad / "config.json").read_text())
    config["backbone_hidden_size"] = 128
    (bad / "config.json").write_text(json.dumps(config))
    line = fail("-m", str(tiny), "--drafter", str(bad), "-p", "hi")
    assert "does not fit the target" in line
    assert "not a Gemma 4 MTP assistant" in fail(
        "-m", str(tiny), "--drafter", str(tiny), "-p", "hi"
    )


def test_broken_weights(tiny, tmp_path):
    broken = shutil.copytree(tiny, tmp_path / "broken", ignore=shutil.ignore_patterns("assistant"))
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert "cannot read model.safetensors" in fail("-m", str(broken), "-p", "hi")
    r = gemma("-m", str(broken), "-p", "hi", "--debug")
    assert r.exit_code == 1 and "Traceback" in r.stderr


def test_usage_errors_version_and_flags():
    assert gemma("--temp", "-1", "-p", "x").exit_code == 2
    assert gemma("--no-such-flag").exit_code == 2
    r = gemma("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"gemma-chat {__version__}"
    help_text = gemma("--help").stdout
    for flag in (
        "--prompt",
        "--model",
        "--drafter",
        "--no-mtp",
        "--max-tokens",
        "--temp",
        "--top-p",
        "--top-k",
        "--seed",
        "--draft-tokens",
        "--system",
        "--think",
        "--no-think",
        "--raw",
        "--ignore-eos",
        "--json",
        "--debug",
        "--version",
        "--precision",
        "--max-memory",
    ):
        assert flag in help_text
    assert "--raw needs --prompt" in fail("--raw")


def test_empty_prompt(tiny):
    assert "empty" in fail("-m", str(tiny), "-p", "  ")


def test_keyboard_interrupt_exits_130(tiny, monkeypatch):
    def interrupted(*args, **kw):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(session_module, "generate", interrupted)
    r = gemma("-m", str(tiny), "-p", "Hello there")
    assert r.exit_code == 130 and r.stderr.strip() == "interrupted"


def test_no_color(monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert stdout_console().no_color and stderr_console().no_color


def test_closed_pipe_ends_quietly(tiny):
    code = "from gemma_mtp_mlx.cli import main; main()"
    args = [sys.executable, "-c", code, "-m", str(tiny), "-p", "Hello", "-n", "400", "--ignore-eos"]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=Path(__file__).parent.parent
    )
    proc.stdout.read(1)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err and "error" not in err


def test_thinking_is_reported_apart(tiny, monkeypatch):
    from tests.test_chat import fake_generate

    tok = load_tokenizer(tiny)
    thought = tok.encode("thought\nLet me think about it", add_special_tokens=False)
    answer = tok.encode("The answer is four.", add_special_tokens=False)
    out = [tc.CHANNEL_OPEN_ID, *thought, tc.CHANNEL_CLOSE_ID, *answer, tc.END_OF_TURN_ID]
    monkeypatch.setattr(session_module, "generate", fake_generate(out))
    r = gemma("-m", str(tiny), "-p", "What is 2+2?", "--think", "--json")
    data = json.loads(r.stdout)
    assert data["text"] == "The answer is four." and data["thinking"] == "Let me think about it"
    assert data["stats"]["thinking_tokens"] == len(thought)
    r = gemma("-m", str(tiny), "-p", "What is 2+2?", "--think")
    assert r.stdout == "The answer is four.\n"  # the thinking goes to stderr, never stdout
    assert "Let me think about it" in r.stderr and "<|channel>" not in r.stderr


def test_prompt_file_batches_answer_each_line_like_its_own_prompt(tiny, tmp_path):
    prompts = ["Hello there", "What is the capital of France?", "Write a haiku about the ocean."]
    path = tmp_path / "prompts.txt"
    path.write_text(prompts[0] + "\n\n" + "\n".join(prompts[1:]) + "\n")  # blank lines are skipped
    singles = [
        json.loads(gemma("-m", str(tiny), "-p", p, "-n", "12", "--json").stdout)["token_ids"]
        for p in prompts
    ]
    r = gemma("-m", str(tiny), "--prompt-file", str(path), "--batch", "2", "-n", "12", "--json")
    assert r.exit_code == 0, r.output
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    assert [a["index"] for a in answers] == [0, 1, 2]
    assert [a["token_ids"] for a in answers] == singles
    assert "3 answers" in r.stderr and "batch 2" in r.stderr
    text = gemma("-m", str(tiny), "--prompt-file", "-", "-b", "3", "-n", "12", input=path.read_text())
    assert text.exit_code == 0, text.output
    lines = text.stdout.split("\n")
    assert len(lines) == 4 and lines[-1] == ""  # one line per answer
    first = gemma("-m", str(tiny), "-p", prompts[0], "-n", "12").stdout
    assert lines[0] == first.rstrip("\n").replace("\\", "\\\\").replace("\n", "\\n")


def test_prompt_file_with_an_over_long_line_answers_the_rest(short_context, tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("Hello there\n" + "the village " * 60 + "\nWrite a haiku.\n")
    r = gemma("-m", str(short_context), "--prompt-file", str(path), "-b", "2", "-n", "8", "--json")
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    assert [a["index"] for a in answers] == [0, 1, 2]
    assert "error" in answers[1] and "token_ids" in answers[0] and "token_ids" in answers[2]
    assert "error: prompt 2 is" in r.stderr


def test_prompt_file_usage_errors(tiny, tmp_path):
    assert "--batch needs --prompt-file" in fail("-m", str(tiny), "--batch", "2", "-p", "hi")
    assert "cannot be combined" in fail("-m", str(tiny), "-p", "hi", "--prompt-file", "x")
    assert "cannot read prompts" in fail("-m", str(tiny), "--prompt-file", str(tmp_path / "none.txt"))
    (tmp_path / "empty.txt").write_text("\n \n")
    assert "no prompts" in fail("-m", str(tiny), "--prompt-file", str(tmp_path / "empty.txt"))


def test_invalid_utf8_on_stdin_becomes_replacement_characters():
    """A line with bytes that are not UTF-8 is answered with U+FFFD in their place, said once;
    the turns around it run (it used to end the chat with a TypeError from the tokenizer)."""
    data = b"To be or not to be\nhello \xff world \xfe\nGood night sweet prince\n"
    r = gemma("-m", "demo", "-n", "8", "--json", input=data)
    assert r.exit_code == 0 and "Traceback" not in r.stderr, r.output
    assert [line for line in r.stderr.splitlines() if "UTF-8" in line] == [
        "note: the input is not valid UTF-8; its undecodable bytes became U+FFFD"
    ]
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    decoded = "To be or not to be\nhello \ufffd world \ufffd\nGood night sweet prince\n"
    replaced = gemma("-m", "demo", "-n", "8", "--json", input=decoded).stdout.splitlines()
    assert [a["token_ids"] for a in answers] == [json.loads(x)["token_ids"] for x in replaced]
    r = gemma("-m", "demo", "-n", "8", "-p", "-", input=b"hello \xff world\n")
    assert r.exit_code == 0 and r.stdout.strip(), r.output
    assert r.stderr.startswith("note: the input is not valid UTF-8")


def test_a_large_max_tokens_keeps_the_history():
    """An answer budget larger than the room left does not evict history: the answer gets the
    room that is left (issue 18: -n 4050 on the demo's 4096 dropped the first exchange)."""
    lines = "To be or not to be\nWhat did I just say?\n"
    r = gemma("-m", "demo", "-n", "4050", "--json", input=lines)
    assert r.exit_code == 0, r.output
    first, second = [json.loads(line) for line in r.stdout.splitlines()]
    assert "dropped" not in r.stderr
    held = first["stats"]["prompt_tokens"] + len(first["token_ids"]) - 1
    assert second["stats"]["context_tokens"] == held  # the first exchange is still there
    assert second["stats"]["prompt_tokens"] < 30


def test_an_answer_capped_by_the_context_says_so(short_context):
    r = gemma("-m", str(short_context), "-p", "Hello there", "-n", "100", "--ignore-eos", "--json")
    assert r.exit_code == 0, r.output
    answer = json.loads(r.stdout)
    room = 120 - 1 - answer["stats"]["prompt_tokens"]
    assert len(answer["token_ids"]) == room < 100 and answer["finish_reason"] == "length"
    assert r.stderr.splitlines()[0] == (
        f"note: the answer stopped at {room} tokens, where the context is full (--max-tokens 100)"
    )


def test_scripted_chats_take_the_commands_that_need_no_terminal(tiny, tmp_path):
    saved = tmp_path / "chat.json"
    chat = "Hello there\n/system Be brief.\n/think on\n/mtp 0\n//slash text\n"
    script = chat + f"/save {saved}\n/reset\n/load {saved}\nWhat is 2+2?\n/stats\n/verify\n"
    r = gemma("-m", str(tiny), "-n", "8", "--json", input=script)
    assert r.exit_code == 1, r.output  # /stats and /verify need the interactive chat ...
    answers = [json.loads(line) for line in r.stdout.splitlines()]
    assert len(answers) == 3  # ... the other lines ran
    cached = answers[2]["stats"]["context_tokens"]  # where the reloaded chat started from
    scripted_only = "(they take /reset, /system, /mtp, /think, /save, /save!, /load, /image; //text sends /text)"
    assert r.stderr.splitlines() == [
        "system prompt set",
        "thinking on",
        "MTP parked (K = 0)",
        f"saved 4 messages to {saved} (and its KV cache, {cached} tokens, beside it)",
        "new conversation",
        f"loaded 4 messages and their KV cache ({cached} tokens)",
        f"error: /stats is not a command of scripted chats {scripted_only}",
        f"error: /verify is not a command of scripted chats {scripted_only}",
    ]
    saved_chat = json.loads(saved.read_text())
    assert saved_chat["system"] == "Be brief." and saved_chat["think"] is True
    assert saved_chat["messages"][2]["content"] == "/slash text"
    assert answers[1]["stats"]["drafted"] == 0  # /mtp 0 parked drafting
    # the reloaded chat answers as the chat that was never saved, from the cache it saved
    r = gemma("-m", str(tiny), "-n", "8", "--json", input=chat + "What is 2+2?\n")
    expected = [json.loads(line) for line in r.stdout.splitlines()]
    assert [a["token_ids"] for a in answers] == [a["token_ids"] for a in expected]
    assert answers[2]["stats"]["prompt_tokens"] == expected[2]["stats"]["prompt_tokens"]
    assert 0 < cached <= expected[2]["stats"]["context_tokens"]


def test_resume_needs_a_session_file_and_a_chat(tiny, tmp_path):
    missing = str(tmp_path / "none.json")
    assert "no session file at" in fail("-m", str(tiny), "--resume", missing, "-p", "hi")
    line = fail("-m", str(tiny), "--resume", missing, "--prompt-file", missing)
    assert "--resume continues a chat" in line
