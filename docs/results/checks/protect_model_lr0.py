"""Sanity check: with protection lr 0 (and no weight decay) the L2P loop returns θ bit-identical to the base
(docs/protect_model.md, "What we learned" 1).

    python docs/results/checks/protect_model_lr0.py
"""

import dataclasses
from apdm.bench import toy_setup
from apdm.config import ProtectModelRunConfig, load_config
from apdm.bench.protect_model import RECIPES
from apdm.evaluation.protocol import with_prompts
from apdm.personalization.simulator import class_images_for
from apdm.protect_model.l2p import Subject, protect
from apdm.toy.world import heldout_subjects
opts, sd, inst = toy_setup([], set())
rc = load_config(ProtectModelRunConfig, RECIPES / "toy-protect-model.yaml", ["protect.learning_rate=0", "protect.outer_steps=2", "protect.weight_decay=0"])
a = heldout_subjects(1, num_images=4)[0]
per = with_prompts(rc.personalization, a.instance_prompt, a.class_prompt)
cls = class_images_for(sd, dataclasses.replace(per, num_class_images=32), quiet=True)
subj = Subject("A", a.images, cls[:4], cls, a.instance_prompt, a.class_prompt)
theta, hist, _ = protect(sd, [subj], per, dataclasses.replace(rc.protect, checkpoint_every=0))
base = dict(sd.unet.named_parameters())
diff = max((p.float() - base[n].float()).abs().max().item() for n, p in theta.named_parameters())
print("max |theta - base| with lr 0:", diff, "dtype", next(theta.parameters()).dtype, next(sd.unet.parameters()).dtype)
print("training flags", theta.training, sd.unet.training)
