"""The decoder: one loop for one answer or many at once (rows), plain or speculative.

`add()` prefills an answer and takes its first token; each `step()` is then one round for every
answer still running: a speculative round (draft K, verify K + 1 in one target forward shared by
all rows, accept, commit) or, when K = 0, a step of the pipelined plain loop. Finished answers
(end of sequence, `max_tokens`) leave; others may join between steps. Every answer gets the
same treatment whatever runs beside it: the draft length from the policy (or fixed), capped so
that no round drafts past an answer's end, the baseline measurement, the plain pipeline. With
compiled steps (engine/steps.py) rounds are pipelined too (engine/rounds.py): a step reads the
round queued at the step before and queues the next, of the K decided now, before it does.

K per round comes from `DraftPolicy` over the costs this machine has shown so far
(engine/costs.py), learned from these very rounds. Steady plain steps are the baseline behind
the speedup meter. A few rounds into an answer (BASELINE_AFTER: the first steps after a prefill
run slower than the rest) and every BASELINE_EVERY rounds after, the decoder checks that the
pair's plain step for this many rows is still current: that rounds cost what they did just
after it was measured (`RowCosts.stale`). If not, the next rounds are plain steps
(BASELINE_STEPS after the one that fills the pipeline and SETTLING_STEPS), which costs only
those rounds' missed drafting, and only when the machine or the context has changed. Parked
rounds are samples too. Each round carries the plain steps its time is worth (a steady plain
step one, a round of K the inverse of K's measured plain/round ratio), from which each answer's
meter takes its baseline (a round pipeline's rounds once more as a whole when it ends, by the
ratios known then); an answer with none of those shows the pair's plain step now
(`RowCosts.current_plain`), and says so. Counting rounds rather than tokens keeps the rows of a
batch on the schedule each would have alone (they start together and share every round).

A pair with nothing trusted to weigh drafting against (a fresh process without stored costs,
engine/stored_costs.py) takes measurements one after another until two agree (the first plain
steps of a process run slow, `RowCosts.end_measurement`): plain steps, which lose nothing
against plain decoding, and no baseline samples: its meter shows no baseline and no speedup
until then ("measuring baseline"). The policy drafts only from then on, within a bound on what
exploring may lose (`LossBudget`); a fixed K drafts through the answer's first rounds first.
What the pair learned is written at the end of an answer (`close`), for the next process.
"""

import time
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from ..errors import GemmaChatError
from ..models.rollback import max_draft_tokens
from .context import Context
from .costs import RowCosts, measurements_for
from .plain import PlainSteps
from .policy import POLICY_MAX_DRAFT
from .round_timing import PipelineStep
from .rounds import RoundPipeline
from .sampling import Sampler
from .speculative import Row, run_round
from .stats import GenerationStats, RoundStats
from .steps import CompiledSteps, steps_for
from .stored_costs import CostStore

# Every duration here is read from this clock (tests put a controlled one in its place).
clock = time.perf_counter

BASELINE_STEPS = 4  # steady plain steps per baseline measurement
# Plain steps that settle a pipeline, after the one that fills it, before its steps are timed:
# the first steps run slower than the rest, after rounds and after a prefill alike (recorded on
# the development VM, relative to the fourth: after rounds +5.1 %, +2.9 %, +1.8 % in 75
# measurements; at a process's start +7.7 %, +5.2 %, +2.6 % against the fifth to eighth).
SETTLING_STEPS = 2
BASELINE_AFTER = 4  # rounds into an answer before its baseline is checked
BASELINE_EVERY = 32  # rounds between later checks (a change is caught within a few dozen)


@dataclass(eq=False)
class Stream:
    """One answer being decoded (compared by identity)."""

    row: Row
    max_tokens: int
    stop: frozenset[int]  # end-of-sequence ids (empty: run to max_tokens)
    stats: GenerationStats
    last_out: float  # when its latest tokens were out (moved on by newcomers' prefills)
    rounds_to_baseline: int  # rounds before its baseline is checked (again)
    emitted: int = 0
    finish_reason: str | None = None  # "stop" or "length" once finished
    # Its rounds in the round pipeline running now: (K, seconds, plain steps credited, the
    # plain steps a trace in it took), held against the plain step anew when it ends.
    piped: list[tuple[int, float, float, float]] = field(default_factory=list)


