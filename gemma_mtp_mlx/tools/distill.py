"""Distil a Gemma 4 MTP assistant (`gemma4_assistant`) for a frozen target, on text files.

The drafter is the released architecture (spec §3): `num_layers` decoder layers (all sliding but
the last, which is full), query-only attention over the target's K/V, head dims / KV heads /
k_eq_v / window / RoPE copied from the target's store layers, its own hidden width, a tied dense
head, `pre_projection` [2 * target hidden -> hidden] and `post_projection` [hidden -> target
hidden]. It is written as a checkpoint that `loading.load_drafter` (and transformers) read.

Training forward (one window x of T = seq_len + depth + 1 tokens, all query rows at once)
-----------------------------------------------------------------------------------------
The frozen target runs once over x without a cache: post-norm hidden states h, softcapped
logits, and the K/V of its last non-shared sliding and full layer (`store_layer`) for all T
positions. Query row i (0 <= i <= T - 2) stands for the drafting state right after the target
has committed x[0..i] and emitted x[i + 1]: exactly what `engine.speculative.draft` sees with a
cache offset of i + 1. So, for every draft step s = 1..depth:

* input: (target embed of x[i + s], g), g = h[i] for s = 1 and the previous step's g_next after;
  teacher forcing with the window's own tokens (for self-distilled windows those are the
  target's greedy tokens, i.e. what a fully accepted round would draft);
* RoPE position i + 1 for every step (the `position` argument is 1 and the row index adds i);
* keys: full attention sees positions <= i, sliding attention positions i - W .. i (W + 1 keys,
  W = the drafter's sliding window), as `Model.drafter_kv` gives at inference;
* target: the target's distribution at row i + s (its softcapped logits for the token after
  x[i + s]), valid while i + s <= T - 1.

Loss = sum over steps of the mean over valid rows of KL(p_target || q_drafter) (temperature 1;
drafter logits are not softcapped, as at inference). The accuracy reported per depth is top-1
agreement (drafter argmax == target argmax). The target is frozen: its outputs are computed
outside `value_and_grad` and enter the compiled step as inputs.

Self-distillation: `self_distill_fraction` of the batches come from a pool of windows whose
first `prefix` (<= 64) tokens are text and whose rest is the target's own greedy continuation.
The pool is generated once at the start with a batched KV-cached greedy decode: its cost is
(T - prefix) batched decode steps per 64 windows, i.e. about `pool * (T - prefix)` target
token-forwards (for the default pool of 8 batches of 8 windows of 260 tokens with prefix 64:
~12.5k token-forwards in 196 batched steps: ~10 s for a 256-wide 6-layer target on a loaded
2-core CPU with OpenBLAS preloaded), counted in the time budget.

Cost: memory is dominated by the [B, T, vocab] fp32 tensors (the teacher's probabilities and
each step's drafter logits): fine for small vocabularies, ~2 GB each for Gemma's 262k vocabulary
at B = 8, T = 260 (lower `batch` / `seq_len` there). On a CPU, MLX's matmuls need OpenBLAS
(LD_PRELOAD, as scripts/make_demo.py says) and exp/tanh dominate (attention softmax, gelu, the
head's logsumexp).

Checkpoints (every `checkpoint_every` steps and at the end) go to `out`: model.safetensors and
config.json (the drafter, in HF's names and `gemma4_assistant` format), progress.json (step,
tokens, schedule position, metrics, hyper-parameters) and progress/optimizer.safetensors (the
AdamW state; in a subfolder because the loader reads every *.safetensors next to config.json).
A later call with the same `out` resumes from there.
"""

import json
import math
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten, tree_unflatten

from ..errors import GemmaChatError
from ..models.assistant import Assistant, AssistantArgs, pairing_problems
from ..models.cache import KVView, window_mask
from ..models.gemma4 import FULL, SLIDING, Model, ModelArgs

__all__ = [
    "TeacherBatch",
    "drafter_config",
    "measure_acceptance",
    "new_drafter",
    "self_distilled_windows",
    "teacher_batch",
    "train_drafter",
    "unrolled_logits",
]

