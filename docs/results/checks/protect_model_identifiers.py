"""Does the protection follow the subject or the word? DreamBooth on the protected subject under several identifiers
(docs/protect_model.md, "Another identifier"; the paper's Table 14 tries "t@t").

Protects held-out subject ``P`` exactly as ``apdm bench protect-model subjects=P,1`` does (the toy recipe plus
``protect.*`` / ``personalization.*`` overrides; the protection's own prompt is the recipe's "a photo of sks person"
unless ``protect.identifiers`` says otherwise), then attacks A with the toy DreamBooth recipe as "a photo of WORD
person" for every WORD of ``--identifiers``, on the unprotected and the protected model, and scores the 8 samples of
that prompt (``ism@toy-id``, ``fdfr@toy-det``) as the bench does: with ``WORD=sks`` the numbers equal the bench's
``ism_db_*``, with another word its ``identifier=WORD`` run. Also: class-prompt ISM and KID of both models.

    python docs/results/checks/protect_model_identifiers.py --subject 0 --identifiers sks,zwx,t@t --out F.json \
        [--baseline G.json] [KEY=VALUE ...]

``--baseline`` takes the unprotected numbers (per identifier, class-prompt ISM, KID) from an earlier output of this
script for the same subject and model. ~6 min of protection on one core, then ~40 s per attack.
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

from apdm.bench import attack_config, jobs, toy_setup
from apdm.bench.protect_model import (
    RECIPES,
    _class_prompt_ism_job,
    _kid_job,
    drawn_persons,
    protection_subject,
)
from apdm.bench.toy_world import toy_recipe
from apdm.config import ProtectModelRunConfig, load_config
from apdm.protect_model.l2p import check_protect_config, protect
from apdm.toy.world import heldout_subjects
from apdm.utils import atomic_write_json


def main() -> None:  # spawned worker processes import this file: nothing may run at import
    ap = argparse.ArgumentParser()
    ap.add_argument("--subject", type=int, default=0, help="position in the held-out list (bench: subjects=P,...)")
    ap.add_argument("--identifiers", default="sks,zwx,t@t", help="comma-separated words the attacker names A with")
    ap.add_argument("--baseline", help="an earlier output of this script: reuse its unprotected numbers")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--save", help="also write the protected weights here (safetensors, jobs.unet_state keys)")
    ap.add_argument("--out", required=True)
    ap.add_argument("overrides", nargs="*", help="protect.* / personalization.* recipe overrides")
    args = ap.parse_args()

    t_start = time.perf_counter()
    _, sd, inst = toy_setup([], set())
    rc = load_config(ProtectModelRunConfig, RECIPES / "toy-protect-model.yaml", args.overrides)
    pcfg = dataclasses.replace(rc.protect, checkpoint_every=0)
    check_protect_config(rc.personalization, pcfg)
    subj = heldout_subjects(1, num_images=4, offset=args.subject)[0]
    words = [w for w in args.identifiers.split(",") if w]
    base = None
    if args.baseline:
        base = json.loads(Path(args.baseline).read_text())
        for key, mine in (("subject_protected", subj.index), ("model_fingerprint", sd.fingerprint())):
            if base[key] != mine:
                raise SystemExit(f"{args.baseline}: baseline has {key}={base[key]!r}, this run {mine!r}")
        missing = [w for w in words if w not in base["unprotected"]]
        if missing:
            raise SystemExit(f"{args.baseline}: no unprotected attack under {missing}")

    per_base, subject = protection_subject(sd, rc.personalization, pcfg, subj)
    attack = toy_recipe("dreambooth")
    sample = attack.sample
    sample.num_images_per_prompt = 8  # the quick bench's samples per prompt
    real = drawn_persons(4 * 8)  # the bench's KID reference set
    spec = jobs.spec(sd)

    def attack_job(pool, state, word):
        cfg = attack_config(attack.personalization, subj, word)
        return pool.submit(jobs.attack, spec, state, subj.images, subj.references, cfg, cfg.instance_prompt,
                           sample)

    with jobs.executor(args.workers) as pool:
        t0 = time.perf_counter()
        theta, hist, text_encoder = protect(sd, [subject], per_base, pcfg)
        seconds_protect = time.perf_counter() - t0
        state = jobs.unet_state(theta, text_encoder)
        if args.save:
            from safetensors.torch import save_file

            Path(args.save).parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()}, args.save)
        f_prot = {w: attack_job(pool, state, w) for w in words}
        f_kid = pool.submit(_kid_job, spec, state, real, 8)
        if base is None:
            f_unprot = {w: attack_job(pool, None, w) for w in words}
            f_kid0 = pool.submit(_kid_job, spec, None, real, 8)
            f_cls = pool.submit(_class_prompt_ism_job, spec, 8, subj.references)
            unprot = {w: round(f.result()["ism"], 4) for w, f in f_unprot.items()}
            kid0, ism_cls = round(f_kid0.result(), 5), f_cls.result()[0]
        else:
            unprot = {w: base["unprotected"][w] for w in words}
            kid0, ism_cls = base["kid_class_unprotected"], base["ism_class_prompt"]
        prot = {w: f.result() for w, f in f_prot.items()}
        kid1 = round(f_kid.result(), 5)

    res = {"subject_protected": subj.index, "position": args.subject, "model_fingerprint": sd.fingerprint(),
           "overrides": args.overrides, "protect_config": dataclasses.asdict(pcfg), "baseline_from": args.baseline,
           "ism_class_prompt": ism_cls, "unprotected": unprot,
           "protected": {w: round(o["ism"], 4) for w, o in prot.items()},
           "fdfr_protected": {w: round(o["fdfr"], 4) for w, o in prot.items()},
           "protection_ratio": {w: round((unprot[w] - prot[w]["ism"]) / (unprot[w] - ism_cls), 4)
                                if unprot[w] > ism_cls else None for w in words},
           "kid_class_unprotected": kid0, "kid_class_protected": kid1,
           "kid_rise_fraction": round((kid1 - kid0) / abs(kid0), 4),
           "seconds_protect": round(seconds_protect, 1), "protect_history": hist,
           "metric_impl": {"ism": "ism@toy-id", "fdfr": "fdfr@toy-det", "kid": "kid@toy-features"}}
    res["seconds_total"] = round(time.perf_counter() - t_start, 1)
    atomic_write_json(args.out, res)
    print(json.dumps({k: v for k, v in res.items() if k not in ("protect_history", "protect_config")}))


if __name__ == "__main__":
    main()
