"""The pair bench's cost curve and tok/s per K as PNGs (matplotlib, the `plot` extra)."""

from pathlib import Path

from .costs import COST_TOKENS


def save_pngs(result: dict, folder: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
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
