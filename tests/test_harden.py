"""Issue 28: one user's bad request never costs another's answer. Through the real server
(`serve`'s app under the server `gemma-chat serve` runs), the `--endpoint` client and the chat's
session files, on the tiny checkpoint."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import os
import shutil
import signal
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from fixtures.servers import running, serving
from gemma_mtp_mlx import load
from gemma_mtp_mlx.chat.repl import run_repl
from gemma_mtp_mlx.chat.session import Settings
from gemma_mtp_mlx.engine import isolation
from gemma_mtp_mlx.engine.decode import Decoder
from gemma_mtp_mlx.engine.generate import encode_prompt, make_sampler
from gemma_mtp_mlx.engine.sampling import Sampler
from gemma_mtp_mlx.serve import app as app_module
from gemma_mtp_mlx.serve import scheduler as scheduler_module
from gemma_mtp_mlx.serve.app import ServeOptions, create_app
from gemma_mtp_mlx.serve.remote import RemoteSession
from tests.test_chat import build_tiny
from tests.test_cli import gemma

PROMPTS = ["Hello there", "What is the capital of France?", "Write a haiku about the ocean."]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def pair(tiny):
    return load(str(tiny))


def body(prompt: str, **fields) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": prompt}]} | fields


def post(base: str, path: str, data: bytes | dict, timeout: float = 60) -> tuple[int, dict]:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    request = urllib.request.Request(base + path, data=raw, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def events(base: str, data: dict, seen: threading.Event | None = None, out: list | None = None) -> list:
    """The server-sent events of a streamed answer, each decoded ("[DONE]" as is), gathered in
    `out` as they come; `seen` is set once the first token ids have come."""
    request = urllib.request.Request(
        base + CHAT, data=json.dumps(data | {"stream": True}).encode(),
        headers={"Content-Type": "application/json"},
    )
    out = [] if out is None else out
    with urllib.request.urlopen(request, timeout=60) as r:
        for line in r:
            if not line.startswith(b"data: "):
                continue
            text = line[len(b"data: "):].decode().strip()
            out.append(text if text == "[DONE]" else json.loads(text))
            if seen is not None and text != "[DONE]" and any(
                c.get("token_ids") for c in out[-1].get("choices", [])
            ):
                seen.set()
    return out


def ids_of(answer: list) -> list[int]:
    return [t for e in answer if isinstance(e, dict) for c in e.get("choices", []) for t in c.get("token_ids", [])]


# -- 1. a failure is its own answer's ----------------------------------------------------------
class Watched(Sampler):
    """Records which answer's sampler runs, in order (all on the decoding thread)."""

    calls: list = []

    def biased(self, logits, ids=None):
        Watched.calls.append(self)
        return super().biased(logits, ids)


class Faulty(Watched):
    """Holds the decoding thread at its first step (`waiting`, until `gate`), then fails, for
    good, in the first round that three other answers share with it: a fault in this row's own
    work."""

    waiting, gate = threading.Event(), threading.Event()
    broken = False

    def biased(self, logits, ids=None):
        mine = [i for i, s in enumerate(Watched.calls) if s is self]
        Watched.calls.append(self)
        if len(mine) == 1:
            Faulty.waiting.set()
            assert Faulty.gate.wait(60)
        others = {id(s) for s in Watched.calls[mine[-1] + 1 : -1]} if mine else set()
        if Faulty.broken or len(others) >= 3:
            Faulty.broken = True
            raise RuntimeError("injected: this row's own work failed")
        return Sampler.biased(self, logits, ids)


class Broken(Watched):
    """Fails at once: the prefill of its own prompt."""

    def biased(self, logits, ids=None):
        raise RuntimeError("injected: this prompt cannot be admitted")


