"""``apdm bench toy-world``: is the toy world a working instrument? (issue #3)

Measures, on held-out subjects never seen in pretraining: the detector's pass rate on class-prompt generations,
the identity encoder's verification AUC, and the identity similarity (ISM analog) of class-prompt generations
vs generations after DreamBooth / LoRA / Textual Inversion with the default toy recipes
(``recipes/toy-dreambooth.yaml``, ``toy-lora.yaml``, ``toy-ti.yaml``), as ``ism_<method>``.
Overrides: ``subjects=N samples=N methods=dreambooth,lora,ti workers=N`` (the attacks run as N parallel processes,
default 2 on a CPU with ≥ 2 cores; :mod:`apdm.bench.jobs`). ``methods=`` replaces the list: name each method once,
e.g. ``methods=dreambooth,lora,ti,custom_diffusion`` to add Custom Diffusion (``toy-custom-diffusion.yaml``) to the
three; ``methods=custom_diffusion`` runs it alone. ``metric_impl`` names the implementation of every measured key
(``identity_verification_auc`` included, as the identity encoder's evaluation tags it).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[2] / "recipes"
METHOD_RECIPES = {"dreambooth": "toy-dreambooth.yaml", "lora": "toy-lora.yaml", "ti": "toy-ti.yaml",
                  "custom_diffusion": "toy-custom-diffusion.yaml"}


def toy_recipe(method: str, overrides=()):
    """The toy personalization recipe for ``method`` as a :class:`PersonalizeRunConfig`, with ``key=value``
    overrides (``personalization.steps=100``) applied as :func:`apdm.config.load_config` does."""
    from apdm.config import PersonalizeRunConfig, load_config

    return load_config(PersonalizeRunConfig, RECIPES / METHOD_RECIPES[method], overrides)


def bench_toy_world(quick: bool, overrides: list[str]) -> dict:
    from apdm.bench import check_subjects, jobs, method_list, option_int, parse_options, toy_setup
    from apdm.core import diffusion as D
    from apdm.evaluation.identity import wilson_interval
    from apdm.evaluation.protocol import with_prompts
    from apdm.toy import instruments as I
    from apdm.toy.world import heldout_subjects
    from apdm.utils import LOG

    t0 = time.perf_counter()
    known = {"subjects", "samples", "methods"}
    early = parse_options(overrides, known | {"model", "device", "workers"})  # checked before the model loads
    methods = method_list(early.get("methods", "dreambooth,lora,ti"), list(METHOD_RECIPES))
    opts, sd, inst = toy_setup(overrides, known)
    n_subjects = option_int(opts, "subjects", 3 if quick else 8)
    n_samples = option_int(opts, "samples", 8 if quick else 16)
    check_subjects(n_subjects)
    res: dict = {"model": sd.source, "model_fingerprint": sd.fingerprint(),
                 "instruments_fingerprint": inst.config.get("fingerprint"),
                 "subjects": n_subjects, "samples_per_prompt": n_samples}

    # instruments' own held-out quality
    held_ids = [s.index for s in heldout_subjects(64 if quick else 200)]
    enc = I.evaluate_identity_encoder(inst.encoder, "person", held_ids, photos=4)
    auc_key = next(k for k in enc if k.startswith("verification_auc"))
    res["identity_verification_auc"] = round(enc[auc_key], 4)

    # class-prompt generations: detector pass rate
    sample = toy_recipe("dreambooth").sample
    sample.num_images_per_prompt = n_samples
    cls_imgs = D.generate(sd, ["a photo of a person"], 4 * n_samples, sample.num_inference_steps,
                          sample.guidance_scale, seed=123, quiet=True)
    det = I.detector_scores(inst.detector, cls_imgs, "person")
    passed = int((det >= 0.5).sum())
    res["detector_pass_rate_class_prompt"] = round(passed / det.numel(), 4)
    res["detector_pass_rate_class_prompt_n"] = det.numel()
    res["detector_pass_rate_class_prompt_ci95"] = [round(v, 4) for v in wilson_interval(passed, det.numel())]

    per_subject = {m: [] for m in ["class_prompt", *methods]}
    attr = {m: [] for m in ["class_prompt", *methods]}
    seconds = {m: [] for m in methods}
    spec, workers = jobs.spec(sd), jobs.worker_count(opts, sd)
    res["workers"] = workers
    with jobs.executor(workers) as pool:
        futures = []
        for subj in heldout_subjects(n_subjects, num_images=4):
            refs = subj.references
            per_subject["class_prompt"].append(float(I.identity_similarity(inst.encoder, cls_imgs, refs).mean()))
            attr["class_prompt"].append(float(I.attribute_match(inst.encoder, cls_imgs, subj.identity).mean()))
            for m in methods:
                cfg = with_prompts(toy_recipe(m).personalization, subj.instance_prompt, subj.class_prompt)
                futures.append((subj, m, pool.submit(jobs.attack, spec, None, subj.images, refs, cfg,
                                                     subj.instance_prompt, sample, identity=subj.identity,
                                                     subject_class=subj.cls)))
        for subj, m, fut in futures:  # in submission order: per-subject lists line up
            out = fut.result()
            per_subject[m].append(out["ism"])
            attr[m].append(out["attr_match"])
            seconds[m].append(out["seconds_train"])
            LOG.info("subject %d %s: ISM %.3f", subj.index, m, out["ism"])
    key = {m: f"ism_{m}" for m in per_subject}
    for m, vals in per_subject.items():
        res[key[m]] = round(statistics.mean(vals), 4)
        res[key[m] + "_per_subject"] = [round(v, 4) for v in vals]
        res[key[m].replace("ism", "attr_match")] = round(statistics.mean(attr[m]), 4)
    for m in methods:
        res[f"seconds_personalize_{m}"] = round(statistics.mean(seconds[m]), 2)
    if "dreambooth" in methods:
        res["ism_gain_dreambooth"] = round(res["ism_dreambooth"] - res["ism_class_prompt"], 4)
    res["metric_impl"] = {"ism": "ism@toy-id", "attr_match": "attr_match@toy-attr", "detector": "pass@toy-det",
                          "identity_verification_auc": auc_key}  # the evaluation's own "name@impl" key
    res["seconds_total"] = round(time.perf_counter() - t0, 1)
    return res
