"""`gemma-chat bench`: the speed story, measured side by side in one process.

For one model pair and four workload classes (prose, code, structured, a prompt longer than the
sliding window) it times, alternating the runs after a warm-up and keeping medians:

- ours plain and ours MTP (the engine's own draft length, and fixed K = 1..6),
- mlx-lm's plain decode of the same target (`mlx_lm.stream_generate` over mlx-lm's own
  `gemma4_text` model holding our weights), and mlx-vlm's MTP when mlx-vlm is importable,
- a drafter that never hits (same work per step, every draft rejected): the cost of drafting,

and compares every run's tokens with ours plain, token by token. It also measures cost curves:
a target forward of T = 1..9 tokens on a warm cache, and one drafter step with the dense head and
with the centroid head, as ratios to a 1-token step, for the pair and for random-weight targets
with the real layer dimensions of E2B and 26B-A4B (fewer layers, a smaller vocabulary).
`--moe-curve` measures only the MoE verify cost curve: a random 26B-A4B-core stack, ours and
mlx-lm's model holding the same weights, a forward of T = 1..9 distinct tokens each (issue 7).

Tokens per second count decode time only: the clock starts when the first token (which comes
from the prefill) is out and stops after the last, for ours and the peers alike. Every figure is
measured in this run; nothing is estimated. Speed goals live here, never in tests.
"""

import dataclasses
import functools
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import mlx.core as mx
import numpy as np
import typer
from mlx.utils import tree_flatten

from . import __version__
from .engine.context import Context
from .engine.generate import encode_prompt, generate
from .engine.sampling import ban_bias
from .engine.stats import GenerationStats
from .errors import GemmaChatError
from .models.assistant import Assistant, AssistantArgs
from .models.gemma4 import Model, ModelArgs
from .models.moe import fused_module_path

FIXED_KS = (1, 2, 3, 4, 5, 6)
COST_TOKENS = 9  # verify blocks of T = 1..9 tokens (K = 0..8 drafts)
# The goals of issue #6: what a run is held against (reported, never asserted).
GOALS = {
    "plain_vs_mlx_lm": 1.0,  # ours plain / mlx-lm plain
    "mtp_speedup": 1.5,  # ours MTP / ours plain, on the demo pair
    "never_hit_vs_plain": 0.97,  # ours with a drafter that never hits / ours plain
}


# -- workloads ---------------------------------------------------------------------------------
@dataclass
class Workload:
    name: str
    description: str
    prompt: list[int]


_PROSE = (
    "Tell me the tale of the old king who lost his crown in a single night of storm, of the "
    "daughter who sailed after him, and of what the sea gave back to them both."
)
_CODE = (
    "Complete this Python module so that it reads a CSV file and returns its rows as "
    "dictionaries, skipping blank lines.\n\n```python\nimport csv\n\n\ndef read_rows(path):\n"
)
_STRUCTURED = (
    "Return a JSON list of six books, each an object with the keys title, author, year and "
    'genre, like this:\n[\n  {"title": "The Tempest", "author": "William Shakespeare", '
    '"year": 1611, "genre": "comedy"},\n'
)
_NAMES = ["ariel", "prospero", "miranda", "caliban", "ferdinand", "gonzalo", "antonio", "sebastian"]
_EVENTS = ["opened", "closed", "renamed", "moved", "archived", "restored", "shared", "locked"]


def _long_context_body(tokenizer, tokens: int) -> str:
    """A varied, deterministic log of at least `tokens` tokens: no passage repeats, so the
    drafter cannot simply copy from the prompt."""
    rng = random.Random(0)
    lines, count, i = [], 0, 0
    while count < tokens:
        line = (
            f"{9 + i // 60:02d}:{i % 60:02d} {rng.choice(_NAMES)} {rng.choice(_EVENTS)} "
            f"file-{rng.randint(100, 999)} ({rng.randint(1, 64)} kB)"
        )
        lines.append(line)
        count += len(tokenizer.encode(line + "\n", add_special_tokens=False))
        i += 1
    return "\n".join(lines)


def workloads(pair, max_tokens: int) -> list[Workload]:
    """Prose, code, structured output and a prompt that runs past the sliding window."""
    args = pair.target.args
    room = args.max_position_embeddings - max_tokens - 64
    long_tokens = max(64, min(int(args.sliding_window * 1.5), room))
    long_text = (
        "Here is today's activity log. Summarize who did what, in order.\n\n"
        + _long_context_body(pair.tokenizer, long_tokens)
    )

    def encode(text):
        raw = pair.tokenizer.chat_template is None
        return encode_prompt(pair.tokenizer, text, raw=raw)

    window = args.sliding_window
    return [
        Workload("prose", "a story request", encode(_PROSE)),
        Workload("code", "complete a Python function", encode(_CODE)),
        Workload("structured", "a JSON list", encode(_STRUCTURED)),
        Workload("long", f"a log past the {window}-token sliding window", encode(long_text)),
    ]


# -- one timed decode --------------------------------------------------------------------------
@dataclass
class Run:
    tokens: list[int]
    seconds: float  # decode wall time: from the first token out to the last
    peak_memory_bytes: int
    stats: GenerationStats | None = None

    @property
    def tokens_per_second(self) -> float:
        return (len(self.tokens) - 1) / self.seconds if self.seconds > 0 else 0.0


def run_ours(pair, prompt: list[int], max_tokens: int, *, mtp: bool, k: int | None = None) -> Run:
    """Our engine, greedy, to exactly `max_tokens` (end of sequence masked). `k=None` lets the
    engine choose the draft length."""
    tokens, first, stats = [], None, None
    for chunk in generate(
        pair, prompt, max_tokens=max_tokens, mtp=mtp, draft_tokens=k, ignore_eos=True
    ):
        if first is None:
            first = time.perf_counter()
        tokens += chunk.token_ids
        stats = chunk.stats
    end = time.perf_counter()
    return Run(tokens, end - first, stats.peak_memory_bytes, stats)


