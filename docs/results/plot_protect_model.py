"""Plot the protect-model ablations (docs/img/protect_model_ablations.png) and the protection / preservation
trade-off (docs/img/protect_model_tradeoff.png) from docs/results/protect-model-sweep/.

    pip install matplotlib          # only for this plot; not an apdm dependency
    python docs/results/plot_protect_model.py

Each JSON there is one `apdm bench protect-model --quick ... attacks=other no_naive=true` run; see
docs/protect_model.md for the commands.
"""

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
ORDER = sys.argv[1:] or None


def main() -> None:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted((HERE / "protect-model-sweep").glob("*.json"))}
    runs = {k: v for k, v in runs.items() if "protection_ratio" in v}  # base = Algorithm 1 at lr 2e-5
    names = [n for n in (ORDER or runs) if n in runs]
    keys = [("protection_ratio", "protection ratio (goal ≥ 0.85)"),
            ("other_gain_kept", "other subject's gain kept (goal ≥ 0.9)"),
            ("kid_rise_fraction", "class-prompt KID rise (goal ≤ 0.1)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.45 * len(names) + 1.6), sharey=True)
    for ax, (key, title) in zip(axes, keys):
        vals = [runs[n].get(key) or 0.0 for n in names]
        ax.barh(range(len(names)), vals, color=["#4477aa" if v >= 0 else "#cc6677" for v in vals])
        ax.set_title(title, fontsize=10)
        ax.axvline(0, color="k", lw=0.6)
        for i, v in enumerate(vals):
            ax.text(v, i, f" {v:.2f}", va="center", fontsize=8)
    axes[0].set_yticks(range(len(names)), names, fontsize=8)
    axes[0].invert_yaxis()
    fig.tight_layout()
    out = HERE.parent / "img" / "protect_model_ablations.png"
    fig.savefig(out, dpi=110)
    print("wrote", out)

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.axhspan(0.85, 1.05, xmin=0, xmax=1, color="#ddeedd", zorder=0)
    ax.axvline(0.1, color="#228833", lw=0.8, ls="--")
    for n in names:
        r = runs[n]
        x, y = r["kid_rise_fraction"], r["protection_ratio"]
        ax.scatter([x], [y], color="#4477aa" if r.get("inner_steps", 0) else "#ee7733", zorder=2)
        ax.annotate(n, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("class-prompt KID rise (fraction of unprotected; goal ≤ 0.1, dashed)")
    ax.set_ylabel("protection ratio (goal ≥ 0.85, shaded)")
    ax.set_title("APDM on the toy world: protection vs damage (blue: L2P, orange: no L2P)", fontsize=9)
    fig.tight_layout()
    out = HERE.parent / "img" / "protect_model_tradeoff.png"
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
