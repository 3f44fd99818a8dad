"""Two protections attacked with the same attacker seeds, compared run by run (docs/protect_model.md, "paired").

    python docs/results/checks/paired_runs.py A.json B.json

A and B are ``apdm bench protect-model`` results with ``attack_seeds=K`` and the same ``attack_seed_stride`` (run r of
A and run r of B share the attacker's seed and sampling noise). For every ``*_runs`` list both hold, it prints the mean
of A − B over the runs where both are defined (a single run's ratio is None when its unprotected gain is not positive)
and the standard error of that mean. Nothing is trained; reads two JSON files.
"""

import argparse
import json
import math
import sys


def paired(a: list, b: list) -> tuple[float, float, int]:
    """(mean of a[r] − b[r], its standard error, how many runs) over the runs where both are numbers."""
    d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    if len(d) < 2:
        raise ValueError(f"fewer than two runs defined in both ({len(d)})")
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    return mean, sd / math.sqrt(len(d)), len(d)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a")
    ap.add_argument("b")
    args = ap.parse_args(argv)
    res = []
    for path in (args.a, args.b):
        try:
            with open(path) as f:
                res.append(json.load(f))
        except (OSError, ValueError) as e:
            raise SystemExit(f"{path}: cannot read a bench result ({e})")
    a, b = res
    for key in ("attack_seeds", "attack_seed_stride", "subject_protected", "identifier", "attack_photos"):
        if a.get(key) != b.get(key):
            raise SystemExit(f"{args.b}: {key}={b.get(key)!r}, but {args.a} has {a.get(key)!r}: runs do not pair")
    for key in sorted(k for k in a if k.endswith("_runs") and k in b):
        try:
            mean, se, n = paired(a[key], b[key])
        except ValueError as e:
            print(f"{key}: {e}")
            continue
        print(f"{key}: A - B = {mean:+.3f} ± {se:.3f} ({n} runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