def mlx_lm_twin(target: Model):
    """mlx-lm's own `gemma4_text` model holding our target's weights (the same arrays: no
    copy: our fused expert gate/up rows are handed over as two views). Our other module names
    follow mlx-lm's, so every parameter must find its place."""
    import mlx.nn as nn
    from mlx_lm.models import gemma4_text

    config = {k: v for k, v in dataclasses.asdict(target.args).items() if v is not None}
    twin = gemma4_text.Model(gemma4_text.ModelArgs.from_dict(config))
    ours = dict(target.named_modules())

    def quantized_like_ours(path, _module):
        m = ours.get(path)
        if m is None or not hasattr(m, "bits"):
            return False
        return {"group_size": m.group_size, "bits": m.bits, "mode": getattr(m, "mode", "affine")}

    if any(hasattr(m, "bits") for m in ours.values()):
        nn.quantize(twin, class_predicate=lambda p, m: quantized_like_ours(fused_module_path(p), m))
    weights = {}
    for key, value in tree_flatten(target.parameters()):
        if ".experts.gate_up_proj." in key:  # ours fused, mlx-lm's split: row slices (views)
            gate, up = mx.split(value, 2, axis=1)
            split = key.replace(".experts.gate_up_proj.", ".experts.switch_glu.{}_proj.")
            weights[split.format("gate")], weights[split.format("up")] = gate, up
        else:
            weights[key.replace(".experts.down_proj.", ".experts.switch_glu.down_proj.")] = value
    theirs = {k for k, _ in tree_flatten(twin.parameters())}
    if theirs != set(weights):
        missing = sorted(theirs - set(weights))[:3]
        extra = sorted(set(weights) - theirs)[:3]
        raise GemmaChatError(f"mlx-lm's gemma4_text does not fit this target: {missing} {extra}")
    twin.load_weights(list(weights.items()), strict=True)
    return twin


def run_mlx_lm(twin, tokenizer, prompt: list[int], max_tokens: int) -> Run:
    """mlx-lm's plain greedy decode (its default argmax sampler) to exactly `max_tokens`, end
    of sequence masked by the same bias as ours."""
    from mlx_lm import stream_generate

    bias = ban_bias(twin.args.vocab_size, sorted(set(tokenizer.eos_token_ids)))
    processors = [lambda _tokens, logits: logits + bias] if bias is not None else None
    tokens, first = [], None
    mx.reset_peak_memory()
    for response in stream_generate(
        twin, tokenizer, prompt, max_tokens=max_tokens, logits_processors=processors
    ):
        if first is None:
            first = time.perf_counter()
        tokens.append(int(response.token))
    end = time.perf_counter()
    return Run(tokens, end - first, mx.get_peak_memory())


class MlxVlmPeer:
    """mlx-vlm's Gemma 4 MTP on the same checkpoint folders (only when mlx-vlm is installed:
    gemma-chat never depends on it). Loaded through mlx-vlm's own loaders, so its weights are a
    second copy in memory."""

    def __init__(self, pair, draft_tokens: int):
        from mlx_vlm.speculative.drafters import load_drafter
        from mlx_vlm.utils import load

        self.model, self.processor = load(str(pair.target_path))
        self.drafter = load_drafter(str(pair.drafter_path), kind="mtp")
        self.block = draft_tokens + 1  # mlx-vlm's block counts the bonus token

    def run(self, prompt: list[int], max_tokens: int) -> Run:
        from mlx_vlm.generate import generate_step

        tokens, first = [], None
        mx.reset_peak_memory()
        steps = generate_step(
            mx.array([prompt]), self.model, None, None, max_tokens=max_tokens,
            draft_model=self.drafter, draft_kind="mtp", draft_block_size=self.block,
        )
        for token, _ in steps:
            if first is None:
                first = time.perf_counter()
            tokens.append(int(token.item() if hasattr(token, "item") else token))
            if len(tokens) >= max_tokens:
                break
        end = time.perf_counter()
        return Run(tokens, end - first, mx.get_peak_memory())


class NeverHit:
    """A drafter that does all of its drafter's work per step but always proposes `token`, one
    the target does not choose (the padding id), so every draft is rejected: what drafting
    costs when it never pays."""

    def __init__(self, drafter: Assistant, token: int, vocab: int):
        self.drafter = drafter
        self.is_token = mx.arange(vocab) == token

    def __getattr__(self, name):
        return getattr(self.drafter, name)

    def __call__(self, *args):
        return self.drafter(*args)

    def candidate_logits(self, y: mx.array) -> tuple[None, mx.array]:
        _, logits = self.drafter.candidate_logits(y)
        # Built from the real logits, so the head still runs (MLX evaluates lazily).
        top = logits.max(axis=-1, keepdims=True) + 1.0  # per row: [V] or [B, V] logits
        return None, mx.where(self.is_token, top, logits.min(axis=-1, keepdims=True) - 1.0)


def never_hit_pair(pair):
    eos = set(pair.tokenizer.eos_token_ids)
    pad = getattr(pair.tokenizer, "pad_token_id", None)
    token = pad if pad is not None and pad not in eos else 0
    drafter = NeverHit(pair.drafter, token, pair.target.args.vocab_size)
    return dataclasses.replace(pair, drafter=drafter)


