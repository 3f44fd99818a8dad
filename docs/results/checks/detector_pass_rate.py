"""Detector pass rate of class-prompt samples on 2 × 48 samples (seeds 123 and 7) (docs/toy_world.md).

    python docs/results/checks/detector_pass_rate.py                      # the installed toy model
    python docs/results/checks/detector_pass_rate.py model=PATH           # another model folder
"""

import sys
from apdm.bench import toy_setup
from apdm.core import diffusion as D
from apdm.toy import instruments as I
opts, sd, inst = toy_setup(sys.argv[1:], set())
rates=[]
for seed in (123, 7):
    imgs = D.generate(sd, ["a photo of a person"], 48, 25, 3.0, seed=seed, quiet=True)
    det = I.detector_scores(inst.detector, imgs, "person")
    rates.append((det>=0.5).float().mean().item())
print(sd.source, "pass", rates)
