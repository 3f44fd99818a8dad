"""LDU's PSNR per held-out subject and its worst photo, for one or more trained ρ (docs/protect_images.md).

    python docs/results/checks/ldu_psnr.py [RHO_DIR ...]     # default: the shipped assets/toy/rho
"""

import sys

import torch

from apdm.bench import toy_setup
from apdm.evaluation.fidelity import psnr
from apdm.protect_images import ldu
from apdm.toy.world import REPO_ASSETS, heldout_subjects

_, sd, _ = toy_setup([], set())
subjects = heldout_subjects(4, num_images=4)
for folder in sys.argv[1:] or [str(REPO_ASSETS / "rho")]:
    rho = ldu.load_rho(folder, device=sd.device)
    per_subject = [psnr(s.images, ldu.apply(sd, rho, s.images.to(sd.device), 8 / 255, quiet=True).cpu())
                   for s in subjects]
    values = torch.cat(per_subject)
    print(f"{folder}: PSNR at 8/255 per subject {[round(float(v.mean()), 2) for v in per_subject]} "
          f"(subjects {[s.index for s in subjects]}), min over {len(values)} photos {float(values.min()):.2f} dB, "
          f"mean {float(values.mean()):.2f} dB")
