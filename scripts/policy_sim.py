"""The draft policy against fixed draft lengths, on a clock that only this script moves.

    .venv/bin/python scripts/policy_sim.py [--round-fixed 0.05] [--per-draft 0.37] [--trace 0.7]
        [--trace-per-draft 0.45] [--tokens 300] [--noise 0.15 --seed 1] [--stored] [--queued]

On a busy machine the same answer twice differs by more than the policy's shortfall, so the pair
bench cannot tell a better policy from a luckier run. Here the engine decodes for real (the
demo pair, compiled steps, the real decoder with its baseline measurements, loss budget and
probes), but time passes only as this script says: a plain step costs STEP, a round of K drafts
STEP x (1 + round_fixed + per_draft x K), tracing a compiled step's graph (its first call of a
shape: a fresh process's, or a context outgrowing its buffer) `trace` + `trace_per_draft` x K
plain steps (a round's graph holds K drafter steps), the reader READ per chunk. Each forward is
paid once, when it is read (a device that runs ahead of the host), or with `--queued` when it is
queued, as MLX's CPU backend runs it (engine/round_timing.py). With `--noise`,
every step and round costs that times the machine's speed of the moment, a random walk that
reverts within some ten steps (the slow and fast spells of a shared machine: the policy times a
length in one and goes by it in another), the same walk in every answer from its start. Drafts
hit where the demo drafter's did: each workload of the pair bench is decoded once at K = 6 and
the accepted positions kept (the simulated drafter of the bench then proposes the target's token
exactly there). The default
costs are the demo pair's own on the 2-core VM (its plain/round ratios: a round of K costs about
1 + 0.37 K plain steps; a plain step's graph traces in 6-7 ms, a round's in some 4 ms more per
draft: 10-29 ms for K = 1..6). Each fixed K and the policy's first answer decode with a drafter
of their own, so each traces its steps as a fresh process would.

Printed per workload: tokens per simulated second of plain decoding and each fixed K, and of
the policy three times in a row in one process, its first answer with nothing learned ("fresh")
and the two after, each as a share of the best fixed K; then how far the meter's baseline in
every MTP answer was from plain decoding's simulated speed.

With `--stored`, the fresh-process bench with a stored file instead (`stored_file_runs`): each
answer a process of its own that starts from the costs the one before it stored, plain, K = 1,
K = 3 and the policy three times in turn after a first pass that writes the file; medians.
"""

import argparse
import dataclasses
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gemma_mtp_mlx import generate, load  # noqa: E402
from gemma_mtp_mlx.engine import decode, stored_costs  # noqa: E402
from gemma_mtp_mlx.engine import steps as steps_module  # noqa: E402
from gemma_mtp_mlx.engine.costs import measurements_for  # noqa: E402
from gemma_mtp_mlx.engine.plain import PlainSteps  # noqa: E402
from gemma_mtp_mlx.engine.rounds import RoundPipeline  # noqa: E402
from gemma_mtp_mlx.engine.steps import CompiledSteps  # noqa: E402
from gemma_mtp_mlx.tools.bench.simulated import Proposals, SimulatedDrafter  # noqa: E402
from gemma_mtp_mlx.tools.bench.workloads import workloads  # noqa: E402

STEP, READ = 0.01, 0.0005


class MachineSpeed:
    """A factor on what each step costs over an answer's simulated time: exp(x), x a walk with
    standard deviation `noise` that keeps REVERT of itself from one plain step's time to the
    next. Every answer meets the same walk from its start (`restart`): the variants are held to
    one another on the same machine."""

    REVERT, LENGTH = 0.9, 100_000

    def __init__(self, clock, noise: float, seed: int):
        shocks = np.random.default_rng(seed).normal(0.0, noise, self.LENGTH)
        x = np.empty(self.LENGTH)
        x[0] = shocks[0]
        for i in range(1, self.LENGTH):
            x[i] = self.REVERT * x[i - 1] + (1 - self.REVERT**2) ** 0.5 * shocks[i]
        self.walk, self.clock, self.start = np.exp(x), clock, 0.0

    def restart(self, offset: int = 0) -> None:
        """The walk from its start, or from `offset` plain steps' time into it."""
        self.start = self.clock.now - offset * STEP

    def __call__(self) -> float:
        return float(self.walk[min(int((self.clock.now - self.start) / STEP), self.LENGTH - 1)])


