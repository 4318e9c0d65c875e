"""The text of one answer as its tokens arrive: special tokens dropped and Gemma 4's thinking
channel kept apart (chat/thinking.py, the same split the chat shows), and the request's stop
strings: the answer ends just before the first one, and text that could be the beginning of one
is held back until the next tokens tell."""

from ..chat.thinking import ChannelSplitter


class AnswerText:
    def __init__(self, tokenizer, stops: list[str]):
        self.splitter = ChannelSplitter(tokenizer)
        self.stops = stops
        self.stopped = False  # a stop string was met
        self._held = ""

    @property
    def thinking_tokens(self) -> int:
        return self.splitter.thinking_tokens

    def feed(self, token: int) -> tuple[str, str]:
        """(thinking, answer) text new with this token."""
        thinking, text = self.splitter.feed([token])
        return thinking, self._cut(text)

    def finish(self) -> tuple[str, str]:
        """What is left once the answer is over."""
        thinking, text = self.splitter.finish()
        text = self._cut(text)
        if not self.stopped:
            text, self._held = text + self._held, ""
        return thinking, text

    def _cut(self, text: str) -> str:
        if self.stopped:
            return ""
        pending = self._held + text
        found = [i for i in (pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.stopped, self._held = True, ""
            return pending[: min(found)]
        keep = max(
            (n for s in self.stops for n in range(1, len(s)) if pending.endswith(s[:n])), default=0
        )
        self._held = pending[len(pending) - keep :]
        return pending[: len(pending) - keep]