PREFIX_TOKENS = 64  # text prefix of the self-distilled windows (at most T // 4)
GENERATION_BATCH = 64  # windows decoded together when building the self-distillation pool
MIN_LR_FRACTION = 0.1  # the cosine decays to lr * this


# -- the drafter's config ----------------------------------------------------------------------
def drafter_config(
    target: ModelArgs,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    intermediate_size: int = 512,
    num_attention_heads: int | None = None,
) -> dict:
    """A `gemma4_assistant` config.json dict for `target` (what `AssistantArgs.from_config` and
    transformers' `Gemma4AssistantConfig` read)."""
    if num_layers < 2:
        raise GemmaChatError("the drafter needs at least 2 layers (sliding ones, then a full one)")
    heads = num_attention_heads or target.num_attention_heads
    text = {
        "model_type": "gemma4_text",
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": target.num_key_value_heads,
        "num_global_key_value_heads": target.num_global_key_value_heads,
        "head_dim": target.head_dim,
        "global_head_dim": target.global_head_dim,
        "attention_k_eq_v": bool(target.attention_k_eq_v),
        "sliding_window": target.sliding_window,
        "layer_types": [SLIDING] * (num_layers - 1) + [FULL],
        "rope_parameters": json.loads(json.dumps(target.rope_parameters)),
        "vocab_size": target.vocab_size,
        "rms_norm_eps": target.rms_norm_eps,
        "final_logit_softcapping": None,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": target.max_position_embeddings,
        "hidden_size_per_layer_input": 0,
        "vocab_size_per_layer_input": 0,
        "num_kv_shared_layers": num_layers,
        "use_double_wide_mlp": False,
        "enable_moe_block": False,
        "tie_word_embeddings": True,
    }
    return {
        "model_type": "gemma4_assistant",
        "architectures": ["Gemma4AssistantForCausalLM"],
        "backbone_hidden_size": target.hidden_size,
        "use_ordered_embeddings": False,
        "tie_word_embeddings": True,
        "dtype": "float32",
        "text_config": text,
    }


def new_drafter(config: dict, target: ModelArgs) -> Assistant:
    args = AssistantArgs.from_config(config)
    problems = pairing_problems(target, args)
    if problems:
        raise GemmaChatError("drafter does not fit the target: " + "; ".join(problems))
    drafter = Assistant(args)
    # layer_scalar is a fixed buffer in transformers' assistant, not a trained weight.
    drafter.freeze(recurse=True, keys=["layer_scalar"], strict=False)
    mx.eval(drafter.parameters())
    return drafter


# -- the frozen target's side of the loss -----------------------------------------------------
class TeacherBatch(NamedTuple):
    """Everything the loss needs from the frozen target, for B windows of T tokens
    (Q = T - 1 query rows, D = depth). Step s (1-based) reads rows s .. s + Q - 1 of the padded
    `embeds`, `probs` and `neg_entropy`."""

    embeds: mx.array  # [B, T + D - 1, Hb] target scaled input embeddings of x, zero-padded
    hidden: mx.array  # [B, Q, Hb] target post-norm hidden states h[0 .. Q - 1]
    sliding_keys: mx.array  # [B, kv, T, d] store sliding layer K (normed, RoPE'd) for all positions
    sliding_values: mx.array
    full_keys: mx.array  # [B, kv_f, T, d_f] store full layer K/V
    full_values: mx.array
    sliding_mask: mx.array  # [Q, T] bool: keys i - W .. i visible to row i
    full_mask: mx.array  # [Q, T] bool: keys <= i visible to row i
    probs: (
        mx.array
    )  # [B, T + D - 1, V] target probabilities (softmax of softcapped logits), 0-padded
    neg_entropy: mx.array  # [B, T + D - 1] sum(p log p) per row, zero-padded


