"""`gemma-chat serve`: the OpenAI-compatible server on tiny checkpoints and the demo pair, driven
by the official `openai` client (and raw HTTP where a client would not send such a request)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from fixtures.servers import serving
from gemma_mtp_mlx import load
from gemma_mtp_mlx.serve.app import ServeOptions, create_app
from gemma_mtp_mlx.serve.server import is_loopback
from tests.test_chat import build_tiny
from tests.test_cli import gemma

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Hello there",
    "What is the capital of France?",
    "Write a haiku about the ocean.",
    "Please summarize the following text in one sentence.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def pair(tiny):
    return load(str(tiny))


@pytest.fixture(scope="module")
def url(pair):
    with serving(create_app(pair, "tiny", ServeOptions(batch=4, queue=4))) as base:
        yield base


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def cli_answer(*args: str) -> dict:
    r = gemma(*args, "--json")
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def chat(client, prompt: str, **options):
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": prompt}],
        extra_body={"return_token_ids": True} | options.pop("extra_body", {}),
        **options,
    )


def streamed(client, prompt: str, **options) -> tuple[str, list[int], str, object]:
    """(text, token ids, finish reason, usage) of a streamed chat answer."""
    text, ids, finish, usage = "", [], None, None
    for chunk in chat(client, prompt, stream=True, stream_options={"include_usage": True}, **options):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            ids += choice.model_extra.get("token_ids", [])
            finish = choice.finish_reason or finish
    return text, ids, finish, usage


def token_ids(response) -> list[int]:
    return response.choices[0].model_extra["token_ids"]


def spec(usage) -> dict:
    return usage.model_extra["speculative"]


def test_greedy_answers_equal_the_cli_streamed_or_not(client, tiny):
    for prompt in PROMPTS[:2]:
        local = cli_answer("-m", str(tiny), "-p", prompt, "-n", "16")
        whole = chat(client, prompt, max_tokens=16)
        assert token_ids(whole) == local["token_ids"]
        assert whole.choices[0].message.content == local["text"]
        assert whole.choices[0].finish_reason == local["finish_reason"]
        assert whole.usage.completion_tokens == len(local["token_ids"])
        assert whole.usage.prompt_tokens == local["stats"]["prompt_tokens"]
        figures = spec(whole.usage)
        assert figures["mtp"] is True and figures["rounds"] > 0
        assert {"drafted", "accepted", "acceptance_rate", "mean_accepted_length", "speedup"} <= set(figures)
        text, ids, finish, usage = streamed(client, prompt, max_tokens=16)
        assert (text, ids, finish) == (local["text"], local["token_ids"], local["finish_reason"])
        assert usage.completion_tokens == len(ids) and spec(usage)["mtp"] is True


def test_raw_completion_and_thinking_equal_the_cli(client, tiny):
    local = cli_answer("-m", str(tiny), "--raw", "-p", "The quick brown fox", "-n", "10")
    done = client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=10, extra_body={"return_token_ids": True}
    )
    assert token_ids(done) == local["token_ids"] and done.choices[0].text == local["text"]
    pieces = client.completions.create(
        model="tiny", prompt="The quick brown fox", max_tokens=10, stream=True
    )
    assert "".join(c.choices[0].text for c in pieces if c.choices) == local["text"]
    thinking = cli_answer("-m", str(tiny), "-p", "What is 2+2?", "-n", "12", "--think")
    done = chat(client, "What is 2+2?", max_tokens=12, extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert token_ids(done) == thinking["token_ids"]
    assert done.usage.prompt_tokens == thinking["stats"]["prompt_tokens"]


def test_demo_pair_streamed_and_whole_equal_the_cli():
    local = cli_answer("-m", "demo", "-p", "Hello there", "-n", "24")
    with serving(create_app(load("demo"), "demo")) as base:
        demo = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        whole = demo.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "Hello there"}],
            max_tokens=24,
            extra_body={"return_token_ids": True},
        )
        assert token_ids(whole) == local["token_ids"]
        assert whole.choices[0].message.content == local["text"]
        text, ids = "", []
        for chunk in demo.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": "Hello there"}],
            max_tokens=24,
            stream=True,
            extra_body={"return_token_ids": True},
        ):
            text += chunk.choices[0].delta.content or ""
            ids += chunk.choices[0].model_extra.get("token_ids", [])
        assert (text, ids) == (local["text"], local["token_ids"])


def test_concurrent_requests_share_rounds_and_each_equals_its_solo_answer(client):
    options = dict(max_tokens=40, extra_body={"ignore_eos": True})
    solo = []
    for prompt in PROMPTS:
        answer = chat(client, prompt, **options)
        assert spec(answer.usage)["rows_together"] == 1
        solo.append(token_ids(answer))
    results: list = [None] * 4
    start = threading.Barrier(4)

    def ask(i: int) -> None:
        start.wait()
        if i % 2:  # two streamed, two whole
            _, ids, _, usage = streamed(client, PROMPTS[i], **options)
            results[i] = (ids, spec(usage)["rows_together"])
        else:
            answer = chat(client, PROMPTS[i], **options)
            results[i] = (token_ids(answer), spec(answer.usage)["rows_together"])

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [ids for ids, _ in results] == solo
    together = [n for _, n in results]
    assert max(together) >= 2 and all(n <= 4 for n in together)


def test_stop_strings_cut_the_answer(client):
    full = chat(client, PROMPTS[0], max_tokens=24, extra_body={"ignore_eos": True})
    text = full.choices[0].message.content
    stop = text[6:9]
    cut = chat(client, PROMPTS[0], max_tokens=24, stop=[stop], extra_body={"ignore_eos": True})
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert token_ids(full)[: len(token_ids(cut))] == token_ids(cut)
    assert streamed(client, PROMPTS[0], max_tokens=24, stop=stop, extra_body={"ignore_eos": True})[0] == text[: text.index(stop)]


def health(base: str) -> dict:
    with urllib.request.urlopen(base + "/health", timeout=10) as r:
        return json.load(r)


def wait_until_idle(base: str) -> None:
    deadline = time.monotonic() + 60
    while health(base)["running"]:
        assert time.monotonic() < deadline, "the row of a client that left is still decoded"
        time.sleep(0.05)


def test_a_client_that_leaves_frees_its_row_and_the_server_goes_on(pair):
    endless = dict(max_tokens=100_000, extra_body={"ignore_eos": True})
    with serving(create_app(pair, "tiny", ServeOptions(batch=1, queue=0))) as base:
        one = openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)
        stream = chat(one, PROMPTS[0], stream=True, **endless)
        next(c for c in stream if c.choices[0].model_extra.get("token_ids"))  # decoding now
        assert health(base)["running"] == 1
        with pytest.raises(openai.RateLimitError) as busy:  # the one slot is taken, no line
            chat(one, PROMPTS[1], max_tokens=4)
        assert busy.value.body["code"] == "server_busy"
        stream.close()
        wait_until_idle(base)
        impatient = one.with_options(timeout=1.0)
        with pytest.raises(openai.APITimeoutError):  # a whole answer whose client gives up
            chat(impatient, PROMPTS[1], **endless)
        wait_until_idle(base)
        assert chat(one, PROMPTS[2], max_tokens=8).choices[0].finish_reason in ("stop", "length")
        assert health(base) == {"status": "ok", "running": 0, "waiting": 0}


def raw(base: str, path: str, body: bytes | dict | None = None) -> tuple[int, dict]:
    data = body if isinstance(body, bytes | None) else json.dumps(body).encode()
    request = urllib.request.Request(
        base + path, data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def refused(base: str, path: str, body, status: int, code: str | None = None, param: str | None = None) -> str:
    got, data = raw(base, path, body)
    assert got == status, data
    error = data["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code and (param is None or error["param"] == param), error
    return error["message"]


def test_bad_requests_get_the_openai_error_shape(url):
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    path = "/v1/chat/completions"
    assert "not valid JSON" in refused(url, path, b'{"model": ', 400)
    refused(url, path, b"[1, 2]", 400)
    refused(url, path, ok | {"model": "gpt-4o"}, 404, "model_not_found", "model")
    refused(url, path, {"model": "tiny"}, 400, param="messages")
    refused(url, path, ok | {"messages": []}, 400, param="messages")
    refused(url, path, ok | {"temperature": 5}, 400, param="temperature")
    refused(url, path, ok | {"n": 2}, 400, "unsupported_parameter", "n")
    refused(url, path, ok | {"logprobs": True}, 400, "unsupported_parameter", "logprobs")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {}}}]
    refused(url, path, ok | {"tools": tools}, 400, "unsupported_parameter", "tools")
    refused(url, path, ok | {"presence_penalty": 0.5}, 400, "unsupported_parameter", "presence_penalty")
    image = [{"type": "image_url", "image_url": {"url": "data:,"}}]
    refused(url, path, ok | {"messages": [{"role": "user", "content": image}]}, 400, "unsupported_parameter")
    refused(url, path, ok | {"messages": [{"role": "tool", "content": "x"}]}, 400, "unsupported_parameter")
    refused(url, path, ok | {"stop": list("abcde")}, 400, param="stop")
    refused(url, path, ok | {"max_tokens": 10**6}, 400, "context_length_exceeded", "messages")
    done = "/v1/completions"
    refused(url, done, {"model": "tiny", "prompt": ["a", "b"]}, 400, "unsupported_parameter", "prompt")
    refused(url, done, {"model": "tiny", "prompt": "a", "echo": True}, 400, "unsupported_parameter", "echo")
    refused(url, done, {"model": "tiny", "prompt": [1, 10**6]}, 400, param="prompt")
    refused(url, "/v1/nothing", None, 404)
    refused(url, path, None, 405)  # a GET
    status, models = raw(url, "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]
    assert models["data"][0]["owned_by"] == "gemma-chat" and models["data"][0]["max_model_len"] > 0


def test_prompt_over_the_context_and_body_over_the_limit(tiny, tmp_path):
    short = shutil.copytree(tiny, tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    config["max_position_embeddings"] = 120
    (short / "config.json").write_text(json.dumps(config))
    app = create_app(load(str(short)), "short", ServeOptions(max_request_bytes=4096))
    with serving(app) as base:
        long = {"model": "short", "messages": [{"role": "user", "content": "the village " * 60}]}
        message = refused(base, "/v1/chat/completions", long, 400, "context_length_exceeded")
        assert "context holds 120 tokens" in message
        huge = long | {"messages": [{"role": "user", "content": "x" * 5000}]}
        refused(base, "/v1/chat/completions", huge, 413, "request_too_large")
        with pytest.raises(openai.BadRequestError):  # what an OpenAI client sees
            openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0).chat.completions.create(
                model="short", messages=long["messages"]
            )


def test_a_server_with_a_shorter_context_says_so_and_holds_to_it():
    app = create_app(load("demo", context=1024), "demo", ServeOptions())
    with serving(app) as base:
        status, models = raw(base, "/v1/models")
        assert status == 200 and models["data"][0]["max_model_len"] == 1024
        long = {"model": "demo", "messages": [{"role": "user", "content": "the rest is silence " * 300}]}
        message = refused(base, "/v1/chat/completions", long, 400, "context_length_exceeded")
        assert "context holds 1024 tokens" in message


def test_serve_command_listens_and_stops_on_ctrl_c():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.2")
    command = [sys.executable, "-c", "from gemma_mtp_mlx.cli import main; main()", "serve", "-m", "demo"]
    proc = subprocess.Popen(
        [*command, "--port", "0"], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, cwd=ROOT, text=True
    )
    try:
        shown, found = "", None
        for line in iter(proc.stderr.readline, ""):  # notes of the loading may come first
            shown += line
            found = re.search(r"serving demo \(MTP on, batch 4\) at (http://127\.0\.0\.1:\d+)/v1", line)
            if found:
                break
        assert found, shown
        deadline = time.monotonic() + 60
        while True:
            try:
                assert health(found[1])["status"] == "ok"
                break
            except urllib.error.URLError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130  # as any Ctrl-C'd gemma-chat
        assert "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    # Beyond this machine: one warning line; an address it cannot take: one error line.
    done = subprocess.run(
        [*command, "--host", "192.0.2.1"], capture_output=True, text=True, cwd=ROOT,
        env=os.environ | {"NO_COLOR": "1"}, timeout=120,
    )
    *_, warning, error = done.stderr.strip().splitlines()
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert warning.startswith("warning: --host 192.0.2.1") and "no authentication" in warning
    assert error.startswith("error: cannot listen on 192.0.2.1:8080")
