"""Showing an answer while it streams: Markdown and a live speedup meter on a terminal, plain
text everywhere else.

Speculative rounds arrive in bursts of several tokens. Re-rendering a whole growing answer in
a Rich Live flickers, costs time on the thread that also drives the model, and breaks once the
answer is taller than the screen (Live cannot redraw lines that scrolled away). So finished
Markdown blocks (text up to a blank line, a closed code fence) are printed once, above the live
region, and the Live holds only the unfinished block, cut to the screen's height, and the meter.
"""

import re
import time
from collections.abc import Callable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markdown import Markdown
from rich.segment import Segment
from rich.text import Text

from ..engine.stats import GenerationStats

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_LIST_ITEM = re.compile(r"^\s*([-*+]|\d{1,9}[.)])(\s|$)")
# Control bytes a model may emit (ESC sequences could drive the terminal): never printed; --json
# keeps the exact text.
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_THINKING = "dim italic"
PARKED_WHY = "drafting does not pay on this pair on this machine: plain decoding"


def stable_prefix(text: str) -> int:
    """How much of a growing Markdown `text` is made of finished blocks: blocks that more text
    can no longer change (paragraphs, lists and headings followed by a blank line and a new
    block at the margin, closed code fences)."""
    boundary, pos, fence, blank = 0, 0, None, False
    for line in text.split("\n")[:-1]:  # the last piece is an unfinished line
        start, pos = pos, pos + len(line) + 1
        opener = _FENCE.match(line)
        if fence:
            if opener and opener.group(1)[0] == fence[0] and len(opener.group(1)) >= len(fence):
                if not line.strip().strip(fence[0]):
                    fence, boundary = None, pos
            continue
        if opener:
            fence = opener.group(1)
            if not line.startswith(" "):
                boundary = start
        elif blank and line[:1] not in ("", " ", "\t") and not _LIST_ITEM.match(line):
            boundary = start
        blank = not line.strip()
    return boundary


def meter_text(
    stats: GenerationStats | None,
    *,
    mtp: bool,
    draft: int | None,
    auto: bool = False,
    context_used: int,
    context_limit: int,
    thinking_tokens: int = 0,
    parked_why: bool = False,
) -> Text:
    """One line: tok/s now, measured baseline, speedup, acceptance, tokens per target forward,
    draft length (`draft`; 0 = parked, None = not chosen yet) or MTP off, thinking tokens,
    context used. Every figure is measured: nothing is shown until it exists. `parked_why`
    says in words why drafting is parked (the chat does once)."""
    parts: list[str] = []
    if stats is None or not stats.tokens_per_second:
        parts.append("prefilling…" if stats is None else "– tok/s")
    else:
        parts.append(f"{stats.tokens_per_second:.1f} tok/s")
    if not mtp:
        parts.append("MTP off")
    else:
        base = stats.baseline_tokens_per_second if stats else None
        speedup = stats.speedup if stats else None
        if base:
            earlier = " earlier" if stats.baseline_is_earlier else ""
            parts.append(f"baseline {base:.1f} tok/s measured{earlier}")
        else:
            parts.append("measuring baseline…")
        if speedup:
            parts.append(f"{speedup:.2f}×")
        if stats and stats.acceptance_rate is not None:
            parts.append(f"accepted {stats.acceptance_rate:.0%}")
        if stats and stats.mean_accepted_length:
            parts.append(f"{stats.mean_accepted_length:.2f} tok/forward")
        if draft == 0:
            parts.append(PARKED_WHY if parked_why else "drafting parked")
        elif draft is None:
            parts.append("draft K=auto")
        else:
            parts.append(f"draft K={draft}" + (" (auto)" if auto else ""))
    if thinking_tokens:
        parts.append(f"thinking {thinking_tokens} tok")
    parts.append(f"context {context_used:,}/{context_limit:,}")
    return Text(" · ".join(parts), style="dim")


class _Lines:
    """Already rendered lines, printed as they are."""

    def __init__(self, lines: list[list[Segment]]):
        self.lines = lines

    def __rich_console__(self, console, options):
        for line in self.lines:
            yield from line
            yield Segment.line()


def _blank(line: list[Segment]) -> bool:
    return not "".join(s.text for s in line).strip()


class _Block:
    """A growing text shown as finished lines (printed once) plus a live, unfinished tail."""

    def __init__(self, markdown: bool):
        self.markdown = markdown
        self.text = ""
        self.stable = 0  # characters of text whose rendering is final
        self.printed = 0  # lines of that rendering already printed

    def render(self, text: str) -> RenderableType:
        if self.markdown:
            return Markdown(text)
        return Text(text, style=_THINKING)

    def commit(self, console: Console, *, everything: bool = False) -> _Lines | None:
        """The newly finished lines to print, if any."""
        end = len(self.text) if everything else self._stable_end()
        if not self.text or (end <= self.stable and not everything):
            return None
        self.stable = end
        lines = console.render_lines(self.render(self.text[:end]), pad=False)
        if not everything:
            while lines and _blank(lines[-1]):  # separators belong to the next block
                lines.pop()
        new, self.printed = lines[self.printed :], max(self.printed, len(lines))
        return _Lines(new) if new else None

    def _stable_end(self) -> int:
        if self.markdown:
            return stable_prefix(self.text)
        return self.text.rfind("\n") + 1

    def tail(self, console: Console, max_lines: int) -> _Lines | None:
        pending = self.text[self.stable :]
        if not pending.strip():
            return None
        lines = console.render_lines(self.render(pending.strip("\n")), pad=False)
        if self.printed and self.markdown:  # the blank line between Markdown blocks
            lines = [[]] + lines
        return _Lines(lines[-max_lines:])


