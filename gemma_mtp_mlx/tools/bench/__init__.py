"""`gemma-chat bench`: speed measured side by side in one process, never estimated.

Four benches, one per question:

- `--model M` (pair_bench.py): a loaded pair (the demo pair by default) with its real drafter on
  four workload classes: ours plain and MTP against mlx-lm and mlx-vlm on the same weights.
- `--shape e2b|e4b|26b|31b` (shape_bench.py): random weights with a real Gemma 4 shape
  (shapes.py) and a drafter of simulated acceptance (simulated.py), beside both peers.
- `--moe-curve` (costs.py): the 26B-A4B mixture of experts' verify cost, ours against mlx-lm.
- `--fresh-processes` (fresh.py): a pair as one-shot scripted use meets it, each answer its own
  `gemma-chat` process, with and without the costs an earlier process stored.

The files: measure.py times runs and alternates variants; peers.py runs mlx-lm and mlx-vlm on our
arrays; costs.py measures isolated step costs; report.py turns runs into figures; render.py and
plots.py show them; machine.py says where it ran. Speed goals live here, never in tests.
"""

import json
from pathlib import Path

from rich.console import Console


def run(
    *,
    model: str = "demo",
    drafter: str = "auto",
    shape: str | None = None,
    acceptances: list[float] | None = None,
    layers: int | None = None,
    max_tokens: int | None = None,
    quick: bool = False,
    repeats: int | None = None,
    as_json: bool = False,
    png: Path | None = None,
    moe: bool = False,
    moe_layers: int = 4,
    fresh: bool = False,
    out: Console | None = None,
    err: Console | None = None,
) -> dict:
    """Run the bench the options ask for; print JSON or tables; return the result."""
    out = out or Console(highlight=False)
    err = err or Console(stderr=True, highlight=False)

    def say(message: str) -> None:
        err.print(f"[dim]bench: {message}[/]")

    if moe:
        from .costs import moe_config, moe_curve
        from .render import render_moe_curve

        say(f"MoE verify cost curve, {moe_layers} random 26B-A4B-core layers")
        result = moe_curve(moe_config(moe_layers), reps=repeats or 5)
        render = render_moe_curve
    elif fresh:
        from .fresh import run_fresh
        from .render import render_fresh as render

        result = run_fresh(
            model, drafter, max_tokens=max_tokens or (64 if quick else 300),
            repeats=repeats or (1 if quick else 3), progress=say,
        )
    elif shape is not None:
        result = _shape_bench(shape, acceptances or [0.6, 0.8], layers, max_tokens, quick, repeats, say)
        from .render import render_shape as render
    else:
        result = _pair_bench(model, drafter, max_tokens, quick, repeats, as_json, png, say)
        from .render import render_pair as render
    if as_json:
        print(json.dumps(result))
    else:
        render(result, out)
        for p in result.get("png", []):
            out.print(f"wrote {p}")
    return result


def _shape_bench(name, acceptances, layers, max_tokens, quick, repeats, say) -> dict:
    from .shape_bench import run_shape_bench
    from .shapes import MEMORY_SHARE, available_memory, build, fit, weight_bytes

    budget = int(available_memory() * MEMORY_SHARE)
    s = fit(name, layers, budget)
    total, _ = weight_bytes(s)
    say(f"random {name}: {s.note}, {total / 2**30:.1f} GiB of fp32 weights (building)")
    pair = build(s)
    return run_shape_bench(
        pair, s, acceptances, max_tokens=max_tokens or (32 if quick else 64),
        repeats=repeats or (1 if quick else 3), cost_reps=2 if quick else 5, progress=say,
    )


def _pair_bench(model, drafter, max_tokens, quick, repeats, as_json, png, say) -> dict:
    from ...errors import GemmaChatError
    from ...loading import load
    from .pair_bench import run_bench
    from .plots import save_pngs

    pair = load(model, drafter)
    if pair.drafter is None:
        raise GemmaChatError(f"no MTP drafter found for {model}: pass --drafter")
    result = run_bench(
        pair, max_tokens=max_tokens or (48 if quick else 128), repeats=repeats or (1 if quick else 3),
        quick=quick, cost_reps=7 if quick else 15, progress=say,
    )
    folder = png if png is not None else (None if as_json else Path("."))
    if folder is not None:
        try:
            result["png"] = [str(p) for p in save_pngs(result, folder)]
        except ImportError:
            result["notes"].append(
                "PNG skipped: matplotlib is not installed (pip install 'gemma-chat[plot]')"
            )
    return result
