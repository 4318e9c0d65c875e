"""The benches' figures (matplotlib, the `plot` extra): the shape bench's speed story, and the
pair bench's cost curve and tok/s per K."""

import textwrap
from pathlib import Path

from .costs import COST_TOKENS


def save_plots(result: dict, folder: Path) -> list[Path]:
    """The figures of a shape or pair bench result (as its JSON holds it) into `folder`."""
    import matplotlib

    matplotlib.use("Agg")
    matplotlib.rcParams["svg.fonttype"] = "none"  # text stays text: small, searchable SVGs
    folder.mkdir(parents=True, exist_ok=True)
    if "rows" in result:
        return [speed_story(result, folder)]
    return pair_pngs(result, folder)


def machine_caption(m: dict) -> str:
    blas = "OpenBLAS" if m["openblas_preload"] else "reference BLAS"
    threads = f" ({m['openblas_threads']} thread)" if m.get("openblas_threads") else ""
    return (
        f"{m['cpu']}, {m['cpu_count']} cores, {m['platform']}; mlx {m['mlx']} on {m['device']}, "
        f"{blas}{threads}; load average {m['load_average']}"
    )


def speed_story(result: dict, folder: Path) -> Path:
    """Speedup over our plain decoding against simulated acceptance: ours with the policy, the
    best fixed K, mlx-vlm's MTP, and the ideal that isolated step costs promise for the same
    hits and misses."""
    import matplotlib.pyplot as plt

    rows = result["rows"]
    acceptances = sorted({r["acceptance_target"] for r in rows})

    def at(a, variant, key="speedup"):
        return next((r[key] for r in rows if r["acceptance_target"] == a and r["variant"] == variant), None)

    def best_fixed(a):
        fixed = [r for r in rows if r["acceptance_target"] == a and r["variant"].startswith("k")]
        return max(fixed, key=lambda r: r["speedup"])

    fig, ax = plt.subplots(figsize=(7, 4.6))
    ax.axhline(1.0, color="grey", lw=1, ls=":", label="plain decoding (ours)")
    ax.plot(acceptances, [at(a, "policy", "ideal") for a in acceptances], color="grey", ls="--",
            marker=".", label="ideal: isolated step costs, best K, same hits")
    ax.plot(acceptances, [at(a, "policy") for a in acceptances], marker="o", lw=2,
            label="gemma-chat: K per round by the policy")
    best = [best_fixed(a) for a in acceptances]
    ax.plot(acceptances, [r["speedup"] for r in best], marker="s", ls="-.",
            label="gemma-chat: the best fixed K")
    for a, r in zip(acceptances, best):
        ax.annotate(f"K={r['variant'][1:]}", (a, r["speedup"]), textcoords="offset points",
                    xytext=(0, -13), ha="center", fontsize=7)
    if any(r["variant"] == "mlx_vlm" for r in rows):
        ax.plot(acceptances, [at(a, "mlx_vlm") for a in acceptances], marker="^",
                label=f"mlx-vlm MTP (block {result['settings']['mlx_vlm_block']})")
    s = result["settings"]
    ax.set_xlabel("simulated drafter acceptance (share of drafts the target accepts)")
    ax.set_ylabel("decode speed / plain decoding")
    ax.set_title(
        f"{result['shape']}: {result['description']}\n{s['max_tokens']} tokens after a "
        f"{s['prompt_tokens']}-token prompt, greedy, median of {s['repeats']}", fontsize=9,
    )
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    caption = textwrap.fill("; ".join([machine_caption(result["machine"]), *result["notes"]]), 130)
    fig.text(0.01, 0.01, caption, fontsize=6.5, color="dimgrey")
    fig.tight_layout(rect=(0, 0.02 + 0.02 * caption.count("\n") + 0.02, 1, 1))
    path = folder / f"speed-{result['shape']}.svg"
    fig.savefig(path, metadata={"Date": None})
    plt.close(fig)
    return path


def pair_pngs(result: dict, folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt

    written = []
    c = result["cost_curve"]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(c["tokens"], c["ratios"], marker="o", label=result["model"])
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
