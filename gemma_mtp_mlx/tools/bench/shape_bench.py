"""`gemma-chat bench --shape`: the speed story at Gemma 4's real shapes, beside mlx-lm and mlx-vlm.

One random-weight pair of a real shape (shapes.py), one prompt, and per simulated acceptance A
(simulated.py) these variants on the same weights, alternated in one run: ours plain, mlx-lm
plain, ours MTP with the engine's draft-length policy and at fixed K = 1..4, and mlx-vlm's MTP
loop with the same simulated drafter (when mlx-vlm is importable). Every variant must produce
ours-plain's tokens. The isolated step costs (costs.py), measured at the middle of the decode,
give each row its ideal speedup for the run's own hits and misses, and efficiency = measured /
ideal.
"""

import dataclasses
from collections.abc import Callable

import numpy as np

from ...engine.policy import POLICY_MAX_DRAFT
from .costs import COST_TOKENS, cost_curve
from .machine import busy_note, machine, preload_note
from .measure import Variant, alternate, run_ours
from .peers import (
    eos_bias,
    mlx_lm_twin,
    mlx_vlm_missing,
    run_mlx_lm,
    run_mlx_vlm,
    vlm_drafter,
    vlm_target,
)
from .report import SIMULATED, goals, identical, shape_rows
from .shapes import Shape, shape, step_bytes
from .simulated import Proposals, SimulatedDrafter

FIXED_KS = (1, 2, 3, 4)
PROMPT_TOKENS = 128
VLM_BLOCK = 4  # mlx-vlm's default draft_block_size: the bonus token and 3 drafts


def run_shape_bench(
    pair,
    kept: Shape,
    acceptances: list[float],
    *,
    max_tokens: int = 64,
    repeats: int = 3,
    cost_reps: int = 5,
    prompt_tokens: int = PROMPT_TOKENS,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Measure everything for a random-weight pair of the shape `kept`; one JSON-ready dict."""
    say = progress or (lambda _message: None)
    notes = [n for n in (busy_note(), preload_note()) if n]
    vocab = pair.target.args.vocab_size
    prompt = np.random.default_rng(seed).integers(3, vocab, prompt_tokens).tolist()

    say("reference: ours plain")
    reference = run_ours(pair, prompt, max_tokens, mtp=False)
    sequence = prompt + reference.tokens
    twin = mlx_lm_twin(pair.target)
    variants = {
        "plain": Variant("plain", lambda p, n: run_ours(pair, p, n, mtp=False)),
        "mlx_lm": Variant("mlx_lm", lambda p, n: run_mlx_lm(twin, pair.tokenizer, p, n)),
    }
    missing = mlx_vlm_missing()
    vlm_model = None
    if missing:
        notes.append(f"mlx-vlm MTP skipped: {missing}")
    else:
        vlm_model = vlm_target(pair.target, eos_bias(pair.target, pair.tokenizer))
    proposals = {}
    for a in acceptances:
        proposals[a] = Proposals(sequence, a, vocab, seed)
        simulated = dataclasses.replace(pair, drafter=SimulatedDrafter(pair.drafter, proposals[a]))

        def ours(k, simulated=simulated):
            return lambda p, n: run_ours(simulated, p, n, mtp=True, k=k)

        variants[f"{a}/policy"] = Variant(f"{a}/policy", ours(None))
        for k in FIXED_KS:
            variants[f"{a}/k{k}"] = Variant(f"{a}/k{k}", ours(k))
        if vlm_model is not None:
            drafter = vlm_drafter(pair.drafter, proposals[a])
            variants[f"{a}/mlx_vlm"] = Variant(
                f"{a}/mlx_vlm", lambda p, n, d=drafter: run_mlx_vlm(vlm_model, d, p, n, VLM_BLOCK)
            )

    say(f"{len(variants)} variants x {repeats} runs of {max_tokens} tokens")
    alternate(list(variants.values()), prompt, max_tokens, repeats, progress=say)
    say("isolated step costs")
    curve = cost_curve(
        pair.target, pair.drafter, context=prompt_tokens + max_tokens // 2, reps=cost_reps
    )

    plain, lm = variants["plain"].median(), variants["mlx_lm"].median()
    head = "centroid_head" if pair.drafter.args.use_ordered_embeddings else "dense_head"
    rows = shape_rows(
        proposals, variants, plain, curve, head, FIXED_KS,
        policy_max=min(POLICY_MAX_DRAFT, COST_TOKENS - 1),
        vlm_block=None if vlm_model is None else VLM_BLOCK,
        answer=(prompt_tokens, max_tokens),
    )
    plain_vs_mlx_lm = round(plain.tokens_per_second / lm.tokens_per_second, 3)
    if reference.tokens != plain.tokens:
        notes.append("ours plain decoded differently from its first run")
    return {
        "shape": kept.name,
        "description": kept.note,
        "layers": kept.layers,
        "vocab": kept.vocab,
        # How representative the kept layers are: what a one-token step reads, kept and full.
        "step_bytes": {"kept": step_bytes(kept), "full": step_bytes(shape(kept.name))},
        "machine": machine(),
        "simulated": SIMULATED,
        "settings": {
            "max_tokens": max_tokens, "repeats": repeats, "prompt_tokens": prompt_tokens,
            "seed": seed, "greedy": True, "ignore_eos": True, "fixed_ks": list(FIXED_KS),
            "mlx_vlm_block": VLM_BLOCK if vlm_model is not None else None,
        },
        "plain_tps": round(plain.tokens_per_second, 2),
        "mlx_lm_tps": round(lm.tokens_per_second, 2),
        "plain_vs_mlx_lm": plain_vs_mlx_lm,
        "outputs_identical": all(identical(v, reference) for v in variants.values()),
        "rows": rows,
        "costs": curve | {"drafter_head": head},
        "goals": goals(kept.name, rows, plain_vs_mlx_lm),
        "mlx_vlm": {"skipped": missing} if missing else {"block": VLM_BLOCK},
        "notes": notes,
    }
