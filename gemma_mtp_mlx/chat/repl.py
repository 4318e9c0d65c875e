"""The interactive chat: prompt-toolkit input (history file, multi-line, slash commands with
completion) around a `Session`, answers shown by `AnswerView`.

Keys: Enter sends; Esc-Enter (or a bracketed paste) adds lines; Ctrl-C clears the line at the
prompt and stops an answer (the partial answer stays in the conversation); Ctrl-D quits.
"""

import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion, PathCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.history import FileHistory, History, InMemoryHistory
from prompt_toolkit.key_binding import KeyBindings
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from ..errors import GemmaChatError
from . import commands
from .session import Session, Turn
from .verification import VERDICT_STYLE
from .view import AnswerView, meter_text

# name -> (argument hint, what it does)
COMMANDS: dict[str, tuple[str, str]] = {
    "/help": ("", "this list"),
    "/reset": ("", "start a new conversation (same system prompt)"),
    "/system": ("[TEXT|off]", "show, set or clear the system prompt"),
    "/mtp": (
        "[on|off|auto|K]",
        "MTP on or off; K per round from measured costs, or fixed (0 parks)",
    ),
    "/think": ("[on|off]", "Gemma 4's thinking channel (shown dimmed)"),
    "/stats": ("", "figures of the last answer"),
    "/verify": ("", "replay the last answer without MTP and compare the tokens"),
    "/save": ("FILE", "save the conversation (JSON) and its KV cache beside it, mode 0600 (/save! replaces a file that is not a session)"),
    "/load": ("FILE", "load a saved conversation (and its KV cache, when it fits)"),
    "/image": ("PATH", "attach a picture to the next message (or paste or drop its path)"),
    "/quit": ("", "leave (also Ctrl-D)"),
}
_CHOICES = {
    "/mtp": ("on", "off", "auto", "0", "1", "2", "3", "4"),
    "/think": ("on", "off"),
    "/system": ("off",),
}
KEYS_HELP = "Enter sends · Esc-Enter or a paste adds lines · Ctrl-C stops an answer · Ctrl-D quits"


def state_dir() -> Path:
    """Where the input history lives: $GEMMA_CHAT_STATE_DIR, else the XDG state directory."""
    if os.environ.get("GEMMA_CHAT_STATE_DIR"):
        return Path(os.environ["GEMMA_CHAT_STATE_DIR"]).expanduser()
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "gemma-chat"


def open_history() -> tuple[History, str | None]:
    """The persistent input history (private: directory 0700, file 0600), or an in-memory
    one and the reason when the state directory cannot be written."""
    folder = state_dir()
    path = folder / "history"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_APPEND | os.O_WRONLY, 0o600))
    except OSError as e:
        return InMemoryHistory(), f"input history is not kept: cannot write {path} ({e.strerror})"
    return FileHistory(str(path)), None


class SlashCompleter(Completer):
    """Completes command names at the start of the input, then their arguments."""

    def __init__(self):
        self.paths = PathCompleter(expanduser=True)

    def get_completions(self, document: Document, event: CompleteEvent) -> Iterator[Completion]:
        text = document.text_before_cursor
        if not text.startswith("/") or "\n" in text:
            return
        name, space, arg = text.partition(" ")
        if not space:
            for command, (hint, what) in COMMANDS.items():
                if command.startswith(name):
                    yield Completion(command, -len(name), display_meta=f"{hint} {what}".strip())
            return
        if name in ("/save", "/save!", "/load", "/image"):
            yield from self.paths.get_completions(Document(arg, len(arg)), event)
            return
        for choice in _CHOICES.get(name, ()):
            if choice.startswith(arg.strip()):
                yield Completion(choice, -len(arg.lstrip()))


def key_bindings() -> KeyBindings:
    kb = KeyBindings()

    @kb.add("enter")
    def _send(event):
        buffer = event.current_buffer
        state = buffer.complete_state
        if state and state.current_completion:  # Enter picks the highlighted completion
            buffer.apply_completion(state.current_completion)
        else:
            buffer.validate_and_handle()

    @kb.add("escape", "enter")
    def _newline(event):
        event.current_buffer.insert_text("\n")

    return kb


def make_prompt_session(
    history: History | None = None, *, input=None, output=None
) -> PromptSession:
    return PromptSession(
        multiline=True,
        history=history or InMemoryHistory(),
        completer=SlashCompleter(),
        complete_while_typing=True,
        key_bindings=key_bindings(),
        prompt_continuation=lambda width, line, wrap: "… ".rjust(width),
        input=input,
        output=output,
    )


