"""`gemma-chat --endpoint URL`: the chat against our own `serve` and against `mlx_lm.server`
(a real peer) serving a tiny Gemma 4 target; vLLM's spec-decode counters parsed from a real
Prometheus exposition."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest, make_asgi_app
from prompt_toolkit.history import InMemoryHistory
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route

from fixtures import tiny_checkpoints as tc
from fixtures.servers import free_port, mlx_lm_server, serving
from gemma_mtp_mlx import load
from gemma_mtp_mlx.chat.repl import run_repl
from gemma_mtp_mlx.chat.session import Settings
from gemma_mtp_mlx.serve.app import ServeOptions, create_app
from gemma_mtp_mlx.serve.remote import NOT_REPORTED, RemoteSession, ServerFigures, api_base
from gemma_mtp_mlx.serve.vllm_metrics import spec_counters
from tests.test_chat import build_tiny
from tests.test_cli import gemma


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny(tmp_path_factory)


@pytest.fixture(scope="module")
def pair(tiny):
    return load(str(tiny))


@pytest.fixture(scope="module")
def ours(pair):
    with serving(create_app(pair, "tiny")) as url:
        yield url


def one_line_error(r) -> str:
    assert r.exit_code == 1 and r.stdout == "", r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in r.stderr
    return lines[0]


def test_endpoint_answers_equal_the_local_ones_with_the_servers_figures(ours, tiny):
    local = gemma("-m", str(tiny), "-p", "Hello there", "-n", "16", "--json")
    remote = gemma("--endpoint", ours, "-p", "Hello there", "-n", "16", "--json")
    assert remote.exit_code == 0, remote.output
    mine, theirs = json.loads(local.stdout), json.loads(remote.stdout)
    assert theirs["token_ids"] == mine["token_ids"] and theirs["text"] == mine["text"]
    assert theirs["finish_reason"] == mine["finish_reason"]
    stats = theirs["stats"]
    assert stats["generated_tokens"] == len(mine["token_ids"])
    assert stats["prompt_tokens"] == mine["stats"]["prompt_tokens"]
    assert stats["server"]["source"] == "gemma-chat serve" and stats["server"]["drafted"] >= 0
    text = gemma("--endpoint", ours + "/v1/", "-p", "Hello there", "-n", "16")
    assert text.exit_code == 0 and text.stdout == gemma("-m", str(tiny), "-p", "Hello there", "-n", "16").stdout
    summary = text.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"{len(mine['token_ids'])} tokens · ")
    assert "tok/s measured here" in summary and "gemma-chat serve:" in summary and "prompt 26 tokens" in summary


def test_endpoint_raw_completion_equals_the_local_one(ours, tiny):
    args = ("--raw", "-p", "The quick brown fox", "-n", "10", "--json")
    local = json.loads(gemma("-m", str(tiny), *args).stdout)
    remote = json.loads(gemma("--endpoint", ours, *args).stdout)
    assert remote["token_ids"] == local["token_ids"] and remote["text"] == local["text"]


def test_endpoint_scripted_chat_carries_the_conversation(ours):
    r = gemma("--endpoint", ours, "-n", "8", "--json", input="Hello there\nWhat is 2+2?\n")
    assert r.exit_code == 0, r.output
    first, second = (json.loads(line) for line in r.stdout.splitlines())
    assert second["stats"]["prompt_tokens"] > first["stats"]["prompt_tokens"] + first["stats"]["generated_tokens"]


def test_endpoint_without_mtp_on_the_server_says_so(pair):
    with serving(create_app(pair, "tiny", ServeOptions(mtp=False))) as url:
        r = gemma("--endpoint", url, "-p", "Hello there", "-n", "8")
    assert r.exit_code == 0, r.output
    assert "gemma-chat serve: nothing drafted" in r.stderr.strip().splitlines()[-1]


def test_endpoint_repl_meter_and_commands(ours):
    session = RemoteSession(ours, Settings(max_tokens=8))
    console = Console(record=True, force_terminal=True, width=240, height=40, file=io.StringIO())
    keys = "Hello there\r/stats\r/mtp 2\r/verify\r/think on\rWhat is 2+2?\r/reset\r\x04"
    with create_pipe_input() as pipe:
        pipe.send_text(keys)
        code = run_repl(session, console, input=pipe, output=DummyOutput(), history=InMemoryHistory())
    out = console.export_text()
    assert code == 0
    assert f"gemma-chat · tiny · MTP on at {ours}" in out and "context 131,072 tokens" in out
    assert "tok/s measured here" in out and "gemma-chat serve: " in out  # the meter
    assert "reported by    gemma-chat serve" in out and "per forward" in out  # /stats
    assert "MTP is set where the model runs" in out and "/verify replays" in out
    assert "thinking on" in out and session.settings.think
    assert session.messages == []  # /reset after two exchanges


def test_endpoint_against_mlx_lm_server(tiny, tmp_path):
    folder = tc.to_mlx_community_layout(tiny, tmp_path / "tiny-mlx")
    (tmp_path / "hf").mkdir()
    with mlx_lm_server(folder.resolve(), tmp_path / "hf") as url:
        r = gemma("--endpoint", url, "-p", "Hello there", "-n", "8")
        assert r.exit_code == 0, r.output
        assert r.stdout.strip()
        summary = r.stderr.strip().splitlines()[-1]
        assert summary.startswith("8 tokens") and NOT_REPORTED in summary
        data = json.loads(gemma("--endpoint", url, "-p", "Hello there", "-n", "8", "--json").stdout)
        assert data["stats"]["generated_tokens"] == 8 and data["stats"]["server"] is None
        assert data["token_ids"] is None  # mlx_lm.server does not send them
        assert "--ignore-eos needs a server" in one_line_error(
            gemma("--endpoint", url, "-p", "Hello", "--ignore-eos")
        )


def test_endpoint_failures_are_one_line(ours):
    dead = f"http://127.0.0.1:{free_port()}"
    assert f"cannot reach {dead}" in one_line_error(gemma("--endpoint", dead, "-p", "hi"))
    line = one_line_error(gemma("--endpoint", ours, "-m", "gpt-4o", "-p", "hi"))
    assert "(404)" in line and "does not exist" in line
    assert "GEMMA_TEST_KEY is not set" in one_line_error(
        gemma("--endpoint", ours, "--api-key-env", "GEMMA_TEST_KEY", "-p", "hi")
    )
    assert "--no-mtp is for a local model" in one_line_error(gemma("--endpoint", ours, "--no-mtp", "-p", "hi"))
    assert "--api-key-env needs --endpoint" in one_line_error(gemma("--api-key-env", "X", "-p", "hi"))


def vllm_counters(registry: CollectorRegistry):
    labels = ["model_name", "engine"]
    counters = {
        name: Counter(f"vllm:spec_decode_num_{name}", name, labels, registry=registry)
        for name in ("drafts", "draft_tokens", "accepted_tokens")
    }
    Counter("vllm:prompt_tokens", "other", labels, registry=registry).labels("g", "0").inc(50)

    def run(drafts, drafted, accepted):
        for engine in ("0", "1"):  # summed over engines
            counters["drafts"].labels("g", engine).inc(drafts)
            counters["draft_tokens"].labels("g", engine).inc(drafted)
            counters["accepted_tokens"].labels("g", engine).inc(accepted)

    return run


def test_vllm_spec_decode_counters():
    registry = CollectorRegistry()
    run = vllm_counters(registry)
    run(10, 40, 20)
    before = spec_counters(generate_latest(registry).decode())
    run(5, 20, 15)
    after = spec_counters(generate_latest(registry).decode())
    assert (before.drafts, before.drafted, before.accepted) == (20, 80, 40)
    figures = ServerFigures.from_vllm(after - before)
    assert (figures.drafted, figures.accepted) == (40, 30)
    assert figures.acceptance_rate == 0.75 and figures.mean_accepted_length == 4.0
    assert figures.speedup is None  # vLLM measures no plain baseline
    assert spec_counters("vllm:prompt_tokens_total 3\n") is None  # no speculative decoding
    assert spec_counters("<html>not metrics</html>") is None


def test_api_base():
    assert api_base("http://gpu-box:8000") == "http://gpu-box:8000/v1"
    assert api_base("http://localhost:11434/v1/") == "http://localhost:11434/v1"


def test_a_vllm_server_is_recognised_and_its_metrics_page_read():
    """A server whose models say `owned_by: vllm`, with its counters served over HTTP by
    prometheus_client's own exporter (what vLLM serves /metrics with)."""
    registry = CollectorRegistry()
    run = vllm_counters(registry)
    models = {"object": "list", "data": [{"id": "g", "object": "model", "owned_by": "vllm", "max_model_len": 8192}]}
    app = Starlette(
        routes=[
            Route("/v1/models", lambda request: JSONResponse(models)),
            Mount("/metrics", make_asgi_app(registry)),
        ]
    )
    with serving(app) as url:
        session = RemoteSession(url + "/v1", Settings(ignore_eos=True, top_k=5))
        assert session.model_name == "g" and session.context_limit == 8192
        assert session.request_options()["extra_body"] == {"top_k": 5, "return_token_ids": True, "ignore_eos": True}
        run(3, 12, 9)
        before = session.spec_counters()
        run(4, 16, 8)
        figures = ServerFigures.from_vllm(session.spec_counters() - before)
    assert (figures.drafted, figures.accepted, figures.mean_accepted_length) == (32, 16, 3.0)
