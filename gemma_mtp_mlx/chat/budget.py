"""Counting a text's tokens only as far as a budget. Tokenizing a huge text whole costs many
times its size in memory (a tokenizer keeps offsets and strings per token), so a text that may
be huge (a session file's message, a request's prompt) is counted a piece at a time, and the
counting stops as soon as the budget is passed."""

PIECE_CHARS = 1 << 15


def count_tokens(tokenizer, text: str, most: int) -> int:
    """The tokens of `text`, or some number above `most` once it is clear that there are more.
    Pieces end before a space, where a token boundary is likely, so a count is the text's own
    give or take a token per piece: a bound to refuse or drop by, not the exact prompt length."""
    count, start = 0, 0
    while start < len(text) and count <= most:
        end = start + PIECE_CHARS
        if end < len(text):
            space = text.rfind(" ", start + PIECE_CHARS // 2, end)
            end = space if space > 0 else end
        count += len(tokenizer.encode(text[start:end], add_special_tokens=False))
        start = end
    return count
