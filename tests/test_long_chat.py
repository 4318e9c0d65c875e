"""Long conversations (issue 16) through the real CLI, on a tiny checkpoint whose answers hold
thought channels (fixtures.tiny_checkpoints.make_thinking_target): 40 turns with thinking on,
far past the sliding window, each prefilling only its new tokens; the chat saved after 20
turns and resumed in a new process; saved caches that must be refused.

The chats here run with a slack of 8 instead of 64 (as the fixtures have a window of 8 instead
of 512): a ring then rolls back at most 7 tokens, so every 16-token answer whose thought opens
in its first 8 tokens makes the next turn roll back past the slack, onto the snapshot."""

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import pytest
from typer.testing import CliRunner

from fixtures import tiny_checkpoints as tc
from gemma_mtp_mlx import load
from gemma_mtp_mlx.chat import session as session_module
from gemma_mtp_mlx.chat.session import Session, Settings
from gemma_mtp_mlx.chat.thinking import strip_channels
from gemma_mtp_mlx.cli import app

SLACK = 8
WORDS = [
    "hello there",
    "what is the capital of France?",
    "write a haiku",
    "two plus two",
    "the village",
    "tell me about the river",
    "who baked the bread?",
    "Monday morning",
    "the quick brown fox",
    "summarize the meeting",
]
LINES = [f"Turn {i}: {WORDS[i % len(WORDS)]}" for i in range(40)]
CHAT = ["--think", "-n", "16", "-k", "2", "--json"]
# Run the CLI in a new process with the same small slack.
MAIN = (
    f"from gemma_mtp_mlx.chat import session; session.DEFAULT_SLACK = {SLACK}; "
    "from gemma_mtp_mlx.cli import main; main()"
)


@pytest.fixture(scope="module")
def small_slack():
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(session_module, "DEFAULT_SLACK", SLACK)
        yield


@pytest.fixture(scope="module")
def thinker(tmp_path_factory) -> Path:
    return tc.make_thinking_target(tmp_path_factory.mktemp("thinker") / "target")


@dataclass
class LongChat:
    answers: list[dict]
    saved: Path  # the /save after 20 turns


@pytest.fixture(scope="module")
def long_chat(thinker, small_slack, tmp_path_factory) -> LongChat:
    """40 turns with MTP (2 drafts per round) in one scripted chat, saved after the 20th."""
    saved = tmp_path_factory.mktemp("saved") / "chat.json"
    script = "\n".join(LINES[:20] + [f"/save {saved}"] + LINES[20:]) + "\n"
    r = CliRunner().invoke(app, ["-m", str(thinker), *CHAT], input=script)
    assert r.exit_code == 0, r.output
    assert f"saved 40 messages to {saved} (and its KV cache" in r.stderr
    return LongChat([json.loads(line) for line in r.stdout.splitlines()], saved)


@pytest.fixture(scope="module")
def from_scratch(thinker, small_slack) -> list:
    """The same chat without MTP, its context emptied before every turn: each prompt is
    prefilled whole."""
    session = Session(load(str(thinker)), Settings(max_tokens=16, think=True, mtp=False))
    turns = []
    for line in LINES:
        session.context.reset()
        turns.append(session.ask(line).run())
    return turns


def test_forty_thinking_turns_prefill_only_their_new_tokens(thinker, long_chat, from_scratch):
    answers = long_chat.answers
    assert [a["token_ids"] for a in answers] == [t.token_ids for t in from_scratch]
    assert all(a["stats"]["drafted"] > 0 for a in answers)  # MTP drafted in every answer
    tokenizer = load(str(thinker), None).tokenizer

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    template = len(encode("<turn|>\n<|turn>user\n")) + len(encode("<turn|>\n<|turn>model\n"))
    past_the_slack = 0
    for before, answer, line, scratch in zip(answers, answers[1:], LINES[1:], from_scratch[1:]):
        ids = before["token_ids"][: -1 if before["finish_reason"] == "stop" else None]
        body = strip_channels(ids, tc.CHANNEL_OPEN_ID, tc.CHANNEL_CLOSE_ID)
        own = len(body) + len(encode(line)) + template
        assert answer["stats"]["prompt_tokens"] <= own < scratch.stats.prompt_tokens
        if tc.CHANNEL_OPEN_ID in ids:  # the thought is dropped: back to where it opened
            past_the_slack += len(ids) - 1 - ids.index(tc.CHANNEL_OPEN_ID) > SLACK - 1
    # the fixture thinks often enough, early enough, for the snapshots to matter
    assert past_the_slack >= 5
    assert from_scratch[-1].stats.prompt_tokens > 100 * 8  # a hundred windows long


