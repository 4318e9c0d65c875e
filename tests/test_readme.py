"""The README cannot drift from the CLI: every `gemma-chat` line in its shell blocks names a
subcommand that exists and only options that command takes, every `make` target is in the
Makefile, and every file it links to is in the repository."""

import re
import shlex
from pathlib import Path

import click
import typer

from gemma_mtp_mlx.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def shell_lines(markdown: str) -> list[str]:
    """The commands of the ```sh blocks, comments and line continuations taken out."""
    lines = []
    for block in re.findall(r"```(?:sh|bash|shell)\n(.*?)```", markdown, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(words)
    return lines


def commands(markdown: str, program: str) -> list[list[str]]:
    """Each use of `program` in the shell lines: the words after it (pipes and `&&` split)."""
    found = []
    for words in shell_lines(markdown):
        for i, word in enumerate(words):
            if Path(word).name == program:
                rest = words[i + 1 :]
                ends = [j for j, w in enumerate(rest) if w in ("|", "&&", ";", ">")]
                found.append(rest[: ends[0]] if ends else rest)
    return found


def options_of(command: click.Command) -> set[str]:
    return {o for p in command.params for o in (*p.opts, *p.secondary_opts)}


def test_every_gemma_chat_line_uses_real_subcommands_and_options():
    group = typer.main.get_command(app)
    uses = commands(README, "gemma-chat")
    assert len(uses) >= 10  # the README shows the CLI; a parsing slip would check nothing
    for words in uses:
        command, known = group, options_of(group)
        for word in words:
            if word in group.commands and command is group:
                command = group.commands[word]
                known = options_of(command)
            elif word.startswith("-") and word != "-":
                name = word.split("=", 1)[0]
                assert name in known, f"README: `gemma-chat {' '.join(words)}`: no option {name}"


def test_every_make_target_and_link_exists():
    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([\w-]+):", makefile, re.M))
    for words in commands(README, "make"):
        for target in (w for w in words if not w.startswith("-") and "=" not in w):
            assert target in targets, f"README: make {target}: no such target"
    for link in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", README):
        assert (ROOT / link).exists(), f"README links to {link}, which is not in the repository"
