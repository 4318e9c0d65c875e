"""/verify's verdict on a greedy answer: identical to plain decoding, a near-tie, or a bug.

Greedy MTP keeps plain decoding's tokens wherever the verify pass (several tokens in one target
forward) and the one-token step sum in the same order. Apple GPUs from M3 on run quantised
matmuls over several rows with another kernel than over one, so the two paths' logits differ by
rounding; where the target's top two tokens are that close, the paths may pick different,
equally valid tokens, and the answers part from there. At the first difference the target's
logits for the two tokens (from the replay's own one-token step) tell which it is: a gap within
`ROUNDING_STEPS` steps of the logits' precision at their size is a near-tie, anything wider a
bug.
"""

import math
from dataclasses import asdict, dataclass

import mlx.core as mx

# Two paths that sum in different orders differ by a few roundings of each logit; the
# margin a near-tie may have is this many steps (units in the last place) of the logits' dtype.
ROUNDING_STEPS = 4
VERDICT_STYLE = {"identical": "green", "near-tie": "yellow", "bug": "bold red", "not-comparable": "yellow"}


@dataclass
class Difference:
    """Where an answer and its plain replay first part."""

    position: int  # index of the token in the answer
    answer_token: int | None  # None: the answer ended there
    plain_token: int | None  # None: the replay ended there
    margin: float | None  # the target's logit of plain_token minus answer_token's, there
    tolerance: float | None  # the widest margin rounding explains, there

    @property
    def near_tie(self) -> bool:
        return self.margin is not None and abs(self.margin) <= self.tolerance


@dataclass
class Verification:
    identical: bool | None  # None: not comparable token by token (a sampled answer)
    tokens: int
    message: str
    difference: Difference | None = None

    @property
    def verdict(self) -> str:
        """identical, near-tie, bug, or not-comparable."""
        if self.identical is None:
            return "not-comparable"
        if self.identical:
            return "identical"
        return "near-tie" if self.difference.near_tie else "bug"

    def as_dict(self) -> dict:
        out = {"verdict": self.verdict, "tokens": self.tokens, "message": self.message}
        if self.difference is not None:
            out |= asdict(self.difference)
        return out


def rounding_tolerance(a: float, b: float, dtype: mx.Dtype) -> float:
    """ROUNDING_STEPS units in the last place of `dtype` at the larger of two logits."""
    scale = max(abs(a), abs(b), float(mx.finfo(dtype).smallest_normal))
    return ROUNDING_STEPS * float(mx.finfo(dtype).eps) * 2.0 ** math.floor(math.log2(scale))


def first_difference(answer: list[int], plain: list[int]) -> int | None:
    first = next((i for i, (a, b) in enumerate(zip(answer, plain)) if a != b), None)
    if first is None and len(answer) != len(plain):
        return min(len(answer), len(plain))
    return first


def difference_at(
    position: int, answer: list[int], plain: list[int], logits: mx.array
) -> Difference:
    """The Difference at `position`, from the target's logits [V] for the token there."""
    a = answer[position] if position < len(answer) else None
    p = plain[position] if position < len(plain) else None
    if a is None or p is None:
        return Difference(position, a, p, None, None)
    la, lp = logits[a].item(), logits[p].item()
    return Difference(position, a, p, lp - la, rounding_tolerance(la, lp, logits.dtype))


def describe(d: Difference, n: int, how: str, token_text) -> str:
    """The line /verify shows for a difference; `token_text(id)` shows a token."""

    def show(token):
        return "the end" if token is None else f"{token_text(token)!r} (id {token})"

    line = (
        f"different at token {d.position} of {n}: the answer ({how}) has {show(d.answer_token)}, "
        f"plain decoding {show(d.plain_token)}"
    )
    if d.margin is None:
        return line + "; one of them ended there: a bug, please report it with the prompt"
    gap = f"the target's logits for the two differ by {abs(d.margin):.3g}"
    if d.near_tie:
        return (
            f"{line}; {gap}, within rounding ({d.tolerance:.2g}): a near-tie, both tokens equally "
            "valid (a verify pass may sum in another order than a one-token step)"
        )
    return f"{line}; {gap}, beyond rounding ({d.tolerance:.2g}): a bug, please report it with the prompt"
