"""Plot identity similarity along the DreamBooth attack, unprotected against protected, one panel per subject
(docs/img/protect_model_attack_curves.png), from docs/results/protect-model-curves/*.json written by
docs/results/checks/protect_model_attack_curve.py. Runs of the recipe (UNet protected only; no protect.* override)
are drawn;
where a subject also has a run against the UNet-only attacker (``--attack train_text_encoder=false``), it is drawn
in blue. A second figure (docs/img/protect_model_te_curves.png) sets the recipe against the recipe with the text
encoder protected too (``protect.train_text_encoder=true protect.text_encoder_lr=2e-4``) on every subject that has
both runs.

    pip install matplotlib          # only for this plot; not an apdm dependency
    python docs/results/plot_attack_curves.py
"""

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent
TE_RUN = ["protect.train_text_encoder=true", "protect.text_encoder_lr=2e-4"]


def unet_only_recipe(run: dict) -> bool:
    """A run of the recipe with the UNet protected only: no overrides, and no protected text encoder in the recorded
    config (runs before 2026-12-01 record none), should the recipe ever protect it."""
    return not run["overrides"] and not run.get("protect_config", {}).get("train_text_encoder", False)


def text_encoder_run(run: dict) -> bool:
    """A run with the text encoder protected too at lr 2e-4: by override, or by the recipe, should it ever do so."""
    cfg = run.get("protect_config", {})
    return run["overrides"] == TE_RUN or (not run["overrides"] and cfg.get("train_text_encoder", False)
                                          and cfg.get("text_encoder_lr") == 2e-4)


def load_runs() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((HERE / "protect-model-curves").glob("*.json"))]


def panel_grid(runs: list[dict]):
    """One panel per subject, five to a row, sharing the ISM axis: (fig, axes, [(ax, run), ...])."""
    cols = min(5, len(runs))
    rows = (len(runs) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.5 * rows), sharey=True, squeeze=False)
    for ax, run in zip(axes.flat, runs):
        ax.set_title(f"held-out person {run['subject_protected']}", fontsize=9)
        ax.set_xlabel("attack step", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("ISM to the subject", fontsize=8)
    return fig, axes, list(zip(axes.flat, runs))


def save(fig, axes, ncol: int, title: str, bottom: float, name: str) -> None:
    """The legend (each label once), the title, and the PNG under docs/img/."""
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=7, frameon=False)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    out = HERE.parent / "img" / name
    fig.savefig(out, dpi=110)
    print(out)


def main() -> None:
    runs = [r for r in load_runs() if unet_only_recipe(r)]
    full = sorted((r for r in runs if not r.get("attack_overrides")), key=lambda r: r["position"])
    unet_only = {r["position"]: r for r in runs if r.get("attack_overrides") == ["train_text_encoder=false"]}
    fig, axes, panels = panel_grid(full)
    for ax, run in panels:
        lines = [(run, "#777777", "#cc3311", "DreamBooth (UNet + text encoder)")]
        if run["position"] in unet_only:
            lines.append((unet_only[run["position"]], "#88aadd", "#1144aa", "UNet-only DreamBooth"))
        for r, c_unprot, c_prot, label in lines:
            for key, style, colour in (("unprotected", "--", c_unprot), ("protected", "-", c_prot)):
                pts = r[key]
                ax.plot([p["step"] for p in pts], [p["ism"] for p in pts], style, marker="o", ms=2.5, lw=1.2,
                        color=colour, label=f"{label}, {key}")
        ax.axvline(300, color="k", lw=0.5, ls=":")
    save(fig, axes, 2, "Identity along the attack (ism@toy-id, 8 samples per point): the toy recipe (40 × 10 at 2e-5) "
         "against DreamBooth", 0.07, "protect_model_attack_curves.png")


def text_encoder_figure() -> None:
    runs = [r for r in load_runs() if not r.get("attack_overrides")]
    recipe = {r["position"]: r for r in runs if unet_only_recipe(r)}
    te = sorted((r for r in runs if text_encoder_run(r) and r["position"] in recipe), key=lambda r: r["position"])
    if not te:
        return
    fig, axes, panels = panel_grid(te)
    for ax, run in panels:
        base = recipe[run["position"]]
        for pts, style, colour, label in ((base["unprotected"], "--", "#777777", "unprotected"),
                                          (base["protected"], "-", "#cc3311", "the recipe (UNet protected)"),
                                          (run["protected"], "-", "#228833", "UNet + text encoder protected")):
            ax.plot([p["step"] for p in pts], [p["ism"] for p in pts], style, marker="o", ms=2.5, lw=1.2,
                    color=colour, label=label)
    save(fig, axes, 3, "DreamBooth (UNet + text encoder) against the recipe, and against the recipe with the text "
         "encoder protected too (lr 2e-4)", 0.08, "protect_model_te_curves.png")


if __name__ == "__main__":
    main()
    text_encoder_figure()