@contextmanager
def sigint_as_request(at_once: bool = False) -> Iterator[threading.Event]:
    """While an answer runs, a first Ctrl-C only asks it to stop (between two prefill chunks or
    two streamed chunks, where the cache is consistent); a second one interrupts at once, and so
    does the first `at_once` (an answer with no local cache, waiting on a server)."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return

    def handler(signum, frame):
        if requested.is_set() or at_once:
            raise KeyboardInterrupt
        requested.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


class Repl:
    def __init__(
        self,
        session: Session,
        console: Console,
        prompt: PromptSession,
        *,
        debug: bool = False,
    ):
        self.session = session
        self.console = console
        self.prompt = prompt
        self.debug = debug
        self.parked_told: Turn | None = None  # the answer whose meter said why drafting parked

    def run(self) -> int:
        self.banner()
        while True:
            try:
                line = self.prompt.prompt("› ")
            except KeyboardInterrupt:
                continue  # Ctrl-C at the prompt clears the line
            except EOFError:
                break
            try:
                if not self.handle(line):
                    break
            except GemmaChatError as e:
                self.error(str(e))
            except KeyboardInterrupt:  # e.g. during /verify; answers handle their own
                self.note("stopped")
            except Exception as e:  # the chat goes on; --debug shows where it came from
                if self.debug:
                    self.console.print_exception()
                self.error(f"{type(e).__name__}: {e}")
        return 0

    def handle(self, line: str) -> bool:
        """Run one input; False to quit."""
        if not line.strip():
            return True
        command = commands.parse(line)
        if command is not None:
            return self.command(*command)
        self.ask(commands.message(line))
        return True

    # -- messages ------------------------------------------------------------------------------
    def banner(self) -> None:
        s = self.session
        parts = [
            f"gemma-chat · {s.model_name}",
            self.session.mtp_state(),
            f"thinking {_on(s.settings.think)}",
        ]
        if s.context_limit:  # a server (--endpoint) may not say
            parts.append(f"context {s.context_limit:,} tokens")
        self.console.print(Text(" · ".join(parts), style="bold"))
        if s.model_name == "demo" and hasattr(s, "pair"):
            self.console.print(Text(demo_note(s.pair), style="yellow"))
        self.console.print(Text(f"{KEYS_HELP} · /help lists commands", style="dim"))

    def note(self, message: str) -> None:
        self.console.print(Text(message, style="dim"))

    def error(self, message: str) -> None:
        self.console.print(f"[bold red]error:[/] {escape(message)}")

    # -- a turn --------------------------------------------------------------------------------
    def ask(self, text: str) -> None:
        session = self.session
        text, attached = commands.attach_pasted(session, text)
        if attached:
            self.note(attached)
        turn = session.ask(text)
        if turn.dropped:
            self.note(
                f"the conversation no longer fits the context ({session.context_limit:,} tokens): "
                f"dropped the {turn.dropped} oldest exchange{'s' * (turn.dropped > 1)}"
            )
        if turn.capped:
            self.note(
                f"this answer can have at most {turn.max_tokens} tokens before the context is full"
            )
        view = AnswerView(self.console, meter=lambda stats: self._meter(turn, stats))
        with view:
            try:
                with sigint_as_request(getattr(turn, "stops_at_once", False)) as stop:
                    turn.stop_request = stop  # honoured between prefill chunks too
                    for update in turn:
                        view.update(update.thinking, update.text, update.stats)
                        if stop.is_set():
                            break
            except KeyboardInterrupt:
                pass
            finally:
                turn.close()
            note = None
            if turn.finish_reason == "interrupted":
                note = (
                    "stopped; the partial answer stays in the conversation"
                    if turn.token_ids
                    else "stopped"
                )
            elif turn.finish_reason == "length" and turn.capped:
                note = f"stopped at {turn.max_tokens} tokens: the context is full"
            elif turn.finish_reason == "length":
                note = f"stopped at the {turn.max_tokens}-token limit (--max-tokens)"
            view.finish(turn.stats, note)

    def _meter(self, turn: Turn, stats) -> Text:
        if hasattr(turn, "meter"):  # answered by a server (serve/remote.py): its own figures
            return turn.meter()
        # The first answer the policy parks drafting in says why, in words; later ones are short.
        parked = turn.draft_now == 0 and turn.settings.draft_tokens is None
        if parked and self.parked_told is None:
            self.parked_told = turn
        return meter_text(
            stats,
            mtp=turn.used_mtp,
            draft=turn.draft_now,
            auto=turn.settings.draft_tokens is None,
            context_used=self.session.context_used,
            context_limit=self.session.context_limit,
            thinking_tokens=turn.thinking_tokens,
            parked_why=parked and self.parked_told is turn,
        )

    # -- slash commands ------------------------------------------------------------------------
    def command(self, name: str, arg: str) -> bool:
        if name in commands.SESSION_COMMANDS:
            self.note(commands.SESSION_COMMANDS[name](self.session, arg))
            return True
        handler = (
            getattr(self, "cmd_" + name[1:], None) if name in COMMANDS or name == "/exit" else None
        )
        if handler is None:
            raise GemmaChatError(f"unknown command {name}; /help lists the commands")
        return handler(arg) is not False

    def cmd_help(self, arg: str) -> None:
        table = Table.grid(padding=(0, 2))
        for name, (hint, what) in COMMANDS.items():
            table.add_row(Text(f"{name} {hint}".strip(), style="bold"), what)
        self.console.print(table)
        self.note(KEYS_HELP + " · //text sends a message that starts with /")

    def cmd_quit(self, arg: str) -> bool:
        return False

    cmd_exit = cmd_quit

    def cmd_stats(self, arg: str) -> None:
        turn = self.session.last
        if turn is None or turn.stats is None:
            self.note("no answer yet")
            return
        st = turn.stats
        table = Table.grid(padding=(0, 2))
        if hasattr(turn, "stats_rows"):  # answered by a server (serve/remote.py): its own figures
            for key, value in turn.stats_rows():
                table.add_row(Text(key, style="dim"), value)
            self.console.print(table)
            return
        rows = [
            (
                "answer",
                f"{st.generated_tokens} tokens ({turn.thinking_tokens} thinking), {turn.finish_reason}",
            ),
            ("prefilled", f"{st.prompt_tokens} tokens in {st.prefill_seconds:.2f} s"),
            (
                "context",
                f"{st.context_tokens:,} tokens before, {self.session.context_used:,}/{self.session.context_limit:,} now",
            ),
            ("decode", _rate(st.tokens_per_second)),
            (
                "baseline",
                _rate(
                    st.baseline_tokens_per_second,
                    "measured earlier" if st.baseline_is_earlier else "measured",
                )
                if st.baseline_tokens_per_second
                else "not measured yet",
            ),
            ("speedup", f"{st.speedup:.2f}×" if st.speedup else "–"),
            ("drafting", _drafting(turn)),
            ("rounds", f"{st.rounds}: {st.drafted} drafted, {st.accepted} accepted"),
        ]
        if st.acceptance_rate is not None:
            rows.append(("acceptance", f"{st.acceptance_rate:.1%}"))
            by_position = " ".join(f"{a:.0%}" for a in st.acceptance_by_position)
            rows.append(("by position", by_position))
        else:  # MTP off, or the policy kept drafting parked for this whole answer
            rows.append(("acceptance", "– (nothing drafted)"))
        if st.mean_accepted_length:
            rows.append(("per forward", f"{st.mean_accepted_length:.2f} tokens"))
        rows.append(("time", f"prefill {st.prefill_seconds:.2f} s, decode {st.decode_seconds:.2f} s"))
        rows.append(("peak memory", f"{st.peak_memory_bytes / 2**20:,.0f} MiB"))
        for key, value in rows:
            table.add_row(Text(key, style="dim"), value)
        self.console.print(table)

    def cmd_verify(self, arg: str) -> None:
        with (
            self.console.status("replaying without MTP…")
            if self.console.is_terminal
            else nullcontext()
        ):
            result = self.session.verify()
        self.console.print(Text(result.message, style=VERDICT_STYLE[result.verdict]))


def demo_note(pair) -> str:
    from mlx.utils import tree_flatten

    params = sum(v.size for _, v in tree_flatten(pair.target.parameters()))
    return (
        f"the demo: a {params / 1e6:.0f} M-parameter Shakespeare pair, to try the app offline; "
        "at this size MTP barely pays on a CPU"
    )


def _drafting(turn: Turn) -> str:
    if not turn.used_mtp:
        return "off"
    if turn.settings.draft_tokens is not None:
        return f"K = {turn.settings.draft_tokens}"
    k = turn.draft_now
    return "K per round from measured costs" + ("" if k is None else f", lately {k or 'parked'}")


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _rate(value: float | None, label: str = "") -> str:
    return "–" if not value else f"{value:.1f} tok/s {label}".strip()


def run_repl(
    session: Session,
    console: Console,
    *,
    input=None,
    output=None,
    history: History | None = None,
    debug: bool = False,
) -> int:
    """The interactive chat; `input`/`output` are prompt-toolkit's (tests pass a pipe)."""
    if history is None:
        history, problem = open_history()
        if problem:
            console.print(Text(problem, style="yellow"))
    prompt = make_prompt_session(history, input=input, output=output)
    return Repl(session, console, prompt, debug=debug).run()