def target_forward(target: Model, tokens: mx.array):
    """(post-norm hidden [B, T, H], logits [B, T, V], (K, V) of the store sliding layer,
    (K, V) of the store full layer) for a cache-less forward over `tokens` [B, T]. The same
    loop as `Gemma4TextModel.__call__`, keeping the K/V each layer attended to."""
    m, a = target.model, target.args
    h = m.embed(tokens)
    ple = m.per_layer_inputs(tokens, h) if a.hidden_size_per_layer_input else None
    kv: list = [None] * len(m.layers)
    for i, layer in enumerate(m.layers):
        layer_ple = ple[i] if ple is not None else None
        h, kv[i] = layer(h, None, kv[a.kv_source_of(i)], layer_ple)
    hidden = m.norm(h)
    sliding = kv[a.store_layer(SLIDING)]
    full = kv[a.store_layer(FULL)]
    return hidden, target.logits(hidden), sliding[:2], full[:2]  # (keys, values) of each view


def drafter_masks(q_len: int, t_len: int, window: int) -> tuple[mx.array, mx.array]:
    """Key visibility of query row i (RoPE position i + 1, cache offset i + 1): sliding keys
    i - window .. i (the last window + 1 committed ones), full keys 0 .. i."""
    rows, keys = mx.arange(q_len), mx.arange(t_len)
    return window_mask(rows, keys, window + 1), keys[None, :] <= rows[:, None]


def teacher_batch(target: Model, tokens: mx.array, depth: int, window: int) -> TeacherBatch:
    B, T = tokens.shape
    hidden, logits, (sk, sv), (fk, fv) = target_forward(target, tokens)
    f32 = mx.float32
    embeds = target.model.embed(tokens).astype(f32)
    logp = nn.log_softmax(logits.astype(f32), axis=-1)
    probs = mx.exp(logp)
    neg_entropy = (probs * logp).sum(axis=-1)
    if depth > 1:
        embeds = mx.concatenate([embeds, mx.zeros((B, depth - 1, embeds.shape[-1]), f32)], axis=1)
        probs = mx.concatenate([probs, mx.zeros((B, depth - 1, probs.shape[-1]), f32)], axis=1)
        neg_entropy = mx.concatenate([neg_entropy, mx.zeros((B, depth - 1), f32)], axis=1)
    sliding_mask, full_mask = drafter_masks(T - 1, T, window)
    return TeacherBatch(
        embeds,
        hidden[:, : T - 1].astype(f32),
        sk.astype(f32),
        sv.astype(f32),
        fk.astype(f32),
        fv.astype(f32),
        sliding_mask,
        full_mask,
        probs,
        neg_entropy,
    )


# -- the drafter's side: the unrolled forward and the loss ---------------------------------------
def unrolled_logits(drafter: Assistant, batch: TeacherBatch, depth: int) -> list[mx.array]:
    """The drafter's logits [B, Q, V] for steps 1..depth, for every query row at once, run the
    way `engine.speculative.draft` runs at inference (see the module docstring)."""
    q_len = batch.hidden.shape[1]
    # Query row i sits at position i + 1 (see drafter_masks).
    kv = {
        SLIDING: KVView(batch.sliding_keys, batch.sliding_values, batch.sliding_mask, 1),
        FULL: KVView(batch.full_keys, batch.full_values, batch.full_mask, 1),
    }
    g = batch.hidden
    out = []
    for s in range(1, depth + 1):
        y, g = drafter(batch.embeds[:, s : s + q_len], g, kv)
        out.append(drafter.logits(y))
    return out


def distill_loss(drafter: Assistant, depth: int, *arrays: mx.array):
    """(loss, per-step KL [depth], per-step top-1 agreement [depth]) over valid rows."""
    batch = TeacherBatch(*arrays)
    B, q_len = batch.hidden.shape[:2]
    rows = mx.arange(q_len)
    loss, kls, accs = mx.array(0.0), [], []
    for s, logits in enumerate(unrolled_logits(drafter, batch, depth), start=1):
        p = batch.probs[:, s : s + q_len]
        # KL(p || q) = sum p log p - sum p logits + logsumexp(logits), as sum p = 1 (valid rows).
        # The teacher's side is precomputed: exp/log are what cost on a CPU.
        cross = (p * logits).sum(axis=-1) - mx.logsumexp(logits, axis=-1)
        kl = batch.neg_entropy[:, s : s + q_len] - cross  # [B, Q]
        valid = (rows <= q_len - s).astype(mx.float32)  # row i + s inside the window
        count = valid.sum() * B
        kl = (kl * valid).sum() / count
        agree = (mx.argmax(logits, axis=-1) == mx.argmax(p, axis=-1)).astype(mx.float32)
        kls.append(kl)
        accs.append((agree * valid).sum() / count)
        loss = loss + kl
    return loss, (mx.stack(kls), mx.stack(accs))


