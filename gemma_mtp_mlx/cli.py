"""The `gemma-chat` command: one-shot answers (`--prompt`, or `--prompt-file` with `--batch`),
scripted and interactive chat (with a local model, or `--endpoint URL` against an
OpenAI-compatible server), and the `serve`, `models`, `doctor`, `bench` and `train-drafter`
subcommands.

Answers go to stdout; progress, warnings and statistics to stderr. Failures print one line
and exit 1 (typer's usage errors exit 2); `--debug` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
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
from .aliases import ALIASES, check_precision
from .blas import leave_a_core_to_the_host
from .errors import DownloadInterrupted, GemmaChatError
from .models.rollback import max_draft_tokens

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
    model: Annotated[str | None, typer.Option("--model", "-m", help="Alias (e2b, e4b, 26b, 31b, demo), hub repo id or folder. Default: e4b, or e2b where e4b does not fit. With --endpoint, the server's model name (default: the one it serves).")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="An alias's published weights: 4bit (default), 8bit or bf16.")] = None,
    max_memory: Annotated[str | None, typer.Option("--max-memory", metavar="SIZE", help="Refuse models that need more (12G, 800M, 60%). Default: 75% of memory.")] = None,
    context: Annotated[str | None, typer.Option("--context", metavar="TOKENS", help="Tokens a conversation may hold (32768, 32k); less than the model's context makes its KV cache smaller. Default: the model's.")] = None,
    drafter: Annotated[str, typer.Option(help="MTP drafter: 'auto', a hub repo id or a folder.")] = "auto",
    no_mtp: Annotated[bool, typer.Option("--no-mtp", help="Plain decoding with the target alone.")] = False,
    draft_tokens: Annotated[int | None, typer.Option("--draft-tokens", "-k", min=0, help="Drafts per round.")] = None,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1)] = 512,
    temp: Annotated[float, typer.Option("--temp", min=0.0, help="0 = greedy.")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    top_k: Annotated[int, typer.Option("--top-k", min=0)] = 0,
    seed: Annotated[int | None, typer.Option("--seed", min=0, max=2**64 - 1)] = None,
    system: Annotated[str | None, typer.Option("--system", help="System prompt.")] = None,
    image: Annotated[list[str] | None, typer.Option("--image", help="A picture (PNG, JPEG, WebP, GIF) for --prompt; repeat for more.")] = None,
    image_tokens: Annotated[int | None, typer.Option("--image-tokens", help="Soft tokens per picture at most: 70, 140, 280, 560 or 1120. Default: the model's processor config (280).")] = None,
    think: Annotated[bool | None, typer.Option("--think/--no-think", help="Gemma 4's thinking channel (shown dimmed, kept out of the answer).")] = None,
    resume: Annotated[str | None, typer.Option("--resume", help="Continue a conversation saved with /save (with its KV cache when it fits this model).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="No chat template: encode the text as is.")] = False,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Run to --max-tokens.")] = False,
    quantize: Annotated[int | None, typer.Option("--quantize", help="Quantise the target at load: 4 or 8.")] = None,
    no_compile: Annotated[bool, typer.Option("--no-compile", help="Eager steps: the graph built in Python at every step (slower on the host; for comparison).")] = False,
    endpoint: Annotated[str | None, typer.Option("--endpoint", help="Chat with the model of this OpenAI-compatible server (gemma-chat serve, mlx_lm.server, Ollama, vLLM) instead of a local one.")] = None,
    api_key_env: Annotated[str | None, typer.Option("--api-key-env", help="With --endpoint: the environment variable that holds the server's API key.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", min=0.1, metavar="SECONDS", help="With --endpoint: how long to wait for the server's first token, or the next one (default 60).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per answer.")] = False,
    forget_costs: Annotated[bool, typer.Option("--forget-costs", help="Forget the decoding costs earlier runs measured on this machine (the meter and the draft policy start over); then answer --prompt or --prompt-file, if given.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Say on stderr what gemma-chat starts from (e.g. stored costs, or why they were ignored).")] = False,
    verify: Annotated[bool, typer.Option("--verify", help="With --prompt: replay the answer by plain decoding and say where they part (JSON: a 'verify' field); exit 1 on a difference rounding does not explain.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
):
    """Without --prompt: the interactive chat on a terminal, or one answer per input line when
    stdin is a pipe or a file."""
    leave_a_core_to_the_host()  # every command, before a model runs (blas.py says why)
    if verbose:
        _show_notes(ctx)
    if forget_costs:
        _forget_costs()
        if ctx.invoked_subcommand is None and prompt is None and prompt_file is None:
            raise typer.Exit(0)
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
        if verify and prompt is None:
            raise GemmaChatError("--verify needs --prompt")
        if resume is not None and (prompt_file is not None or raw):
            raise GemmaChatError("--resume continues a chat: not with --prompt-file or --raw")
        text = None
        if prompt is not None:
            text = StdinText(err).decode(sys.stdin.buffer.read()) if prompt == "-" else prompt
            if not text.strip() and not image:
                raise GemmaChatError("the prompt is empty")
        pictures = check_pictures(image or [], image_tokens, prompt=prompt, raw=raw)
        limit, context_tokens = check_load_options(
            model, precision, quantize, max_memory, draft_tokens, context
        )
        texts = read_prompts(prompt_file) if prompt_file is not None else None
        if endpoint is not None:
            local_only = {
                "--drafter": drafter != "auto",
                "--no-mtp": no_mtp,
                "--draft-tokens": draft_tokens is not None,
                "--quantize": quantize is not None,
                "--no-compile": no_compile,
                "--precision": precision is not None,
                "--max-memory": max_memory is not None,
                "--context": context is not None,
                "--prompt-file": prompt_file is not None,
                "--resume": resume is not None,
                "--image-tokens": image_tokens is not None,
                "--verify": verify,
            }
            given = [flag for flag, used in local_only.items() if used]
            if given:
                raise GemmaChatError(f"{given[0]} is for a local model; with --endpoint the server decides")
            session = _remote_session(
                endpoint, api_key_env, settings, model=model, system=system, timeout=timeout
            )
        else:
            if api_key_env is not None:
                raise GemmaChatError("--api-key-env needs --endpoint")
            if timeout is not None:
                raise GemmaChatError("--timeout needs --endpoint")
            if resume is not None:  # a session file that cannot be loaded fails before the weights
                from .chat.transcript import read_transcript

                read_transcript(Path(resume).expanduser())
            model, pair = _load(
                err, model, None if no_mtp else drafter, precision, quantize, limit, context_tokens,
                pictures=bool(pictures),
            )
            if image_tokens is not None and pair.vision is not None:
                pair.vision.set_budget(image_tokens)
            pair.compile = not no_compile
            if pair.drafter is None and not no_mtp:
                why = f" ({pair.drafter_note})" if pair.drafter_note else ""
                err.print(f"warning: no MTP drafter for {model}{why}: plain decoding", style="yellow")
            session = Session(pair, settings, system=system, model_name=model)
            if resume is not None:
                _resume(session, resume, system=system, think=think, err=err)
        if texts is not None:
            if not answer_file(session, texts, batch=batch or 1, raw=raw, as_json=as_json, err=err):
                raise typer.Exit(1)
        elif text is not None:
            for picture in pictures:
                session.attach(picture)
            one_shot(session, text, raw=raw, as_json=as_json, err=err, verify=verify)
        elif interactive:
            from .chat.repl import run_repl

            run_repl(session, stdout_console(), debug=debug)
        elif not scripted(session, StdinText(err).lines(), as_json=as_json, err=err):
            raise typer.Exit(1)
    except GemmaChatError as e:
        _fail(err, str(e), debug)
    except DownloadInterrupted as e:
        _download_interrupted(err, e)
    except KeyboardInterrupt as e:
        err.print(str(e) or "interrupted")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        _quiet_broken_pipe()
    except typer.Exit:
        raise
    except Exception as e:  # anything unexpected still gets one line unless --debug
        _fail(err, f"{type(e).__name__}: {e}", debug)


class _Notes(logging.Handler):
    """gemma-chat's notes (the "gemma_chat" loggers), one line each on the current stderr."""

    def emit(self, record: logging.LogRecord) -> None:
        sys.stderr.write(self.format(record) + "\n")