# -- cost curves -------------------------------------------------------------------------------
def _time_once(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    mx.eval(fn())
    return time.perf_counter() - start


def cost_curve(
    target: Model,
    drafter: Assistant | None = None,
    *,
    context: int = 256,
    max_tokens: int = COST_TOKENS,
    reps: int = 5,
) -> dict:
    """Seconds of a target forward of T = 1..`max_tokens` tokens (logits and hidden states of
    every position, as a verify block) on a cache warm with `context` tokens, and of one drafter
    step (drafter layers, head, argmax, the next token's embedding) with the dense head and, when
    the drafter has one, the centroid head. Ratios are to the 1-token target forward."""
    args = target.args
    ctx = Context(target, slack=max(64, max_tokens + 2))
    ids = mx.random.randint(3, args.vocab_size, (context + max_tokens,), key=mx.random.key(0))
    ids = ids.tolist()
    _, hidden, _ = ctx.prefill(ids[:context])
    mx.eval([(c.keys, c.values) for c in ctx.cache])

    def target_step(t):
        def step():
            logits, hiddens = target(mx.array([ids[context : context + t]]), ctx.cache, return_hidden=True)
            return logits, hiddens

        return step

    heads = {}
    if drafter is not None:
        heads["dense_head"] = lambda y: drafter.model.embed_tokens.as_linear(y)
        if drafter.args.use_ordered_embeddings:
            heads["centroid_head"] = lambda y: drafter.candidate_logits(y)[1]

    def drafter_step(head):
        def step():
            kv = target.drafter_kv(ctx.cache, drafter.sliding_window)
            token = mx.array([[ids[context]]])
            y, g = drafter(target.model.embed(token), hidden, kv)
            choice = mx.argmax(head(y[0, 0]))
            return g, target.model.embed(choice.reshape(1, 1))

        return step

    samples: dict[str, list[float]] = {f"T{t}": [] for t in range(1, max_tokens + 1)}
    samples.update({name: [] for name in heads})
    for rep in range(reps + 1):  # the first pass warms up and is not kept
        for t in range(1, max_tokens + 1):
            seconds = _time_once(target_step(t))
            for c in ctx.cache:
                c.trim(t)
            if rep:
                samples[f"T{t}"].append(seconds)
        for name, head in heads.items():
            seconds = _time_once(drafter_step(head))
            if rep:
                samples[name].append(seconds)
    med = {k: statistics.median(v) for k, v in samples.items()}
    seconds = [med[f"T{t}"] for t in range(1, max_tokens + 1)]
    out = {
        "context": context,
        "tokens": list(range(1, max_tokens + 1)),
        "target_seconds": [round(s, 6) for s in seconds],
        "ratios": [round(s / seconds[0], 4) for s in seconds],
        "drafter_step_seconds": {
            name: round(med[name], 6) if name in med else None
            for name in ("dense_head", "centroid_head")
        },
        "drafter_step_ratio": {
            name: round(med[name] / seconds[0], 4) if name in med else None
            for name in ("dense_head", "centroid_head")
        },
    }
    out["ratios"][0] = 1.0
    return out


# Real layer dimensions (spec/gemma4-mtp.md §0), fewer layers and a 32768-token vocabulary so
# that fp32 copies fit in memory and build quickly. The E2B-like drafter keeps the real
# candidate count of its centroid head (32 clusters of 128 tokens = 4096 candidates).
SHAPE_VOCAB = 32768
SHAPE_CONTEXT = 576  # warm cache for the shapes' curves: past E2B's 512 window, inside 26B's 1024
_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
}
SHAPES = {
    "e2b": {
        "description": "E2B dims (hidden 1536, 8 heads, 1 KV head, head_dim 256/512, MLP 6144, "
        "double-wide in KV-shared layers, PLE 256), 10 of 35 layers (4 KV-shared), vocab 32768",
        "target": {
            "hidden_size": 1536, "num_hidden_layers": 10, "intermediate_size": 6144,
            "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256,
            "global_head_dim": 512, "hidden_size_per_layer_input": 256,
            "vocab_size": SHAPE_VOCAB, "vocab_size_per_layer_input": SHAPE_VOCAB,
            "layer_types": (["sliding_attention"] * 4 + ["full_attention"]) * 2,
            "num_kv_shared_layers": 4, "use_double_wide_mlp": True, "sliding_window": 512,
            "final_logit_softcapping": 30.0, "rope_parameters": _ROPE,
        },
        "drafter": {
            "backbone_hidden_size": 1536, "use_ordered_embeddings": True,
            "num_centroids": SHAPE_VOCAB // 128, "centroid_intermediate_top_k": 32,
            "text_config": {
                "hidden_size": 256, "intermediate_size": 2048, "num_hidden_layers": 4,
                "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
                "global_head_dim": 512, "vocab_size": SHAPE_VOCAB, "sliding_window": 512,
                "rope_parameters": _ROPE,
            },
        },
    },
    "26b-a4b": {
        "description": "26B-A4B dims (hidden 2816, 16 heads, 8/2 KV heads with k_eq_v, head_dim "
        "256/512, 128 experts top-8 of width 704, dense MLP 2112), 2 of 30 layers, vocab 32768",
        "target": {
            "hidden_size": 2816, "num_hidden_layers": 2, "intermediate_size": 2112,
            "num_attention_heads": 16, "num_key_value_heads": 8, "num_global_key_value_heads": 2,
            "attention_k_eq_v": True, "head_dim": 256, "global_head_dim": 512,
            "hidden_size_per_layer_input": 0, "vocab_size": SHAPE_VOCAB,
            "layer_types": ["sliding_attention", "full_attention"], "num_kv_shared_layers": 0,
            "enable_moe_block": True, "num_experts": 128, "top_k_experts": 8,
            "moe_intermediate_size": 704, "sliding_window": 1024, "final_logit_softcapping": 30.0,
            "rope_parameters": _ROPE,
        },
        "drafter": {
            "backbone_hidden_size": 2816, "use_ordered_embeddings": False,
            "text_config": {
                "hidden_size": 1024, "intermediate_size": 8192, "num_hidden_layers": 4,
                "layer_types": ["sliding_attention"] * 3 + ["full_attention"],
                "num_attention_heads": 16, "num_key_value_heads": 8,
                "num_global_key_value_heads": 2, "attention_k_eq_v": True, "head_dim": 256,
                "global_head_dim": 512, "vocab_size": SHAPE_VOCAB, "sliding_window": 1024,
                "rope_parameters": _ROPE,
            },
        },
    },
}