# -- data --------------------------------------------------------------------------------------
def _text_files(data: list[Path]) -> list[Path]:
    files = []
    for path in map(Path, data):
        if path.is_dir():
            files += sorted(p for p in path.rglob("*.txt") if p.is_file())
        elif path.is_file():
            files.append(path)
        else:
            raise GemmaChatError(f"no such data file: {path}")
    if not files:
        raise GemmaChatError("no text files to train on")
    return files


def token_stream(tokenizer, files: list[Path]) -> np.ndarray:
    """All files tokenized (paragraph by paragraph, batched), each starting with <bos>."""
    hf = getattr(tokenizer, "_tokenizer", tokenizer)
    bos = getattr(hf, "bos_token_id", None)
    pieces = []
    for file in files:
        text = file.read_text(errors="ignore")
        paras = [p + "\n\n" for p in text.split("\n\n") if p.strip()]
        ids = hf(paras, add_special_tokens=False)["input_ids"] if paras else []
        pieces.append(np.array(([bos] if bos is not None else []) + [t for p in ids for t in p]))
    return np.concatenate(pieces).astype(np.int32)


def self_distilled_windows(target: Model, prefixes: np.ndarray, length: int) -> np.ndarray:
    """[N, length] windows: each prefix [N, P] followed by the target's greedy continuation
    (batched decoding with a KV cache, GENERATION_BATCH windows at a time)."""
    n, p = prefixes.shape
    out = np.zeros((n, length), dtype=np.int32)
    out[:, :p] = prefixes
    for start in range(0, n, GENERATION_BATCH):
        chunk = mx.array(prefixes[start : start + GENERATION_BATCH])
        cache = target.make_cache(slack=max(64, p))
        logits = target(chunk, cache, last_only=True)
        tokens = [mx.argmax(logits[:, -1], axis=-1)]
        for _ in range(length - p - 1):
            logits = target(tokens[-1][:, None], cache)
            tokens.append(mx.argmax(logits[:, -1], axis=-1))
            mx.async_eval(tokens[-1])
        out[start : start + len(chunk), p:] = np.array(mx.stack(tokens, axis=1))
    return out


# -- acceptance ----------------------------------------------------------------------------------
def measure_acceptance(
    pair, prompts: list, draft_tokens: int = 3, max_tokens: int = 64, raw: bool = False
) -> float:
    """Greedy acceptance rate (accepted drafts / drafted) of `pair.drafter` over `prompts`
    (strings, chat-templated unless `raw`, or token id lists), generating `max_tokens` each."""
    from ..engine.generate import generate

    drafted = accepted = 0
    for prompt in prompts:
        stats = None
        for chunk in generate(
            pair, prompt, max_tokens=max_tokens, draft_tokens=draft_tokens, ignore_eos=True, raw=raw
        ):
            stats = chunk.stats
        drafted += stats.drafted
        accepted += stats.accepted
    return accepted / drafted if drafted else 0.0


# -- checkpoints ---------------------------------------------------------------------------------
def _save_arrays(arrays: dict, file: Path):
    tmp = file.with_name(file.stem + ".tmp.safetensors")
    mx.save_safetensors(str(tmp), arrays)
    os.replace(tmp, file)


def _write_text(file: Path, text: str):
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, file)


def _save_checkpoint(out: Path, drafter, optimizer, config: dict, progress: dict):
    out.mkdir(parents=True, exist_ok=True)
    (out / "progress").mkdir(exist_ok=True)
    _save_arrays(dict(tree_flatten(drafter.parameters())), out / "model.safetensors")
    _save_arrays(dict(tree_flatten(optimizer.state)), out / "progress" / "optimizer.safetensors")
    _write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    _write_text(out / "progress.json", json.dumps(progress, indent=2) + "\n")