def _show_notes(ctx: typer.Context) -> None:
    """--verbose: the engine's notes on stderr for this command."""
    logger, handler = logging.getLogger("gemma_chat"), _Notes()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)

    def stop():
        logger.removeHandler(handler)
        logger.setLevel(level)

    ctx.call_on_close(stop)


def _forget_costs() -> None:
    from .engine.stored_costs import costs_path, forget

    err = stderr_console()
    if forget() is None:
        err.print(f"no stored costs to forget ({costs_path()})", style="dim", markup=False)
    else:
        err.print(f"forgot the stored costs ({costs_path()}): the meter and the policy start over", style="dim", markup=False)


def stdout_console() -> Console:
    return Console(no_color="NO_COLOR" in os.environ, highlight=False)


def _fail(err: Console, message: str, debug: bool):
    if debug:
        err.print_exception()
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(1)


def _download_interrupted(err: Console, e: DownloadInterrupted):
    err.print(str(e))
    # huggingface_hub's download threads would finish their files before the interpreter
    # could exit; what they wrote stays in the cache for the next run.
    sys.stderr.flush()
    os._exit(130)


def _quiet_broken_pipe():
    # The reader went away (e.g. `| head`): stop writing and exit quietly.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise typer.Exit(0)


def check_load_options(
    model: str | None, precision: str | None, quantize: int | None, max_memory: str | None,
    draft_tokens: int | None, context: str | None,
):
    """Everything about the model options that can be checked before a byte is read: the
    memory limit they set (None when this machine's memory is unknown) and the context in
    tokens (None: the model's)."""
    from .loading import is_alias
    from .memory import default_limit, parse_size

    if quantize is not None and quantize not in (4, 8):
        raise GemmaChatError(f"--quantize takes 4 or 8 (bits), not {quantize}")
    if draft_tokens is not None and draft_tokens > max_draft_tokens():
        raise GemmaChatError(
            f"--draft-tokens {draft_tokens}: at most {max_draft_tokens()} (the sliding caches' rollback room)"
        )
    if precision is not None:
        check_precision(precision)
        if model is not None and not is_alias(model):
            raise GemmaChatError(
                f"--precision picks among the published weights of an alias ({', '.join(ALIASES)}); "
                f"{model} loads as stored (--quantize 4|8 quantises it at load)"
            )
    tokens = None  # at least MIN_CONTEXT and at most the model's: checked by load_plan
    if context is not None:
        tokens = parse_tokens(context)
        if tokens is None:
            raise GemmaChatError(f"--context takes a number of tokens (32768, 32k), not '{context}'")
    limit = parse_size(max_memory) if max_memory is not None else default_limit()
    return limit, tokens


