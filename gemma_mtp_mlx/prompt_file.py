"""`gemma-chat --prompt-file FILE --batch B`: one answer per prompt line, B prompts at a time
(when one finishes, the next prompt takes its place).

Each line is its own one-message conversation (with --system, --think, --raw as for --prompt).
Answers go to stdout in input order as soon as they and all before them are done: one line per
answer, so line i is
always prompt i's answer (newlines and backslashes inside an answer are written as `\\n` and
`\\\\`, terminal control characters dropped as in the chat), or with --json one object per
prompt. A prompt that cannot run (too long for the context) gets an error line on stderr and an
empty answer line (JSON: an "error" field); the others still run.
"""

import json
import sys
import time
from dataclasses import dataclass

from rich.console import Console
from rich.markup import escape

from .chat.session import Session
from .chat.thinking import ChannelSplitter
from .chat.view import CONTROL
from .engine.batch import Answer, generate_batch
from .errors import GemmaChatError


@dataclass
class Prompt:
    index: int
    text: str
    ids: list[int] | None = None
    max_tokens: int = 0
    error: str | None = None


def read_prompts(path: str) -> list[str]:
    """Non-empty lines of `path` ('-': stdin), without their line ends."""
    try:
        if path == "-":
            lines = sys.stdin.read().splitlines()
        else:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise GemmaChatError(f"cannot read prompts from {path}: {e}") from None
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise GemmaChatError(f"no prompts in {path}")
    return prompts


def prepare(session: Session, texts: list[str], *, raw: bool) -> list[Prompt]:
    """Encode each prompt and give it the room its context leaves."""
    limit = session.context_limit
    prompts = []
    for i, text in enumerate(texts):
        p = Prompt(i, text)
        try:
            p.ids = (
                list(session.pair.tokenizer.encode(text)) if raw else session.single_prompt(text)
            )
        except GemmaChatError as e:
            p.error = str(e)
        if p.ids is not None and len(p.ids) >= limit - 1:
            p.error = f"prompt {i + 1} is {len(p.ids)} tokens; the context holds {limit}"
        if p.error is None:
            p.max_tokens = min(session.settings.max_tokens, limit - 1 - len(p.ids))
        prompts.append(p)
    return prompts


def answer_file(
    session: Session, texts: list[str], *, batch: int, raw: bool, as_json: bool, err: Console
) -> bool:
    """Answer every prompt; False when some could not run."""
    prompts = prepare(session, texts, raw=raw)
    runnable = [p for p in prompts if p.error is None]
    answers: dict[int, Answer] = {}
    tokens, start = 0, 0
    began = time.perf_counter()
    finished = generate_batch(
        session.pair,
        [p.ids for p in runnable],
        batch=batch,
        max_tokens=[p.max_tokens for p in runnable],
        **session.settings.decoding(),
    )
    for i, answer in finished:
        answers[runnable[i].index] = answer
        tokens += len(answer.token_ids)
        # Everything up to the first prompt still running goes out now, in input order.
        while start < len(prompts) and (prompts[start].error or prompts[start].index in answers):
            _write(session, prompts[start], answers.get(prompts[start].index), as_json=as_json, err=err)
            start += 1
    seconds = time.perf_counter() - began
    for p in prompts[start:]:
        _write(session, p, None, as_json=as_json, err=err)
    if answers:
        err.print(
            f"{len(answers)} answers · {tokens} tokens in {seconds:.1f} s · "
            f"{tokens / seconds:.1f} tok/s overall · batch {batch}",
            style="dim",
        )
    return len(answers) == len(prompts)


def _write(
    session: Session, p: Prompt, answer: Answer | None, *, as_json: bool, err: Console
) -> None:
    if answer is None:
        err.print(f"[bold red]error:[/] {escape(p.error or 'not answered')}")
        print(json.dumps({"index": p.index, "error": p.error}) if as_json else "", flush=True)
        return
    splitter = ChannelSplitter(session.pair.tokenizer)
    splitter.feed(answer.token_ids)
    splitter.finish()
    if not as_json:
        line = CONTROL.sub("", splitter.answer).replace("\\", "\\\\").replace("\n", "\\n")
        print(line, flush=True)
        return
    out = {"index": p.index, "text": splitter.answer, "token_ids": answer.token_ids}
    out["finish_reason"] = answer.finish_reason
    if splitter.thinking:
        out["thinking"] = splitter.thinking
    out["stats"] = answer.stats.as_dict() | {"thinking_tokens": splitter.thinking_tokens}
    print(json.dumps(out, ensure_ascii=False), flush=True)
