"""Gemma 4's thinking channel, split from the answer by token id, never by text.

A model turn may hold `<|channel>thought\\n...<channel|>` before the answer. mlx-lm's
detokenizers print special tokens as text (`<|channel>`, `<turn|>`, `<eos>`), so the ids are
routed instead: the marker ids switch channels, every other special id is dropped, and each side
has its own streaming detokenizer (a character split over two tokens stays whole).
"""

CHANNEL_OPEN = "<|channel>"
CHANNEL_CLOSE = "<channel|>"
# A channel starts with its name on a line of its own ("thought\n"): not shown.
_MAX_NAME = 32


def token_id(tokenizer, token: str) -> int | None:
    """The id of a single special token, or None when the vocabulary lacks it."""
    i = tokenizer.convert_tokens_to_ids(token)
    return None if i is None or i == tokenizer.unk_token_id else i


def strip_channels(ids: list[int], open_id: int | None, close_id: int | None) -> list[int]:
    """`ids` without channel blocks (markers included; an unclosed block runs to the end):
    the token form of the chat template's thinking removal for earlier model turns."""
    if open_id is None:
        return list(ids)
    out, inside = [], False
    for t in ids:
        if t == open_id:
            inside = True
        elif t == close_id and inside:
            inside = False
        elif not inside:
            out.append(t)
    return out


def _shown_thought(block: str) -> str:
    """A channel's text without its name line; while the first line is incomplete and could
    still be a name, nothing (so what is shown only ever grows)."""
    first, newline, rest = block.partition("\n")
    is_name = len(first) <= _MAX_NAME and " " not in first.strip()
    if not is_name:
        return block
    return rest if newline else ""


class ChannelSplitter:
    """Feed token ids as they stream; get (thinking, answer) text deltas back."""

    def __init__(self, tokenizer):
        self.open_id = token_id(tokenizer, CHANNEL_OPEN)
        self.close_id = token_id(tokenizer, CHANNEL_CLOSE)
        self.special = set(tokenizer.all_special_ids) - {self.open_id, self.close_id}
        self._answer = tokenizer.detokenizer
        self._thought = tokenizer.detokenizer
        self.in_channel = False
        self.thinking_tokens = 0
        self.answer_tokens = 0
        self._blocks: list[str] = []  # finished channels, as shown
        self._block_start = 0  # where the open channel starts in the thought detokenizer's text
        self._sent_thinking = 0
        self._sent_answer = 0

    @property
    def answer(self) -> str:
        """The answer as shown: no channels, no special tokens, no leading blank lines."""
        return self._answer.text.lstrip()

    @property
    def thinking(self) -> str:
        blocks = list(self._blocks)
        if self.in_channel:
            blocks.append(_shown_thought(self._thought.text[self._block_start :]))
        return "\n\n".join(b.strip("\n") for b in blocks if b.strip())

    def feed(self, ids: list[int]) -> tuple[str, str]:
        for t in ids:
            if t == self.open_id:
                self._open()
            elif t == self.close_id:
                self._close()
            elif t in self.special:
                continue
            elif self.in_channel:
                self._thought.add_token(t)
                self.thinking_tokens += 1
            else:
                self._answer.add_token(t)
                self.answer_tokens += 1
        return self._deltas()

    def finish(self) -> tuple[str, str]:
        """Flush what the detokenizers still hold (call once, at the end of the answer)."""
        self._answer.finalize()
        self._thought.finalize()
        return self._deltas()

    def _open(self):
        if self.in_channel:
            return
        self._thought.finalize()
        self.in_channel = True
        self._block_start = len(self._thought.text)

    def _close(self):
        if not self.in_channel:
            return
        self._thought.finalize()
        self._blocks.append(_shown_thought(self._thought.text[self._block_start :]))
        self.in_channel = False

    def _deltas(self) -> tuple[str, str]:
        thinking, answer = self.thinking, self.answer
        # Shown text only grows, except when a block turns out empty; never resend old text.
        dt = thinking[self._sent_thinking :] if len(thinking) > self._sent_thinking else ""
        da = answer[self._sent_answer :] if len(answer) > self._sent_answer else ""
        self._sent_thinking = max(self._sent_thinking, len(thinking))
        self._sent_answer = max(self._sent_answer, len(answer))
        return dt, da
