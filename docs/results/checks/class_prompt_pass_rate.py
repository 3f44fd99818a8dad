"""The toy detector's pass rate on class-prompt samples, on enough samples to resolve the 0.9 goal (issue #3).

The benchmark's 32 samples (quick) or 64 (full) leave a 95 % interval about ±0.08 wide; this scores 512
samples of "a photo of a person" (8 seeds × 64; the benchmark's sampler: 25 DDIM steps, guidance 3) and prints
the rate per seed, cumulative, and its Wilson 95 % interval. ~4 min on one core.

    python docs/results/checks/class_prompt_pass_rate.py [model=PATH] [seeds=8]
"""

import sys
import time

import torch

from apdm.bench import toy_setup
from apdm.core import diffusion as D
from apdm.evaluation.identity import wilson_interval
from apdm.toy import instruments as I

args = dict(a.split("=", 1) for a in sys.argv[1:])
seeds = int(args.pop("seeds", 8))
_, sd, inst = toy_setup([f"{k}={v}" for k, v in args.items()], set())
t0 = time.time()
flags = []
for s in range(seeds):
    x = D.generate(sd, ["a photo of a person"], 64, 25, 3.0, seed=1000 + s, quiet=True)
    flags.append(I.detector_scores(inst.detector, x, "person") >= 0.5)
    done = torch.cat(flags)
    print(f"seed {1000 + s}: {float(flags[-1].float().mean()):.3f}; cumulative {float(done.float().mean()):.4f} "
          f"of {done.numel()} ({time.time() - t0:.0f} s)", flush=True)
k, n = int(done.sum()), done.numel()
lo, hi = wilson_interval(k, n)
print(f"instruments {inst.config['fingerprint']}: {k} of {n} accepted = {k / n:.4f}, Wilson 95 % [{lo:.3f}, {hi:.3f}]")
