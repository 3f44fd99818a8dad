"""How deep is the protection? Identity similarity along the DreamBooth attack, on the unprotected and the protected
model, for one held-out subject (docs/protect_model.md, "Along the attack").

Protects held-out subject ``P`` exactly as ``apdm bench protect-model subjects=P,1`` does (the toy recipe plus
``protect.*`` / ``personalization.*`` overrides), then runs the toy DreamBooth attack on both models and, every few
steps, samples "a photo of sks person" (the bench's 8 samples, seed and sampler) and scores ISM (``ism@toy-id``)
against the subject's references and FDFR (``fdfr@toy-det``). Sampling does not touch the attack's random
streams, so the last point equals the bench's ``ism_db_*`` when ``--steps`` is the recipe's 300.

    python docs/results/checks/protect_model_attack_curve.py --subject 0 --out curve0.json [--steps 600] [KEY=VALUE ...]

One subject takes ~10 min on one core (one protection, two 300-step attacks, 9 × 2 samplings).
"""

import argparse
import dataclasses
import json
import time

import torch

from apdm.bench import jobs, toy_setup
from apdm.bench.protect_model import RECIPES, protection_subject
from apdm.bench.toy_world import toy_recipe
from apdm.config import ProtectModelRunConfig, load_config
from apdm.core import diffusion as D
from apdm.evaluation.identity import fdfr
from apdm.evaluation.protocol import with_prompts
from apdm.personalization import simulator as S
from apdm.protect_model.l2p import protect
from apdm.toy import instruments as I
from apdm.toy.world import heldout_subjects
from apdm.utils import atomic_write_json, progress

ap = argparse.ArgumentParser()
ap.add_argument("--subject", type=int, default=0, help="position in the held-out list (the bench's subjects=P,...)")
ap.add_argument("--steps", type=int, default=300, help="attack steps (the recipe's 300; 600 = the 2x attack)")
ap.add_argument("--every", type=int, default=0, help="score every N steps (default: a log-like grid)")
ap.add_argument("--attack", nargs="*", default=[], metavar="KEY=VALUE",
                help="changes to the evaluation attacker, as the bench's attack.KEY=VALUE (train_text_encoder=false)")
ap.add_argument("--out", required=True)
ap.add_argument("overrides", nargs="*", help="protect.* / personalization.* recipe overrides")
args = ap.parse_args()

t_start = time.perf_counter()
_, sd, inst = toy_setup([], set())
rc = load_config(ProtectModelRunConfig, RECIPES / "toy-protect-model.yaml", args.overrides)
pcfg = dataclasses.replace(rc.protect, checkpoint_every=0)
subj = heldout_subjects(1, num_images=4, offset=args.subject)[0]
per_base, subject = protection_subject(sd, rc.personalization, pcfg, subj)
t0 = time.perf_counter()
theta, hist, text_encoder = protect(sd, [subject], per_base, pcfg)
seconds_protect = time.perf_counter() - t0

attack = toy_recipe("dreambooth", [f"personalization.{o}" for o in args.attack])
sample = attack.sample
sample.num_images_per_prompt = 8  # the quick bench's samples per prompt
cfg = dataclasses.replace(with_prompts(attack.personalization, subj.instance_prompt, subj.class_prompt),
                          steps=args.steps)
grid = (list(range(0, args.steps + 1, args.every)) if args.every else
        sorted({s for s in (0, 10, 25, 50, 100, 150, 200, 300, 400, 500, 600) if s <= args.steps} | {args.steps}))


def attributes_matched(gen: torch.Tensor) -> dict:
    """Per attribute: the share of samples whose predicted value is the subject's (``attr_match@toy-attr`` split
    by attribute)."""
    pred = I.predict_attributes(inst.encoder, gen, subj.identity["class"])
    return {k: round(sum(p[k] == v for p in pred) / len(pred), 3) for k, v in subj.identity.items() if k != "class"}


def conditioning(text_encoder, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return D.encode_prompt(text_encoder, sd.tokenizer, [prompt]).float()


c_base = conditioning(sd.text_encoder, subj.instance_prompt)  # the base model's "a photo of sks person"


def curve(model) -> list[dict]:
    class_images = S.class_images_for(model, cfg, quiet=True)
    state = S.setup(model, cfg, class_images)
    images = subj.images.to(model.device)
    out = []
    for k in progress(range(args.steps + 1), desc="attacking and sampling"):
        if k in grid:
            gen = D.generate(state.sd, [S.prompt_for(state, subj.instance_prompt)], sample.num_images_per_prompt,
                             sample.num_inference_steps, sample.guidance_scale, sample.negative_prompt, sample.seed,
                             sample.batch_size, sample.sampler, quiet=True)
            out.append({"step": k,
                        "ism": round(float(I.identity_similarity(inst.encoder, gen, subj.references).mean()), 4),
                        "fdfr": round(float(fdfr(I.detector_scores(inst.detector, gen, "person")).mean()), 4),
                        "attr_match": round(float(I.attribute_match(inst.encoder, gen, subj.identity).mean()), 4),
                        "attributes": attributes_matched(gen),
                        # how far the attacker's text encoder has moved the instance prompt's conditioning from the
                        # base model's: ‖c − c_base‖ / ‖c_base‖ (0 for a UNet-only attack on an unprotected model)
                        "cond_shift": round(float((conditioning(state.sd.text_encoder, subj.instance_prompt)
                                                   - c_base).norm() / c_base.norm()), 5),
                        "loss": state.history[-1] if state.history else None})
            print(subj.index, k, out[-1], flush=True)
        if k < args.steps:
            S.step(state, images)
    return out


prot = jobs.model(jobs.spec(sd), jobs.unet_state(theta, text_encoder))
res = {"subject_protected": subj.index, "position": args.subject, "overrides": args.overrides,
       "protect_config": dataclasses.asdict(pcfg),  # the recipe changes over time; this is what ran
       "attack_overrides": args.attack,
       "attack_steps": args.steps, "seconds_protect": round(seconds_protect, 1),
       "protect_loss_first": hist[0]["loss_protect"], "protect_loss_last": hist[-1]["loss_protect"],
       "unprotected": curve(sd), "protected": curve(prot), "protect_history": hist,
       "metric_impl": {"ism": "ism@toy-id", "fdfr": "fdfr@toy-det", "attr_match": "attr_match@toy-attr"}}
res["seconds_total"] = round(time.perf_counter() - t_start, 1)
atomic_write_json(args.out, res)
print(json.dumps({k: v for k, v in res.items() if k not in ("unprotected", "protected")}))
