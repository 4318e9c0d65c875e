"""Counters for one answer: rounds, drafts, acceptance by position, time split, throughput,
and the measured plain-decoding baseline the speedup is taken against.

Every figure is measured on this run. A round's `seconds` is the wall time from the moment the
answer's previous tokens were out to the moment its own were, so the decode time is exactly
what the reader waited, less the prefills of answers that joined a batch meanwhile (theirs: a
row does not decode while another prefills). The baseline is plain decoding's speed over the
same time: steady steps of the pipelined plain loop of the same model on the same machine (the
engine runs a few now and then, and parked rounds are such steps) count one each, and a round
of K drafts counts the plain steps its time is worth by the plain/round cost ratio measured for
K (engine/costs.py), so the baseline follows the machine through the answer, as --no-mtp beside
it would have. An answer with no such round takes the pair's latest figure from earlier answers.
"""

from dataclasses import dataclass, field


@dataclass
class RoundStats:
    drafted: int
    accepted: int = 0
    emitted: int = 0
    seconds: float = 0.0  # wall time since the answer's previous tokens were out (see above)
    # Steady plain steps this round's time is worth (engine/costs.py): 1 for a step of the
    # pipelined plain loop in steady state, 1 / the measured plain/round ratio for a round of K
    # drafts, 0 where that is not known (the step that fills the pipeline, a K not measured).
    plain_steps: float = 0.0
    measuring: bool = False  # plain only to measure the baseline (not the policy parking)


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    context_tokens: int = 0
    generated_tokens: int = 0
    decoded_tokens: int = 0  # emitted by rounds (the first token comes from the prefill)
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    accepted_by_position: list[int] = field(default_factory=list)
    drafted_by_position: list[int] = field(default_factory=list)
    baseline_steps: float = 0.0  # plain steps the rounds below are worth
    baseline_seconds: float = 0.0
    earlier_baseline_seconds: float | None = None  # a plain step measured before this answer
    peak_memory_bytes: int = 0

    def add_round(self, r: RoundStats) -> None:
        self.rounds += 1
        self.drafted += r.drafted
        self.accepted += r.accepted
        self.decoded_tokens += r.emitted
        self.decode_seconds += r.seconds
        grow = r.drafted - len(self.drafted_by_position)
        if grow > 0:
            self.drafted_by_position += [0] * grow
            self.accepted_by_position += [0] * grow
        for i in range(r.drafted):
            self.drafted_by_position[i] += 1
            self.accepted_by_position[i] += int(i < r.accepted)
        if r.plain_steps:
            self.baseline_steps += r.plain_steps
            self.baseline_seconds += r.seconds

    def recredit(self, seconds: float, credited: float, worth: float) -> None:
        """A round of `seconds` credited `credited` plain steps (0: none, its time left out of
        the baseline too) is now worth `worth`."""
        self.baseline_steps += worth - credited
        if not credited:
            self.baseline_seconds += seconds

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    @property
    def mean_accepted_length(self) -> float | None:
        """Tokens emitted per target forward."""
        return self.decoded_tokens / self.rounds if self.rounds else None

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed, prefill excluded."""
        return self.decoded_tokens / self.decode_seconds if self.decode_seconds > 0 else None

    @property
    def baseline_tokens_per_second(self) -> float | None:
        """Plain decoding's speed over this answer: the plain steps its rounds were worth per
        second of them, else the latest earlier measurement."""
        if self.baseline_steps:
            return self.baseline_steps / self.baseline_seconds
        if self.earlier_baseline_seconds:
            return 1.0 / self.earlier_baseline_seconds
        return None

    @property
    def baseline_is_earlier(self) -> bool:
        """The baseline was measured before this answer (none of its rounds says it)."""
        return not self.baseline_steps and bool(self.earlier_baseline_seconds)

    @property
    def speedup(self) -> float | None:
        tps, base = self.tokens_per_second, self.baseline_tokens_per_second
        return tps / base if tps and base else None

    @property
    def acceptance_by_position(self) -> list[float]:
        return [a / d for a, d in zip(self.accepted_by_position, self.drafted_by_position) if d]

    def as_dict(self) -> dict:
        def r(x, n=4):
            return None if x is None else round(x, n)

        return {
            "prompt_tokens": self.prompt_tokens,
            "context_tokens": self.context_tokens,
            "generated_tokens": self.generated_tokens,
            "rounds": self.rounds,
            "drafted": self.drafted,
            "accepted": self.accepted,
            "acceptance_rate": r(self.acceptance_rate),
            "mean_accepted_length": r(self.mean_accepted_length),
            "acceptance_by_position": [round(a, 4) for a in self.acceptance_by_position],
            "tokens_per_second": r(self.tokens_per_second, 2),
            "baseline_tokens_per_second": r(self.baseline_tokens_per_second, 2),
            "speedup": r(self.speedup, 3),
            "prefill_seconds": r(self.prefill_seconds),
            "decode_seconds": r(self.decode_seconds),
            "peak_memory_bytes": self.peak_memory_bytes,
        }