class Clock:
    """Each reading costs the engine a fifth of a millisecond; the rest is set below."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.0002
        return self.now


def simulate_time(
    clock: Clock, round_fixed: float, per_draft: float, trace: float, trace_per_draft: float,
    speed: MachineSpeed, queued: bool = False,
) -> None:
    """Every forward costs its time once: a plain step's, or a round's. `queued`: as MLX's CPU
    backend runs (engine/round_timing.py), a forward's time passes when it is queued, so a
    pipeline's first step holds two and its last read comes early; else as a device that runs
    ahead of the host, when it is read (a plain pipeline's queued token handed over to a round
    included: its forward ran)."""
    real_function = CompiledSteps._function

    def paid(real, steps_of):
        """`real`, after which the clock moves by `steps_of(args, out)` plain steps."""

        def call(*args):
            out = real(*args)
            clock.now += STEP * steps_of(args, out) * speed()
            return out

        return call

    def one(args, out):
        return 1.0

    def round_of(k):
        return 1 + round_fixed + per_draft * k

    def function(steps, signature, *args):
        compiled = real_function(steps, signature, *args)

        def call(*inputs):
            traces = steps.traces
            out = compiled(*inputs)
            if steps.traces != traces:
                drafts = signature[1] if signature[0] == "round" else 0
                clock.now += STEP * (trace + trace_per_draft * drafts)
            return out

        return call

    decode.clock = clock
    steps_module.clock = lambda: clock.now  # (reading it costs nothing: the trace is added above)
    decode.run_round = paid(decode.run_round, lambda args, out: round_of(args[2]))  # (rows, steps, k)
    if queued:
        PlainSteps._feed = paid(PlainSteps._feed, one)
        RoundPipeline._queue = paid(RoundPipeline._queue, lambda args, out: round_of(args[1]))  # (self, k, start)
    else:
        PlainSteps.step = paid(PlainSteps.step, one)
        PlainSteps.hand_over = paid(PlainSteps.hand_over, one)
        RoundPipeline.step = paid(RoundPipeline.step, lambda args, out: round_of(out[0]))  # -> (k, results)
    CompiledSteps._function = function
    # Every answer starts from what this process learned, never from a file of earlier runs.
    stored_costs.CostStore.open = classmethod(lambda cls, *args, **kwargs: None)


def hits_of(pair, prompt: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """The target's greedy answer and, per sequence position, whether the real drafter's draft
    there was accepted in rounds of 6 (a round's bonus token counts as a hit). The answer is
    decoded twice and the second kept: the first measures the pair's plain step, and the
    positions of those plain steps say nothing about the drafter. Eager steps: compiled ones end
    an answer in plain steps where a shorter round would trace, and those say nothing either."""
    options = dict(max_tokens=n, draft_tokens=6, ignore_eos=True, compile=False)
    for _ in generate(pair, prompt, **options):
        pass
    answer, hits = [], [False] * (len(prompt) + 1)
    for chunk in generate(pair, prompt, **options):
        answer += chunk.token_ids
        if chunk.round is not None and chunk.round.drafted:
            a, d = chunk.round.accepted, chunk.round.drafted
            hits += [True] * a + [a == d]
        elif chunk.round is not None:
            hits.append(False)
    return answer, np.array(hits[: len(prompt) + n], dtype=bool)


def simulated(pair, proposals: Proposals):
    """The pair with the simulated drafter: a new drafter object, so nothing learned with
    another carries over."""
    return dataclasses.replace(pair, drafter=SimulatedDrafter(pair.drafter, proposals))


def answer_speed(
    clock: Clock, speed: MachineSpeed, pair, prompt, n: int, k: int | None, mtp=True, offset=0
):
    """(tokens per simulated second, the meter's baseline in tokens per second); the machine's
    walk from `offset` on."""
    speed.restart(offset)
    start, emitted, stats = None, 0, None
    for chunk in generate(pair, prompt, max_tokens=n, draft_tokens=k, mtp=mtp, ignore_eos=True):
        clock.now += READ
        start = clock.now if start is None else start
        emitted += len(chunk.token_ids)
        stats = chunk.stats
    return (emitted - 1) / (clock.now - start), stats.baseline_tokens_per_second


def process(clock, speed, pair, prompt, n: int, k: int | None, stored: dict | None, offset: int):
    """One answer as a fresh process with a stored file gives it: `pair` new to this script (its
    own costs and compiled steps, so it traces as a process does) starting from `stored`, the
    machine's walk from `offset`. (tokens per second, baseline, what it stores)."""
    measurements = measurements_for(pair.target, pair.drafter, True)
    if stored is not None:
        stored_costs.restore(measurements, stored)
    tps, baseline = answer_speed(clock, speed, pair, prompt, n, k, offset=offset)
    return tps, baseline, stored_costs.snapshot(measurements)


def stored_file_runs(clock, speed, pair, recorded, n: int) -> None:
    """The fresh-process bench with a stored file: per workload, each variant in its own process,
    all sharing one file (a first pass writes it), three alternated repeats; medians. Each
    repeat meets the machine at another point of its walk, as processes run minutes apart do
    (the variants of one repeat at the same point: they are held to one another)."""
    ratios, meters = [], []
    for name, (prompt, answer, hits) in recorded.items():
        proposals = Proposals(prompt + answer, 1.0, pair.target.args.vocab_size, hits=hits)
        stored, runs = None, {"plain": [], 1: [], 3: [], None: []}
        for repeat in range(4):  # the first writes the file
            offset = 1000 * repeat
            plain, _ = answer_speed(clock, speed, pair, prompt, n, None, mtp=False, offset=offset)
            for k in (1, 3, None):
                fresh = simulated(pair, proposals)
                tps, baseline, stored = process(clock, speed, fresh, prompt, n, k, stored, offset)
                if repeat:
                    runs[k].append((tps, baseline))
            if repeat:
                runs["plain"].append((plain, None))
        med = {k: statistics.median(tps for tps, _ in v) for k, v in runs.items()}
        best = max(med[1], med[3])
        said = " ".join(f"K={k} {med[k]:5.1f}" for k in (1, 3))
        print(
            f"{name:10s} plain {med['plain']:5.1f} {said} policy {med[None]:5.1f}: "
            f"{med[None] / best:.2f} of the best fixed K, {med[None] / med['plain']:.2f}x plain"
        )
        ratios.append(med[None] / best)
        baselines = [statistics.median(b for _, b in runs[k] if b) / med["plain"] for k in (1, 3, None)]
        print(f"{'':10s} baselines / plain: " + " ".join(f"{b:.2f}" for b in baselines))
        meters += baselines
    print(f"stored file: policy / best fixed K: lowest {min(ratios):.2f}, mean {statistics.mean(ratios):.2f}")
    print(f"stored file: the meter's baseline / plain decoding (medians): {min(meters):.3f}-{max(meters):.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--round-fixed", type=float, default=0.05, help="plain steps a round costs beyond one"
    )
    parser.add_argument("--per-draft", type=float, default=0.37)
    parser.add_argument(
        "--trace", type=float, default=0.7, help="plain steps a plain step's trace takes"
    )
    parser.add_argument(
        "--trace-per-draft", type=float, default=0.45, help="plain steps more per draft"
    )
    parser.add_argument("--tokens", type=int, default=300)
    parser.add_argument("--noise", type=float, default=0.0, help="the machine's speed: log std dev")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--stored", action="store_true", help="fresh processes sharing a stored file instead"
    )
    parser.add_argument(
        "--queued", action="store_true", help="a forward's time passes when queued (MLX's CPU)"
    )
    args = parser.parse_args()
    pair = load("demo")
    clock = Clock()
    # First: the recording measures its baseline on this clock too.
    speed = MachineSpeed(clock, args.noise, args.seed)
    prices = args.round_fixed, args.per_draft, args.trace, args.trace_per_draft
    simulate_time(clock, *prices, speed, args.queued)
    recorded = {
        w.name: (w.prompt, *hits_of(pair, w.prompt, args.tokens))
        for w in workloads(pair, args.tokens)
    }
    if args.stored:
        stored_file_runs(clock, speed, pair, recorded, args.tokens)
        return
    shares = {"fresh": [], "then": [], "then again": []}
    meters = []
    for name, (prompt, answer, hits) in recorded.items():
        plain, _ = answer_speed(clock, speed, pair, prompt, args.tokens, None, mtp=False)
        proposals = Proposals(prompt + answer, 1.0, pair.target.args.vocab_size, hits=hits)
        fixed = {
            k: answer_speed(clock, speed, simulated(pair, proposals), prompt, args.tokens, k)
            for k in range(1, 7)
        }
        best = max(tps for tps, _ in fixed.values())
        policy_pair = simulated(pair, proposals)  # one pair: what its answers learn carries over
        policy = [
            answer_speed(clock, speed, policy_pair, prompt, args.tokens, None) for _ in shares
        ]
        row = " ".join(f"K={k} {tps:5.1f}" for k, (tps, _) in fixed.items())
        said = " ".join(f"{label} {tps / best:.2f}" for label, (tps, _) in zip(shares, policy))
        print(f"{name:10s} plain {plain:5.1f} {row} | policy: {said}")
        for label, (tps, _) in zip(shares, policy):
            shares[label].append(tps / best)
        meters += [baseline / plain for _, baseline in [*fixed.values(), *policy] if baseline]
    for label, values in shares.items():
        lowest, mean = min(values), statistics.mean(values)
        print(f"policy / best K, {label}: lowest {lowest:.2f}, mean {mean:.2f}")
    print(f"the meter's baseline / plain decoding: {min(meters):.3f}-{max(meters):.3f}")


if __name__ == "__main__":
    main()