@dataclass
class Emitted:
    """What one round gave one answer."""

    stream: Stream
    tokens: list[int]
    round: RoundStats | None  # None: the first token, from the prefill
    finish_reason: str | None  # set when these tokens end the answer


def answer_end(new: list[int], done: int, max_tokens: int, stop: Iterable[int]) -> tuple[int, str | None]:
    """Where the `new` tokens end an answer that already has `done`: (index of the last token
    kept, "stop" at an end-of-sequence token or "length" at max_tokens), or (-, None)."""
    stop_at = next((i for i, t in enumerate(new) if t in stop), None)
    if stop_at is not None:
        return stop_at, "stop"
    if done + len(new) >= max_tokens:
        return max_tokens - done - 1, "length"
    return len(new) - 1, None


class Decoder:
    def __init__(
        self, pair, *, mtp: bool = True, draft_tokens: int | None = None,
        compile: bool | None = None,
    ):
        """`compile`: compiled steps or eager ones (engine/steps.py); None: as the pair says."""
        self.target = pair.target
        self.drafter = pair.drafter if mtp else None
        self.compile = pair.compile if compile is None else compile
        self.steps = steps_for(self.target, self.drafter, self.compile)
        if draft_tokens is not None and not 0 <= draft_tokens <= max_draft_tokens():
            raise GemmaChatError(
                f"draft tokens must be between 0 and {max_draft_tokens()}"
            )
        self.fixed_k = draft_tokens
        self.measurements = measurements_for(self.target, self.drafter, self.compile)
        if self.drafter is not None and self.measurements.store is None:
            self.measurements.store = CostStore.open(pair, self.measurements, self.compile)
        self.unsaved = False  # rounds run since the pair's costs were last written
        self.streams: list[Stream] = []
        self.plain: PlainSteps | None = None
        self.settling = 0  # the plain pipeline's steps still to run before its steps are timed
        # Compiled steps queue each round before the previous one is read (engine/rounds.py).
        self.rounds: RoundPipeline | None = None
        self.baseline_left = 0  # plain steps still to run for the baseline measurement
        self.measuring = False  # this round is one of them
        self.plain_measuring = False  # the latest plain step was
        self.last_end = 0.0  # when the latest round (or join) ended

    @property
    def most_drafts(self) -> int:
        if self.drafter is None:
            return 0
        return POLICY_MAX_DRAFT if self.fixed_k is None else self.fixed_k

    # -- answers joining and leaving -----------------------------------------------------------
    def add(
        self,
        prompt: list[int],
        sampler: Sampler,
        *,
        max_tokens: int,
        stop: Iterable[int] = (),
        context: Context | None = None,
    ) -> Emitted:
        """Prefill a new answer (only what `context` does not hold yet) and take its first
        token; the answer decodes from the next step on."""
        ctx = context or Context(self.target)
        if self.most_drafts > max_draft_tokens(ctx.slack):
            most = max_draft_tokens(ctx.slack)
            raise GemmaChatError(f"at most {most} draft tokens with this context")
        self._close_pipelines()  # they restart with the newcomer in them
        stats = GenerationStats(context_tokens=len(ctx.tokens))
        earlier = self.measurements.rows(len(self.streams) + 1).trusted_plain
        stats.earlier_baseline_seconds = earlier
        start = clock()
        logits, hidden, stats.prompt_tokens = ctx.prefill(prompt)
        # Its end: its tokens, and the drafts of a round in flight and of one queued behind it.
        ctx.make_room(len(ctx.tokens) + max_tokens + 2 * (self.most_drafts + 1))
        token = sampler.pick(logits[0, 0]).reshape(1, 1)
        first = token.item()
        now = clock()
        stats.prefill_seconds = now - start
        for s in self.streams:  # they waited on the newcomer's prefill: its time, not their decoding
            s.last_out += stats.prefill_seconds
        stream = Stream(
            Row(ctx, sampler, token, hidden),
            max_tokens,
            frozenset(stop),
            stats,
            last_out=now,
            rounds_to_baseline=BASELINE_AFTER,
        )
        kept = self._keep(stream, [first])
        if stream.finish_reason is None:
            self.streams.append(stream)
        self.last_end = now
        return Emitted(stream, kept, None, stream.finish_reason)

    def remove(self, stream: Stream) -> None:
        """Stop decoding `stream` now (its reader went away); its cache keeps what it emitted."""
        if stream in self.streams:
            _settle_pipeline(stream, self.measurements.rows(len(self.streams)))
            self._drop_from_pipelines(stream.row)
            self.streams.remove(stream)

    def close(self) -> None:
        """Leave every cache holding exactly what was emitted (what a pipeline queued out); once
        no answer is running, write what the pair learned for later processes."""
        self._close_pipelines()
        if self.unsaved and not self.streams and self.measurements.store is not None:
            self.measurements.store.save(self.measurements)
            self.unsaved = False

    def _close_pipelines(self) -> None:
        costs = self.measurements.rows(len(self.streams)) if self.streams else None
        for s in self.streams:
            _settle_pipeline(s, costs)
        for pipeline in (self.plain, self.rounds):
            if pipeline is not None:
                pipeline.close()
        self.plain = self.rounds = None

    def _drop_from_pipelines(self, row: Row) -> None:
        for pipeline in (self.plain, self.rounds):
            if pipeline is not None and row in pipeline.rows:
                pipeline.drop(row)

    # -- rounds ------------------------------------------------------------------------------
    def step(self) -> list[Emitted]:
        """One round for every running answer: what each answer got (an answer may get two
        entries: the plain pipeline's last token, then a speculative round). Answers that
        finished leave the decoder."""
        costs = self.measurements.rows(len(self.streams))
        self.unsaved = True
        k = self._draft_length(costs)
        if k == 0:  # a round in flight is read first, alone: plain steps start at the next step
            return self._round(costs, 0) if self.rounds is not None else self._plain_step(costs)
        out = []
        handed_over = self.plain is not None
        if handed_over:  # the plain pipeline's queued tokens come first: no forward is wasted
            ids = self.plain.hand_over()
            self.plain = None
            handed = RoundStats(0, measuring=self.plain_measuring)
            out = self._emit([(s, [t], replace(handed)) for s, t in zip(self.streams, ids)])
            if not self.streams:
                return out
        return out + self._round(costs, k, timed=not handed_over)

    def _round(self, costs: RowCosts, k: int, timed: bool = True) -> list[Emitted]:
        """A speculative round for every running answer; compiled steps read the round in
        flight and queue the next of `k` drafts first (0: none, the pipeline ends)."""
        by_row = {s.row: s for s in self.streams}
        traces, traced_seconds = self.steps.traces, self.steps.trace_seconds
        pipeline = None  # eager rounds: each read before the next is built
        if isinstance(self.steps, CompiledSteps):
            first = self.rounds is None or self.rounds.inflight is None
            if first:
                self.rounds = RoundPipeline([s.row for s in self.streams], self.steps, k)
            pipeline = self.rounds
            timed = timed and pipeline.inflight.whole
            rows = list(pipeline.inflight.rows)
            # A parked policy's probe is one round: none queued behind it on its decision. Near
            # an answer's end the next round waits to be decided on what this one emits, so that
            # it drafts past no end, as an unpipelined round would not.
            probe = self.fixed_k is None and self.measurements.policy.probing
            ahead = k <= self._room(pipeline.inflight.k + 1) and not probe
            k, results = pipeline.step(k if ahead else 0)
            if pipeline.inflight is None:
                self.rounds = None
        else:
            rows = [s.row for s in self.streams]
            results = run_round(rows, self.steps, k)
        end = clock()
        streams = [by_row[r] for r in rows]
        # After a hand-over the round's time lacks the reader's work; tracing a new step's graph
        # is no round's cost; a pipeline's step times the round engine/round_timing.py says.
        traced = self.steps.traces != traces
        plain = costs.current_plain
        if pipeline is None:
            timing = (k, end - self.last_end) if timed and not traced else None
        else:
            queued = pipeline.inflight.k if pipeline.inflight is not None else 0
            step = PipelineStep(k, queued, end - self.last_end, first, timed, traced)
            timing = pipeline.timing.round_of(
                step, lambda j: costs.round_now(j) if j in costs.rounds else None, plain
            )
        if timing is not None:
            warm = all(s.stats.rounds >= BASELINE_AFTER for s in streams)
            costs.observe_round(*timing, warm)
        for r in results:
            self.measurements.policy.observe(k, r.accepted)
        # The loss budget weighs a round's interval against the plain step of these rows (the
        # intervals of a pipeline's rounds add up to what they took); a batch that just lost a
        # row may have none measured yet (its first steps measure it).
        if self.fixed_k is None and not traced and plain is not None:
            tokens = sum(len(r.tokens) for r in results) / len(results)
            self.measurements.budget.settle(tokens, (end - self.last_end) / plain - tokens)
        ratio = costs.plain_ratio(k)  # a round of K is worth 1 / ratio plain steps
        # Plain decoding traces its own steps, never a round's: it would have decoded through
        # the time this round's graph took to trace.
        tracing = (self.steps.trace_seconds - traced_seconds) / plain if traced and plain else 0.0
        worth = 1 / ratio + tracing if ratio else 0.0
        rounds = [
            (s, r.tokens, RoundStats(k, r.accepted, plain_steps=worth))
            for s, r in zip(streams, results)
        ]
        out = self._emit(rounds, end)
        if pipeline is not None:
            for e in out:
                e.stream.piped.append((k, e.round.seconds, worth, tracing))
                if e.finish_reason or pipeline.inflight is None:
                    _settle_pipeline(e.stream, costs)
        return out

    def _draft_length(self, costs: RowCosts) -> int:
        """K for the next round; 0 is a plain step, also while the baseline is being measured
        (`self.measuring`)."""
        if self.drafter is None:
            return 0
        checked = [s for s in self.streams if s.rounds_to_baseline <= 0]
        for s in checked:
            s.rounds_to_baseline = BASELINE_EVERY
        cold = any(s.stats.rounds < BASELINE_AFTER for s in self.streams)
        # Nothing trusted yet: the policy weighs drafting against a plain step, so it measures
        # first; a fixed K drafts on, and measures once the answer's first rounds are over.
        untrusted = not costs.trusted and (self.fixed_k is None or not cold)
        if (untrusted or (bool(checked) and costs.stale)) and not self.baseline_left:
            # + the steps that fill and settle the plain pipeline (what is left of them), and the
            # one that reads a round in flight
            filling = 1 + SETTLING_STEPS if self.plain is None else self.settling
            self.baseline_left = BASELINE_STEPS + filling + (self.rounds is not None)
            costs.start_measurement(provisional=cold or not costs.trusted)
        self.measuring = bool(self.baseline_left)
        if self.measuring:
            self.baseline_left -= 1
            return 0
        # A round emits up to K + 1 tokens, after the token a running plain pipeline hands over
        # or the round in flight emits at least.
        room = self._room(int(self.plain is not None or self.rounds is not None))
        if room <= 0:
            return 0
        rows = [s.row for s in self.streams]

        def tracing(k: int) -> float:
            return self.steps.trace_seconds_before(rows, k)

        if self.fixed_k is None:
            policy = self.measurements.policy
            budget = self.measurements.budget
            if budget.spent:  # parked; a probe that misses costs its round less one token
                probe = policy.probe_length(costs, room, tracing)
                probe_loss = costs.round_seconds(probe) / costs.current_plain - 1
                return policy.parked(room, may_probe=budget.affords(probe_loss), probe=probe)
            return policy.choose(costs, room, tracing)
        if room >= self.fixed_k:
            return self.fixed_k
        # The answer's last rounds have room for fewer drafts than asked. A length whose step is
        # not traced yet would trace a graph (several plain steps' time) for a few tokens: the
        # longest traced length that fits runs instead, else plain steps finish the answer.
        return next((k for k in range(room, 0, -1) if not tracing(k)), 0)

    def _room(self, ahead: int) -> int:
        """The most drafts a round may hold without drafting past the end of every answer, after
        `ahead` tokens that come before it."""
        return max(s.max_tokens - s.emitted for s in self.streams) - 1 - ahead

    def _plain_step(self, costs: RowCosts) -> list[Emitted]:
        # The first step also builds the forward it queues, and the next SETTLING_STEPS run
        # slower than the rest: none of them is timed.
        steady = self.plain is not None and not self.settling
        traces = self.steps.traces
        if self.plain is None:
            self.plain = PlainSteps([s.row for s in self.streams], self.steps)
            self.settling = SETTLING_STEPS
        elif self.settling:
            self.settling -= 1
        self.plain_measuring = self.measuring
        ids = self.plain.step()
        end = clock()
        # Tracing a graph is no step's cost. A fixed K's plain steps are its baseline's
        # measurements; those that finish an answer with no room for a round are no sample: each
        # would restart the rounds held against the plain step (engine/costs.py) at every answer.
        sample = self.drafter is None or self.fixed_k is None or self.measuring
        if sample and steady and self.steps.traces == traces:
            costs.observe_plain(end - self.last_end)
        if self.measuring and not self.baseline_left:
            costs.end_measurement()
        if self.drafter is not None and self.fixed_k is None:
            self.measurements.budget.settle(1.0)
        # Steps taken before the pair trusts its plain step (a cold start's) are no sample.
        trusted = steady and costs.trusted
        step = RoundStats(0, plain_steps=float(trusted), measuring=self.measuring)
        out = self._emit([(s, [t], replace(step)) for s, t in zip(self.streams, ids)], end)
        if self.plain is not None and not self.plain.rows:
            self.plain = None
        return out

    def _emit(self, rounds: list[tuple[Stream, list[int], RoundStats]], end=None) -> list[Emitted]:
        """Keep each stream's tokens up to its end, time and record its round, and let
        finished streams go."""
        end = clock() if end is None else end
        out = []
        for s, tokens, stats in rounds:
            kept = self._keep(s, tokens)
            stats.emitted, stats.seconds, s.last_out = len(kept), end - s.last_out, end
            s.rounds_to_baseline -= 1
            s.stats.add_round(stats)
            out.append(Emitted(s, kept, stats, s.finish_reason))
        # Only an answer none of whose rounds says its baseline yet shows the pair's figure.
        unsaid = [e.stream.stats for e in out if not e.stream.stats.baseline_steps]
        if unsaid:
            baseline = self.measurements.rows(len(rounds)).trusted_plain
            for stats in unsaid:
                stats.earlier_baseline_seconds = baseline
        self.last_end = end
        return out

    def _keep(self, s: Stream, tokens: list[int]) -> list[int]:
        """The tokens of `tokens` that belong to the answer; at its end, what follows the last
        one kept is rolled back out of the cache (a plain look-ahead included)."""
        stop_at, finish = answer_end(tokens, s.emitted, s.max_tokens, s.stop)
        if finish:
            self._drop_from_pipelines(s.row)
            s.row.ctx.rewind(len(tokens) - 1 - stop_at)
            tokens = tokens[: stop_at + 1]
            s.finish_reason = finish
            if s in self.streams:
                self.streams.remove(s)
        s.emitted += len(tokens)
        s.stats.generated_tokens = s.emitted
        return tokens


def _settle_pipeline(stream: Stream, costs: RowCosts) -> None:
    """Hold the stream's rounds of the round pipeline that ended (for it) against the plain step
    as a whole, by the plain/round ratios known now. A pipeline's intervals add up to its
    rounds' work whichever round each holds (engine/round_timing.py), but a part of them need
    not: on MLX's CPU backend the round read when a K's ratio comes ran in the step before,
    uncredited, and the pipeline's last read comes early, so the rounds credited from then on
    are worth a round more than their time holds, which a short answer's baseline shows. Where
    a K of them still has no ratio, what was credited stays."""
    rounds, stream.piped = stream.piped, []
    ratios = {k: costs.plain_ratio(k) for k, *_ in rounds}
    if not rounds or not all(ratios.values()):
        return
    for k, seconds, credited, tracing in rounds:
        stream.stats.recredit(seconds, credited, 1 / ratios[k] + tracing)
