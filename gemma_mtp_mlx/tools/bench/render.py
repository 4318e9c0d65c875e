"""The benches' results as Rich tables (narrow enough for 80 columns)."""

from rich import box
from rich.markup import escape
from rich.table import Table

from .costs import COST_TOKENS


def _table(console, title, *columns) -> Table:
    console.print(f"\n[bold]{title}[/]")
    t = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for i, c in enumerate(columns):
        t.add_column(c, justify="left" if i == 0 else "right", min_width=max(len(c), 4 if i else 8))
    return t


def _f(x, fmt="{:.1f}"):
    return "–" if x is None else fmt.format(x)


def _machine_line(m: dict) -> str:
    blas = "OpenBLAS preloaded" if m["openblas_preload"] else "no BLAS preload"
    threads = f", {m['openblas_threads']} BLAS thread(s)" if m.get("openblas_threads") else ""
    return (
        f"{escape(m['cpu'])}, {m['cpu_count']} cores, {escape(m['platform'])}; mlx {m['mlx']} "
        f"({m['device']}, {blas}{threads}), mlx-lm {m['mlx_lm']}, mlx-vlm {m['mlx_vlm'] or '–'}; "
        f"load average {m['load_average']}"
    )


def _goals(console, goals: dict) -> None:
    for k, g in goals.items():
        if not isinstance(g, dict):
            continue
        met = "n/a" if g["met"] is None else "met" if g["met"] else "NOT met"
        console.print(f"goal {k} >= {g['target']}: {_f(g['value'], '{:.2f}')} ({met})")


# -- the shapes bench --------------------------------------------------------------------------
def render_shape(result: dict, console) -> None:
    s = result["settings"]
    console.print(
        f"[bold]gemma-chat bench --shape {result['shape']}[/]: random fp32 weights, "
        f"{escape(result['description'])}; {s['prompt_tokens']}-token prompt, {s['max_tokens']} "
        f"tokens per run, median of {s['repeats']}, greedy\n{_machine_line(result['machine'])}"
    )
    console.print(f"[yellow]{escape(result['simulated'])}[/]")
    console.print(
        f"ours plain {result['plain_tps']:.2f} tok/s, mlx-lm plain {result['mlx_lm_tps']:.2f} "
        f"tok/s: ours / mlx-lm = {result['plain_vs_mlx_lm']:.2f}x"
    )
    columns = ("variant", "tok/s", "speedup", "ideal", "eff", "acc", "tok/fwd", "K", "/vlm", "meter")
    for a in dict.fromkeys(r["acceptance_target"] for r in result["rows"]):
        t = _table(console, f"simulated acceptance {a:.2f}", *columns)
        for r in (r for r in result["rows"] if r["acceptance_target"] == a):
            meter = None
            if r.get("meter_speedup") is not None:
                meter = f"{r['meter_speedup']:.2f}x ({r['baseline_error']:.2f})"
            t.add_row(
                r["variant"], _f(r["tps"], "{:.2f}"), _f(r["speedup"], "{:.2f}x"),
                _f(r["ideal"], "{:.2f}x"), _f(r["efficiency"], "{:.2f}"),
                _f(r["acceptance"], "{:.0%}"), _f(r["tokens_per_forward"], "{:.2f}"),
                _f(r["drafts_per_round"], "{:.1f}"), _f(r.get("vs_mlx_vlm"), "{:.2f}x"),
                meter or "–",
            )
        console.print(t)
    console.print(
        "speedup = tok/s / ours plain; ideal = what isolated step costs promise for this run's "
        "own hits and misses (the policy: the best fixed K); eff = speedup / ideal; "
        "acc = accepted / drafts the verification reached; K = drafts per round; /vlm = ours / "
        "mlx-vlm's MTP; meter = the speedup our engine reported (its baseline / ours plain "
        "measured)", style="dim",
    )
    c = result["costs"]
    head = c["drafter_head"]
    console.print(
        f"isolated costs at a {c['context']}-token context: 1-token forward "
        f"{c['target_seconds'][0] * 1e3:.1f} ms; forward of T tokens / 1-token forward: "
        + ", ".join(f"T{t} {r:.2f}" for t, r in zip(c["tokens"], c["ratios"]))
        + f"; drafter step ({head.replace('_', ' ')}) {c['drafter_step_ratio'][head]:.3f}"
    )
    b = result["step_bytes"]

    def reads(x):
        total = x["lm_head"] + x["layers"]
        return f"{total / 2**30:.2f} GiB, {x['lm_head'] / total:.0%} of it the LM head"

    console.print(
        f"weights a one-token step reads (arithmetic on the shape): {reads(b['kept'])}; the full "
        f"model's {reads(b['full'])}"
    )
    console.print(
        "outputs identical (every variant, every run = ours plain): "
        + ("yes" if result["outputs_identical"] else "[bold red]NO[/]")
    )
    if not result["goals"]["applies"]:
        console.print("the goals below are set for e2b and e4b; shown for reference", style="dim")
    _goals(console, result["goals"])
    for note in result["notes"]:
        console.print(f"note: {escape(note)}", style="yellow")


