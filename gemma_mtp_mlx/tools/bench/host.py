"""`gemma-chat bench --host`: the host's work per step, eager against compiled, in one run.

What the decoding thread spends per plain step and per round of K drafts is the host's work:
building the graph and handing each primitive to MLX. MLX's CPU backend computes on threads of
its own, so that thread's CPU time (`time.thread_time`) measures the host alone, here as on a
Mac, where a speculative round pays it in full before the next can start. Every variant runs
through the public `generate`, greedy and to exactly `max_tokens`; the compiled runs must give
the eager runs' tokens. Beside the times: the primitives one step hands to MLX (counted on the
graph before it runs), and the graphs the compiled steps traced with the host's time in the
calls that traced them (the warm-up a first answer pays).
"""

import collections
import io
import re
import statistics
import time
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from ...engine.context import Context
from ...engine.generate import generate
from ...engine.sampling import Sampler
from ...engine.speculative import Row, draft, verify
from ...engine.steps import CompiledSteps, plain_step, steps_for
from ...models.moe import on_cpu
from .machine import busy_note, machine, preload_note

DRAFTS = (1, 2, 3, 4)
PROMPT_TOKENS = 64


def primitives(outputs) -> collections.Counter:
    """The primitives MLX would run to compute `outputs` (those not computed yet), by name."""
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return collections.Counter(re.findall(r'label ="(\w+)"', dot.getvalue()))


def timed_answer(pair, prompt, max_tokens: int, *, k: int | None, compile: bool) -> dict:
    """One greedy answer: the decoding thread's CPU seconds and the wall seconds from the first
    token out (the prefill's) to the last, per round."""
    tokens, cpu, wall, stats = [], None, None, None
    for chunk in generate(pair, prompt, max_tokens=max_tokens, mtp=k is not None,
                          draft_tokens=k, ignore_eos=True, compile=compile):
        if cpu is None:
            cpu, wall = time.thread_time(), time.perf_counter()
        tokens += chunk.token_ids
        stats = chunk.stats
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    return {"tokens": tokens, "cpu": cpu / stats.rounds, "wall": wall / stats.rounds,
            "rounds": stats.rounds}


def step_primitives(pair, prompt: list[int], k: int | None, *, compile: bool) -> int | None:
    """Primitives of one plain step (k None) or one round of K drafts on a scratch context;
    None where the graph cannot be seen whole before it runs: the eager mixture of experts on
    the CPU reads a multi-token block's routing on the host while the graph is built."""
    if not compile and k is not None and pair.target.args.enable_moe_block and on_cpu():
        return None
    ctx = Context(pair.target)
    logits, hidden, _ = ctx.prefill(prompt)
    row = Row(ctx, Sampler(), mx.argmax(logits[0, 0]).reshape(1, 1), hidden)
    if compile:
        steps = CompiledSteps(pair.target, pair.drafter)
        out = steps.plain([row], row.token) if k is None else steps.speculate([row], k)
        return sum(primitives(_arrays(out, ctx)).values())
    if k is None:
        return sum(primitives(_arrays(plain_step(pair.target, row.token, [ctx.cache], [Sampler()]),
                                      ctx)).values())
    drafts = draft(pair.target, pair.drafter, k, row.token, hidden, [ctx.cache], [Sampler()])
    drafting = sum(primitives([d for d, _ in drafts]).values())
    mx.eval([d for d, _ in drafts])
    out = verify(pair.target, k, row.token, drafts, [ctx.cache], [Sampler()])
    return drafting + sum(primitives(_arrays(out, ctx)).values())


def _arrays(out, ctx: Context) -> list:
    flat = []
    for a in out:
        flat += a if isinstance(a, list) else [a]
    return flat + [x for c in ctx.cache for x in (c.keys, c.values)]


def run_host_bench(
    pair,
    *,
    note: str,
    max_tokens: int = 64,
    repeats: int = 3,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Everything `--host` reports for `pair`; one JSON-ready dict."""
    say = progress or (lambda _message: None)
    vocab = pair.target.args.vocab_size
    prompt = np.random.default_rng(seed).integers(3, vocab, PROMPT_TOKENS).tolist()
    variants = [("plain", None)] + [(f"K={k}", k) for k in DRAFTS]

    say("warm-up: the first compiled answers trace their graphs")
    steps = steps_for(pair.target, pair.drafter, True)
    traces_before, traced_before = steps.traces, steps.trace_seconds
    for _, k in variants:
        for compile in (False, True):
            timed_answer(pair, prompt, 8, k=k, compile=compile)

    runs = {(label, c): [] for label, _ in variants for c in (False, True)}
    reference = None
    identical = True
    for rep in range(repeats):
        order = [(label, k, c) for label, k in variants for c in (False, True)]
        for label, k, compile in order if rep % 2 == 0 else order[::-1]:
            run = timed_answer(pair, prompt, max_tokens, k=k, compile=compile)
            reference = reference or run["tokens"]
            identical &= run["tokens"] == reference
            runs[(label, compile)].append(run)
        say(f"repeat {rep + 1}/{repeats} done")

    say("counting primitives")
    layers = pair.target.args.num_hidden_layers
    rows = []
    for label, k in variants:
        eager, compiled = runs[(label, False)], runs[(label, True)]
        row = {"variant": label}
        for name, rs in (("eager", eager), ("compiled", compiled)):
            row[f"{name}_cpu_ms"] = round(1000 * statistics.median(r["cpu"] for r in rs), 3)
            row[f"{name}_wall_ms"] = round(1000 * statistics.median(r["wall"] for r in rs), 3)
        row["cpu_ratio"] = round(row["compiled_cpu_ms"] / row["eager_cpu_ms"], 3)
        row["wall_ratio"] = round(row["compiled_wall_ms"] / row["eager_wall_ms"], 3)
        for name, compile in (("eager", False), ("compiled", True)):
            n = step_primitives(pair, prompt, k, compile=compile)
            row[f"{name}_primitives"] = n
            row[f"{name}_primitives_per_layer"] = None if n is None else round(n / layers, 1)
        rows.append(row)
    return {
        "bench": "host",
        "pair": note,
        "layers": layers,
        "max_tokens": max_tokens,
        "repeats": repeats,
        "identical": identical,
        "rows": rows,
        "traces": steps.traces - traces_before,
        "trace_seconds": round(steps.trace_seconds - traced_before, 3),
        "machine": machine(),
        "notes": [n for n in (busy_note(), preload_note()) if n],
    }