def _is_checkpoint(out: Path) -> bool:
    """Whether `out` holds a checkpoint to resume; refuses to overwrite any other model."""
    if (out / "progress.json").is_file() and (out / "model.safetensors").is_file():
        return True
    if (out / "config.json").is_file() or any(out.glob("*.safetensors")):
        raise GemmaChatError(
            f"{out} holds a model but no training progress: not overwriting it; "
            "pick a new output folder"
        )
    return False


def _resume(out: Path, config: dict, drafter, optimizer) -> dict | None:
    """Load the checkpoint in `out` (if any) into drafter and optimizer; its progress dict."""
    if not _is_checkpoint(out):
        return None
    saved = json.loads((out / "config.json").read_text())
    if saved != json.loads(json.dumps(config)):
        raise GemmaChatError(
            f"{out} holds a drafter checkpoint of another shape; use a new output folder "
            "or the same sizes to resume it"
        )
    drafter.load_weights(str(out / "model.safetensors"), strict=True)
    state = mx.load(str(out / "progress" / "optimizer.safetensors"))
    current = dict(tree_flatten(optimizer.state))
    if set(state) != set(current):
        raise GemmaChatError(f"the optimizer state in {out}/progress does not fit the drafter")
    optimizer.state = tree_unflatten(list(state.items()))
    mx.eval(drafter.parameters(), optimizer.state)
    return json.loads((out / "progress.json").read_text())


# -- training ------------------------------------------------------------------------------------
@dataclass
class _Schedule:
    lr: float
    warmup: int
    steps: int | None
    budget_s: float | None
    start_fraction: float

    def fraction(self, step: int, elapsed: float) -> float:
        """How far along the cosine we are: by steps when a step count is given, else by time
        (resumed runs continue from where the last one stopped)."""
        f = []
        if self.steps:
            f.append((step - self.warmup) / max(1, self.steps - self.warmup))
        if self.budget_s:
            f.append(self.start_fraction + (1 - self.start_fraction) * elapsed / self.budget_s)
        return min(1.0, max(0.0, max(f)))

    def __call__(self, step: int, elapsed: float) -> float:
        if step <= self.warmup:
            return self.lr * step / self.warmup
        low = self.lr * MIN_LR_FRACTION
        return low + (self.lr - low) * 0.5 * (1 + math.cos(math.pi * self.fraction(step, elapsed)))


