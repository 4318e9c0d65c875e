"""The real app in a real terminal (tmux): type a question, see streamed text and the meter,
check /verify, /quit; the demo's banner says what the demo is. .ci/run installs tmux; without
it this test is skipped."""

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gemma_mtp_mlx.chat.view import PARKED_WHY
from tests.test_chat import build_tiny

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
SESSION = "gemma-chat-e2e"
APP = Path(sys.executable).with_name("gemma-chat")
METER = re.compile(r"context [\d,]+/[\d,]+")  # the end of an answer's meter


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def screen() -> str:
    return tmux("capture-pane", "-t", SESSION, "-p", "-S", "-200")


def flat(text: str) -> str:
    """The screen's words with the terminal's line wrapping undone."""
    return " ".join(text.split())


def wait_for(predicate, timeout: float = 60.0) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = screen()
        if predicate(text):
            return text
        time.sleep(0.3)
    raise AssertionError(f"timed out; the screen shows:\n{screen()}")


def start(command: str) -> None:
    """Run `command` in a fresh tmux window, on this checkout's code (a tmux server started
    elsewhere has its own environment)."""
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    root = Path(__file__).resolve().parent.parent
    command = f"PYTHONPATH={root} {command}; echo EXITED $?; sleep 30"
    tmux("new-session", "-d", "-s", SESSION, "-x", "100", "-y", "40", command)


@pytest.fixture
def app_in_tmux(tmp_path_factory, tmp_path):
    target = build_tiny(tmp_path_factory)
    start(f"GEMMA_CHAT_STATE_DIR={tmp_path} {APP} --model {target} --max-tokens 30 --ignore-eos")
    yield
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)


@pytest.fixture
def demo_in_tmux(tmp_path):
    start(f"GEMMA_CHAT_STATE_DIR={tmp_path} HF_HUB_OFFLINE=1 {APP} --model demo --max-tokens 60")
    yield
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)


def test_chat_in_a_terminal(app_in_tmux):
    wait_for(lambda s: "›" in s)
    tmux("send-keys", "-t", SESSION, "Tell me a story", "Enter")
    text = wait_for(lambda s: "tok/s" in s and "baseline" in s and s.rstrip().endswith("›"))
    assert "Tell me a story" in text
    assert "context" in text  # the meter's context gauge
    # The tiny pair's random drafter never hits: the policy parks and the meter says why, once.
    assert PARKED_WHY in flat(text)
    tmux("send-keys", "-t", SESSION, "Once more", "Enter")
    text = wait_for(lambda s: len(METER.findall(flat(s))) == 2 and s.rstrip().endswith("›"))
    assert flat(text).count(PARKED_WHY) == 1 and "drafting parked" in flat(text)
    tmux("send-keys", "-t", SESSION, "/verify", "Enter")
    wait_for(lambda s: "identical" in s)
    tmux("send-keys", "-t", SESSION, "/quit", "Enter")
    wait_for(lambda s: "EXITED 0" in s)


def test_demo_says_what_it_is(demo_in_tmux):
    text = flat(wait_for(lambda s: "›" in s))
    assert "the demo: a 7 M-parameter Shakespeare pair, to try the app offline" in text
    assert "at this size MTP barely pays on a CPU" in text
    tmux("send-keys", "-t", SESSION, "Full fathom five thy father lies", "Enter")
    wait_for(lambda s: "tok/s" in s and s.rstrip().endswith("›"))
    tmux("send-keys", "-t", SESSION, "/quit", "Enter")
    wait_for(lambda s: "EXITED 0" in s)
