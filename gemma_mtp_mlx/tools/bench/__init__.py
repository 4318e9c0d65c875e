"""`gemma-chat bench`: speed measured side by side in one process, never estimated.

Five benches, one per question:

- `--model M` (pair_bench.py): a loaded pair (the demo pair by default) with its real drafter on
  four workload classes: ours plain and MTP against mlx-lm and mlx-vlm on the same weights.
- `--shape e2b|e4b|26b|31b` (shape_bench.py): random weights with a real Gemma 4 shape
  (shapes.py) and a drafter of simulated acceptance (simulated.py), beside both peers.
- `--moe-curve` (costs.py): the 26B-A4B mixture of experts' verify cost, ours against mlx-lm.
- `--fresh-processes` (fresh.py): a pair as one-shot scripted use meets it, each answer its own
  `gemma-chat` process, with and without the costs an earlier process stored.
- `--host` (host.py): the host's work per plain step and per round, eager against compiled, on
  a loaded pair, a random pair of a real shape (`--shape`, `--layers`) or a deep, narrow one
  built from a real shape's whole stack (`--shape S --narrow`).

The files: measure.py times runs and alternates variants; peers.py runs mlx-lm and mlx-vlm on our
arrays; costs.py measures isolated step costs; report.py turns runs into figures; render.py and
plots.py show them (`--plot DIR`; `--from-json FILE` shows a saved run again); machine.py says
where it ran. Speed goals live here, never in tests.
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
    plot: Path | None = None,
    saved: Path | None = None,
    moe: bool = False,
    moe_layers: int = 4,
    fresh: bool = False,
    host: bool = False,
    narrow: bool = False,
    out: Console | None = None,
    err: Console | None = None,
) -> dict:
    """Run the bench the options ask for (or read a `saved` run's JSON); print JSON or tables,
    draw the figures into `plot`; return the result."""
    out = out or Console(highlight=False)
    err = err or Console(stderr=True, highlight=False)

    def say(message: str) -> None:
        err.print(f"[dim]bench: {message}[/]")

    from . import render as renders

    if saved is not None:
        result = _read_saved(saved)
    elif host:
        result = _host_bench(model, drafter, shape, narrow, layers, max_tokens, quick, repeats, say)
    elif moe:
        from .costs import moe_config, moe_curve

        say(f"MoE verify cost curve, {moe_layers} random 26B-A4B-core layers")
        result = moe_curve(moe_config(moe_layers), reps=repeats or 5)
    elif fresh:
        from .fresh import run_fresh

        result = run_fresh(
            model, drafter, max_tokens=max_tokens or (64 if quick else 300),
            repeats=repeats or (1 if quick else 3), progress=say,
        )
    elif shape is not None:
        result = _shape_bench(shape, acceptances or [0.6, 0.8], layers, max_tokens, quick, repeats, say)
    else:
        result = _pair_bench(model, drafter, max_tokens, quick, repeats, say)
    fresh_run = result.get("mode") == "fresh-processes"
    host_run = result.get("bench") == "host"
    if plot is not None and "dims" not in result and not fresh_run and not host_run:  # tables
        result["plots"] = _plots(result, plot)
    render = (
        renders.render_moe_curve if "dims" in result
        else renders.render_fresh if fresh_run
        else renders.render_host if host_run
        else renders.render_shape if "rows" in result
        else renders.render_pair
    )
    if as_json:
        print(json.dumps(result))
    else:
        render(result, out)
        for p in result.get("plots", []):
            out.print(f"wrote {p}")
    return result


def _host_bench(model, drafter, shape, narrow, layers, max_tokens, quick, repeats, say) -> dict:
    from ...errors import GemmaChatError
    from ...loading import load
    from .host import run_host_bench

    if narrow:
        if shape is None:
            raise GemmaChatError("--narrow needs --shape: the layer stack it keeps")
        import mlx.nn as nn

        from .shapes import build
        from .shapes import narrow as narrow_shape

        s = narrow_shape(shape)
        say(f"deep, narrow {shape}: {s.note}, 4-bit as the default download (building)")
        pair = build(s)
        nn.quantize(pair.target, 64, 4, class_predicate=pair.target.quant_predicate)
        note = f"deep, narrow {shape}: {s.note}, 4-bit"
    elif shape is not None:
        from .shapes import MEMORY_SHARE, available_memory, build, fit

        s = fit(shape, layers, int(available_memory() * MEMORY_SHARE))
        say(f"random {shape}: {s.note} (building)")
        pair = build(s)
        note = f"random {shape}: {s.note}, fp32"
    else:
        pair = load(model, drafter)
        if pair.drafter is None:
            raise GemmaChatError(f"no MTP drafter found for {model}: pass --drafter")
        note = model
    return run_host_bench(pair, note=note, max_tokens=max_tokens or (32 if quick else 64),
                          repeats=repeats or (1 if quick else 3), progress=say)


def _read_saved(path: Path) -> dict:
    from ...errors import GemmaChatError

    try:
        result = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise GemmaChatError(f"cannot read a bench result from {path}: {e}") from None
    if not isinstance(result, dict) or "machine" not in result:
        raise GemmaChatError(f"{path} is not the --json output of gemma-chat bench")
    return result


def _plots(result: dict, folder: Path) -> list[str]:
    from ...errors import GemmaChatError

    try:
        from .plots import save_plots
    except ImportError:
        raise GemmaChatError("--plot needs matplotlib: pip install 'gemma-chat[plot]'") from None
    return [str(p) for p in save_plots(result, folder)]


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


def _pair_bench(model, drafter, max_tokens, quick, repeats, say) -> dict:
    from ...errors import GemmaChatError
    from ...loading import load
    from .pair_bench import run_bench

    pair = load(model, drafter)
    if pair.drafter is None:
        raise GemmaChatError(f"no MTP drafter found for {model}: pass --drafter")
    return run_bench(
        pair, max_tokens=max_tokens or (48 if quick else 128), repeats=repeats or (1 if quick else 3),
        quick=quick, cost_reps=7 if quick else 15, progress=say,
    )