class AnswerView:
    """Use as a context manager around one answer: `update()` per streamed chunk, `finish()`
    at the end. On a terminal: a Rich Live; otherwise the answer text as it comes, nothing else
    (thinking goes to `err`, dimmed there when it is a terminal)."""

    def __init__(
        self,
        console: Console,
        *,
        err: Console | None = None,
        meter: Callable[[GenerationStats | None], RenderableType] | None = None,
        keep_meter: bool = True,
        fps: float = 15.0,
    ):
        self.console = console
        self.err = err
        self.meter = meter  # e.g. meter_text with the session's figures
        self.keep_meter = keep_meter
        self.interval = 1.0 / fps
        self.live_mode = console.is_terminal and not console.is_dumb_terminal
        self.answer = _Block(markdown=True)
        self.thought = _Block(markdown=False)
        self.stats: GenerationStats | None = None
        self._live: Live | None = None
        self._last_refresh = 0.0
        self._wrote_thinking = False
        self._thinking_done = False

    def __enter__(self) -> "AnswerView":
        if self.live_mode:
            self._live = Live(
                self._meter(),
                console=self.console,
                auto_refresh=False,
                transient=False,
                vertical_overflow="visible",
                redirect_stdout=False,
                redirect_stderr=False,
            )
            self._live.start(refresh=True)
        return self

    def __exit__(self, *exc) -> bool:
        if self._live is not None:
            self._live.stop()
            self._live = None
        return False

    def update(self, thinking: str, text: str, stats: GenerationStats | None) -> None:
        self.stats = stats
        if not self.live_mode:
            self._write_plain(thinking, text)
            return
        # Thinking comes before the answer; a late channel is counted by the meter, not shown.
        if thinking and not self.answer.text:
            if not self.thought.text and self._live is not None:
                self._live.console.print(Text("thinking", style="dim bold"))
            self.thought.text += CONTROL.sub("", thinking)
        if text:
            self.answer.text += CONTROL.sub("", text)
        now = time.monotonic()
        if now - self._last_refresh >= self.interval:
            self._last_refresh = now
            self._refresh()

    def finish(self, stats: GenerationStats | None = None, note: str | None = None) -> None:
        """Print what is left; the meter stays under the answer when `keep_meter` and there
        are figures to show."""
        if stats is not None:
            self.stats = stats
        if not self.live_mode:
            if self._wrote_thinking and self.err is not None:
                self.err.file.write("\n")
                self.err.file.flush()
            self.console.file.write("\n")  # one line per answer, even an empty one
            self.console.file.flush()
            if note and self.err is not None:
                self.err.print(note, style="dim", highlight=False)
            return
        out: list[RenderableType] = []
        if not self._thinking_done:
            out += self._end_thinking()
        out += [self.answer.commit(self.console, everything=True)]
        if note:
            out.append(Text(note, style="dim"))
        # Without figures (stopped during the prefill) the meter would stay at "prefilling…".
        keep = self.keep_meter and self.stats is not None
        self._show(out, self._meter() if keep else Text(""))

    def _end_thinking(self) -> list:
        self._thinking_done = True
        lines = self.thought.commit(self.console, everything=True)
        return [lines, Text("")] if lines and self.answer.text else [lines]

    def _refresh(self) -> None:
        out: list[RenderableType] = []
        if self.answer.text and self.thought.text and not self._thinking_done:
            out += self._end_thinking()
        out += [self.thought.commit(self.console), self.answer.commit(self.console)]
        room = max(3, self.console.height - 3)
        tails = [self.thought.tail(self.console, room), self.answer.tail(self.console, room)]
        self._show(out, Group(*[t for t in tails if t], self._meter()))

    def _show(self, printed: list, live: RenderableType) -> None:
        """Redraw the live region and print finished lines above it. Live redraws its region
        after each print from its last refresh, so it is refreshed first: updated without a
        refresh, the print would bring back the previous frame (a stale meter, after a stop)."""
        if self._live is None:
            return
        self._live.update(live, refresh=True)
        printed = [p for p in printed if p is not None]
        if printed:
            self.console.print(Group(*printed))

    def _meter(self) -> RenderableType:
        return self.meter(self.stats) if self.meter else Text("")

    def _write_plain(self, thinking: str, text: str) -> None:
        thinking, text = CONTROL.sub("", thinking), CONTROL.sub("", text)
        if thinking and self.err is not None:
            self.err.print(
                thinking, style=_THINKING, end="", highlight=False, markup=False, soft_wrap=True
            )
            self._wrote_thinking = True
        if text:
            self.console.file.write(text)
            self.console.file.flush()
