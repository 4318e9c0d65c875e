"""Pictures through every interface: `--image` one-shots, `/image` and pasted paths in scripted
and interactive chats, /save and --resume, the server's `image_url` parts (official `openai`
client) and `--endpoint`; each bad input is one line, the ones that can be before any weights
move."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import openai
import pytest
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from fixtures.servers import serving
from gemma_mtp_mlx import generate, load
from gemma_mtp_mlx.chat.repl import run_repl
from gemma_mtp_mlx.chat.session import Session, Settings
from gemma_mtp_mlx.serve.app import create_app
from tests.conftest import picture
from tests.test_cli import gemma

BUDGET = "70"


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("my photos")  # a space in every path
    out = {"cat": folder / "cat.png", "dog": folder / "my dog.png"}
    out["cat"].write_bytes(picture(40, 24, seed=0))  # 60 soft tokens at the budget
    out["dog"].write_bytes(picture(20, 50, seed=1))  # 65
    return out


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return {"GEMMA_CHAT_STATE_DIR": str(tmp_path / "state"), "HF_HUB_OFFLINE": "1"}


def local(seeing, ckpt) -> list[str]:
    return ["-m", str(seeing["e2b"]), "--drafter", str(ckpt["e2b-assistant"]), "--image-tokens", BUDGET]


def message(photos, text: str) -> list[dict]:
    return [{"role": "user", "content": [
        {"type": "image", "path": str(photos["cat"])}, {"type": "text", "text": text},
    ]}]


@pytest.fixture(scope="module")
def seeing_pair(seeing, ckpt):
    pair = load(str(seeing["e2b"]), str(ckpt["e2b-assistant"]))
    pair.vision.set_budget(int(BUDGET))
    return pair


def test_one_shot_with_two_pictures_is_lossless(seeing, ckpt, photos, env):
    args = [*local(seeing, ckpt), "-n", "16", "--json", "-p", "Compare them.",
            "--image", str(photos["cat"]), "--image", str(photos["dog"])]
    mtp, plain = gemma(*args, env=env), gemma(*args, "--no-mtp", env=env)
    assert mtp.exit_code == 0 and plain.exit_code == 0, mtp.output + plain.output
    mine, theirs = json.loads(mtp.stdout), json.loads(plain.stdout)
    assert mine["token_ids"] == theirs["token_ids"] and len(mine["token_ids"]) == 16
    assert mine["stats"]["prompt_tokens"] == theirs["stats"]["prompt_tokens"] > 60 + 65 + 4


def run_chat(seeing, ckpt, env, lines: str, *extra: str):
    return gemma(*local(seeing, ckpt), "-n", "8", "--json", *extra, input=lines, env=env)


def test_scripted_chat_with_pictures_save_and_resume(seeing, ckpt, photos, env, tmp_path):
    saved = tmp_path / "talk.json"
    dog = str(photos["dog"]).replace(" ", "\\ ")  # as a terminal's drag and drop writes it
    lines = f"/image {photos['cat']}\nWhat is it?\n{dog} and this one?\n/save {saved}\n"
    mtp = run_chat(seeing, ckpt, env, lines)
    plain = run_chat(seeing, ckpt, env, lines, "--no-mtp")
    assert mtp.exit_code == 0, mtp.output
    turns = [json.loads(x) for x in mtp.stdout.splitlines()]
    assert [t["token_ids"] for t in turns] == [json.loads(x)["token_ids"] for x in plain.stdout.splitlines()]
    assert "attached cat.png (60 image tokens) to the next message" in mtp.stderr
    assert "attached my dog.png (65 image tokens) to this message" in mtp.stderr
    users = [m for m in json.loads(saved.read_text())["messages"] if m["role"] == "user"]
    assert users[1]["content"] == "and this one?"
    assert [[(p["path"], p["tokens"]) for p in m["images"]] for m in users] == [
        [(str(photos["cat"]), 60)], [(str(photos["dog"]), 65)]
    ]
    assert len(users[0]["images"][0]["sha256"]) == 64

    resumed = run_chat(seeing, ckpt, env, "And now?\n", "--resume", str(saved))
    assert resumed.exit_code == 0, resumed.output
    assert "loaded 4 messages and their KV cache" in resumed.stderr
    assert json.loads(resumed.stdout)["stats"]["prompt_tokens"] < 60  # fewer than a picture holds

    photos_dog = photos["dog"].read_bytes()
    try:
        photos["dog"].write_bytes(picture(20, 50, seed=9))
        changed = run_chat(seeing, ckpt, env, "And now?\n", "--resume", str(saved))
    finally:
        photos["dog"].write_bytes(photos_dog)
    assert changed.exit_code == 0, changed.output
    assert f"{photos['dog']} changed since it was saved: the conversation goes on without it" in changed.stderr
    assert "its saved KV cache is not used: it holds a picture that is left out" in changed.stderr

    # Without its KV cache: the saved token ids, with the pictures read again in their places.
    (tmp_path / "talk.json.kv.safetensors").unlink()
    again = run_chat(seeing, ckpt, env, "And now?\n", "--resume", str(saved))
    assert "loaded 4 messages; the next answer prefills the conversation" in again.stderr
    fresh = json.loads(again.stdout)
    assert fresh["stats"]["prompt_tokens"] > 60 + 65
    assert fresh["token_ids"] == json.loads(resumed.stdout)["token_ids"]


def test_the_interactive_chat_attaches_and_counts_pictures(seeing_pair, photos):
    session = Session(seeing_pair, Settings(max_tokens=6), model_name="tiny")
    console = Console(record=True, force_terminal=True, width=240, height=40, file=io.StringIO())
    keys = (f"/image {photos['cat']}\rWhat is it?\r/verify\r'{photos['dog']}'\r"
            f"/image {photos['cat']}.missing\r\x04")
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        run_repl(session, console, input=pipe, output=DummyOutput(), history=InMemoryHistory())
    out = console.export_text()
    assert "attached cat.png (60 image tokens) to the next message" in out
    assert "attached my dog.png (65 image tokens) to this message" in out
    assert "error: no image at" in out
    assert "identical: all 6 tokens of the last answer" in out  # /verify replays with the picture
    users = [m for m in session.messages if m["role"] == "user"]
    assert [m["content"] for m in users] == ["What is it?", ""]
    assert session.context_used > 60 + 65  # the meter's context counts the pictures


def data_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def test_the_server_and_endpoint_answer_as_the_one_shot(seeing_pair, photos, ckpt, env):
    expected = [t for c in generate(seeing_pair, message(photos, "What is it?"), max_tokens=12)
                for t in c.token_ids]
    with serving(create_app(seeing_pair, "tiny")) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        card = client.models.list().data[0]
        assert card.model_extra["input_modalities"] == ["text", "image"]
        content = [{"type": "image_url", "image_url": {"url": data_url(photos["cat"])}},
                   {"type": "text", "text": "What is it?"}]
        answer = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": content}], max_tokens=12,
            temperature=0, extra_body={"return_token_ids": True},
        )
        assert answer.choices[0].model_extra["token_ids"] == expected
        remote = content[:1] + [{"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]
        with pytest.raises(openai.BadRequestError, match="not fetched here: send the picture as a data: URL"):
            client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": remote}])
        one_shot = gemma("--endpoint", base, "-p", "What is it?", "--image", str(photos["cat"]),
                         "-n", "12", "--json", env=env)
        assert one_shot.exit_code == 0, one_shot.output
        assert json.loads(one_shot.stdout)["token_ids"] == expected
    with serving(create_app(load(str(ckpt["e2b"]), drafter=None), "text")) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0)
        assert client.models.list().data[0].model_extra["input_modalities"] == ["text"]
        with pytest.raises(openai.BadRequestError, match="has no vision tower: it cannot read images"):
            client.chat.completions.create(model="text", messages=[{"role": "user", "content": content}])
        refused = gemma("--endpoint", base, "-p", "hi", "--image", str(photos["cat"]), env=env)
        assert refused.exit_code == 1 and "does not read images" in refused.stderr


def one_line(r) -> str:
    assert r.exit_code == 1 and r.stdout == "", r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--image", "{missing}"], "no image at {missing}"),
        (["--image", "{notes}"], "{notes} is not a PNG, JPEG, WebP or GIF image"),
        (["--image", "{cat}"] * 9, "9 images in one message; at most 8"),
        (["--image", "{cat}", "--image-tokens", "99"], "--image-tokens 99: one of 70, 140, 280, 560, 1120"),
        (["--image", "{cat}", "--raw"], "--image needs the chat template: not with --raw"),
        (["--image", "{cat}", "-m", "{text_only}"], "{text_only} has no vision tower: it cannot read images"),
    ],
)
def test_bad_pictures_are_one_line_before_the_weights_load(seeing, ckpt, photos, env, tmp_path, monkeypatch, args, message):
    from gemma_mtp_mlx import loading

    def no_load(*a, **k):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(loading, "load_target", no_load)
    (tmp_path / "notes.png").write_text("not a picture")
    names = {"missing": str(tmp_path / "missing.png"), "notes": str(tmp_path / "notes.png"),
             "cat": str(photos["cat"]), "text_only": str(ckpt["e2b"])}
    r = gemma("-m", str(seeing["e2b"]), "-p", "hi", *[a.format(**names) for a in args], env=env)
    assert one_line(r) == "error: " + message.format(**names)


def test_a_picture_over_the_context_is_one_line(seeing, ckpt, photos, env):
    r = gemma(*local(seeing, ckpt), "--image-tokens", "1120", "--context", "1024", "-p", "hi",
              "--image", str(photos["cat"]), env=env)
    assert one_line(r).startswith("error: this message takes 1")
    assert one_line(r).endswith("tokens with the chat template; the context holds 1024")
    chat = gemma("--image", str(photos["cat"]), input="hi\n", env=env)
    assert one_line(chat) == "error: --image goes with --prompt (a chat takes /image; --prompt-file lines take no images)"


def test_a_session_whose_picture_records_are_broken_is_refused(seeing_pair, tmp_path):
    from gemma_mtp_mlx.errors import GemmaChatError

    path = tmp_path / "bad.json"
    messages = [{"role": "user", "content": "hi", "images": [{"path": 3}]},
                {"role": "assistant", "content": "hello"}]
    path.write_text(json.dumps({"messages": messages}))
    with pytest.raises(GemmaChatError, match=r"\(message 0 has images that are not a list of path, sha256, tokens\)$"):
        Session(seeing_pair).load(path)