def check_pictures(paths: list[str], budget: int | None, *, prompt: str | None, raw: bool) -> list:
    """The --image files, read and decoded (each bad one is a line) before any weights move."""
    from .images.files import decode, read_image_file
    from .images.processor import check_budget
    from .images.prompt import MAX_IMAGES

    if budget is not None:
        check_budget(budget)
    if not paths:
        return []
    if prompt is None:
        raise GemmaChatError("--image goes with --prompt (a chat takes /image; --prompt-file lines take no images)")
    if raw:
        raise GemmaChatError("--image needs the chat template: not with --raw")
    if len(paths) > MAX_IMAGES:
        raise GemmaChatError(f"{len(paths)} images in one message; at most {MAX_IMAGES}")
    pictures = [read_image_file(p) for p in paths]
    for picture in pictures:
        decode(picture)
    return pictures


def parse_tokens(text: str) -> int | None:
    """'32768' or '32k' (k = 1,024) as a number of tokens; None when it is neither."""
    text = text.strip().lower()
    scale = 1024 if text.endswith("k") else 1
    digits = text[:-1] if scale > 1 else text
    return int(digits) * scale if digits.isdigit() else None


def _load(err: Console, model: str | None, drafter: str | None, precision: str | None,
          quantize: int | None, limit, context: int | None, *, pictures: bool = False):
    """(the model's name, the loaded pair). Without --model: the default that fits, said in
    one line the first time (while it is not in the cache yet). With `pictures`, a checkpoint
    on disk without a vision tower is refused before it loads."""
    from . import hub
    from .catalog import choose_default
    from .loading import load_plan, plan, read_config
    from .models.multimodal import has_vision

    if model is None:
        chosen, why = choose_default(limit)
        model, precision = chosen.alias, chosen.precision
        if hub.cached_snapshot(chosen.target) is None:
            err.print(why)
    _blas_hint_once(err)
    p = plan(model, drafter, precision=precision)
    if pictures and p.target.path is not None and not has_vision(read_config(p.target.path)):
        raise GemmaChatError(f"{model} has no vision tower: it cannot read images")
    with err.status(f"loading {model}…", spinner="dots") if err.is_terminal and all(
        s is None or s.path is not None for s in (p.target, p.drafter)
    ) else nullcontext():
        return model, load_plan(p, quantize=quantize, limit=limit, console=err, context=context)


