"""Plot the protect-model ablations (docs/img/protect_model_ablations.png), the protection / preservation
trade-off (docs/img/protect_model_tradeoff.png) and DreamBooth against LoRA protection
(docs/img/protect_model_db_vs_lora.png) from docs/results/protect-model-sweep/.

    pip install matplotlib          # only for this plot; not an apdm dependency
    python docs/results/plot_protect_model.py

Each JSON there is one `apdm bench protect-model --quick ... attacks=other no_naive=true` run; see
docs/protect_model.md for the commands.
"""

import json
import sys
from pathlib import Path

import matplotlib
import matplotlib.patches

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
ORDER = sys.argv[1:] or None


def main() -> None:
    runs = {p.stem: json.loads(p.read_text()) for p in sorted((HERE / "protect-model-sweep").glob("*.json"))}
    runs = {k: v for k, v in runs.items() if "protection_ratio" in v}  # base = Algorithm 1 at lr 2e-5
    missing = [n for n in ORDER or [] if n not in runs]
    if missing:
        sys.exit(f"no run named {', '.join(missing)} in protect-model-sweep/ (with a protection_ratio)")
    # without names: the runs that measured all three numbers (many early runs did not measure the other subject)
    three = ("protection_ratio", "other_gain_kept", "kid_rise_fraction")
    names = ORDER or [n for n, r in runs.items() if all(r.get(k) is not None for k in three)]
    keys = [("protection_ratio", "protection ratio (goal ≥ 0.85)"),
            ("other_gain_kept", "other subject's gain kept (goal ≥ 0.9)"),
            ("kid_rise_fraction", "class-prompt KID rise (goal ≤ 0.1)")]
    fig, axes = plt.subplots(1, 3, figsize=(13, 0.45 * len(names) + 1.6), sharey=True)
    for ax, (key, title) in zip(axes, keys):
        vals = [runs[n].get(key) for n in names]  # None: not measured in that run, drawn as "n/a", not as 0
        ax.barh(range(len(names)), [v or 0.0 for v in vals],
                color=["#4477aa" if (v or 0.0) >= 0 else "#cc6677" for v in vals])
        ax.set_title(title, fontsize=10)
        ax.axvline(0, color="k", lw=0.6)
        for i, v in enumerate(vals):
            ax.text(v or 0.0, i, " n/a" if v is None else f" {v:.2f}", va="center", fontsize=8)
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

    # DreamBooth against LoRA: which settings block which attacker (v2 instruments: every run with a LoRA ratio)
    # (independent of the ORDER arguments, which select the v1 ablations above)
    both = {"recipe": json.loads((HERE / "protect-model-quick.json").read_text())}
    both.update({k: v for k, v in runs.items() if "protection_ratio_lora" in v and v.get("instruments_fingerprint")})
    fig, ax = plt.subplots(figsize=(6.5, 4.8))
    ax.add_patch(matplotlib.patches.Rectangle((0.85, 0.85), 0.2, 0.2, color="#ddeedd", zorder=0))
    kid = [both[n]["kid_rise_fraction"] for n in both]
    sc = ax.scatter([both[n]["protection_ratio"] for n in both], [both[n]["protection_ratio_lora"] for n in both],
                    c=kid, cmap="viridis_r", vmin=0, vmax=2, zorder=2)
    for n, r in both.items():
        ax.annotate(n.replace("v2_", ""), (r["protection_ratio"], r["protection_ratio_lora"]), fontsize=6.5,
                    xytext=(3, 3), textcoords="offset points")
    fig.colorbar(sc, ax=ax, label="class-prompt KID rise (fraction; goal ≤ 0.1)")
    ax.set_xlabel("DreamBooth protection ratio (goal ≥ 0.85)")
    ax.set_ylabel("LoRA protection ratio (goal ≥ 0.85)")
    ax.set_xlim(-0.1, 1.05)
    ax.set_ylim(-0.1, 1.05)
    ax.set_title("APDM on the toy world: no setting yet blocks both attackers (goal: top right)", fontsize=9)
    fig.tight_layout()
    out = HERE.parent / "img" / "protect_model_db_vs_lora.png"
    fig.savefig(out, dpi=110)
    print("wrote", out)


if __name__ == "__main__":
    main()
