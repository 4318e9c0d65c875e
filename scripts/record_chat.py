"""Record a real chat as an SVG: the app runs in a real terminal (tmux), this script types the
questions, waits for each answer and its meter, and turns the final screen, colours included,
into an SVG with Rich (Console(record=True).save_svg).

    .venv/bin/python scripts/record_chat.py --out docs/demo-chat.svg

The demo pair unless --model says otherwise; needs tmux.
"""

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text

ROOT = Path(__file__).resolve().parent.parent
SESSION = "gemma-chat-record"
METER = re.compile(r"context [\d,]+/[\d,]+")  # the end of each answer's meter
QUESTIONS = [
    "Shall I compare thee to a summer's day?",
    "Now is the winter of our discontent.",
]


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def screen(colours: bool = False) -> str:
    return tmux("capture-pane", "-t", SESSION, "-p", *(["-e"] if colours else []))


def wait_for_prompt(answers: int, timeout: float = 300.0) -> None:
    """Until the chat shows its input prompt after `answers` meters."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        text = screen()
        if text.rstrip().endswith("›") and len(METER.findall(text)) >= answers:
            return
        time.sleep(0.5)
    raise SystemExit(f"timed out; the screen shows:\n{screen()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "demo-chat.svg")
    parser.add_argument("--width", type=int, default=100)
    args = parser.parse_args()
    app = Path(sys.executable).with_name("gemma-chat")
    command = f"PYTHONPATH={ROOT} {app} --model {args.model} --max-tokens 256; sleep 30"
    subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    tmux("new-session", "-d", "-s", SESSION, "-x", str(args.width), "-y", "50", command)
    try:
        wait_for_prompt(0)
        for n, question in enumerate(QUESTIONS, 1):
            tmux("send-keys", "-t", SESSION, question, "Enter")
            wait_for_prompt(n)
        shown = screen(colours=True).rstrip()
    finally:
        subprocess.run(["tmux", "kill-session", "-t", SESSION], capture_output=True)
    console = Console(record=True, width=args.width, force_terminal=True, file=open("/dev/null", "w"))
    console.print(Text.from_ansi(shown))
    console.save_svg(str(args.out), title=f"gemma-chat --model {args.model}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