def _blas_hint_once(err: Console) -> None:
    """On Linux without OpenBLAS: how to get it, once per user (a marker in the state folder)."""
    from .blas import HINT, needs_hint

    if not needs_hint():
        return
    from .chat.repl import state_dir

    marker = state_dir() / "openblas-hint-shown"
    if marker.exists():
        return
    err.print(f"note: {HINT}", style="yellow")
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
    except OSError:
        pass  # a read-only home: the note comes again next time, nothing worse


def _remote_session(
    url: str, key_env: str | None, settings, *, model: str | None, system: str | None,
    timeout: float | None,
):
    from .serve.remote import FIRST_TOKEN_TIMEOUT_S, RemoteSession

    key = None
    if key_env is not None:
        key = os.environ.get(key_env)
        if not key:
            raise GemmaChatError(f"--api-key-env: the environment variable {key_env} is not set")
    return RemoteSession(
        url, settings, model=model, api_key=key, system=system,
        timeout=FIRST_TOKEN_TIMEOUT_S if timeout is None else timeout,
    )


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
    if loaded.refused or loaded.dropped or loaded.ids_refused:
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


def one_shot(
    session: Session, text: str, *, raw: bool, as_json: bool, err: Console, verify: bool = False
) -> None:
    """One answer on stdout; notes and the stats line on stderr. With `verify`, /verify's
    verdict too (in the JSON object, or on stderr); exit 1 when it is a bug."""
    turn = session.complete(text) if raw else session.ask(text)
    verification = _answer(turn, as_json=as_json, err=err, verify=session.verify if verify else None)
    _capped_note(turn, err)
    if verification is not None and verification.verdict == "bug":
        raise typer.Exit(1)


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
            text, attached = commands.attach_pasted(session, commands.message(line))
            if attached:
                err.print(attached, style="dim", markup=False)
            turn = session.ask(text)
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


def _answer(turn: Turn, *, as_json: bool, err: Console, verify=None):
    """Show one answer; with `verify` (a Session's), also its Verification, which it returns."""
    if as_json:
        turn.run()
        out = answer_json(turn)
        verification = verify() if verify else None
        if verification is not None:
            out["verify"] = verification.as_dict()
        print(json.dumps(out, ensure_ascii=False), flush=True)
        return verification
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
    if verify:
        verification = verify()
        from .chat.verification import VERDICT_STYLE

        err.print(verification.message, style=VERDICT_STYLE[verification.verdict], markup=False)
        return verification
    return None


def answer_json(turn: Turn) -> dict:
    stats = turn.stats.as_dict() | {"thinking_tokens": turn.thinking_tokens}
    out = {"text": turn.text, "token_ids": turn.token_ids, "finish_reason": turn.finish_reason}
    if turn.thinking:
        out["thinking"] = turn.thinking
    out["stats"] = stats
    return out


