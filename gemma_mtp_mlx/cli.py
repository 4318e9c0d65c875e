"""The `gemma-chat` command: one-shot answers (`--prompt`), scripted and interactive chat,
and the `doctor` subcommand.

Answers go to stdout; progress, warnings and statistics to stderr. Failures print one line
and exit 1 (typer's usage errors exit 2); `--debug` shows the traceback instead.
"""

import json
import os
import sys
from typing import Annotated

import typer
from rich.console import Console

from . import __version__
from .aliases import DEFAULT_MODEL
from .errors import GemmaChatError

app = typer.Typer(
    add_completion=False,
    invoke_without_command=True,
    no_args_is_help=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Chat with Gemma 4 on your Mac, sped up losslessly by its MTP drafter.",
)


def stderr_console() -> Console:
    return Console(stderr=True, no_color="NO_COLOR" in os.environ, highlight=False)


def _version(value: bool):
    if value:
        typer.echo(f"gemma-chat {__version__}")
        raise typer.Exit()


@app.callback()
def main_command(
    ctx: typer.Context,
    prompt: Annotated[str | None, typer.Option("--prompt", "-p", help="Answer this and exit ('-' reads stdin).")] = None,
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
    raw: Annotated[bool, typer.Option("--raw", help="No chat template: encode the text as is.")] = False,
    ignore_eos: Annotated[bool, typer.Option("--ignore-eos", help="Run to --max-tokens.")] = False,
    quantize: Annotated[int | None, typer.Option("--quantize", help="Quantise the target at load: 4 or 8.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per answer.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True)] = False,
):
    if ctx.invoked_subcommand is not None:
        return
    err = stderr_console()
    options = dict(
        max_tokens=max_tokens,
        temperature=temp,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        mtp=not no_mtp,
        draft_tokens=draft_tokens,
        ignore_eos=ignore_eos,
    )
    try:
        if prompt is None:
            raise GemmaChatError("interactive chat needs --prompt for now")
        text = sys.stdin.read() if prompt == "-" else prompt
        pair = _load(err, model, None if no_mtp else drafter, quantize)
        one_shot(pair, text, options, raw=raw, system=system, as_json=as_json, err=err)
    except GemmaChatError as e:
        _fail(err, str(e), debug)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except BrokenPipeError:
        _quiet_broken_pipe()
    except Exception as e:  # anything unexpected still gets one line unless --debug
        _fail(err, f"{type(e).__name__}: {e}", debug)


def _fail(err: Console, message: str, debug: bool):
    if debug:
        err.print_exception()
    err.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


def _quiet_broken_pipe():
    # The reader went away (e.g. `| head`): stop writing and exit quietly.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    raise typer.Exit(0)


def _load(err: Console, model: str, drafter: str | None, quantize: int | None):
    from .loading import load

    with err.status(f"loading {model}…", spinner="dots") if err.is_terminal else _nothing():
        return load(model, drafter, quantize=quantize)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def one_shot(pair, text: str, options: dict, *, raw: bool, system: str | None, as_json: bool, err: Console):
    from .engine.generate import encode_prompt, generate

    prompt = encode_prompt(pair.tokenizer, text, raw=raw, system=system)
    pieces, ids, stats = [], [], None
    for chunk in generate(pair, prompt, **options):
        ids += chunk.token_ids
        stats = chunk.stats
        if as_json:
            pieces.append(chunk.text)
        else:
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
    if as_json:
        print(json.dumps({"text": "".join(pieces), "token_ids": ids, "stats": stats.as_dict()}))
    else:
        sys.stdout.write("\n")
        err.print(summary_line(stats), style="dim")


def summary_line(stats) -> str:
    parts = [f"{stats.generated_tokens} tokens"]
    if stats.tokens_per_second:
        parts.append(f"{stats.tokens_per_second:.1f} tok/s")
    if stats.acceptance_rate is not None:
        parts.append(f"acceptance {stats.acceptance_rate:.0%}")
        parts.append(f"{stats.mean_accepted_length:.2f} tokens/forward")
    if stats.speedup:
        parts.append(f"{stats.speedup:.2f}× vs measured plain {stats.baseline_tokens_per_second:.1f} tok/s")
    parts.append(f"prompt {stats.prompt_tokens} tokens")
    return " · ".join(parts)


@app.command()
def doctor():
    """Check this machine: MLX, memory, disk, cached models, and which models fit."""
    from .doctor import run

    raise typer.Exit(run(Console(no_color="NO_COLOR" in os.environ)))


def main():
    app(prog_name="gemma-chat")