def test_a_chat_saved_after_20_turns_resumes_in_a_new_process(thinker, long_chat, from_scratch):
    proc = subprocess.run(
        [sys.executable, "-c", MAIN, "-m", str(thinker), *CHAT, "--resume", str(long_chat.saved)],
        input="\n".join(LINES[20:25]) + "\n",
        capture_output=True,
        text=True,
        cwd=Path(__file__).parent.parent,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith("loaded 40 messages and their KV cache (")
    resumed = [json.loads(line) for line in proc.stdout.splitlines()]
    before = long_chat.answers[:20]
    assert [a["token_ids"] for a in before + resumed] == [t.token_ids for t in from_scratch[:25]]
    first, uninterrupted = resumed[0]["stats"], long_chat.answers[20]["stats"]
    # the first resumed turn starts from the saved cache and prefills what the uninterrupted
    # chat prefilled there: its own new tokens
    assert first["context_tokens"] == uninterrupted["context_tokens"] > 0
    assert first["prompt_tokens"] == uninterrupted["prompt_tokens"] < 50


def _copy(saved: Path, to: Path) -> tuple[Path, Path]:
    to.mkdir()
    transcript, kv = to / saved.name, to / (saved.name + ".kv.safetensors")
    transcript.write_bytes(saved.read_bytes())
    kv.write_bytes((saved.parent / kv.name).read_bytes())
    return transcript, kv


def _truncate(transcript: Path, kv: Path) -> None:
    kv.write_bytes(kv.read_bytes()[: kv.stat().st_size // 2])


def _flip_a_byte(transcript: Path, kv: Path) -> None:
    data = bytearray(kv.read_bytes())
    data[-100] ^= 0x40  # inside the last tensor
    kv.write_bytes(bytes(data))


def _other_version(transcript: Path, kv: Path) -> None:
    arrays, meta = mx.load(str(kv), format="safetensors", return_metadata=True)
    mx.eval(arrays)  # loaded lazily: read it all before writing over the file
    with open(kv, "wb") as f:
        mx.save_safetensors(f, arrays, metadata=meta | {"version": "2"})


def _edit_the_transcript(transcript: Path, kv: Path) -> None:
    data = json.loads(transcript.read_text())
    data["messages"][0]["content"] = "Turn 0: good evening"
    transcript.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "damage, reason, how",
    [
        (_truncate, "it cannot be read (truncated, or not a safetensors file)", "--resume"),
        (_flip_a_byte, "it does not match its checksum (damaged or edited)", "/load"),
        (_other_version, "format version '2'; this gemma-chat reads 1", "--resume"),
        (
            _edit_the_transcript,
            "it was saved with another version of this conversation; its token ids do not match"
            " its messages (edited): its text is encoded again",
            "/load",
        ),
    ],
)
def test_a_damaged_cache_is_refused_and_the_transcript_loaded(
    thinker, small_slack, long_chat, tmp_path, damage, reason, how
):
    transcript, kv = _copy(long_chat.saved, tmp_path / "copy")
    damage(transcript, kv)
    if how == "--resume":
        r = CliRunner().invoke(
            app, ["-m", str(thinker), *CHAT, "--resume", str(transcript)], input=LINES[20] + "\n"
        )
    else:
        script = f"/load {transcript}\n{LINES[20]}\n"
        r = CliRunner().invoke(app, ["-m", str(thinker), *CHAT], input=script)
    assert r.exit_code == 0 and "Traceback" not in r.stderr, r.output
    refusal = [line for line in r.stderr.splitlines() if "KV cache" in line]
    assert refusal == [
        ("note: " if how == "--resume" else "")
        + f"loaded 40 messages; its saved KV cache is not used: {reason}; "
        "the next answer prefills the conversation"
    ]
    (answer,) = [json.loads(line) for line in r.stdout.splitlines()]
    # the conversation is all there, prefilled from the transcript
    assert answer["stats"]["context_tokens"] == 0 and answer["stats"]["prompt_tokens"] > 800
    assert len(answer["token_ids"]) == 16


def test_a_cache_saved_for_another_model_is_refused(thinker, small_slack, long_chat, tmp_path):
    """A target of the same shape, other weights: only the weights' fingerprint tells."""
    other = tc.make_target(tmp_path / "other", "e2b", seed=1)
    transcript, _ = _copy(long_chat.saved, tmp_path / "copy")
    r = CliRunner().invoke(
        app, ["-m", str(other), "--no-mtp", *CHAT[:3], "--json", "--resume", str(transcript)],
        input=LINES[20] + "\n",
    )
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines()[0] == (
        "note: loaded 40 messages; its saved KV cache is not used: it was saved for another "
        f"model ({thinker}); the next answer prefills the conversation"
    )
    (answer,) = [json.loads(line) for line in r.stdout.splitlines()]
    assert answer["stats"]["context_tokens"] == 0 and answer["stats"]["prompt_tokens"] > 800
