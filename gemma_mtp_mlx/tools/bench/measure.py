"""Timed decodes, and the alternation that makes variants comparable on a noisy machine.

Tokens per second count decode time only: the clock starts when the first token (which comes
from the prefill) is out and stops after the last, for ours and the peers alike.
"""

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlx.core as mx

from ...engine.generate import generate
from ...engine.stats import GenerationStats


@dataclass
class Run:
    tokens: list[int]
    seconds: float  # decode wall time: from the first token out to the last
    peak_memory_bytes: int
    stats: GenerationStats | None = None  # what our engine reported (None for peers)
    rounds: list[tuple[int, int]] = field(default_factory=list)  # (drafted, accepted) per round

    @property
    def tokens_per_second(self) -> float:
        return (len(self.tokens) - 1) / self.seconds if self.seconds > 0 else 0.0

    @property
    def drafted(self) -> int:
        return sum(d for d, _ in self.rounds)

    @property
    def accepted(self) -> int:
        return sum(a for _, a in self.rounds)

    @property
    def tried(self) -> int:
        """Drafts the verification reached: the accepted ones and, per round, the first
        rejected one (the drafts after it were never compared)."""
        return sum(a + (a < d) for d, a in self.rounds)

    @property
    def acceptance(self) -> float | None:
        """The probability that a draft the verification reached was accepted: the quantity a
        simulated acceptance A sets (a round of K drafts accepts A + A^2 + ... + A^K of them)."""
        return self.accepted / self.tried if self.tried else None

    @property
    def tokens_per_forward(self) -> float | None:
        """Tokens emitted per target forward (rounds with no drafts count as forwards too)."""
        if self.stats is not None:  # ours: the engine counts every forward
            return self.stats.mean_accepted_length
        return (len(self.tokens) - 1) / len(self.rounds) if self.rounds else None


def run_ours(pair, prompt: list[int], max_tokens: int, *, mtp: bool, k: int | None = None) -> Run:
    """Our engine, greedy, to exactly `max_tokens` (end of sequence masked). `k=None` lets the
    engine choose the draft length."""
    tokens, rounds, first, stats = [], [], None, None
    for chunk in generate(
        pair, prompt, max_tokens=max_tokens, mtp=mtp, draft_tokens=k, ignore_eos=True
    ):
        if first is None:
            first = time.perf_counter()
        tokens += chunk.token_ids
        if chunk.round is not None:
            rounds.append((chunk.round.drafted, chunk.round.accepted))
        stats = chunk.stats
    end = time.perf_counter()
    return Run(tokens, end - first, stats.peak_memory_bytes, stats, rounds)


@dataclass
class Variant:
    label: str
    run: Callable[[list[int], int], Run]  # (prompt, max_tokens) -> Run
    runs: list[Run] = field(default_factory=list)

    def median(self) -> Run:
        """The run with the median decode time (the lower median for an even count)."""
        ordered = sorted(self.runs, key=lambda r: r.seconds)
        return ordered[(len(ordered) - 1) // 2]

    def fastest(self) -> Run:
        return min(self.runs, key=lambda r: r.seconds)


def alternate(
    variants: list[Variant],
    prompt: list[int],
    max_tokens: int,
    repeats: int,
    warmup_tokens: int = 8,
    progress: Callable[[str], None] | None = None,
) -> None:
    """One short warm-up run of every variant (compiles, allocates, runs the prefill path),
    then `repeats` rounds over all of them, the order reversed every other round, so that a
    machine slowing down or speeding up during the run weighs on every variant alike."""
    for v in variants:
        v.run(prompt, min(warmup_tokens, max_tokens))
    for rep in range(repeats):
        for v in variants if rep % 2 == 0 else variants[::-1]:
            v.runs.append(v.run(prompt, max_tokens))
            if progress is not None:
                progress(f"run {rep + 1}/{repeats}: {v.label} {v.runs[-1].tokens_per_second:.1f} tok/s")


def time_once(fn: Callable[[], object]) -> float:
    """Seconds of `fn` including the device work it queues (MLX is lazy: evaluate, then stop)."""
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start