# -- the pair bench ----------------------------------------------------------------------------
def render_pair(result: dict, console) -> None:
    console.print(
        f"[bold]gemma-chat bench[/] {escape(result['model'])}: {result['settings']['max_tokens']} "
        f"tokens per run, median of {result['settings']['repeats']}, greedy\n"
        f"{_machine_line(result['machine'])}"
    )
    t = _table(console, "decode tok/s, prefill excluded (gain = MTP / plain, acc = acceptance, "
               "tok/fwd = tokens per target forward, K = mean drafts per round, vs lm = ours plain "
               "/ mlx-lm plain, vlm = mlx-vlm's MTP)", "workload", "prompt", "plain", "MTP", "gain",
               "acc", "K", "tok/fwd", "mlx-lm", "vs lm", "vlm")
    for name, w in result["workloads"].items():
        lm, vlm = w.get("mlx_lm"), w.get("mlx_vlm")
        t.add_row(
            name, str(w["prompt_tokens"]), _f(w["plain"]["tokens_per_second"]),
            _f(w["mtp"]["tokens_per_second"]), _f(w["mtp"]["vs_plain"], "{:.2f}x"),
            _f(w["mtp"]["acceptance_rate"], "{:.0%}"), _f(w["mtp"]["mean_draft_tokens"], "{:.1f}"),
            _f(w["mtp"]["tokens_per_forward"], "{:.2f}"), _f(lm and lm["tokens_per_second"]),
            _f(lm and w["plain"]["tokens_per_second"] / lm["tokens_per_second"], "{:.2f}x"),
            _f(vlm and vlm["tokens_per_second"]),
        )
    t.add_row(
        "all", "", _f(result["plain_tokens_per_second"]), _f(result["mtp_tokens_per_second"]),
        _f(result["speedup"], "{:.2f}x"), _f(result["acceptance_rate"], "{:.0%}"), "",
        _f(result["tokens_per_target_forward"], "{:.2f}"),
        _f(result["mlx_lm_plain_tokens_per_second"]), _f(result["plain_vs_mlx_lm"], "{:.2f}x"),
        _f(result["mlx_vlm_mtp_tokens_per_second"]), style="bold",
    )
    console.print(t)
    differ = [n for n, w in result["workloads"].items() if not w["outputs_identical"]]
    console.print(
        "outputs identical (ours plain = ours MTP at every K = mlx-lm plain = mlx-vlm MTP, every "
        "run): " + ("yes" if not differ else f"[bold red]NO[/] ({', '.join(differ)})")
    )

    if result["k_sweep"]:
        names = list(next(iter(result["k_sweep"].values()))["by_workload"])
        t = _table(console, "tok/s at a fixed draft length K", "K", *names, "accept")
        t.add_row("plain", *[_f(result["workloads"][n]["plain"]["tokens_per_second"]) for n in names], "")
        for k, row in result["k_sweep"].items():
            t.add_row(k, *[_f(row["by_workload"].get(n)) for n in names], _f(row["acceptance_rate"], "{:.0%}"))
        console.print(t)

    t = _table(console, "what the meter showed: its speedup (the real one) and its baseline / ours "
               "plain measured beside it", "variant", *result["workloads"])
    for label, by_workload in result["meter"].items():
        cells = []
        for name in result["workloads"]:
            m = by_workload.get(name)
            cells.append("–" if m is None else (
                f"{m['meter_speedup']:.2f}x ({m['speedup']:.2f}x), {m['baseline_error']:.2f}"
            ))
        t.add_row(label, *cells)
    console.print(t)

    c = result["cost_curve"]
    t = _table(console, "cost: T-token target forward / 1-token forward", "T", "ratio")
    for i in range(COST_TOKENS):
        t.add_row(str(i + 1), _f(c["ratios"][i], "{:.2f}"))
    for head in ("dense_head", "centroid_head"):
        t.add_row(f"draft step, {head.replace('_', ' ')}", _f(c["drafter_step_ratio"][head], "{:.3f}"))
    t.add_row("1-token forward, ms", _f(c["target_seconds"][0] * 1e3, "{:.2f}"))
    console.print(t)

    pos = ", ".join(_f(a, "{:.0%}") for a in result["acceptance_by_position"]) or "–"
    console.print(f"acceptance by draft position: {pos}")
    weights = result["weights_bytes"]
    console.print(
        "peak memory: " + ", ".join(f"{k} {v / 2**20:.1f} MiB" for k, v in result["peak_memory_bytes"].items())
        + f" (weights: target {weights['target'] / 2**20:.1f} MiB, drafter "
        f"{weights['drafter'] / 2**20:.1f} MiB)"
    )
    never = result["never_hit"]
    if never:
        console.print(
            f"drafter that never hits: {never['tokens_per_second']:.1f} tok/s = "
            f"{never['vs_plain']:.2f}x plain by medians, {never['vs_plain_paired']:.2f}x paired by "
            f"repeat; {never['mean_draft_tokens']:.2f} drafts per round"
        )
    same = result["identical_work"].values()
    console.print(
        f"the same work twice (ours plain, again each repeat, paired): {min(same):.2f}-"
        f"{max(same):.2f}x; paired figures this close to 1.0, or to a goal, are this run's noise"
    )
    _goals(console, result["goals"])
    for note in result["notes"]:
        console.print(f"note: {escape(note)}", style="yellow")