def test_a_failing_row_ends_alone_and_the_others_equal_their_solo_runs(pair, monkeypatch):
    # Eager steps: the fault is injected in Python, which a compiled step runs only when tracing.
    pair = dataclasses.replace(pair, compile=False)
    app = create_app(pair, "tiny", ServeOptions(batch=4, queue=4))
    usage = {"stream_options": {"include_usage": True}}
    options = dict(max_tokens=40, ignore_eos=True, return_token_ids=True) | usage
    with serving(app) as base:
        for seed in (-1, 2**70):  # refused before admission, never reaching MLX's random keys
            status, error = post(base, CHAT, body("hi", seed=seed, max_tokens=2))
            assert status == 400 and error["error"]["param"] == "seed", error
        solo = [ids_of(events(base, body(p, **options))) for p in PROMPTS]
        assert all(len(ids) == 40 for ids in solo)

        real = scheduler_module.make_sampler

        def watched(pair, **settings):
            sampler, stop = real(pair, **settings)
            sampler.__class__ = {1: Faulty, 2: Broken}.get(settings["seed"], Watched)
            return sampler, stop

        monkeypatch.setattr(scheduler_module, "make_sampler", watched)
        results: dict = {}

        def run(name, fn, *args):
            results[name] = fn(*args)

        faulty = body("Tell me a story.", seed=1, max_tokens=10_000, ignore_eos=True, return_token_ids=True)
        tasks = [threading.Thread(target=run, args=("faulty", events, base, faulty))]
        tasks += [threading.Thread(target=run, args=(i, events, base, body(p, **options))) for i, p in enumerate(PROMPTS)]
        tasks += [threading.Thread(target=run, args=("broken", post, base, CHAT, body("Hi", seed=2, max_tokens=4)))]
        tasks[0].start()
        assert Faulty.waiting.wait(30)
        for t in tasks[1:]:
            t.start()
        deadline = time.monotonic() + 30
        while app.state.scheduler.open < 5:  # all in line while the decoding thread waits
            assert time.monotonic() < deadline
            time.sleep(0.01)
        Faulty.gate.set()
        for t in tasks:
            t.join(60)

    # The faulty row ended with its own error, as a stream that ends properly.
    last_chunk, error, done = results["faulty"][-3:]
    assert last_chunk["choices"][0]["finish_reason"] == "abort"
    assert error["error"]["type"] == "server_error" and done == "[DONE]"
    assert Faulty.broken
    status, refused = results["broken"]
    assert status == 500 and refused["error"]["message"] == "the engine failed on this prompt"
    # The three others went on: whole, and token for token their solo answers.
    for i in range(3):
        assert ids_of(results[i]) == solo[i]
        assert results[i][-1] == "[DONE]" and results[i][-3]["choices"][0]["finish_reason"] == "length"
        (final,) = [e["usage"] for e in results[i] if isinstance(e, dict) and e.get("usage")]
        assert final["speculative"]["rows_together"] == 4  # they shared rounds with the faulty one


def _rows_with_isolation(
    decoder, pair, rows: list[int], faulty: int | None, faulty_class, faulty_temperature=0.0
) -> tuple[dict, list]:
    """PROMPTS[rows] decoded together (24 tokens each) as the scheduler does: marks before each
    step, each row alone after one that raised; row `faulty` samples with `faulty_class`.
    Returns each row's tokens and the rows that failed."""
    out, failed = {}, []
    for i in rows:
        temperature = faulty_temperature if i == faulty else 0.0
        sampler, stop = make_sampler(pair, ignore_eos=True, temperature=temperature)
        if i == faulty:
            sampler.__class__ = faulty_class
        prompt = encode_prompt(pair.tokenizer, PROMPTS[i])
        emitted = decoder.add(prompt, sampler, max_tokens=24, stop=stop)
        out[emitted.stream] = (i, list(emitted.tokens))
    while decoder.streams:
        marks = isolation.mark(decoder)
        try:
            emitted = decoder.step()
        except RuntimeError:
            emitted, gone = isolation.step_each_alone(decoder, marks)
            failed += [out[s][0] for s in gone]
        for e in emitted:
            out[e.stream][1].extend(e.tokens)
    decoder.close()
    return dict(out.values()), failed


@pytest.mark.parametrize("k", [0, 2])  # the plain pipeline (its look-ahead) and speculative rounds
def test_a_row_failing_mid_round_is_taken_out_and_the_rest_rewound(pair, k):
    """The decoder's side of the scheduler's rounds (serve/scheduler.py): marks before each
    round, and each row alone after one that raised."""

    class FailsLater(Sampler):
        calls = 0

        def biased(self, logits, ids=None):
            FailsLater.calls += 1
            if FailsLater.calls > 5:
                raise RuntimeError("injected")
            return super().biased(logits, ids)

    def run(rows: list[int], faulty: int | None = None) -> tuple[dict, list]:
        # Eager: the fault is injected in Python, which a compiled step runs only when tracing.
        return _rows_with_isolation(
            Decoder(pair, draft_tokens=k, compile=False), pair, rows, faulty, FailsLater
        )

    solo = [run([i])[0][i] for i in range(3)]
    together, failed = run([0, 1, 2], faulty=1)
    assert failed == [1] and FailsLater.calls > 5
    assert together[0] == solo[0] and together[2] == solo[2] and len(solo[0]) == 24