def random_shape(name: str) -> tuple[Model, Assistant]:
    """A random-weight fp32 target and drafter with the dimensions of SHAPES[name]."""
    spec = SHAPES[name]
    rng = np.random.default_rng(0)
    target = random_target(spec["target"], rng)
    drafter = Assistant(AssistantArgs.from_config(spec["drafter"]))
    _randomize(drafter, rng)
    if drafter.args.use_ordered_embeddings:
        order = rng.permutation(drafter.args.text.vocab_size).astype(np.int32)
        drafter.masked_embedding.token_ordering = mx.array(order)
    mx.eval(target.parameters(), drafter.parameters())
    return target, drafter


def random_target(config: dict, rng=None) -> Model:
    """A random-weight fp32 target of the given config (evaluated)."""
    target = Model(ModelArgs.from_config(config))
    _randomize(target, rng if rng is not None else np.random.default_rng(0))
    mx.eval(target.parameters())
    return target


# -- MoE verify cost curve (issue 7) -----------------------------------------------------------
MOE_GOAL = 0.75  # ours T(8)/T(1) over mlx-lm's T(8)/T(1), same weights, same run (reported only)


def moe_config(layers: int = 4, **dims) -> dict:
    """The 26B-A4B core (hidden 2816, 128 experts top-8 of width 704, dense MLP 2112) with
    `layers` layers (sliding, full, sliding, ...); `dims` overrides any key (tests shrink it)."""
    config = dict(SHAPES["26b-a4b"]["target"], num_hidden_layers=layers)
    config["layer_types"] = [("full" if i % 2 else "sliding") + "_attention" for i in range(layers)]
    return {**config, **dims}


def moe_curve(config: dict | None = None, *, context: int = 256, reps: int = 5) -> dict:
    """Milliseconds of one forward of T = 1..COST_TOKENS distinct random tokens on a cache warm
    with `context` tokens, ours and mlx-lm's `gemma4_text` holding the same weight arrays,
    timed alternately (median of `reps` passes after a warm-up pass). Distinct tokens route
    independently; repeated ones would route alike and flatter grouping by expert."""
    config = config or moe_config()
    target = random_target(config)
    twin = mlx_lm_twin(target)
    vocab, top = config["vocab_size"], COST_TOKENS
    ids = np.random.default_rng(1).permutation(np.arange(3, vocab))[: context + top].tolist()
    ctx = Context(target, slack=max(64, top + 2))
    ctx.prefill(ids[:context])
    theirs = twin.make_cache()
    twin(mx.array([ids[:context]]), cache=theirs)
    mx.eval([(c.keys, c.values) for c in ctx.cache], [c.state for c in theirs])
    block = {t: mx.array([ids[context : context + t]]) for t in range(1, top + 1)}
    models = {"ours": (target, ctx.cache), "mlx_lm": (twin, theirs)}
    samples = {(name, t): [] for name in models for t in block}
    for rep in range(reps + 1):  # the first pass warms up and is not kept
        for t in block:
            for name, (model, cache) in models.items():
                seconds = _time_once(functools.partial(model, block[t], cache=cache))
                for c in cache:
                    c.trim(t)
                if rep:
                    samples[name, t].append(seconds)
    ms = {n: [round(1e3 * statistics.median(samples[n, t]), 2) for t in block] for n in models}
    ratio = {n: round(v[7] / v[0], 3) for n, v in ms.items()}
    del target, twin, ctx, theirs, models
    mx.clear_cache()
    return {
        "tokens": list(block),
        "ours_ms": ms["ours"],
        "mlx_lm_ms": ms["mlx_lm"],
        "ratio_8_over_1": ratio,
        "ours_over_mlx_lm_8_over_1": round(ratio["ours"] / ratio["mlx_lm"], 3),
        "goal": MOE_GOAL,
        "layers": config["num_hidden_layers"],
        "context": context,
        "dims": {k: config[k] for k in ("hidden_size", "num_experts", "top_k_experts",
                                        "moe_intermediate_size", "intermediate_size", "vocab_size")},
        "machine": machine(),
    }


def render_moe_curve(result: dict, console) -> None:
    from rich import box
    from rich.table import Table

    d = result["dims"]
    console.print(
        f"[bold]MoE verify cost[/]: random fp32, {result['layers']} layers, hidden "
        f"{d['hidden_size']}, {d['num_experts']} experts top-{d['top_k_experts']} of width "
        f"{d['moe_intermediate_size']}, cache warm with {result['context']} tokens"
    )
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False)
    for c in ("T", "ours ms", "x T1", "mlx-lm ms", "x T1"):
        t.add_column(c, justify="right")
    ours, theirs = result["ours_ms"], result["mlx_lm_ms"]
    for i, n in enumerate(result["tokens"]):
        t.add_row(str(n), f"{ours[i]:.1f}", f"{ours[i] / ours[0]:.2f}",
                  f"{theirs[i]:.1f}", f"{theirs[i] / theirs[0]:.2f}")
    console.print(t)
    value = result["ours_over_mlx_lm_8_over_1"]
    met = "met" if value <= result["goal"] else "not met"
    console.print(f"ours T8/T1 over mlx-lm's: {value:.3f} (goal <= {result['goal']}: {met})")


def _randomize(module, rng) -> None:
    """Normal(0, fan_in^-1/2) matrices drawn with numpy (several times faster than MLX's CPU
    generator for the gigabytes of a 26B layer); vectors (norms, scales) keep their init. The
    router is random too, so the tokens of a verify block pick experts independently: T tokens
    read about min(128, 8T) experts, the diverse-routing case."""
    new = []
    for key, value in tree_flatten(module.parameters()):
        if value.ndim >= 2 and mx.issubdtype(value.dtype, mx.floating):
            w = rng.standard_normal(value.shape, dtype=np.float32)
            w *= np.float32(value.shape[-1] ** -0.5)
            new.append((key, mx.array(w)))
            del w
    module.load_weights(new, strict=False)


