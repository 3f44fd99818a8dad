"""Detector rejection rate (fdfr@toy-det) of DreamBooth generations from *clean* photos, the reference for every
``fdfr_db_*`` number (docs/protect_model.md, docs/protect_images.md).

    python docs/results/checks/fdfr_unprotected_db.py [subjects=1] [samples=8] [instruments=DIR]
"""

import sys
from apdm.bench import toy_setup
from apdm.bench.toy_world import toy_recipe
from apdm.evaluation.identity import fdfr
from apdm.evaluation.protocol import personalize_and_sample, with_prompts
from apdm.toy import instruments as I
from apdm.toy.world import heldout_subjects
from apdm.utils import set_progress

set_progress(False)

args = dict(a.split("=", 1) for a in sys.argv[1:])
opts, sd, inst = toy_setup([], set())
if "instruments" in args:  # e.g. the v1 instruments (docs/results/checks/detector_calibration.py says how)
    inst = I.load_instruments(args["instruments"])
rc = toy_recipe("dreambooth")
rc.sample.num_images_per_prompt = int(args.get("samples", 8))
for subj in heldout_subjects(int(args.get("subjects", 1)), num_images=4):
    cfg = with_prompts(rc.personalization, subj.instance_prompt, subj.class_prompt)
    gen = personalize_and_sample(sd, subj.images, cfg, [subj.instance_prompt], rc.sample)["images"][subj.instance_prompt]
    p = I.detector_scores(inst.detector, gen, "person")
    print(f"subject {subj.index}: ISM {float(I.identity_similarity(inst.encoder, gen, subj.references).mean()):.3f}, "
          f"fdfr {float(fdfr(p).mean()):.3f}, detector p {[round(float(x), 2) for x in p]}")