# -- the MoE verify cost curve -----------------------------------------------------------------
def render_moe_curve(result: dict, console) -> None:
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


# -- fresh processes -----------------------------------------------------------------------------
def render_fresh(result: dict, console) -> None:
    s = result["settings"]
    console.print(
        f"[bold]gemma-chat bench --fresh-processes[/] {escape(result['model'])}: each answer its own "
        f"process, {s['max_tokens']} tokens, median of {s['repeats']}, greedy\n"
        f"{_machine_line(result['machine'])}"
    )
    for mode, title in (("stored", "with the costs an earlier process stored"),
                        ("none", "without stored costs (a first run)")):
        t = _table(console, f"{title}: tok/s, / plain (paired), baseline / plain, meter / real",
                   "prompt", "variant", "tok/s", "vs plain", "baseline", "meter", "accepted")
        for name, cells in result["prompts"].items():
            for cell, c in cells.items():
                if cell != "plain" and not cell.endswith(f"/{mode}"):
                    continue
                t.add_row(
                    name, cell.split("/")[0], _f(c["tokens_per_second"]), _f(c["vs_plain"], "{:.2f}x"),
                    _f(c["baseline_error"], "{:.3f}"), _f(c["meter_vs_real"], "{:.3f}"),
                    _f(c["acceptance_rate"], "{:.0%}"),
                )
        console.print(t)
        goals = {k: v for k, v in result["goals"][mode].items() if isinstance(v, dict)}
        console.print(f"goals {mode} (within {result['goals'][mode]['tolerance']:.0%}):")
        _goals(console, goals)
    console.print(
        "outputs identical (every variant, every run, to plain): "
        + ("yes" if result["outputs_identical"] else "[bold red]NO[/]")
    )
    for note in result["notes"]:
        console.print(f"note: {escape(note)}", style="yellow")


# -- the host bench -----------------------------------------------------------------------------
def render_host(result: dict, console) -> None:
    console.print(
        f"[bold]Host work per step[/] ({escape(result['pair'])}; {result['max_tokens']} tokens, "
        f"medians of {result['repeats']}): the decoding thread's CPU and the wall time"
    )
    t = _table(console, "eager vs compiled (comp.): per step or round, and primitives per layer",
               "variant", "CPU ms", "comp.", "x", "wall ms", "comp.", "x", "prims", "comp.")
    for r in result["rows"]:
        t.add_row(r["variant"], _f(r["eager_cpu_ms"], "{:.2f}"), _f(r["compiled_cpu_ms"], "{:.2f}"),
                  _f(r["cpu_ratio"], "{:.2f}"), _f(r["eager_wall_ms"], "{:.2f}"),
                  _f(r["compiled_wall_ms"], "{:.2f}"), _f(r["wall_ratio"], "{:.2f}"),
                  _f(r["eager_primitives_per_layer"]), _f(r["compiled_primitives_per_layer"]))
    console.print(t)
    console.print(
        f"tokens identical eager/compiled: {'yes' if result['identical'] else 'NO'}; graphs traced: "
        f"{result['traces']}, in {result['trace_seconds']:.2f} s (the warm-up)"
    )
    console.print(f"[dim]{_machine_line(result['machine'])}[/]")
    for note in result["notes"]:
        console.print(f"[yellow]note:[/] {escape(note)}")