# -- the whole run -----------------------------------------------------------------------------
@dataclass
class Variant:
    label: str
    run: Callable[[list[int], int], Run]  # (prompt, max_tokens) -> Run
    runs: list[Run] = field(default_factory=list)

    def median(self) -> Run:
        """The run with the median decode time (the lower median for an even count)."""
        ordered = sorted(self.runs, key=lambda r: r.seconds)
        return ordered[(len(ordered) - 1) // 2]


def machine() -> dict:
    preload = os.environ.get("LD_PRELOAD", "")
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = None
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": memory,
        "python": platform.python_version(),
        "mlx": mx.__version__,
        "mlx_lm": _version("mlx-lm"),
        "gemma_chat": __version__,
        "commit": _git_commit(),
        "device": str(mx.default_device()),
        "openblas_preload": "openblas" in preload.lower(),
        "ld_preload": preload or None,
        "load_average": _load_average(),  # at the end of the run; other work skews timings
    }


def _git_commit() -> str | None:
    """The checkout's commit, when gemma-chat runs from a git working tree."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        )
    except OSError:
        return None
    return out.stdout.strip() or None


def _load_average() -> float | None:
    """The 1-minute load average (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


def _cpu_name() -> str:
    if sys.platform == "darwin":
        try:
            out = subprocess.run(
                ["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True
            )
            if out.stdout.strip():
                return out.stdout.strip()
        except OSError:
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _summary(run: Run, baseline: Run) -> dict:
    out = {
        "tokens_per_second": round(run.tokens_per_second, 2),
        "vs_plain": round(run.tokens_per_second / baseline.tokens_per_second, 3),
        "generated_tokens": len(run.tokens),
        "decode_seconds": round(run.seconds, 4),
        "peak_memory_bytes": run.peak_memory_bytes,
        "identical_to_plain": run.tokens == baseline.tokens,
    }
    if run.tokens != baseline.tokens:
        out["first_difference"] = _first_difference(run.tokens, baseline.tokens)
    s = run.stats
    if s is not None:
        out.update(
            rounds=s.rounds,
            drafted=s.drafted,
            accepted=s.accepted,
            acceptance_rate=None if s.acceptance_rate is None else round(s.acceptance_rate, 4),
            tokens_per_forward=round(s.mean_accepted_length, 3) if s.rounds else None,
            mean_draft_tokens=round(s.drafted / s.rounds, 3) if s.rounds else None,
            rounds_without_drafts=s.rounds - (s.drafted_by_position[0] if s.drafted_by_position else 0),
            acceptance_by_position=[round(a, 4) for a in s.acceptance_by_position],
            drafted_by_position=list(s.drafted_by_position),
            accepted_by_position=list(s.accepted_by_position),
            draft_seconds=round(s.draft_seconds, 4),
            verify_seconds=round(s.verify_seconds, 4),
        )
    return out


def _say(progress: Callable[[str], None] | None, message: str):
    if progress is not None:
        progress(message)


def run_bench(
    pair,
    *,
    max_tokens: int = 128,
    repeats: int = 3,
    quick: bool = False,
    ks: tuple[int, ...] = FIXED_KS,
    shapes: tuple[str, ...] = tuple(SHAPES),
    cost_reps: int = 15,
    shape_reps: int = 5,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure everything for a loaded pair; one JSON-ready dict. `quick` sweeps K on the
    prose workload only. Each workload: one warm-up run of every variant, then `repeats`
    rounds over all variants (reversed order every other round), medians kept. Cost curves:
    medians of `cost_reps` passes for the pair, `shape_reps` for each random shape in `shapes`
    (a pass over a random 26B-A4B layer stack takes seconds)."""
    if pair.drafter is None:
        raise GemmaChatError("the benchmark needs a pair with an MTP drafter")
    notes: list[str] = []
    load, cores = _load_average(), os.cpu_count() or 1
    if load is not None and load >= cores / 2:
        notes.append(
            f"the machine was busy before the run (load average {load:.1f} on {cores} cores): "
            "other work skews these timings"
        )
    twin = None
    try:
        twin = mlx_lm_twin(pair.target)
    except GemmaChatError as e:
        notes.append(f"mlx-lm plain skipped: {e}")
    vlm = None
    try:
        import mlx_vlm  # noqa: F401
    except ImportError:
        notes.append("mlx-vlm MTP skipped: mlx-vlm is not importable (it is optional)")
    else:
        try:
            vlm = MlxVlmPeer(pair, 3)
            vlm.run(workloads(pair, 2)[0].prompt, 2)  # its API can move: fail here, not mid-run
        except Exception as e:  # a peer's own failure is reported, not ours
            notes.append(f"mlx-vlm MTP skipped: {type(e).__name__}: {e}")
            vlm = None
    never = never_hit_pair(pair)

    results: dict[str, dict] = {}
    for i, work in enumerate(workloads(pair, max_tokens)):
        sweep = ks if (not quick or i == 0) else ()
        variants = [
            Variant("plain", lambda p, n: run_ours(pair, p, n, mtp=False)),
            Variant("mtp", lambda p, n: run_ours(pair, p, n, mtp=True)),
        ]
        variants += [
            Variant(f"k{k}", lambda p, n, k=k: run_ours(pair, p, n, mtp=True, k=k)) for k in sweep
        ]
        if i == 0:
            variants.append(Variant("never_hit", lambda p, n: run_ours(never, p, n, mtp=True)))
        if twin is not None:
            variants.append(
                Variant("mlx_lm", lambda p, n: run_mlx_lm(twin, pair.tokenizer, p, n))
            )
        if vlm is not None and i == 0:
            variants.append(Variant("mlx_vlm", vlm.run))
        _say(progress, f"{work.name}: {len(work.prompt)} prompt tokens, {len(variants)} variants")
        for v in variants:  # warm-up: compiles, allocates, runs the prefill path once
            v.run(work.prompt, min(8, max_tokens))
        for rep in range(repeats):
            for v in variants if rep % 2 == 0 else variants[::-1]:
                v.runs.append(v.run(work.prompt, max_tokens))
        results[work.name] = _workload_result(work, variants)

    cost = {}
    context = min(pair.target.args.sliding_window + 64, 512)
    _say(progress, "cost curve: this pair")
    cost["pair"] = {"description": "the benchmarked pair", **cost_curve(
        pair.target, pair.drafter, context=context, reps=cost_reps)}
    for name in shapes:
        _say(progress, f"cost curve: random {name}")
        target, drafter = random_shape(name)
        curve = cost_curve(target, drafter, context=SHAPE_CONTEXT, reps=shape_reps)
        cost[name] = {"description": "random weights, " + SHAPES[name]["description"], **curve}
        del target, drafter
        mx.clear_cache()

    return _report(
        pair, never, results, cost, notes, max_tokens=max_tokens, repeats=repeats, quick=quick
    )


def _workload_result(work: Workload, variants: list[Variant]) -> dict:
    medians = {v.label: v.median() for v in variants}
    plain = medians["plain"]
    # The fastest run of each variant too: on a shared machine other work only ever adds time,
    # so best-of-N is the steadier comparison when the medians swing.
    fastest = {v.label: min(v.runs, key=lambda r: r.seconds) for v in variants}
    out = {"description": work.description, "prompt_tokens": len(work.prompt)}
    for label, run in medians.items():
        out[label] = _summary(run, plain)
        best = fastest[label].tokens_per_second
        out[label]["best_tokens_per_second"] = round(best, 2)
        out[label]["best_vs_plain"] = round(best / fastest["plain"].tokens_per_second, 3)
    # Every timed run of ours and of mlx-lm, not only the medians, must reproduce ours plain token
    # for token (mlx-vlm is reported on its own, under peers).
    out["outputs_identical"] = all(
        r.tokens == plain.tokens for v in variants if v.label != "mlx_vlm" for r in v.runs
    )
    return out


def _suite_rate(results: dict, label: str) -> float | None:
    """Tokens per second over the whole suite: total tokens / total decode seconds."""
    runs = [w[label] for w in results.values() if label in w]
    if not runs:
        return None
    tokens = sum(r["generated_tokens"] - 1 for r in runs)
    return round(tokens / sum(r["decode_seconds"] for r in runs), 2)


def _report(pair, never_pair, results, cost, notes, *, max_tokens, repeats, quick) -> dict:
    def total(key, label="mtp"):
        return sum(w[label].get(key) or 0 for w in results.values())

    plain, mtp = _suite_rate(results, "plain"), _suite_rate(results, "mtp")
    lm = _suite_rate(results, "mlx_lm")
    drafted, accepted, rounds = total("drafted"), total("accepted"), total("rounds")
    generated = sum(w["mtp"]["generated_tokens"] - 1 for w in results.values())
    depth = max(len(w["mtp"]["drafted_by_position"]) for w in results.values())
    drafted_at, accepted_at = [0] * depth, [0] * depth
    for w in results.values():
        for j, (d, a) in enumerate(zip(w["mtp"]["drafted_by_position"], w["mtp"]["accepted_by_position"])):
            drafted_at[j] += d
            accepted_at[j] += a
    by_position = [round(a / d, 4) for a, d in zip(accepted_at, drafted_at) if d]

    first = next(iter(results.values()))
    never = first.get("never_hit")
    sweep: dict[str, dict] = {}
    for label in [k for k in first if k.startswith("k") and k[1:].isdigit()]:
        sweep[label[1:]] = {
            "tokens_per_second": _suite_rate(results, label),
            "by_workload": {n: w[label]["tokens_per_second"] for n, w in results.items() if label in w},
            "acceptance_rate": round(
                sum(w[label]["accepted"] for w in results.values() if label in w)
                / max(1, sum(w[label]["drafted"] for w in results.values() if label in w)), 4
            ),
        }
    vlm = first.get("mlx_vlm")
    identical = all(w["outputs_identical"] for w in results.values())
    out = {
        "model": pair.name,
        "target_path": str(pair.target_path),
        "drafter_path": str(pair.drafter_path) if pair.drafter_path else None,
        "machine": machine(),
        "settings": {"max_tokens": max_tokens, "repeats": repeats, "quick": quick, "greedy": True,
                     "ignore_eos": True},
        "plain_tokens_per_second": plain,
        "mtp_tokens_per_second": mtp,
        "speedup": round(mtp / plain, 3) if plain and mtp else None,
        "acceptance_rate": round(accepted / drafted, 4) if drafted else None,
        "tokens_per_target_forward": round(generated / rounds, 3) if rounds else None,
        "acceptance_by_position": by_position,
        "outputs_identical": identical,
        "mlx_lm_plain_tokens_per_second": lm,
        "plain_vs_mlx_lm": round(plain / lm, 3) if plain and lm else None,
        "never_hit": None if never is None else {
            "tokens_per_second": never["tokens_per_second"],
            "vs_plain": never["vs_plain"],
            "acceptance_rate": never["acceptance_rate"],
            "mean_draft_tokens": never["mean_draft_tokens"],  # 0 when the policy parks
        },
        "weights_bytes": {
            "target": _nbytes(pair.target),
            "drafter": _nbytes(pair.drafter),
        },
        "peak_memory_bytes": {
            label: max(w[label]["peak_memory_bytes"] for w in results.values() if label in w)
            for label in ("plain", "mtp", "mlx_lm") if label in first
        },
        "peers": {
            "mlx_lm": None if lm is None else {
                "plain_tokens_per_second": lm,
                "outputs_identical": all(w["mlx_lm"]["identical_to_plain"] for w in results.values()),
            },
            "mlx_vlm": {"skipped": next((n for n in notes if n.startswith("mlx-vlm")), "not run")}
            if vlm is None else {
                "mtp_tokens_per_second": vlm["tokens_per_second"],
                "outputs_identical": vlm["identical_to_plain"],
                "workload": next(iter(results)),
            },
        },
        "k_sweep": sweep,
        "workloads": results,
        "cost_curves": cost,
        "notes": notes,
    }
    out["goals"] = {
        "plain_vs_mlx_lm": _goal(out["plain_vs_mlx_lm"], GOALS["plain_vs_mlx_lm"]),
        "mtp_speedup": _goal(out["speedup"], GOALS["mtp_speedup"]),
        "never_hit_vs_plain": _goal(never and never["vs_plain"], GOALS["never_hit_vs_plain"]),
    }
    return out


def _nbytes(module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(module.parameters()))


def _goal(value, target) -> dict:
    return {"value": value, "target": target, "met": None if value is None else value >= target}


# -- output ------------------------------------------------------------------------------------
def render(result: dict, console) -> None:
    """The report as Rich tables (narrow enough for 80 columns)."""
    from rich import box
    from rich.markup import escape
    from rich.table import Table

    def table(title, *columns):
        console.print(f"\n[bold]{title}[/]")
        t = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for i, c in enumerate(columns):
            t.add_column(c, justify="left" if i == 0 else "right", min_width=max(len(c), 4 if i else 10))
        return t

    def f(x, fmt="{:.1f}"):
        return "–" if x is None else fmt.format(x)

    m = result["machine"]
    blas = "OpenBLAS preloaded" if m["openblas_preload"] else "no BLAS preload"
    console.print(
        f"[bold]gemma-chat bench[/] {escape(result['model'])}: {result['settings']['max_tokens']} "
        f"tokens per run, median of {result['settings']['repeats']}, greedy\n"
        f"{escape(m['cpu'])}, {m['cpu_count']} cores, {escape(m['platform'])}; mlx {m['mlx']} "
        f"({m['device']}, {blas}), mlx-lm {m['mlx_lm']}; load average {m['load_average']}"
    )

    t = table("decode tok/s, prefill excluded (gain = MTP / plain, acc = acceptance, tok/fwd = "
              "tokens per target forward, K = mean drafts per round, vs lm = ours plain / mlx-lm plain)", "workload",
              "prompt", "plain", "MTP", "gain", "acc", "K", "tok/fwd", "mlx-lm", "vs lm")
    rows = [(n, w) for n, w in result["workloads"].items()]
    for name, w in rows:
        lm = w.get("mlx_lm")
        t.add_row(
            name, str(w["prompt_tokens"]), f(w["plain"]["tokens_per_second"]),
            f(w["mtp"]["tokens_per_second"]), f(w["mtp"]["vs_plain"], "{:.2f}x"),
            f(w["mtp"]["acceptance_rate"], "{:.0%}"), f(w["mtp"]["mean_draft_tokens"], "{:.1f}"),
            f(w["mtp"]["tokens_per_forward"], "{:.2f}"),
            f(lm and lm["tokens_per_second"]),
            f(lm and w["plain"]["tokens_per_second"] / lm["tokens_per_second"], "{:.2f}x"),
        )
    t.add_row(
        "all", "", f(result["plain_tokens_per_second"]), f(result["mtp_tokens_per_second"]),
        f(result["speedup"], "{:.2f}x"), f(result["acceptance_rate"], "{:.0%}"), "",
        f(result["tokens_per_target_forward"], "{:.2f}"), f(result["mlx_lm_plain_tokens_per_second"]),
        f(result["plain_vs_mlx_lm"], "{:.2f}x"), style="bold",
    )
    console.print(t)
    differ = [n for n, w in result["workloads"].items() if not w["outputs_identical"]]
    console.print(
        "outputs identical (ours plain = ours MTP at every K = mlx-lm plain, every run): "
        + ("yes" if not differ else f"[bold red]NO[/] ({', '.join(differ)})")
    )

    if result["k_sweep"]:
        names = list(next(iter(result["k_sweep"].values()))["by_workload"])
        t = table("tok/s at a fixed draft length K", "K", *names, "accept")
        t.add_row("plain", *[f(result["workloads"][n]["plain"]["tokens_per_second"]) for n in names], "")
        for k, row in result["k_sweep"].items():
            t.add_row(k, *[f(row["by_workload"].get(n)) for n in names], f(row["acceptance_rate"], "{:.0%}"))
        console.print(t)

    curves = result["cost_curves"]
    t = table("cost: T-token target forward / 1-token forward", "T", *curves)
    for i in range(COST_TOKENS):
        t.add_row(str(i + 1), *[f(c["ratios"][i], "{:.2f}") for c in curves.values()])
    for head in ("dense_head", "centroid_head"):
        t.add_row(f"draft step, {head.replace('_', ' ')}",
                  *[f(c["drafter_step_ratio"][head], "{:.3f}") for c in curves.values()])
    t.add_row("1-token forward, ms", *[f(c["target_seconds"][0] * 1e3, "{:.2f}") for c in curves.values()])
    console.print(t)

    pos = ", ".join(f(a, "{:.0%}") for a in result["acceptance_by_position"]) or "–"
    mem = result["peak_memory_bytes"]
    console.print(f"acceptance by draft position: {pos}")
    weights = result["weights_bytes"]
    console.print(
        "peak memory: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in mem.items())
        + f" (weights: target {weights['target'] / 2**20:.1f} MiB, drafter "
        f"{weights['drafter'] / 2**20:.1f} MiB)"
    )
    never = result["never_hit"]
    if never:
        console.print(
            f"drafter that never hits: {never['tokens_per_second']:.1f} tok/s = "
            f"{never['vs_plain']:.2f}x plain, {never['mean_draft_tokens']:.2f} drafts per round"
        )
    vlm = result["peers"]["mlx_vlm"]
    if "mtp_tokens_per_second" in vlm:
        console.print(f"mlx-vlm MTP ({vlm['workload']}): {vlm['mtp_tokens_per_second']:.1f} tok/s")
    for k, g in result["goals"].items():
        met = "n/a" if g["met"] is None else "met" if g["met"] else "NOT met"
        console.print(f"goal {k} >= {g['target']}: {f(g['value'], '{:.2f}')} ({met})")
    for note in result["notes"]:
        console.print(f"note: {escape(note)}", style="yellow")


def save_pngs(result: dict, folder: Path) -> list[Path]:
    """The cost curves and tok/s per K as PNGs (matplotlib, the `plot` extra)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, c in result["cost_curves"].items():
        ax.plot(c["tokens"], c["ratios"], marker="o", label=name)
    ax.plot([1, COST_TOKENS], [1, COST_TOKENS], ls=":", c="grey", label="linear (T x step)")
    ax.set_xlabel("tokens in the target forward (T)")
    ax.set_ylabel("time / 1-token step")
    ax.set_title(f"verify cost curve ({result['machine']['cpu']})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    written.append(folder / "bench-cost-curve.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    if result["k_sweep"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        ks = [int(k) for k in result["k_sweep"]]
        names = list(next(iter(result["k_sweep"].values()))["by_workload"])
        for n in names:
            ax.plot(ks, [result["k_sweep"][str(k)]["by_workload"].get(n) for k in ks], marker="o",
                    label=f"MTP {n}")
            ax.axhline(result["workloads"][n]["plain"]["tokens_per_second"], ls=":", lw=1,
                       c=ax.lines[-1].get_color())
        ax.set_xlabel("draft tokens per round (K); dotted: plain decode")
        ax.set_ylabel("tokens / second")
        ax.set_title(f"{result['model']}: tok/s per K", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(folder / "bench-tokens-per-k.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)
    return written


def main(
    model: str = "demo",
    drafter: str = "auto",
    *,
    max_tokens: int | None = None,
    quick: bool = False,
    as_json: bool = False,
    png: Path | None = None,
    repeats: int | None = None,
    shapes: bool | None = None,
    out=None,
    err=None,
) -> dict:
    """Load the pair, run the benchmark, print JSON or tables (+ PNGs); return the result.
    `shapes`: measure the random E2B / 26B-A4B cost curves (default: not with `quick`)."""
    import json

    from rich.console import Console

    from .loading import load

    out = out or Console(highlight=False)
    err = err or Console(stderr=True, highlight=False)
    shapes = not quick if shapes is None else shapes
    max_tokens = max_tokens or (48 if quick else 128)
    repeats = repeats or (1 if quick else 3)
    pair = load(model, drafter)
    if pair.drafter is None:
        raise GemmaChatError(f"no MTP drafter found for {model}: pass --drafter")
    result = run_bench(
        pair,
        max_tokens=max_tokens,
        repeats=repeats,
        quick=quick,
        shapes=tuple(SHAPES) if shapes else (),
        cost_reps=7 if quick else 15,
        progress=lambda s: err.print(f"[dim]bench: {s}[/]"),
    )
    if not result["machine"]["openblas_preload"] and sys.platform == "linux":
        result["notes"].append(
            "no OpenBLAS preload: MLX's bundled CPU BLAS is slow; run under "
            "LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libopenblas.so.0 (make bench does)"
        )
    folder = png if png is not None else (None if as_json else Path("."))
    if folder is not None:
        try:
            result["png"] = [str(p) for p in save_pngs(result, folder)]
        except ImportError:
            result["notes"].append(
                "PNG skipped: matplotlib is not installed (pip install 'gemma-chat[plot]')"
            )
    if as_json:
        print(json.dumps(result))
    else:
        render(result, out)
        for p in result.get("png", []):
            out.print(f"wrote {p}")
    return result


def moe_main(layers: int = 4, *, as_json: bool = False, reps: int = 5, out=None, err=None) -> dict:
    """`bench --moe-curve`: one JSON object on stdout, or a table."""
    import json

    from rich.console import Console

    err = err or Console(stderr=True, highlight=False)
    err.print(f"[dim]bench: MoE verify cost curve, {layers} random 26B-A4B-core layers[/]")
    result = moe_curve(moe_config(layers), reps=reps)
    if as_json:
        print(json.dumps(result))
    else:
        render_moe_curve(result, out or Console(highlight=False))
    return result


def command(
    model: Annotated[str, typer.Option("--model", "-m", help="Alias, hub repo id or folder.")] = "demo",
    drafter: Annotated[str, typer.Option(help="MTP drafter: 'auto', a hub repo id or a folder.")] = "auto",
    max_tokens: Annotated[int | None, typer.Option("--max-tokens", "-n", min=2, help="Tokens per run (48 with --quick, else 128).")] = None,
    quick: Annotated[bool, typer.Option("--quick", help="One timed run per variant, K swept on prose only, no random shapes.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout.")] = False,
    png: Annotated[Path | None, typer.Option("--png", help="Folder for the PNGs (default: . without --json).")] = None,
    repeats: Annotated[int | None, typer.Option("--repeats", min=1, help="Timed runs per variant (1 with --quick, else 3).")] = None,
    shapes: Annotated[bool | None, typer.Option("--shapes/--no-shapes", help="Cost curves of random E2B / 26B-A4B shapes (default: on unless --quick).")] = None,
    moe: Annotated[bool, typer.Option("--moe-curve", help="Only the MoE verify cost curve: ours vs mlx-lm on a random 26B-A4B-core stack (no model is loaded).")] = False,
    moe_layers: Annotated[int, typer.Option("--moe-layers", min=1, help="Layers of that stack (each ~3.2 GB fp32).")] = 4,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks.")] = False,
):
    """Measure plain vs MTP decoding, fixed draft lengths, mlx-lm (and mlx-vlm when installed),
    cost curves, acceptance and memory, on prose, code, structured and long-context prompts."""
    from rich.console import Console
    from rich.markup import escape

    err = Console(stderr=True, highlight=False)
    try:
        if moe:
            moe_main(moe_layers, as_json=as_json, reps=repeats or 5, err=err)
        else:
            main(model, drafter, max_tokens=max_tokens, quick=quick, as_json=as_json, png=png,
                 repeats=repeats, shapes=shapes, err=err)
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as e:  # one line, as the rest of gemma-chat; --debug shows the traceback
        if debug:
            err.print_exception()
        message = str(e) if isinstance(e, GemmaChatError) else f"{type(e).__name__}: {e}"
        err.print(f"[bold red]error:[/] {escape(message)}")
        raise typer.Exit(1) from None


# For `gemma-chat bench`: either `app.command("bench")(bench.command)` in cli.py, or
# `app.add_typer(bench.app, name="bench")` with this one-command sub-app.
app = typer.Typer(add_completion=False, invoke_without_command=True)
app.callback()(command)
