"""Which timesteps SimAC's greedy search keeps on the toy world (person 1's four photos, 8/255 and 16/255).

    cd docs/results/protect-images-seeds && python simac_timestep_sets.py simac_timestep_sets.json   # ~1 min, CPU
"""
import json
import sys

import torch

from apdm.core.models import load_sd
from apdm.protect_images.baselines import simac_timesteps
from apdm.toy.world import heldout_subjects, toy_root
torch.set_num_threads(1)
sd = load_sd(str(toy_root() / "model"), device="cpu")
subj = heldout_subjects(1, num_images=4)[0]
out = {}
for b in (8, 16):
    sets = simac_timesteps(sd, subj.images, subj.instance_prompt, budget=b / 255)
    out[f"{b}/255"] = [{"size": int(s.numel()), "min": int(s.min()), "max": int(s.max()),
                        "mean": round(float(s.float().mean()), 1),
                        "share_above_500": round(float((s >= 500).float().mean()), 3)} for s in sets]
print(json.dumps(out, indent=1))
json.dump(out, open(sys.argv[1], "w"), indent=1)