def summary_line(turn: Turn) -> str:
    if hasattr(turn, "summary"):  # answered by a server (serve/remote.py): its own figures
        return turn.summary()
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
def serve(
    model: Annotated[str | None, typer.Option("--model", "-m", help="Alias, hub repo id or folder; clients ask for it by this name. Default: e4b, or e2b where e4b does not fit.")] = None,
    precision: Annotated[str | None, typer.Option("--precision", help="An alias's published weights: 4bit (default), 8bit or bf16.")] = None,
    max_memory: Annotated[str | None, typer.Option("--max-memory", metavar="SIZE", help="Refuse models that need more (12G, 800M, 60%). Default: 75% of memory.")] = None,
    context: Annotated[str | None, typer.Option("--context", metavar="TOKENS", help="Tokens a request may hold (32768, 32k); less than the model's context makes its KV cache smaller. Default: the model's.")] = None,
    drafter: Annotated[str, typer.Option(help="MTP drafter: 'auto', a hub repo id or a folder.")] = "auto",
    no_mtp: Annotated[bool, typer.Option("--no-mtp", help="Plain decoding with the target alone.")] = False,
    draft_tokens: Annotated[int | None, typer.Option("--draft-tokens", "-k", min=0, help="Drafts per round (default: chosen per round from measured costs).")] = None,
    quantize: Annotated[int | None, typer.Option("--quantize", help="Quantise the target at load: 4 or 8.")] = None,
    no_compile: Annotated[bool, typer.Option("--no-compile", help="Eager steps: the graph built in Python at every step (slower on the host; for comparison).")] = False,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every network this machine is on).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535)] = 8080,
    batch: Annotated[int, typer.Option("--batch", "-b", min=1, help="Requests answered together (one target forward verifies them all); more wait in line.")] = 4,
    max_queue: Annotated[int, typer.Option("--max-queue", min=0, help="Requests that may wait for a slot; more get 429.")] = 32,
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1, help="Answer length for requests that set none.")] = 512,
    max_request_bytes: Annotated[int | None, typer.Option("--max-request-bytes", min=1024, help="Larger request bodies get 413. Default: 1 MiB, 32 MiB for a model that reads images.")] = None,
    allow_image_urls: Annotated[bool, typer.Option("--allow-image-urls", help="Fetch http(s) image_url parts (at most 20 MiB, 10 s each); otherwise only data: URLs are read.")] = False,
    shutdown_grace: Annotated[float, typer.Option("--shutdown-grace", min=0.0, metavar="SECONDS", help="On SIGTERM or Ctrl-C: how long answers under way may finish before they are ended.")] = 5.0,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks (also in the server's log).")] = False,
):
    """An OpenAI-compatible server (/v1/chat/completions, /v1/completions, /v1/models, /health)
    on this engine, with MTP and batched decoding."""
    err = stderr_console()
    try:
        from .serve.app import ServeOptions
        from .serve.server import is_loopback, listen, run_server

        options = ServeOptions(
            batch=batch,
            queue=max_queue,
            max_tokens=max_tokens,
            mtp=not no_mtp,
            draft_tokens=draft_tokens,
            shutdown_grace=shutdown_grace,
            debug=debug,
            allow_image_urls=allow_image_urls,
        )
        limit, context_tokens = check_load_options(
            model, precision, quantize, max_memory, draft_tokens, context
        )
        model, pair = _load(
            err, model, None if no_mtp else drafter, precision, quantize, limit, context_tokens
        )
        # A picture's data: URL is up to 20 MiB of file, a third more in base64.
        options.max_request_bytes = max_request_bytes or (32 << 20 if pair.vision else 1 << 20)
        pair.compile = not no_compile
        if not is_loopback(host):
            err.print(
                f"warning: --host {host} opens the server beyond this machine: anyone who can reach it can use the model (no authentication)",
                style="yellow",
            )
        sock = listen(host, port)
        mtp = "MTP on" if pair.drafter is not None and not no_mtp else "MTP off"
        port = sock.getsockname()[1]
        err.print(f"serving {model} ({mtp}, batch {batch}) at http://{host}:{port}/v1")
        run_server(pair, model, sock, options)
    except GemmaChatError as e:
        _fail(err, str(e), debug)
    except DownloadInterrupted as e:
        _download_interrupted(err, e)
    except KeyboardInterrupt:  # uvicorn has shut down (serve/server.py), then passes Ctrl-C on
        raise typer.Exit(130) from None
    except Exception as e:
        _fail(err, f"{type(e).__name__}: {e}", debug)


@app.command()
def doctor():
    """Check this machine: MLX, BLAS, memory, disk, cached models, and which models fit."""
    from .tools.doctor import run

    raise typer.Exit(run(Console(no_color="NO_COLOR" in os.environ)))