def test_a_row_failing_in_a_compiled_round_is_taken_out_and_the_rest_rewound(pair):
    """Compiled steps run no Python of a row's sampler but its key: a sampling row whose key
    stream fails takes itself out of rounds queued ahead of each other (engine/rounds.py)."""

    class KeyFails(Sampler):
        calls = 0

        def key(self):
            KeyFails.calls += 1
            if KeyFails.calls > 6:
                raise RuntimeError("injected")
            return super().key()

    def run(rows: list[int], faulty: int | None = None) -> tuple[dict, list]:
        decoder = Decoder(pair, draft_tokens=2, compile=True)
        return _rows_with_isolation(decoder, pair, rows, faulty, KeyFails, faulty_temperature=1.0)

    solo = [run([i])[0][i] for i in (0, 2)]
    together, failed = run([0, 1, 2], faulty=1)
    assert failed == [1] and KeyFails.calls > 6
    assert [together[0], together[2]] == solo and len(solo[0]) == 24

# -- 2. session files and prompts are bounded before they are read or tokenized -----------------
@pytest.fixture
def longest_tokenized(monkeypatch) -> list[int]:
    """The length of the longest text the tokenizer was handed at once (one element, updated)."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    longest = [0]
    real = TokenizersBackend._encode_plus

    def spy(self, text, *args, **kwargs):
        if isinstance(text, str):
            longest[0] = max(longest[0], len(text))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(TokenizersBackend, "_encode_plus", spy)
    return longest


def test_session_files_are_bounded_and_trimmed_without_tokenizing_them_whole(tiny, tmp_path, longest_tokenized):
    oversize = tmp_path / "oversize.json"
    with open(oversize, "wb") as f:
        f.truncate(65 << 20)  # sparse: its size is what is checked, before it is read
    r = gemma("-m", str(tmp_path / "no-model"), "--resume", str(oversize), "-p", "hi")
    assert r.exit_code == 1 and "Traceback" not in r.stderr  # said before any model is looked for
    assert r.stderr.strip() == f"error: {oversize} is 65 MiB; a session file holds at most 64 MiB"

    huge = "the village " * 350_000  # 4.2 MB in one message: over a million tokens
    messages = [huge, "Noted.", "Hello there", "Hi."]
    session = tmp_path / "huge.json"
    session.write_text(json.dumps({"messages": [
        {"role": ("user", "assistant")[i % 2], "content": m} for i, m in enumerate(messages)
    ]}))
    r = gemma("-m", str(tiny), "--context", "2048", "--resume", str(session), "-p", "What is 2+2?", "-n", "4", "--json")
    assert r.exit_code == 0, r.output
    assert r.stderr.splitlines()[0] == (
        "note: loaded 2 messages (the 1 oldest exchange left out: they do not fit the context); "
        "the next answer prefills the conversation"
    )
    answer = json.loads(r.stdout)
    assert answer["stats"]["generated_tokens"] == 4 and answer["stats"]["prompt_tokens"] < 100
    assert 0 < longest_tokenized[0] < 100_000  # counted a piece at a time, never whole


def test_the_servers_largest_prompt_is_counted_only_as_far_as_the_context(pair, longest_tokenized):
    prompt = "the village " * 75_000  # 900 kB: accepted as a body, far over the context in tokens
    with serving(create_app(pair, "tiny")) as base:
        status, error = post(base, CHAT, body(prompt))
        assert status == 400 and error["error"]["code"] == "context_length_exceeded", error
        status, error = post(base, "/v1/completions", {"model": "tiny", "prompt": prompt})
        assert status == 400 and error["error"]["code"] == "context_length_exceeded", error
    assert 0 < longest_tokenized[0] < 100_000


def test_no_warning_about_texts_longer_than_the_tokenizers_own_limit(tiny, tmp_path):
    from gemma_mtp_mlx.loading import load_tokenizer

    folder = tmp_path / "tokenizer"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(tiny / name, folder / name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(config | {"model_max_length": 16}))
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        assert len(load_tokenizer(folder).encode("the village " * 20)) > 16
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if "sequence length" in r.getMessage()]


# -- 3. text the tokenizer cannot take, and failures nobody expected -----------------------------
@pytest.fixture
def server_log():
    """Every record the server's loggers (uvicorn's, ours) write while the test runs."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "gemma_chat")]
    yield records, lambda: [lg.addHandler(handler) for lg in loggers]
    for lg in loggers:
        lg.removeHandler(handler)


