"""The `gemma-chat` command: one-shot answers (`--prompt`, or `--prompt-file` with `--batch`),
scripted and interactive chat, and the `doctor`, `bench` and `train-drafter` subcommands.

Answers go to stdout; progress, warnings and statistics to stderr. Failures print one line
and exit 1 (typer's usage errors exit 2); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .aliases import DEFAULT_MODEL
from .bench import command as bench_command
from .errors import GemmaChatError

if TYPE_CHECKING:  # the chat and the engine load only when a command needs them
    from .chat.session import Session, Turn

app = typer.Typer(
    add_completion=False,
    invoke_without_command=True,
    no_args_is_help=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Chat with Gemma 4 on your Mac, sped up losslessly by its MTP drafter.",
)


def stderr_console() -> Console:
    # soft_wrap: a message stays one line however narrow the terminal (or 80 columns in a pipe)
    return Console(stderr=True, no_color="NO_COLOR" in os.environ, highlight=False, soft_wrap=True)


def _version(value: bool):
    if value:
        typer.echo(f"gemma-chat {__version__}")
        raise typer.Exit()


@app.callback()
def main_command(
    ctx: typer.Context,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Answer this and exit ('-' reads stdin).")] = None,
    prompt_file: Annotated[str | None, typer.Option("--prompt-file", help="Answer each line of this file ('-': stdin) on its own, one answer per line.")] = None,
    batch: Annotated[int | None, typer.Option("--batch", "-b", min=1, help="With --prompt-file: prompts answered at once (default 1).")] = None,
    model: Annotated[str, typer.Option("--model", "-m", help="Alias (e2b, e4b, 26b, 31b, demo), hub repo id or folder.")] = DEFAULT_MODEL,
    drafter: Annotated[str, typer.Option(help="MTP drafter: 'auto', a hub repo id or a folder.")] = "auto",
    no_mtp: Annotated[bool, typer.Option("--no-mtp", help="Plain decoding with the target alone.")] = False,
    draft_tokens: Annotated[int | None, typer.Option("--draft-tokens", "-k", min=0, help="Drafts per round.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1)] = 512,
    temp: Annotated[float, typer.Option("--temp", min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0)] = 0,
    seed: Annotated[int | None, typer.Option("--seed")] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    think: Annotated[bool | None, typer.Option("--think/--no-think", help="Gemma 4's thinking channel (shown dimmed, kept out of the answer).")] = None,
    resume: Annotated[str | None, typer.Option("--resume", help="Continue a conversation saved with /save (with its KV cache when it fits this model).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="No chat template: encode the text as is.")] = False,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Run to --max-tokens.")] = False,
    quantize: Annotated[int | None, typer.Option("--quantize", help="Quantise the target at load: 4 or 8.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per answer.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
):
    """Without --prompt: the interactive chat on a terminal, or one answer per input line when
    stdin is a pipe or a file."""
    if ctx.invoked_subcommand is not None:
        return
    from .chat.session import Session, Settings
    from .prompt_file import answer_file, read_prompts

    err = stderr_console()
    settings = Settings(
        max_tokens=max_tokens,
        temperature=temp,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        mtp=not no_mtp,
        draft_tokens=draft_tokens,
        ignore_eos=ignore_eos,
        think=bool(think),
    )
    try:
        interactive = prompt is None and prompt_file is None and sys.stdin.isatty() and sys.stdout.isatty()
        if prompt is not None and prompt_file is not None:
            raise GemmaChatError("--prompt and --prompt-file cannot be combined")
        if batch is not None and prompt_file is None:
            raise GemmaChatError("--batch needs --prompt-file")
        if raw and prompt is None and prompt_file is None:
            raise GemmaChatError("--raw needs --prompt or --prompt-file")
        if interactive and as_json:
            raise GemmaChatError("--json needs --prompt or input from a pipe")
        if resume is not None and (prompt_file is not None or raw):
            raise GemmaChatError("--resume continues a chat: not with --prompt-file or --raw")
        text = None
        if prompt is not None:
            text = StdinText(err).decode(sys.stdin.buffer.read()) if prompt == "-" else prompt
            if not text.strip():
                raise GemmaChatError("the prompt is empty")
        texts = read_prompts(prompt_file) if prompt_file is not None else None
        pair = _load(err, model, None if no_mtp else drafter, quantize)
        if pair.drafter is None and not no_mtp:
            err.print(f"warning: no MTP drafter found for {model}: plain decoding", style="yellow")
        session = Session(pair, settings, system=system, model_name=model)
        if resume is not None:
            _resume(session, resume, system=system, think=think, err=err)
        if texts is not None:
            if not answer_file(session, texts, batch=batch or 1, raw=raw, as_json=as_json, err=err):
                raise typer.Exit(1)
        elif text is not None:
            one_shot(session, text, raw=raw, as_json=as_json, err=err)
        elif interactive:
            from .chat.repl import run_repl

            run_repl(session, stdout_console(), debug=debug)
        elif not scripted(session, StdinText(err).lines(), as_json=as_json, err=err):
            raise typer.Exit(1)
    except GemmaChatError as e:
        _fail(err, str(e), debug)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        _quiet_broken_pipe()
    except typer.Exit:
        raise
    except Exception as e:  # anything unexpected still gets one line unless --debug
        _fail(err, f"{type(e).__name__}: {e}", debug)


def stdout_console() -> Console:
    return Console(no_color="NO_COLOR" in os.environ, highlight=False)


def _fail(err: Console, message: str, debug: bool):
    if debug:
        err.print_exception()
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(1)


def _quiet_broken_pipe():
    # The reader went away (e.g. `| head`): stop writing and exit quietly.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise typer.Exit(0)


def _load(err: Console, model: str, drafter: str | None, quantize: int | None):
    from .loading import load

    with err.status(f"loading {model}…", spinner="dots") if err.is_terminal else nullcontext():
        return load(model, drafter, quantize=quantize)


class StdinText:
    """Input bytes as text. Bytes that are not UTF-8 become U+FFFD (the tokenizer cannot take
    them, and one bad line must not end a chat), said once on stderr."""

    def __init__(self, err: Console):
        self.err = err
        self.warned = False

    def decode(self, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            if not self.warned:
                self.err.print(
                    "note: the input is not valid UTF-8; its undecodable bytes became U+FFFD",
                    style="yellow",
                )
                self.warned = True
            return data.decode("utf-8", errors="replace")

    def lines(self) -> Iterator[str]:
        """stdin line by line as it arrives."""
        for line in sys.stdin.buffer:
            yield self.decode(line)


def _resume(
    session: Session, path: str, *, system: str | None, think: bool | None, err: Console
) -> None:
    """Load a saved conversation; the flags given on the command line win over what it saved."""
    from .chat.commands import loaded_line

    loaded = session.load(path)
    if loaded.refused:
        err.print("note: " + loaded_line(loaded), style="yellow", markup=False)
    else:
        err.print(loaded_line(loaded), style="dim", markup=False)
    if system is not None:
        session.set_system(system)
    if think is not None:
        session.set_think(think)


def _dropped_note(session: Session, turn: Turn, err: Console) -> None:
    if turn.dropped:
        err.print(
            f"note: dropped the {turn.dropped} oldest exchange(s) to fit the context "
            f"({session.context_limit:,} tokens)",
            style="yellow",
        )


def _capped_note(turn: Turn, err: Console) -> None:
    """An answer that ran into the end of the context rather than --max-tokens says so."""
    if turn.capped and turn.finish_reason == "length":
        err.print(
            f"note: the answer stopped at {turn.max_tokens} tokens, where the context is full "
            f"(--max-tokens {turn.settings.max_tokens})",
            style="yellow",
        )


def one_shot(session: Session, text: str, *, raw: bool, as_json: bool, err: Console) -> None:
    """One answer on stdout; notes and the stats line on stderr."""
    turn = session.complete(text) if raw else session.ask(text)
    _answer(turn, as_json=as_json, err=err)
    _capped_note(turn, err)


def scripted(session: Session, lines: Iterable[str], *, as_json: bool, err: Console) -> bool:
    """A conversation read from `lines`: each non-empty line is a user turn, each answer goes
    to stdout (a blank line between answers, or one JSON object per line). The slash commands
    that need no terminal run too (chat/commands.py), saying what they did on stderr; `//text`
    sends `/text`. False when a line failed; the others still run."""
    from .chat import commands

    ok, first = True, True
    for line in lines:
        if not line.strip():
            continue
        command = commands.parse(line)
        try:
            if command is not None:
                err.print(_scripted_command(session, *command), style="dim", markup=False)
                continue
            turn = session.ask(commands.message(line))
        except GemmaChatError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}")
            ok = False
            continue
        _dropped_note(session, turn, err)
        if not first and not as_json:
            sys.stdout.write("\n")
        first = False
        _answer(turn, as_json=as_json, err=err)
        _capped_note(turn, err)
    return ok


def _scripted_command(session: Session, name: str, arg: str) -> str:
    from .chat.commands import SESSION_COMMANDS

    if name not in SESSION_COMMANDS:
        raise GemmaChatError(
            f"{name} is not a command of scripted chats (they take {', '.join(SESSION_COMMANDS)}; "
            "//text sends /text)"
        )
    return SESSION_COMMANDS[name](session, arg)


def _answer(turn: Turn, *, as_json: bool, err: Console) -> None:
    if as_json:
        turn.run()
        print(json.dumps(answer_json(turn), ensure_ascii=False), flush=True)
        return
    from .chat.view import AnswerView

    out = stdout_console()
    with AnswerView(out, err=err, keep_meter=False) as view:
        try:
            for update in turn:
                view.update(update.thinking, update.text, update.stats)
        finally:
            turn.close()
        view.finish(turn.stats)
    err.print(summary_line(turn), style="dim")


def answer_json(turn: Turn) -> dict:
    stats = turn.stats.as_dict() | {"thinking_tokens": turn.thinking_tokens}
    out = {"text": turn.text, "token_ids": turn.token_ids, "finish_reason": turn.finish_reason}
    if turn.thinking:
        out["thinking"] = turn.thinking
    out["stats"] = stats
    return out


def summary_line(turn: Turn) -> str:
    stats = turn.stats
    parts = [f"{stats.generated_tokens} tokens"]
    if turn.thinking_tokens:
        parts.append(f"{turn.thinking_tokens} thinking")
    if stats.tokens_per_second:
        parts.append(f"{stats.tokens_per_second:.1f} tok/s")
    if not turn.used_mtp:
        parts.append("MTP off")
    else:
        if stats.acceptance_rate is not None:
            parts.append(f"acceptance {stats.acceptance_rate:.0%}")
        if stats.mean_accepted_length:
            parts.append(f"{stats.mean_accepted_length:.2f} tokens/forward")
        if stats.speedup:
            parts.append(f"{stats.speedup:.2f}× vs measured plain {stats.baseline_tokens_per_second:.1f} tok/s")
        else:
            parts.append("plain baseline not measured (answer too short)")
    parts.append(f"prompt {stats.prompt_tokens} tokens")
    return " · ".join(parts)


@app.command()
def doctor():
    """Check this machine: MLX, memory, disk, cached models, and which models fit."""
    from .doctor import run

    raise typer.Exit(run(Console(no_color="NO_COLOR" in os.environ)))


app.command("bench")(bench_command)


@app.command("train-drafter")
def train_drafter_command(
    target: Annotated[str, typer.Option(help="The frozen target: alias, hub repo id or folder.")],
    data: Annotated[list[Path], typer.Option(help="Text files (or folders of .txt) to distil on.")],
    out: Annotated[Path, typer.Option(help="Folder for the drafter (resumes if it holds a run).")],
    minutes: Annotated[float | None, typer.Option(help="Wall-clock budget of this run.")] = None,
    steps: Annotated[int | None, typer.Option(help="Total optimizer steps (resumed runs count).")] = None,
    hidden_size: Annotated[int, typer.Option(help="Drafter width.")] = 128,
    layers: Annotated[int, typer.Option(help="Drafter depth (sliding layers, then one full).")] = 4,
    intermediate_size: Annotated[int, typer.Option()] = 512,
    depth: Annotated[int, typer.Option(help="Draft steps unrolled in the loss.")] = 3,
    seq_len: Annotated[int, typer.Option()] = 256,
    batch: Annotated[int, typer.Option()] = 8,
    lr: Annotated[float, typer.Option()] = 2e-3,
    self_distill: Annotated[float, typer.Option(help="Share of windows that are the target's own greedy text.")] = 0.5,
    seed: Annotated[int, typer.Option()] = 0,
    debug: Annotated[bool, typer.Option("--debug")] = False,
):
    """Distil a Gemma 4 MTP drafter for a target on text: `--drafter OUT` then uses it."""
    from .distill import train_drafter
    from .loading import resolve

    err = stderr_console()
    try:
        result = train_drafter(
            resolve(target), data, out, hidden_size=hidden_size, num_layers=layers,
            intermediate_size=intermediate_size, depth=depth, seq_len=seq_len, batch=batch,
            lr=lr, minutes=minutes, steps=steps, self_distill_fraction=self_distill, seed=seed,
            progress=err,
        )
    except GemmaChatError as e:
        _fail(err, str(e), debug)
    except KeyboardInterrupt:
        err.print(f"interrupted: the last checkpoint is in {out}")
        raise typer.Exit(130) from None
    accuracy = " / ".join(f"{a:.2f}" for a in result["accuracy"])
    acceptance = result.get("acceptance")
    err.print(
        f"{result['steps']} steps, loss {result['loss']:.3f}, agreement by depth {accuracy}"
        + (f", greedy acceptance {acceptance:.2f}" if acceptance is not None else "")
        + f" -> {out}"
    )


def main():
    app(prog_name="gemma-chat")