@app.command("models")
def models_command(
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per row.")] = False,
    max_memory: Annotated[str | None, typer.Option("--max-memory", metavar="SIZE", help="The limit 'fits' is judged against (default: 75% of memory).")] = None,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
):
    """Every alias and precision: repos, download size, cached, memory needed, fits here."""
    from .tools.models import show

    err = stderr_console()
    try:
        show(stdout_console(), max_memory=max_memory, as_json=as_json)
    except GemmaChatError as e:
        _fail(err, str(e), debug)


def _acceptances(text: str | None) -> list[float] | None:
    if text is None:
        return None
    try:
        values = [float(a) for a in text.split(",")]
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None
    if not all(0.0 <= a <= 1.0 for a in values):
        raise typer.BadParameter("each acceptance is between 0 and 1")
    return values


@app.command("bench")
def bench_command(
    model: Annotated[str, typer.Option("--model", "-m", help="Alias, hub repo id or folder (the pair bench).")] = "demo",
    drafter: Annotated[str, typer.Option(help="MTP drafter: 'auto', a hub repo id or a folder.")] = "auto",
    shape: Annotated[str | None, typer.Option("--shape", help="Random weights with this Gemma 4 shape (e2b, e4b, 26b, 31b) and a drafter of simulated acceptance, instead of a loaded pair.")] = None,
    acceptance: Annotated[str | None, typer.Option("--acceptance", help="With --shape: simulated acceptances, e.g. 0.6,0.8 (the default).")] = None,
    layers: Annotated[int | None, typer.Option("--layers", min=2, help="With --shape: layers kept (default: as many as memory allows).")] = None,
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", "-n", min=2, help="Tokens per run (pair: 128, 48 with --quick; shape: 64, 32 with --quick; fresh processes: 300, 64 with --quick).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="One timed run per variant and shorter runs (pair: K swept on prose only).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    plot: Annotated[Path | None, typer.Option("--plot", metavar="DIR", help="Draw the figures into DIR (the `plot` extra: matplotlib): --shape's speedup against acceptance, the pair bench's cost curve and tok/s per K.")] = None,
    from_json: Annotated[Path | None, typer.Option("--from-json", metavar="FILE", help="Show (and with --plot, draw) a bench's saved --json output instead of running one.")] = None,
    repeats: Annotated[int | None, typer.Option("--repeats", min=1, help="Timed runs per variant (1 with --quick, else 3; --moe-curve: 5 passes).")] = None,
    moe: Annotated[bool, typer.Option("--moe-curve", help="Only the MoE verify cost curve: ours vs mlx-lm on a random 26B-A4B-core stack (no model is loaded).")] = False,
    moe_layers: Annotated[int, typer.Option("--moe-layers", min=1, help="Layers of that stack (each ~3.2 GB fp32).")] = 4,
    fresh: Annotated[bool, typer.Option("--fresh-processes", help="Each answer its own gemma-chat process (plain, -k 1, -k 3, auto; with and without stored costs), as scripted use meets it (300 tokens, 64 with --quick).")] = False,
    host: Annotated[bool, typer.Option("--host", help="The host's work per plain step and per round of K = 1-4, eager against compiled, on --model, on --shape (real widths) or on a deep, narrow pair (--shape S --narrow).")] = False,
    narrow: Annotated[bool, typer.Option("--narrow", help="With --host --shape: every layer of that shape at tiny widths (a Mac's small-model regime).")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
):
    """Measure plain vs MTP decoding against mlx-lm and mlx-vlm on the same weights: a loaded
    pair on four workloads, or Gemma 4's real shapes with simulated acceptance (--shape)."""
    from .tools.bench import run

    acceptances = _acceptances(acceptance)
    if fresh and (shape is not None or moe):
        raise typer.BadParameter("--fresh-processes runs a loaded pair: not with --shape or --moe-curve")
    err = stderr_console()
    try:
        run(model=model, drafter=drafter, shape=shape, acceptances=acceptances,
            layers=layers, max_tokens=max_tokens, quick=quick, repeats=repeats, as_json=as_json,
            plot=plot, saved=from_json, moe=moe, moe_layers=moe_layers, fresh=fresh, host=host,
            narrow=narrow, err=err)
    except GemmaChatError as e:
        _fail(err, str(e), debug)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as e:  # anything unexpected still gets one line unless --debug
        _fail(err, f"{type(e).__name__}: {e}", debug)


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
    from .loading import resolve
    from .tools.distill import train_drafter

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