def test_lone_surrogates_are_refused_and_failures_logged_in_one_line(pair, server_log, monkeypatch):
    records, listen = server_log
    with serving(create_app(pair, "tiny")) as base:
        listen()  # after uvicorn has set up its loggers
        chat = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'
        status, error = post(base, CHAT, chat)
        assert status == 400 and error["error"]["param"] == "messages.0.content", error
        assert "lone surrogate" in error["error"]["message"]
        status, error = post(base, "/v1/completions", b'{"model": "tiny", "prompt": "\\udc80"}')
        assert status == 400 and error["error"]["param"] == "prompt", error

        def boom(*args):
            raise RuntimeError("nobody expected this")

        monkeypatch.setattr(app_module.Api, "_check_length", boom)
        status, error = post(base, CHAT, body("hi"))
        assert status == 500 and error["error"]["type"] == "server_error"
        assert error["error"]["message"] == "internal server error"  # no internals to the client
    assert not [r for r in records if r.exc_info], "a traceback in the server's log"
    assert [r.getMessage() for r in records if r.levelno >= logging.ERROR] == [
        "POST /v1/chat/completions failed: RuntimeError: nobody expected this"
    ]


# -- 4. SIGTERM: answers under way finish within the grace, or end properly ----------------------
def test_sigterm_stops_admitting_lets_answers_run_then_ends_each_properly(pair):
    app = create_app(pair, "tiny", ServeOptions(batch=2, queue=2, shutdown_grace=1.0))
    endless = dict(max_tokens=100_000, ignore_eos=True, return_token_ids=True)
    streamed, results, seen = [], {}, threading.Event()
    with running(app) as (base, server):
        stream = threading.Thread(target=events, args=(base, body("Tell me a story.", **endless), seen, streamed))
        whole = threading.Thread(target=lambda: results.update(whole=post(base, CHAT, body("Hi", **endless))))
        stream.start()
        whole.start()
        assert seen.wait(30)
        while app.state.scheduler.running < 2:
            time.sleep(0.01)
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's signal handler calls
        at_signal = len(streamed)
        time.sleep(0.3)
        with pytest.raises(OSError):  # admitting nothing more: nobody listens
            urllib.request.urlopen(base + "/health", timeout=5)
        stream.join(30)
        whole.join(30)
    assert ids_of(streamed[at_signal:])  # the answer went on during the grace
    last, error, done = streamed[-3:]
    assert last["choices"][0]["finish_reason"] == "abort" and done == "[DONE]"
    assert error["error"]["code"] == "server_shutting_down"
    status, refused = results["whole"]
    assert status == 503 and refused["error"]["code"] == "server_shutting_down"


# -- 5, 6. --endpoint: waiting, Ctrl-C, a server that is not OpenAI's ----------------------------
MODELS = {"object": "list", "data": [{"id": "m", "object": "model", "created": 0, "owned_by": "x"}]}


def hanging_server(arrived: threading.Event) -> Starlette:
    """Lists its model, then accepts every answer and never sends a byte of it."""

    async def hang(request: Request):
        arrived.set()
        while not await request.is_disconnected():
            await asyncio.sleep(0.05)
        return PlainTextResponse("")

    return Starlette(routes=[
        Route("/v1/models", lambda request: JSONResponse(MODELS)),
        Route(CHAT, hang, methods=["POST"]),
    ])


def test_endpoint_waits_visibly_times_out_in_one_line_and_ctrl_c_stops_at_once():
    arrived = threading.Event()
    with serving(hanging_server(arrived)) as url:
        r = gemma("--endpoint", url, "--timeout", "1", "-p", "hi")
        assert r.exit_code == 1 and "Traceback" not in r.stderr
        assert r.stderr.strip() == f"error: {url} sent nothing for 1 s (--timeout)"
        arrived.clear()
        session = RemoteSession(url, Settings(max_tokens=8), timeout=60)
        console = Console(record=True, force_terminal=True, width=200, height=40, file=io.StringIO())

        def ctrl_c():
            if arrived.wait(30):
                time.sleep(0.2)
                os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=ctrl_c, daemon=True).start()
        start = time.monotonic()
        with create_pipe_input() as pipe:
            pipe.send_text("Hello there\r/save! chat.json\r\x04")
            run_repl(session, console, input=pipe, output=DummyOutput(), history=InMemoryHistory())
        waited = time.monotonic() - start
    out = console.export_text()
    assert "waiting for the server… (Ctrl-C stops)" in out and "stopped" in out
    assert "/save and /load keep local conversations" in out  # and the chat went on
    assert waited < 20  # not the 60 s of --timeout
    assert session.messages == []


