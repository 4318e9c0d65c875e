"""Which round a step of the round pipeline (engine/rounds.py) timed.

A pipelined step queues the next round, then reads the one in flight, and its interval (from
the previous step's end to its own) holds one round's work, but which round's depends on the
device. MLX keeps at most ten tasks in flight while it evaluates: on its CPU backend a task is
one primitive, so `mx.async_eval` returns only once most of the queued round has run, and the
interval holds the round queued; a device that runs ahead of the host spends it on the round
read. Held against the round read alone, a step that changes the draft length gives the new
length's time to the old one, and a refresh round drafted between two rounds of the chosen
length (engine/policy.py, REFRESH_EVERY) swaps their times.

So a step times a round only where both readings agree:
- a step that reads a round of K and queues another of K times a round of K;
- a step that queued a round of K' behind one of K, and the step after it, which reads that
  round and queues K again, hold a round of each: K' costs their sum less what K costs now;
- a pipeline's last step (it queues nothing) times the round it reads, once a plain step is
  measured to tell it from an early read (below);
- a pipeline of one round (a parked policy's probe right after another: one after plain steps
  follows a hand-over, whose time lacks the reader's work) times it whole, built while the
  device waited, as an eager round is.
Any other step times nothing: a pipeline's first step when it queues a second round (its
interval holds both on the CPU backend), a change of length (the rounds after it time the new
one), a step that traced (tracing is no round's cost), and any interval shorter than EARLY_READ
plain steps. A round takes a plain step or more (its verify is a forward of two tokens or more);
a shorter interval is a read that came early, with only a round's last few primitives left to
wait for (on the CPU backend: after a trace, whose graph's first run spills over into the step
after it, and at a pipeline's last step, whose round ran within the step before), a third to
two thirds of a plain step on the development VM.
"""

from collections.abc import Callable
from dataclasses import dataclass

EARLY_READ = 0.75  # of a plain step: a shorter interval is the early read of a round that ran


@dataclass
class PipelineStep:
    read: int  # drafts of the round read
    queued: int  # drafts of the round queued before it was read (0: none)
    seconds: float  # the step's interval
    first: bool  # the pipeline's first step: it queued the round it reads as well
    timed: bool  # the interval may hold a round: every row in it, the reader's work included
    traced: bool  # the step traced a graph


class RoundTiming:
    """The rounds a pipeline's steps time, one step at a time (each pipeline its own)."""

    def __init__(self):
        self.previous: PipelineStep | None = None  # the step before, if it timed cleanly

    def round_of(
        self, step: PipelineStep, cost_now: Callable[[int], float | None], plain: float | None
    ) -> tuple[int, float] | None:
        """The draft length and seconds of the round `step` timed, or None; `cost_now(k)`: what
        a round of k costs now (None: not measured); `plain`: a plain step now (None: not
        measured yet)."""
        early = plain is not None and step.seconds < EARLY_READ * plain
        clean = step.timed and not step.traced and not early
        previous, self.previous = self.previous, step if clean and not step.first else None
        if not clean or (step.first and step.queued):
            return None
        if step.read == step.queued:
            return step.read, step.seconds
        if not step.queued:  # without a plain step, an early read cannot be told from a round
            return (step.read, step.seconds) if step.first or plain is not None else None
        if previous is None or (previous.queued, step.queued) != (step.read, previous.read):
            return None
        known = cost_now(previous.read)
        both = previous.seconds + step.seconds
        return (step.read, both - known) if known is not None and both > known else None
