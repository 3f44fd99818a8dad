"""Protect with the toy recipe (plus overrides), then KID and detector pass rate of class-prompt samples of the
base and the protected UNet, with and without guidance (docs/protect_model.md, "What we learned" 1).

    python docs/results/checks/protect_model_damage.py protect.learning_rate=2e-5 protect.anchor_weight=0
"""

import dataclasses, sys
from apdm.bench import toy_setup
from apdm.config import ProtectModelRunConfig, load_config
from apdm.bench.protect_model import RECIPES, drawn_persons
from apdm.evaluation.protocol import with_prompts
from apdm.personalization.simulator import class_images_for
from apdm.protect_model.l2p import Subject, protect
from apdm.toy.world import heldout_subjects
from apdm.toy import instruments as I
from apdm.core import diffusion as D
from apdm.evaluation.distribution import kid
opts, sd, inst = toy_setup([], set())
ov = sys.argv[1:]
rc = load_config(ProtectModelRunConfig, RECIPES / "toy-protect-model.yaml", ov)
a = heldout_subjects(1, num_images=4)[0]
per = with_prompts(rc.personalization, a.instance_prompt, a.class_prompt)
cls = class_images_for(sd, dataclasses.replace(per, num_class_images=32), quiet=True)
paired = class_images_for(sd, dataclasses.replace(per, num_class_images=4, seed=per.seed + 7777), quiet=True)
subj = Subject("A", a.images, paired, cls, a.instance_prompt, a.class_prompt)
theta, hist, _ = protect(sd, [subj], per, dataclasses.replace(rc.protect, checkpoint_every=0))
for h in hist[::8]: print(h)
prot = dataclasses.replace(sd, unet=theta)
real = drawn_persons(32)  # the bench's KID reference set
for name, m in (("base", sd), ("prot", prot)):
    for g in (1.0, 3.0):
        gen = D.generate(m, ["a photo of a person"], 32, 25, g, seed=321, quiet=True)
        det = I.detector_scores(inst.detector, gen, "person")
        print(name, "cfg", g, "kid", round(float(kid(real, gen, inst.features, subsets=50)[0]), 3), "pass", float((det>=0.5).float().mean()))