def test_endpoint_that_is_not_openai_is_said_in_one_line():
    page = lambda request: PlainTextResponse("<html>hello</html>")  # noqa: E731
    not_openai = Starlette(routes=[Route("/v1/models", page)])
    with serving(not_openai) as url:
        r = gemma("--endpoint", url, "-p", "hi")
    assert r.exit_code == 1 and "Traceback" not in r.stderr
    assert r.stderr.strip() == (
        f"error: the server's answer to /v1/models is not an OpenAI-compatible response ({url})"
    )
    models_only = Starlette(routes=[
        Route("/v1/models", lambda request: JSONResponse(MODELS)),
        Route(CHAT, page, methods=["POST"]),
    ])
    with serving(models_only) as url:
        r = gemma("--endpoint", url, "-p", "hi")
    assert r.exit_code == 1 and r.stderr.strip() == (
        f"error: the server's answer to {CHAT} is not an OpenAI-compatible response ({url})"
    )


# -- 7. a resume without the KV cache prefills exactly what the cache held -----------------------
def test_resume_gives_the_same_answer_with_or_without_the_kv_cache(tiny, tmp_path):
    saved = tmp_path / "chat.json"
    args = ("-m", str(tiny), "-n", "12", "--json")
    script = f"Hello there\nWhat is the capital of France?\n/save {saved}\n{PROMPTS[2]}\n"
    live = gemma(*args, input=script)
    assert live.exit_code == 0, live.output
    expected = json.loads(live.stdout.splitlines()[-1])
    with_cache = json.loads(gemma(*args, "--resume", str(saved), "-p", PROMPTS[2]).stdout)
    (tmp_path / "chat.json.kv.safetensors").unlink()
    without = json.loads(gemma(*args, "--resume", str(saved), "-p", PROMPTS[2]).stdout)
    assert with_cache["token_ids"] == without["token_ids"] == expected["token_ids"]
    held = with_cache["stats"]
    assert held["context_tokens"] > 0 and without["stats"]["context_tokens"] == 0
    # Without the cache: the very tokens it held, then the new turn.
    assert without["stats"]["prompt_tokens"] == held["context_tokens"] + held["prompt_tokens"]


# -- 8. slow clients, large heads, strict types, /save over another file -------------------------
def test_strict_types_are_refused_as_openai_does(pair):
    with serving(create_app(pair, "tiny")) as base:
        for field, value in (("stream", "yes"), ("max_tokens", "10"), ("temperature", "NaN"),
                             ("max_tokens", 10.0), ("seed", "7")):
            status, error = post(base, CHAT, body("hi", **{field: value}))
            assert status == 400 and error["error"]["param"] == field, (field, value, error)
        nan = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}'
        status, error = post(base, CHAT, nan)
        assert status == 400 and error["error"]["param"] == "temperature", error
        status, answer = post(base, CHAT, body("hi", temperature=0, max_tokens=2, stream=False))
        assert status == 200 and answer["usage"]["completion_tokens"] == 2  # an int where a float goes


def exchange(base: str, data: bytes, *, wait: float = 10) -> bytes:
    """What the server answers to `data` on a raw connection, until it closes it."""
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=wait) as conn:
        conn.sendall(data)
        answer = b""
        while chunk := conn.recv(65536):
            answer += chunk
    return answer


def test_slow_clients_time_out_and_a_huge_head_gets_431(pair):
    with serving(create_app(pair, "tiny", ServeOptions(read_timeout=1.0))) as base:
        half_head = exchange(base, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        assert half_head.startswith(b"HTTP/1.1 408 ")
        head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        half_body = exchange(base, head + b"Content-Length: 100\r\n\r\n" + b'{"model": "ti')
        assert half_body.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in half_body
        huge = exchange(base, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (1 << 20) + b"\r\n\r\n")
        assert huge.startswith(b"HTTP/1.1 431 ")
        assert post(base, CHAT, body("hi", max_tokens=2))[0] == 200  # and it serves on


def test_save_refuses_to_replace_a_file_that_is_not_a_session(tiny, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    script = f"Hello there\n/save {notes}\n/save! {notes}\n"
    r = gemma("-m", str(tiny), "-n", "4", input=script)
    assert r.exit_code == 1  # the refused line counts as a failed one
    assert f"error: {notes} exists and is not a gemma-chat session; /save! {notes} replaces it" in r.stderr
    assert f"saved 2 messages to {notes}" in r.stderr
    assert json.loads(notes.read_text())["format"] == "gemma-chat.session"