class _Reporter:
    """A Rich progress bar (with a console) or a plain line every `every` steps."""

    def __init__(self, console, total: float, completed: float, every: int):
        self.every = every
        self.bar = None
        if console is not None:
            from rich.progress import (
                BarColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self.bar = Progress(
                TextColumn("[bold]distilling[/]"),
                BarColumn(),
                TaskProgressColumn(),
                TimeElapsedColumn(),
                TextColumn("{task.fields[metrics]}"),
                console=console,
            )
            self.task = self.bar.add_task("distil", total=total, completed=completed, metrics="")
            self.bar.start()

    def update(self, completed: float, step: int, text: str):
        if self.bar is not None:
            self.bar.update(self.task, completed=completed, metrics=f"step {step} {text}")
        elif step % self.every == 0:
            print(f"step {step} {text}", flush=True)

    def note(self, text: str):
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.stop()


def _format(loss: float, acc: list[float], tok_s: float | None = None) -> str:
    accs = " ".join(f"{a:.2f}" for a in acc)
    speed = f" {tok_s:.0f} tok/s" if tok_s else ""
    return f"loss {loss:.3f} acc {accs}{speed}"


def train_drafter(
    target_path: Path,
    data: list[Path],
    out: Path,
    *,
    hidden_size: int = 128,
    num_layers: int = 4,
    intermediate_size: int = 512,
    num_attention_heads: int | None = None,
    depth: int = 3,
    seq_len: int = 256,
    batch: int = 8,
    lr: float = 2e-3,
    minutes: float | None = None,
    steps: int | None = None,
    self_distill_fraction: float = 0.5,
    seed: int = 0,
    progress=None,
    warmup: int | None = None,
    weight_decay: float = 0.01,
    checkpoint_every: int = 100,
    log_every: int = 25,
    self_distill_pool: int | None = None,
    eval_windows: int = 16,
    acceptance_prompts: int = 4,
) -> dict:
    """Distil a drafter for the target in `target_path` on the text files `data` into `out`
    (resuming from a checkpoint there). Stops after `steps` (the total step count, resumed runs
    included) or `minutes` (this call's wall time), whichever comes first; 1000 steps when
    neither is given. Returns the final metrics: steps, tokens (window tokens seen, all runs),
    loss and accuracy (per depth, mean over the last `log_every` steps), held-out loss and
    accuracy, greedy acceptance on held-out prompts (with `acceptance_prompts` > 0), seconds
    and training tokens/s of this call."""
    from ..loading import Pair, load_target, load_tokenizer

    started = time.perf_counter()
    target_path, out = Path(target_path), Path(out)
    _is_checkpoint(out)
    if steps is None and minutes is None:
        steps = 1000
    if depth < 1 or seq_len < 2 or batch < 1:
        raise GemmaChatError("depth, batch must be >= 1 and seq_len >= 2")
    target = load_target(target_path)
    target.freeze()
    tokenizer = load_tokenizer(target_path)
    config = drafter_config(
        target.args,
        hidden_size=hidden_size,
        num_layers=num_layers,
        intermediate_size=intermediate_size,
        num_attention_heads=num_attention_heads,
    )
    mx.random.seed(seed)
    drafter = new_drafter(config, target.args)
    window = drafter.sliding_window
    T = seq_len + depth + 1

    # Data: a held-out tail (for evaluation and acceptance prompts), the rest for training.
    stream = token_stream(tokenizer, _text_files(data))
    if len(stream) < T + 1:
        raise GemmaChatError(f"the data has {len(stream)} tokens; a window needs {T + 1}")
    held_len = min(len(stream) // 20, eval_windows * T) if len(stream) >= 10 * T else 0
    held = stream[len(stream) - held_len :] if held_len > T else stream[:0]
    train = stream[: len(stream) - len(held)]

    optimizer = optim.AdamW(learning_rate=0.0, weight_decay=weight_decay)
    optimizer.init(drafter.trainable_parameters())
    resumed = _resume(out, config, drafter, optimizer)
    step = resumed["step"] if resumed else 0
    tokens_seen = resumed["tokens"] if resumed else 0
    schedule = _Schedule(
        lr,
        warmup if warmup is not None else max(1, min(100, (steps or 1000) // 10)),
        steps,
        minutes * 60 if minutes else None,
        resumed.get("fraction", 0.0) if resumed else 0.0,
    )

    rng = np.random.default_rng([seed, step])
    prefix = min(PREFIX_TOKENS, max(1, T // 4))
    reporter = _Reporter(
        progress,
        total=steps if steps else minutes * 60,
        completed=step if steps else 0,
        every=log_every,
    )
    if resumed:
        reporter.note(f"resuming from step {step} in {out}")
    pool = np.zeros((0, T), np.int32)
    if self_distill_fraction > 0:
        n = self_distill_pool or 8 * batch
        starts = rng.integers(0, len(train) - prefix, n)
        t0 = time.perf_counter()
        pool = self_distilled_windows(target, np.stack([train[s : s + prefix] for s in starts]), T)
        reporter.note(
            f"self-distillation pool: {n} windows ({n * (T - prefix)} greedy tokens) "
            f"in {time.perf_counter() - t0:.1f}s"
        )

    teacher = mx.compile(partial(teacher_batch, target, depth=depth, window=window))
    loss_and_grad = nn.value_and_grad(drafter, partial(distill_loss, drafter, depth))
    state = [drafter.state, optimizer.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def train_step(*arrays):
        (loss, (kls, accs)), grads = loss_and_grad(*arrays)
        grads, _ = optim.clip_grad_norm(grads, 1.0)
        optimizer.update(drafter, grads)
        return loss, accs

    def sample_batch() -> mx.array:
        if len(pool) and rng.random() < self_distill_fraction:
            return mx.array(pool[rng.integers(0, len(pool), batch)])
        starts = rng.integers(0, len(train) - T + 1, batch)
        return mx.array(np.stack([train[s : s + T] for s in starts]))

    def save(metrics: dict):
        fraction = schedule.fraction(step, time.perf_counter() - started)
        info = {
            "step": step,
            "tokens": tokens_seen,
            "fraction": fraction,
            **metrics,
            "hyperparameters": {
                "depth": depth,
                "seq_len": seq_len,
                "batch": batch,
                "lr": lr,
                "self_distill_fraction": self_distill_fraction,
                "seed": seed,
            },
        }
        _save_checkpoint(out, drafter, optimizer, config, info)

    deadline = started + minutes * 60 if minutes else None
    history: list[float] = []
    recent: list[tuple[float, list[float]]] = []
    train_started, trained_tokens = time.perf_counter(), 0
    mean_loss, mean_acc = None, None
    try:
        while (steps is None or step < steps) and (
            deadline is None or time.perf_counter() < deadline
        ):
            optimizer.learning_rate = schedule(step + 1, time.perf_counter() - started)
            arrays = teacher(sample_batch())
            loss, accs = train_step(*arrays)
            mx.eval(loss, accs, state)
            step += 1
            tokens_seen += batch * T
            trained_tokens += batch * T
            loss_value, acc_values = loss.item(), accs.tolist()
            history.append(loss_value)
            recent = (recent + [(loss_value, acc_values)])[-log_every:]
            mean_loss = sum(r[0] for r in recent) / len(recent)
            mean_acc = [sum(r[1][d] for r in recent) / len(recent) for d in range(depth)]
            tok_s = trained_tokens / (time.perf_counter() - train_started)
            completed = step if steps else time.perf_counter() - started
            reporter.update(completed, step, _format(mean_loss, mean_acc, tok_s))
            if step % checkpoint_every == 0:
                save({"loss": mean_loss, "accuracy": mean_acc})
    except KeyboardInterrupt:
        reporter.close()
        if history:
            save({"loss": mean_loss, "accuracy": mean_acc})
            reporter.note(f"interrupted: checkpoint of step {step} saved to {out}")
        raise
    train_seconds = time.perf_counter() - train_started
    reporter.close()

    result = {
        "steps": step,
        "tokens": tokens_seen,
        "loss": mean_loss if history else (resumed or {}).get("loss"),
        "accuracy": mean_acc if history else (resumed or {}).get("accuracy"),
        "loss_history": history,
        "seconds": round(time.perf_counter() - started, 2),
        "tokens_per_second": round(trained_tokens / train_seconds, 1) if history else None,
    }
    if len(held) >= T:
        starts = np.linspace(0, len(held) - T, min(eval_windows, len(held) // T)).astype(int)
        windows = np.stack([held[s : s + T] for s in starts])
        losses, accs = [], []
        for i in range(0, len(windows), batch):
            arrays = teacher_batch(target, mx.array(windows[i : i + batch]), depth, window)
            loss, (_, acc) = distill_loss(drafter, depth, *arrays)
            losses.append(loss.item())
            accs.append(acc.tolist())
        result["held_out_loss"] = float(np.mean(losses))
        result["held_out_accuracy"] = np.mean(accs, axis=0).tolist()
        if acceptance_prompts:
            pair = Pair(target, drafter, tokenizer, target_path, out)
            prompts = [held[s : s + prefix].tolist() for s in starts[:acceptance_prompts]]
            result["acceptance"] = measure_acceptance(pair, prompts, draft_tokens=depth)
    save(
        {
            k: result[k]
            for k in ("loss", "accuracy", "held_out_loss", "held_out_accuracy", "acceptance")
            if k in result
        }
    )
    reporter.note(
        f"drafter saved to {out}: step {step}, "
        + _format(result["loss"] or 0.0, result["accuracy"] or [])
        + (
            f", held-out acc {' '.join(f'{a:.2f}' for a in result['held_out_accuracy'])}"
            if "held_out_accuracy" in result
            else ""
        )
        + (f", acceptance {result['acceptance']:.2f}" if "acceptance" in result else "")
    )
    return result
