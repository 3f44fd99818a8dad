"""Does the encoder trap's reach on photos it never saw tell a provider whether it will hold? (docs/protect_model.md,
"Checking the trap on held-back photos")

    python docs/results/checks/trap_reach.py [--sweep docs/results/protect-model-sweep] [--out F.json]

Reads the ``apdm bench protect-model`` results in the sweep folder that attacked four fresh photos of the person with
at least three attacker runs (``*_attack_seeds*_fresh_photos*.json``) and carry the trap's latent changes. For each
distinct trap (results that share the trap and the DreamBooth result, e.g. its LoRA / TI / other-subject variants,
count once) it takes

* reach = latent change on the fresh photos / latent change on the photos the trap trained on, what
  ``subjects[].check_data`` reports for a provider's held-back photos (``apdm.protect_model.run.check_held_back``);
* the DreamBooth protection ratio over the attacker runs (goal ≥ 0.85),

and prints their rank and linear correlation and, for each threshold, how many traps above / below it met the goal:
over all of them, then over those with eight attacker runs (the later, less noisy ones; the three-run results include
the weaker settings of the early sweep: 4 photos, no pictures).
Nothing is trained.
"""

import argparse
import glob
import json
import math
import os
import sys

from apdm.utils import atomic_write_json

GOAL = 0.85
THRESHOLDS = (0.6, 0.7, 0.75, 0.8, 0.9)


def ranks(x: list[float]) -> list[float]:
    """Average ranks (ties share their mean rank), 0-based."""
    order = sorted(range(len(x)), key=x.__getitem__)
    r = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            r[order[k]] = (i + j) / 2
        i = j + 1
    return r


def pearson(x: list[float], y: list[float]) -> float:
    mx, my = sum(x) / len(x), sum(y) / len(y)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y))
    return sxy / math.sqrt(sum((a - mx) ** 2 for a in x) * sum((b - my) ** 2 for b in y))


def traps(sweep: str) -> list[dict]:
    """One row per distinct trap: ``file`` (the first result with it), ``reach``, ``fresh``, ``trained``, ``ratio``."""
    rows = {}
    for f in sorted(glob.glob(os.path.join(sweep, "*_attack_seeds*_fresh_photos*.json"))):
        d = json.load(open(f))
        fresh, trained = d.get("trap_latent_change_fresh_photos"), d.get("trap_latent_change_photos")
        if fresh is None or not trained or d.get("protection_ratio") is None or d.get("attack_seeds", 0) < 3:
            continue
        key = (round(fresh, 4), round(trained, 4), round(d["protection_ratio"], 4))
        rows.setdefault(key, {"file": os.path.basename(f), "reach": fresh / trained, "fresh": fresh,
                              "trained": trained, "ratio": d["protection_ratio"],
                              "attack_seeds": d["attack_seeds"]})
    return list(rows.values())


def summarize(rows: list[dict]) -> dict:
    """Correlations of reach (and of the fresh photos' latent change) with the ratio; goal counts per threshold."""
    reach, ratio, fresh = [r["reach"] for r in rows], [r["ratio"] for r in rows], [r["fresh"] for r in rows]
    out = {"traps": len(rows), "met_goal": sum(x >= GOAL for x in ratio),
           "spearman_reach": round(pearson(ranks(reach), ranks(ratio)), 3),
           "pearson_reach": round(pearson(reach, ratio), 3),
           "spearman_fresh_latent_change": round(pearson(ranks(fresh), ranks(ratio)), 3), "thresholds": []}
    for t in THRESHOLDS:
        hi = [r["ratio"] for r in rows if r["reach"] >= t]
        lo = [r["ratio"] for r in rows if r["reach"] < t]
        out["thresholds"].append({"threshold": t, "above": len(hi), "above_met_goal": sum(x >= GOAL for x in hi),
                                  "above_min_ratio": round(min(hi), 2) if hi else None,
                                  "below": len(lo), "below_met_goal": sum(x >= GOAL for x in lo),
                                  "below_max_ratio": round(max(lo), 2) if lo else None})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweep", default=os.path.join(os.path.dirname(__file__), "..", "protect-model-sweep"))
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    every = traps(args.sweep)
    out = {"goal": GOAL}
    for name, rows in (("all", every), ("eight_attacker_runs", [r for r in every if r["attack_seeds"] == 8])):
        if len(rows) < 3:
            print(f"fewer than three traps with fresh photos in {args.sweep}", file=sys.stderr)
            return 1
        out[name] = summarize(rows)
        print(f"{name}: " + "; ".join(f"{k} {v}" for k, v in out[name].items() if k != "thresholds"))
        for row in out[name]["thresholds"]:
            print(f"  reach >= {row['threshold']:.2f}: {row['above_met_goal']} / {row['above']} met the goal (lowest "
                  f"ratio {row['above_min_ratio']}); below: {row['below_met_goal']} / {row['below']} (highest "
                  f"{row['below_max_ratio']})")
    if args.out:
        atomic_write_json(args.out, out | {"rows": every})
    return 0


if __name__ == "__main__":
    sys.exit(main())
