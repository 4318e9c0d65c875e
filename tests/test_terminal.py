"""The real app in a real terminal (tmux): type a question, see streamed text and the meter,
check /verify, /quit. .ci/run installs tmux; without it this test is skipped."""

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_chat import build_tiny

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
SESSION = "gemma-chat-e2e"


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def screen() -> str:
    return tmux("capture-pane", "-t", SESSION, "-p", "-S", "-200")


def wait_for(predicate, timeout: float = 60.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = screen()
        if predicate(text):
            return text
        time.sleep(0.3)
    raise AssertionError(f"timed out; the screen shows:\n{screen()}")


@pytest.fixture
def app_in_tmux(tmp_path_factory, tmp_path):
    target = build_tiny(tmp_path_factory)
    app = Path(sys.executable).with_name("gemma-chat")
    command = (
        f"GEMMA_CHAT_STATE_DIR={tmp_path} {app} --model {target} --max-tokens 40 --ignore-eos;"
        f" echo EXITED $?; sleep 30"
    )
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    tmux("new-session", "-d", "-s", SESSION, "-x", "100", "-y", "40", command)
    yield
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)


def test_chat_in_a_terminal(app_in_tmux):
    wait_for(lambda s: "›" in s)
    tmux("send-keys", "-t", SESSION, "Tell me a story", "Enter")
    text = wait_for(lambda s: "tok/s" in s and "baseline" in s and s.rstrip().endswith("›"))
    assert "Tell me a story" in text
    assert "context" in text  # the meter's context gauge
    tmux("send-keys", "-t", SESSION, "/verify", "Enter")
    wait_for(lambda s: "identical" in s)
    tmux("send-keys", "-t", SESSION, "/quit", "Enter")
    wait_for(lambda s: "EXITED 0" in s)
