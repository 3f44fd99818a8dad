"""``apdm bench protect-model``: does APDM protection work on the toy world, and what does it cost? (issue #5)

Protects one held-out subject A with ``recipes/toy-protect-model.yaml`` (DPO + L2P) and, for comparison, with the
naive loss; then attacks every model with the toy personalization recipes and scores with the toy instruments:

* ``ism_*``: identity similarity (``ism@toy-id``) of "a photo of sks person" generations to A's (or B's) photos;
* ``kid_class_*``: KID (``kid@toy-features``) of class-prompt generations vs freshly drawn persons (preservation);
* ``fdfr_db_protected``: share of post-attack generations the toy detector rejects;
* ``protection_ratio[_lora|_ti|_2x_steps]``: share of each attack's identity gain over the class prompt that the
  protection removes (goal ≥ 0.85); every attack run on the protected model is also run on the unprotected one;
  ``ism_drop[...]``: the same removal in ISM units, unprotected − protected (paired per run, with ``_se``), the number
  to read where an attack gains little (:func:`protection_ratios`).

B is a second held-out subject that is *not* protected (other subjects must keep personalizing).
Overrides: ``outer_steps=N inner_steps=N learning_rate=X samples=N long_attack=true no_naive=true``,
``subjects=P,O`` (positions in the held-out list of A and B; default 0,1), ``other_identifier=WORD`` (B is
personalized as "a photo of WORD person" instead of with A's "sks": does the collateral follow the identifier?),
``identifier=WORD`` (every attack on A, unprotected and protected, uses "a photo of WORD person" while the protection
keeps the recipe's "sks": does an attacker who picks another identifier escape? The paper's Table 14 uses "t@t"),
``attacks=lora,ti,other,targets,dog`` (which attacks besides DreamBooth on A; default lora,ti,other; ``dog`` is
DreamBooth on a held-out dog, a subject of another class, named like B: ``ism_db_dog_*``, ``ism_class_prompt_dog``,
``dog_gain_kept``, is another class left alone? ``targets`` is
DreamBooth on the protection's generic winners x⁺ (with the encoder trap: its decoys, the images its photos
encode as, ``encoder_trap.targets``) instead of A's photos, on the *unprotected* model:
``ism_db_targets`` and ``protection_ratio_db_on_targets``, what an attack that learns exactly the x⁺ instead of A
gives; a protection that steers the attack to the x⁺ cannot do better, see docs/protect_model.md, "What the trap's
DreamBooth learns"),
``attack_seeds=K`` (every attack, unprotected and protected, is run K times, repeat r with the attacker's seed and the
sampling seed both raised by r · ``attack_seed_stride`` (default 100,003, so repeats share no sampling noise or
class image; ``attack_seed_stride=1`` reproduces results written before 2026-12-04, whose repeats shared all but one
of them); each ``ism_*`` / ``fdfr_*`` key is then the mean over the K runs, its runs are listed
under ``<key>_runs``, ``protection_ratio*_runs`` pairs run r unprotected with run r protected and
``protection_ratio*_se`` is the standard error of ``protection_ratio*`` (:func:`protection_ratios`); default 1 with
``--quick``, which is exactly the single attack of earlier results, and 3 in the full run: one attack's ISM moves
by up to 0.6 with its seed on a protected model, see docs/protect_model.md, "One attack is one draw"), and any
recipe key with its section (``protect.beta=0.5``, ``protect.inner_steps=0``, ``protect.gradient_leak=true``,
``personalization.steps=600``) for sweeps and ablations; ``attack.KEY=VALUE`` changes the *evaluation* attacker
(applied to every attack's personalization config, unprotected and protected alike;
``attack.train_text_encoder=false`` is the paper's UNet-only DreamBooth); ``baseline=F.json[,G.json]`` takes the
unprotected numbers (class-prompt ISM, unprotected DreamBooth ISM, unprotected KID; LoRA/TI/other-subject ones where
present, and the unprotected attacks the files lack are run here) from earlier results on the same model, subjects
and sample count instead of recomputing them (the attacks are deterministic, so they would come out the same).
``attack_photos=fresh`` (default ``same``): every attack on A trains on another draw of A's identity (4 new photos,
same references) instead of the photos the protection saw: does the protection hold for photos it never saw?
``protect_photos=K`` (default 4): the protection holds K photos of A, its 4 (the attacker's ``same`` photos) and K − 4
more from a third draw of A's identity (not the fresh photos, not the references): does a provider who holds more
photos of the person protect the photos it never saw better (with ``attack_photos=fresh``)? With ``protected=F``
it must be the K the weights were protected with (saved with them; checked).
``keep_photos=N`` (default 0; with the encoder trap): the trap also keeps N drawn photos, persons and dogs of
held-out identities nothing else in the bench uses (:func:`keep_photos`; the CLI's ``encoder_trap.keep_images``):
does a keep set of photos shrink what the trap costs other images (docs/results/checks/trap_collateral.py)?
``encoder_trap.synthetic_photos=N`` (a recipe key): the trap also holds N pictures of A sampled from a copy of the model
personalized on the protection's photos (:func:`apdm.protect_model.encoder_trap.synthetic_views`); the JSON then has
``synthetic_views_ism`` (the judge's ISM of those pictures to A's references) and
``trap_latent_change_synthetic_views``; ``encoder_trap.synthetic_copies=C`` personalizes C copies for them.
``protect_seed=K`` (default 0): the protection's own seed (the CLI's top-level ``seed``: L2P's draws, the
sampling of the pictures, the trap's augmentation and batches; the copies' personalization keeps
``personalization.seed``): how much of a protection result is the protection's draw?
With an encoder trap the JSON also has ``trap_latent_change_<group>``: how far the trapped encoder moves the latents
of A's photos the protection saw (``photos``), A's fresh photos and references, B's photos, drawn persons
(``class``: the KID reference persons), 32 generated persons (``class_generated``) and drawn dogs (``dog``, another
class), each the mean of :func:`apdm.protect_model.encoder_trap.latent_change` (≈ 1: sent to a decoy; ≈ 0: left
alone); and, per group, ``trap_recon_psnr_drop_<group>`` (dB of encode → decode PSNR lost) and
``trap_decode_change_psnr_<group>`` (the PSNR between the original and the trapped encoder's decoded pictures):
what the trap costs img2img and inpainting on each kind of image (:func:`_trap_changes`).
``encoder_trap.keep_generated=N`` (a recipe key) adds N more generated persons of the base model to the trap's keep
set, leaving the class images (the copy's prior images) as they are.
``encoder_trap.steps=N`` (and the other ``encoder_trap.*`` keys) adds the encoder trap after L2P
(:mod:`apdm.protect_model.encoder_trap`; ``protect.outer_steps=0`` for the trap alone); the saved and attacked
state then carries the VAE too. ``encoder_trap.targets=farthest encoder_trap.identity=toy:DIR`` lets a face
recognizer built independently of the bench's judge (``apdm toy build skip_model=true seed=1 output_dir=DIR``)
choose the decoys (``encoder_trap.identity=toy``, the judge itself, is refused; ``decoy_identity_impl`` records it,
``decoy_cosines`` the recognizer's cosine of each chosen decoy to the subject: a rebuilt recognizer is a draw of its
recipe, and these tell whether it chose the same decoys).
``save_protected=F.safetensors`` writes the protected weights (with the model fingerprint, subject and protection
settings as metadata) and ``protected=F.safetensors`` attacks such weights instead of protecting again (the
protection of the paper's footing takes ~50 min on one core; its settings and time are then read from the file,
and protection overrides and ``save_protected=`` are refused since they would not apply; so is the naive baseline,
off there by default since 2026-12-07: it would be protected with this run's settings, not the file's).
``workers=N`` runs the protections and attacks as N parallel processes (default 2 on a CPU with ≥ 2 cores, 1 on a
GPU; :mod:`apdm.bench.jobs`); the numbers do not depend on it, ``seconds_protect`` is then the protection's own
time on one of N processes sharing the machine.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[2] / "recipes"


def bench_protect_model(quick: bool, overrides: list[str]) -> dict:
    import torch

    from apdm.bench import (attack_config, attack_seed_stride, attack_seeds, check_out, identifier_option, jobs,
                            option_bool, option_int, option_positive, submit_attack_runs, toy_setup)
    from apdm.bench.toy_world import METHOD_RECIPES, toy_recipe
    from apdm.config import EncoderTrapConfig, ProtectModelRunConfig, load_config
    from apdm.protect_model.encoder_trap import check_trap_config, trap_embedder, trap_targets
    from apdm.protect_model.l2p import check_protect_config
    from apdm.toy import instruments as I
    from apdm.toy.world import heldout_subjects, instruments_path
    from apdm.utils import LOG

    t_start = time.perf_counter()
    trap_impl: dict = {}  # the encoder trap keys' implementations, as trap_report names them (_trap_changes)
    dotted = [o for o in overrides if "." in o.split("=", 1)[0]]
    attack_overrides = [o[len("attack."):] for o in dotted if o.startswith("attack.")]
    attack_recipe = [f"personalization.{o}" for o in attack_overrides]  # the evaluation attacker's overrides
    recipe_overrides = [o for o in dotted if not o.startswith("attack.")]
    for o in recipe_overrides:  # the bench takes its model from model=; model.* was accepted and ignored
        if o.split(".", 1)[0] not in ("protect", "personalization", "encoder_trap"):
            raise ValueError(f"{o.split('=', 1)[0]}: the bench takes only protect.*, personalization.*, encoder_trap.* "
                             "and attack.* recipe keys" + (" (its model is model=PATH)" if o.startswith("model.")
                                                           else ""))
    opts, sd, inst = toy_setup([o for o in overrides if o not in dotted],
                               {"outer_steps", "inner_steps", "learning_rate", "samples", "long_attack", "no_naive",
                                "attacks", "baseline", "subjects", "other_identifier", "identifier",
                                "attack_seeds", "save_protected", "protected", "attack_photos", "protect_photos",
                                "keep_photos", "protect_seed", "attack_seed_stride"})
    if "save_protected" in opts:  # before the protection, not after it (a folder or a typo lost the whole run)
        opts["save_protected"] = str(Path(opts["save_protected"]).expanduser())
        check_out(opts["save_protected"], "save_protected=")
    rc = load_config(ProtectModelRunConfig, RECIPES / "toy-protect-model.yaml", recipe_overrides)
    attacks = set(opts.get("attacks", "lora,ti,other").split(",")) - {""}
    unknown = attacks - {"lora", "ti", "other", "targets", "dog"}
    if unknown:
        raise ValueError(f"unknown attacks {sorted(unknown)} (known: lora, ti, other, targets, dog)")
    long_attack = option_bool(opts, "long_attack", not quick, "also attack with twice the DreamBooth steps")
    # with protected=F the naive baseline would be protected with this run's recipe settings, not the file's:
    # numbers beside settings that describe another protection; so it is off there unless asked for (and refused)
    naive = not option_bool(opts, "no_naive", "protected" in opts, "skip the naive-loss baseline")
    if naive and "protected" in opts:
        raise ValueError("protected=F with no_naive=false: the naive baseline would be protected with this run's "
                         "settings, not those of the loaded protection; leave no_naive at its default there")
    # the evaluation attacker's recipes, loaded once (this also rejects a bad attack.* key before any work)
    attack_runs = {m: toy_recipe(m, attack_recipe) for m in METHOD_RECIPES}
    sample = attack_runs["dreambooth"].sample
    pcfg = rc.protect
    for key in ("outer_steps", "inner_steps"):
        setattr(pcfg, key, option_int(opts, key, getattr(pcfg, key), 0))
    pcfg.learning_rate = option_positive(opts, "learning_rate", pcfg.learning_rate, "the protection's learning rate")
    pcfg.checkpoint_every = 0  # the bench keeps no checkpoints
    check_protect_config(rc.personalization, pcfg)  # before any job starts
    check_trap_config(rc.encoder_trap)
    # the recognizer choosing the decoys (farthest) or screening the synthetic photos must not be the judge: "toy"
    # or "toy:DIR" with DIR (or DIR/instruments) the judge's own instruments folder
    trap_id, judge = rc.encoder_trap.identity, Path(instruments_path()).resolve()
    if (rc.encoder_trap.targets == "farthest" or rc.encoder_trap.synthetic_photos > 0) and (trap_id == "toy" or (
            trap_id.startswith("toy:") and judge in {Path(trap_id[4:]).expanduser().resolve(),
                                                     (Path(trap_id[4:]).expanduser() / "instruments").resolve()})):
        raise ValueError(f"encoder_trap.identity={trap_id} is the identity encoder this bench scores ISM with "
                         f"({judge}): choosing the decoys (targets=farthest) or screening the synthetic photos with "
                         "it would grade the protection with its own judge; use an independent one (toy:DIR, built "
                         "by `apdm toy build skip_model=true seed=1 output_dir=DIR`)")
    tcfg = dataclasses.replace(rc.encoder_trap, checkpoint_every=0)
    n_samples = option_int(opts, "samples", 8 if quick else 16)
    n_seeds, stride = attack_seeds(opts, quick), attack_seed_stride(opts)
    sample.num_images_per_prompt = n_samples
    positions = _subject_positions(opts)
    subj_a, subj_b = (heldout_subjects(1, num_images=4, offset=k)[0] for k in positions)
    # a held-out dog: a subject of another class, personalized like B (attacks=dog)
    subj_dog = heldout_subjects(1, cls="dog", num_images=4, offset=positions[1])[0] if "dog" in attacks else None
    other_identifier, identifier = (identifier_option(opts, k) for k in ("other_identifier", "identifier"))
    attack_photos = opts.get("attack_photos", "same")
    if attack_photos not in ("same", "fresh"):
        raise ValueError(f"attack_photos must be 'same' (the attacker trains on the photos the protection saw) or "
                         f"'fresh' (on other photos of the same person), got '{attack_photos}'")
    # the attacker's photos of A: the protection's own, or another draw of the same identity (its references stay)
    fresh_a = heldout_subjects(1, num_images=4, offset=positions[0], seed=1)[0].images
    photos_a = subj_a.images if attack_photos == "same" else fresh_a
    # the protection's photos of A: its 4 (the attacker's "same" photos) and, with protect_photos=K, K - 4 more
    # from a third draw of the same identity (neither the attacker's fresh photos nor the references)
    n_protect = _protect_photo_count(opts)
    n_keep = _keep_photo_count(opts, tcfg)
    protect_seed = option_int(opts, "protect_seed", 0, 0)
    subj_prot = subj_a if n_protect == 4 else dataclasses.replace(subj_a, images=torch.cat(
        [subj_a.images, heldout_subjects(1, num_images=n_protect - 4, offset=positions[0], seed=2)[0].images]))
    res: dict = {"model": sd.source, "model_fingerprint": sd.fingerprint(),
                 # every weight (the fingerprint reads the UNet only: an encoder trap changes the VAE alone)
                 "model_weights_digest": sd.weights_digest(),
                 "instruments_fingerprint": inst.config.get("fingerprint"),
                 "subject_protected": subj_a.index, "subject_other": subj_b.index,
                 "outer_steps": pcfg.outer_steps, "inner_steps": pcfg.inner_steps,
                 "protect_lr": pcfg.learning_rate, "protect_lr_phases": pcfg.lr_phases, "beta": pcfg.beta,
                 "gradient_leak": pcfg.gradient_leak,
                 "samples_per_prompt": n_samples, "other_identifier": other_identifier, "identifier": identifier,
                 "attack_seeds": n_seeds, "attack_seed_stride": stride, "attack_photos": attack_photos,
                 "protect_photos": n_protect,
                 "keep_photos": n_keep, "protect_seed": protect_seed, "recipe_overrides": recipe_overrides,
                 "attack_overrides": attack_overrides,
                 # every protection setting as it ran (the recipe file changes over time; its overrides are above)
                 "protect_config": dataclasses.asdict(pcfg), "encoder_trap_config": dataclasses.asdict(tcfg)}
    if tcfg.steps and tcfg.targets == "farthest":  # which recognizer chose the decoys (its weights' fingerprint)
        from apdm.evaluation.run import identity_backend

        res["decoy_identity_impl"] = identity_backend(tcfg.identity)[1]

    loaded = None
    if "protected" in opts:
        unused = recipe_overrides + [f"{k}={opts[k]}" for k in ("outer_steps", "inner_steps", "learning_rate",
                                                                 "save_protected", "keep_photos", "protect_seed")
                                                      if k in opts]
        if unused:
            raise ValueError(f"protected=FILE attacks saved weights: {', '.join(unused)} would not apply; "
                             "leave them out")
        loaded = load_protected(opts["protected"], res)
        res.update(loaded["info"])
        res["protected_from"] = opts["protected"]
    per_base, subject = protection_subject(sd, rc.personalization, pcfg, subj_prot)

    real = drawn_persons(4 * n_samples)  # fresh drawn persons: the reference distribution for KID

    def submit_attack(key: str, state, subj, method: str, steps: int | None = None, photos=None) -> None:
        # the protection used subj_a's own prompt (the recipe's "sks"); the attacker may name A otherwise
        cfg = attack_config(attack_runs[method].personalization, subj,
                            identifier if subj is subj_a else other_identifier)
        if photos is None:
            photos = photos_a if subj is subj_a else subj.images
        attack_f[key] = submit_attack_runs(pool, spec, state, photos, subj.references,
                                           dataclasses.replace(cfg, steps=steps or cfg.steps), sample, n_seeds,
                                           stride=stride, subject_class=subj.cls)

    spec, workers = jobs.spec(sd), jobs.worker_count(opts, sd)
    res["workers"] = workers
    long_steps = 2 * attack_runs["dreambooth"].personalization.steps
    if "baseline" in opts:  # the unprotected numbers of an earlier run on the same model and subjects
        res.update(load_baseline(opts["baseline"], res))
    f: dict = {}  # result key -> future (class-prompt ISM, KID)
    attack_f: dict[str, list] = {}  # attack key -> its runs' futures, in seed order
    with jobs.executor(workers) as pool:
        # the two protections first (the longest jobs), then every attack on the unprotected model
        keep = keep_photos(n_keep) if n_keep else None
        f_prot = None if loaded else pool.submit(_protect_job, spec, subject, per_base,
                                                  dataclasses.replace(pcfg, loss="dpo"), tcfg, keep, protect_seed)
        # the naive loss gets the same trap, if any: only the loss differs
        f_naive = pool.submit(_protect_job, spec, subject, per_base, dataclasses.replace(pcfg, loss="naive"),
                              tcfg, keep, protect_seed) if naive else None
        if "baseline" not in opts:
            f["class_prompt"] = pool.submit(_class_prompt_ism_job, spec, n_samples, subj_a.references,
                                            subj_b.references)
            f["kid_class_unprotected"] = pool.submit(_kid_job, spec, None, real, n_samples)
        # every unprotected attack the baseline (if any) does not hold, so that each protection ratio can be read
        # from this file
        to_run = unprotected_attacks_to_run(res, attacks, long_attack)
        if "baseline" in opts and to_run:
            LOG.info("the baseline lacks %s: running those attacks on the unprotected model",
                     ", ".join(key for key, *_ in to_run))
        for key, method, on_other, twice in to_run:
            submit_attack(key, None, subj_b if on_other else subj_a, method, long_steps if twice else None)
        if "dog" in attacks:  # never from a baseline file: no earlier result has it
            f["class_prompt_dog"] = pool.submit(_class_prompt_ism_job, spec, n_samples, subj_dog.references,
                                                prompt="a photo of a dog")
            submit_attack("ism_db_dog_unprotected", None, subj_dog, "dreambooth")
        if "targets" in attacks:  # A's attacker, trained on the protection's targets instead of A's photos
            trap = EncoderTrapConfig(**res["encoder_trap_config"])  # as it ran (also from a protected= file)
            targets = trap_targets(subject, trap.targets, trap_embedder(trap)[0], trap.decoys)[0] if trap.steps \
                else subject.paired
            submit_attack("ism_db_targets", None, subj_a, "dreambooth", photos=targets.cpu())
        views = None
        if loaded:
            prot, rss = loaded["state"], 0.0
        else:
            prot, hist, seconds, rss, trap_hist, seconds_trap, views, decoy_cos = f_prot.result()
            if decoy_cos is not None:  # which decoys the recognizer chose (tells whether a rebuilt one chose alike)
                res["decoy_cosines"] = decoy_cos
            if views is not None:  # how like A the synthetic views are, by the judge (the attack's ISM scale)
                res["synthetic_views_ism"] = round(float(I.identity_similarity(
                    jobs.instruments().encoder, views, subj_a.references).mean()), 4)
            res["seconds_protect"] = round(seconds, 1)
            res["seconds_per_outer_step"] = round((seconds - seconds_trap) / len(hist), 3) if hist else None
            res["protect_loss_first"] = hist[0]["loss_protect"] if hist else None
            res["protect_loss_last"] = hist[-1]["loss_protect"] if hist else None
            if trap_hist:
                res["seconds_encoder_trap"] = round(seconds_trap, 1)
                res["encoder_trap_loss_first"] = trap_hist[0]["loss_trap"]
                res["encoder_trap_loss_last"] = trap_hist[-1]["loss_trap"]
            if "save_protected" in opts:
                save_protected(opts["save_protected"], prot, res)
        if any(k.startswith(jobs.VAE_PREFIX) for k in prot):  # where the encoder trap moves latents, and where not
            res.update(_trap_changes(sd, jobs.model(spec, prot).vae, metric_impl=trap_impl, groups={
                "photos": subj_a.images, "fresh_photos": fresh_a, "references": subj_a.references,
                "other_subject": subj_b.images, "class": real, "class_generated": generated_persons(sd),
                "dog": drawn_dogs(2 * n_samples),
                **({"synthetic_views": views} if views is not None else {})}))
        submit_attack("ism_db_protected", prot, subj_a, "dreambooth")
        for method in ("lora", "ti"):
            if method in attacks:
                submit_attack(f"ism_{method}_protected", prot, subj_a, method)
        if "other" in attacks:
            submit_attack("ism_db_other_protected", prot, subj_b, "dreambooth")
        if "dog" in attacks:
            submit_attack("ism_db_dog_protected", prot, subj_dog, "dreambooth")
        f["kid_class_protected"] = pool.submit(_kid_job, spec, prot, real, n_samples)
        if long_attack:
            submit_attack("ism_db_protected_2x_steps", prot, subj_a, "dreambooth", long_steps)
        if f_naive is not None:
            naive_state = f_naive.result()[0]
            submit_attack("ism_db_protected_naive", naive_state, subj_a, "dreambooth")
            f["kid_class_protected_naive"] = pool.submit(_kid_job, spec, naive_state, real, n_samples)
        out = {key: fut.result() for key, fut in f.items()}
        runs = {key: [fut.result() for fut in futs] for key, futs in attack_f.items()}
    peaks = [rss] + [o["peak_rss_mb"] for rs in runs.values() for o in rs]
    for key, o in out.items():
        if key == "class_prompt":
            res["ism_class_prompt"], res["ism_class_prompt_other"] = o
        elif key == "class_prompt_dog":
            res["ism_class_prompt_dog"] = o[0]
        else:  # kid_*
            res[key] = round(o, 5)
    for key, rs in runs.items():
        res.update(_attack_summary(key, rs))
    if long_attack:
        res["seconds_long_attacks"] = round(sum(o["seconds"] for k, rs in runs.items() if k.endswith("_2x_steps")
                                                for o in rs), 1)
    res["peak_rss_mb_worker"] = round(max(peaks), 1)
    LOG.info("unprotected: ISM DB %.3f (class prompt %.3f); APDM: ISM DB %.3f, other subject %s",
             res["ism_db_unprotected"], res["ism_class_prompt"], res["ism_db_protected"],
             res.get("ism_db_other_protected"))

    res.update(protection_ratios(res))
    res.update(gains_kept(res))
    res["kid_rise_fraction"] = round((res["kid_class_protected"] - res["kid_class_unprotected"])
                                     / max(1e-8, abs(res["kid_class_unprotected"])), 4)
    res["metric_impl"] = {"ism": "ism@toy-id", "kid": "kid@toy-features", "fdfr": "fdfr@toy-det", **trap_impl}
    res["seconds_total"] = round(time.perf_counter() - t_start, 1)
    return res


def protection_ratios(res: dict) -> dict:
    """The goals of issue #5 as ratios, from a result's ISM keys (means and, with several runs, ``*_runs``).

    For each attack X whose unprotected and protected ISM ``res`` holds (DreamBooth, LoRA, TI, twice as long, and
    DreamBooth on the protection's targets):

    * ``protection_ratio<X>`` = (unprotected − protected) / (unprotected − class prompt) on the means: the share of
      the attack's identity gain the protection removes (None when the attack gains nothing);
    * with runs: ``protection_ratio<X>_runs`` (run r against run r; a run whose gain is near zero makes its ratio
      anything, as TI on new photos) and ``protection_ratio<X>_se``, the standard error of ``protection_ratio<X>``
      itself (:func:`apdm.bench.ratio_standard_error`, delta method on the paired removed gains and gains; a JSON
      without ``protection_ratio_se_method`` was written before this and holds the standard error of the per-run
      ratios' mean there instead);
    * ``ism_drop<X>`` = mean over runs of (unprotected − protected) ISM, the gain removed in ISM units, and with runs
      ``ism_drop<X>_se``: the paired statistic that stays stable when gains are small.
    """
    from apdm.bench import ratio_standard_error, standard_error

    out: dict = {}
    c = res["ism_class_prompt"]
    for suffix, unprot, prot_key in (("", "ism_db_unprotected", "ism_db_protected"),
                                     ("_lora", "ism_lora_unprotected", "ism_lora_protected"),
                                     ("_ti", "ism_ti_unprotected", "ism_ti_protected"),
                                     ("_2x_steps", "ism_db_unprotected_2x_steps", "ism_db_protected_2x_steps"),
                                     ("_db_on_targets", "ism_db_unprotected", "ism_db_targets")):
        if unprot not in res or prot_key not in res:
            continue
        out[f"protection_ratio{suffix}"] = _ratio(res[unprot], res[prot_key], c)
        if f"{unprot}_runs" not in res or f"{prot_key}_runs" not in res:  # one run: the means are that run
            out[f"ism_drop{suffix}"] = round(res[unprot] - res[prot_key], 4)
            continue
        pairs = list(zip(res[f"{unprot}_runs"], res[f"{prot_key}_runs"]))  # run r against run r
        out[f"protection_ratio{suffix}_runs"] = [_ratio(u, p, c) for u, p in pairs]
        drops = [u - p for u, p in pairs]
        se = ratio_standard_error(drops, [u - c for u, _ in pairs])
        if se is not None:
            out[f"protection_ratio{suffix}_se"] = se
            out["protection_ratio_se_method"] = "delta method on paired runs (se of the ratio of means)"
        out[f"ism_drop{suffix}"] = round(sum(drops) / len(drops), 4)
        out[f"ism_drop{suffix}_se"] = standard_error(drops)
    return out


def gains_kept(res: dict) -> dict:
    """Do the subjects that were not protected keep their personalization gain? For ``name`` in other (a held-out
    person) and dog (another class), when ``res`` holds ``ism_db_<name>_unprotected`` / ``_protected`` and
    ``ism_class_prompt_<name>``:

    * ``<name>_gain_kept`` = (protected − class prompt) / (unprotected − class prompt) on the mean ISMs (1 = the
      gain is intact; None when DreamBooth gains nothing on it);
    * with runs (``*_runs``, run r against run r), ``<name>_gain_kept_se``: the standard error of that ratio of
      means (:func:`apdm.bench.ratio_standard_error`, delta method on the paired protected and unprotected gains).
    """
    from apdm.bench import ratio_standard_error

    out: dict = {}
    for name in ("other", "dog"):
        unprot, prot, cls = f"ism_db_{name}_unprotected", f"ism_db_{name}_protected", f"ism_class_prompt_{name}"
        if unprot not in res or prot not in res or cls not in res:
            continue
        c = res[cls]
        gap = res[unprot] - c
        out[f"{name}_gain_kept"] = round((res[prot] - c) / gap, 4) if gap > 0 else None
        if f"{unprot}_runs" in res and f"{prot}_runs" in res:
            pairs = list(zip(res[f"{unprot}_runs"], res[f"{prot}_runs"]))
            se = ratio_standard_error([p - c for _, p in pairs], [u - c for u, _ in pairs])
            if se is not None:
                out[f"{name}_gain_kept_se"] = se
    return out


def _ratio(unprotected: float, protected: float, class_prompt: float) -> float | None:
    """Share of the attack's identity gain over the class prompt that the protection removes (None: no gain)."""
    gap = unprotected - class_prompt
    return round((unprotected - protected) / gap, 4) if gap > 0 else None


def _attack_summary(key: str, runs: list[dict]) -> dict:
    """The JSON keys of one attack run ``len(runs)`` times: ``key`` = mean ISM (the one run's ISM when there is one
    run, as before ``attack_seeds``), ``<key>_runs`` = each run's ISM (only with several runs), and for the
    DreamBooth attack on the protected model its ``fdfr_db_protected`` (mean) likewise."""
    def mean_and_runs(name: str, values: list[float]) -> dict:
        return {name: round(sum(values) / len(values), 4)} | \
            ({f"{name}_runs": [round(v, 4) for v in values]} if len(values) > 1 else {})

    out = mean_and_runs(key, [o["ism"] for o in runs])
    if key == "ism_db_protected":
        out |= mean_and_runs("fdfr_db_protected", [o["fdfr"] for o in runs])
    return out


def protection_subject(sd, per_cfg, pcfg, subj):
    """The protection's data for held-out subject ``subj`` (the bench's A): x⁻ = its photos, x⁺ = class-prompt
    images of φ (one per photo), prior images of φ (``pcfg.num_class_images``; generated once and cached).

    Returns:
        (``per_cfg`` with the subject's prompts: the simulated attacker, :class:`apdm.protect_model.l2p.Subject`).
    """
    from apdm.evaluation.protocol import with_prompts
    from apdm.protect_model.l2p import Subject
    from apdm.protect_model.run import protection_images

    per = with_prompts(per_cfg, subj.instance_prompt, subj.class_prompt)
    class_imgs, paired = protection_images(sd, per, subj.class_prompt, pcfg.num_class_images, len(subj.images),
                                           quiet=True)
    dev = sd.device
    return per, Subject("A", subj.images.to(dev), paired.to(dev), class_imgs.to(dev), subj.instance_prompt,
                        subj.class_prompt)


def _protect_photo_count(opts: dict) -> int:
    """``protect_photos=K``: how many photos of A the protection holds (default 4, at least 4)."""
    text = opts.get("protect_photos", "4")
    if not text.isdigit() or int(text) < 4:
        raise ValueError(f"protect_photos must be a whole number >= 4 (the attacker's 4 photos plus any more the "
                         f"protection holds), got '{text}'")
    return int(text)


def drawn_persons(n: int):
    """``n`` drawn persons of held-out identities, one photo each: the bench's reference set for KID and the drawn
    group of the trap's cost (no protected or other subject among them), (n,3,64,64) in [0,1]."""
    from apdm.toy import draw

    arr, _, _ = draw.render_dataset("person", draw.split()["heldout"][100:100 + n], 1, seed=77)
    return draw.to_tensor(arr)


def drawn_dogs(n: int):
    """``n`` drawn dogs of held-out identities, one photo each: images of another class, (n,3,64,64) in [0,1]."""
    from apdm.toy import draw

    arr, _, _ = draw.render_dataset("dog", draw.split()["heldout"][200:200 + n], 1, seed=78)
    return draw.to_tensor(arr)


def _trap_changes(sd, trapped_vae, groups: dict, metric_impl: dict | None = None) -> dict:
    """What the trapped encoder does to each group of images (A's photos the trap saw, A's other photos, B's, drawn
    and generated persons, dogs), from :func:`apdm.protect_model.encoder_trap.trap_report`: ``trap_latent_change_<g>``
    (mean latent change: ≈ 1 sent to a decoy, ≈ 0 left alone), ``trap_recon_psnr_drop_<g>`` (dB of encode → decode
    PSNR lost, original → trapped encoder) and ``trap_decode_change_psnr_<g>`` (PSNR between the two encoders'
    decoded pictures: the change itself on one scale for every kind of image; None where nothing changed).

    ``metric_impl``, when given, receives the implementation of each key family as ``trap_report`` names it
    (``trap_latent_change``: ``latent_change@apdm``, ``trap_recon_psnr_drop`` and ``trap_decode_change_psnr``:
    ``psnr@torchmetrics``)."""
    from apdm.protect_model.encoder_trap import trap_report

    out = {}
    for name, r in trap_report(sd.vae, trapped_vae, groups).items():
        out[f"trap_latent_change_{name}"] = r["latent_change"]
        out[f"trap_recon_psnr_drop_{name}"] = round(r["recon_psnr_base"] - r["recon_psnr_trapped"], 2)
        out[f"trap_decode_change_psnr_{name}"] = r["decode_change_psnr"]
        if metric_impl is not None:
            impl = r["metric_impl"]
            metric_impl.update({"trap_latent_change": impl["latent_change"],
                                "trap_recon_psnr_drop": impl["recon_psnr"],
                                "trap_decode_change_psnr": impl["decode_change_psnr"]})
    return out


def generated_persons(sd, prompt: str = "a photo of a person"):
    """32 images of ``prompt`` from the model ``sd`` (25 steps, guidance 3, seed 321): the generated group of the
    trap's cost here and in docs/results/checks/trap_collateral.py and trap_cost_per_image.py; (32,3,H,W) in [0,1]."""
    from apdm.core import diffusion as D

    return D.generate(sd, [prompt], 32, 25, 3.0, seed=321, quiet=True)


def _subject_positions(opts: dict) -> tuple[int, int]:
    """``subjects=P,O``: positions in the held-out list of the protected subject A and the other subject B
    (default 0,1: held-out persons 1 and 7)."""
    text = opts.get("subjects", "0,1")
    try:
        a, b = (int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"subjects must be two held-out positions 'P,O' (e.g. 0,1), got '{text}'") from None
    if a == b or min(a, b) < 0:
        raise ValueError(f"subjects: the protected and the other subject must be two different positions >= 0, "
                         f"got '{text}'")
    from apdm.bench import check_subjects

    check_subjects(1, max(a, b))  # both within the toy world's held-out list
    return a, b


def _keep_photo_count(opts: dict, tcfg) -> int:
    """``keep_photos=N``: drawn photos the encoder trap keeps besides the class images (default 0)."""
    text = opts.get("keep_photos", "0")
    if not text.isdigit() or int(text) > 2 * KEEP_IDS:
        raise ValueError(f"keep_photos must be a whole number from 0 to {2 * KEEP_IDS}, got '{text}'")
    if int(text) and not tcfg.steps and "protected" not in opts:  # with protected=, refused as not applying
        raise ValueError("keep_photos=N is for the encoder trap: set encoder_trap.steps too")
    return int(text)


#: held-out identities the ``keep_photos`` are drawn from: none of the bench's subjects (positions < 12), KID
#: references ([100:164]) or dogs ([200:232]) and none the checks in docs/results/checks draw.
KEEP_IDS = 110


def keep_photos(n: int) -> torch.Tensor:
    """``n`` drawn photos for the encoder trap's keep set (``encoder_trap.keep_images`` of the CLI): persons and
    dogs alternately, one photo of each held-out identity in ``heldout[300:410]``; (n,3,64,64) in [0,1]."""
    import torch

    from apdm.toy import draw

    ids = draw.split()["heldout"][300:300 + KEEP_IDS]
    persons, _, _ = draw.render_dataset("person", ids[:(n + 1) // 2], 1, seed=79)
    dogs, _, _ = draw.render_dataset("dog", ids[:n // 2], 1, seed=79)
    p, d = draw.to_tensor(persons), draw.to_tensor(dogs)
    order = [p[i // 2] if i % 2 == 0 else d[i // 2] for i in range(n)]
    return torch.stack(order)


def _protect_job(spec, subject, per_cfg, pcfg, tcfg=None, keep=None, seed: int = 0
                 ) -> tuple[dict, list[dict], float, float, list[dict], float, object, list | None]:
    """Protect ``subject`` on the model of ``spec`` (L2P, then the encoder trap when ``tcfg.steps`` > 0) with the
    protection's seed ``seed`` (the CLI's top-level ``seed``: L2P's draws, the pictures' sampling, the trap's); returns
    (protected UNet state (and text encoder, VAE, if protected: :func:`apdm.bench.jobs.unet_state`), per-step logs,
    seconds of the whole protection, peak RSS, the trap's per-step logs, the trap's seconds (with its synthetic
    views), the views (V,3,H,W) in [0,1] or None, the decoys' recognizer cosines to the subject with
    ``encoder_trap.targets=farthest`` or None)."""
    from apdm.bench import jobs
    from apdm.protect_model.l2p import protect
    from apdm.utils import peak_rss_mb

    sd = jobs.model(spec)
    t0 = time.perf_counter()
    unet, hist, text_encoder = protect(sd, [subject], per_cfg, pcfg, seed=seed)  # pcfg.checkpoint_every is 0 here
    vae, trap_hist, seconds_trap, views, decoy_cos = None, [], 0.0, None, None
    if tcfg is not None and tcfg.steps > 0:
        import torch

        from apdm.protect_model.encoder_trap import synthetic_views, trap_embedder, trap_encoder
        from apdm.protect_model.run import generated_keep_images

        t1 = time.perf_counter()
        embed = trap_embedder(tcfg)[0]  # one recognizer for the decoys and the pictures
        gen = generated_keep_images(sd, per_cfg, [subject.class_prompt], tcfg.keep_generated, quiet=True)
        if gen is not None:  # encoder_trap.keep_generated: more generated images in the keep set
            keep = gen if keep is None else torch.cat([keep, gen])
        if tcfg.synthetic_photos > 0:
            views = synthetic_views(sd, subject, per_cfg, tcfg.synthetic_photos, seed=seed, embed=embed,
                                    pool=tcfg.synthetic_pool, copies=tcfg.synthetic_copies)
        vae, trap_hist, chosen = trap_encoder(sd.vae, [subject], tcfg, seed=seed, quiet=True, embed=embed,
                                              keep_images=keep, views=None if views is None else [views])
        decoy_cos = chosen[0]["cosines"]  # recorded: a rebuilt recognizer is a draw of its decoys
        seconds_trap = time.perf_counter() - t1
    return (jobs.unet_state(unet, text_encoder, vae), hist, time.perf_counter() - t0, peak_rss_mb(), trap_hist,
            seconds_trap, views, decoy_cos)


def _kid_job(spec, unet_state: dict | None, real, n_samples: int) -> float:
    """KID (``kid@toy-features``) of 4·n class-prompt generations against the drawn persons ``real``."""
    from apdm.bench import jobs
    from apdm.core import diffusion as D
    from apdm.evaluation.distribution import kid

    sd = jobs.model(spec, unet_state)
    gen = D.generate(sd, ["a photo of a person"], 4 * n_samples, 25, 3.0, seed=321, quiet=True)
    return float(kid(real, gen, jobs.instruments().features, subsets=50)[0])


def _class_prompt_ism_job(spec, n_samples: int, *references, prompt: str = "a photo of a person"
                          ) -> tuple[float, ...]:
    """Identity similarity of n generations of the class prompt ``prompt`` by the unprotected model to each
    subject's references."""
    from apdm.bench import jobs
    from apdm.core import diffusion as D
    from apdm.toy import instruments as I

    sd, inst = jobs.model(spec), jobs.instruments()
    gen = D.generate(sd, [prompt], n_samples, 25, 3.0, seed=123, quiet=True)
    return tuple(round(float(I.identity_similarity(inst.encoder, gen, r).mean()), 4) for r in references)


#: what a saved protection carries besides its weights (``save_protected=``), and checks on loading
PROTECTED_INFO = ("model_fingerprint", "model_weights_digest", "subject_protected", "outer_steps", "inner_steps",
                  "protect_lr", "protect_lr_phases", "beta", "gradient_leak", "recipe_overrides", "protect_config",
                  "seconds_protect", "seconds_per_outer_step", "protect_loss_first", "protect_loss_last",
                  "encoder_trap_config", "protect_photos", "decoy_identity_impl", "decoy_cosines", "keep_photos",
                  "synthetic_views_ism", "protect_seed")


def save_protected(path: str, state: dict, res: dict) -> None:
    """Write a protected UNet (and text encoder) state as safetensors, atomically, with the result keys of
    :data:`PROTECTED_INFO` as JSON metadata."""
    import json

    from safetensors.torch import save

    from apdm.utils import LOG, atomic_write_bytes

    info = json.dumps({k: res[k] for k in PROTECTED_INFO if k in res})
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in state.items()}, metadata={"apdm_protected": info}))
    LOG.info("protected weights written to %s", path)


def load_protected(path: str, res: dict) -> dict:
    """Read weights written by :func:`save_protected`: ``{"state": tensors, "info": result keys}``.

    Raises:
        ValueError: naming the file, when it cannot be read, is not such a file, or was protected on another
            model or subject than this run's.
    """
    import json

    from safetensors import safe_open

    try:  # one read for the metadata and the tensors
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # missing file, not safetensors, truncated
        raise ValueError(f"{path}: cannot read protected weights ({e})") from e
    if "apdm_protected" not in meta:
        raise ValueError(f"{path}: not written by `apdm bench protect-model save_protected=` (no apdm metadata)")
    info = json.loads(meta["apdm_protected"])
    for key, default in (("model_fingerprint", None), ("subject_protected", None), ("protect_photos", 4),
                         ("model_weights_digest", res.get("model_weights_digest"))):  # (older files lack it)
        if info.get(key, default) != res.get(key):
            raise ValueError(f"{path}: protected with {key}={info.get(key)!r}, this run has {res.get(key)!r}")
    return {"state": state, "info": info}


BASELINE_KEYS = ("ism_class_prompt", "ism_class_prompt_other", "kid_class_unprotected", "ism_db_unprotected")
#: taken from a baseline file when present; the bench runs those it lacks (:func:`unprotected_attacks_to_run`)
OPTIONAL_BASELINE_KEYS = ("ism_db_other_unprotected", "ism_lora_unprotected", "ism_ti_unprotected",
                          "ism_db_unprotected_2x_steps")


def unprotected_attacks_to_run(res: dict, attacks: set[str], long_attack: bool) -> list[tuple[str, str, bool, bool]]:
    """The unprotected attacks this run must compute, as ``(result key, method, on the other subject B, twice as
    long)``: every one its ``attacks`` (and ``long_attack``) ask for whose key ``res`` does not already hold from a
    ``baseline=`` file. Before 2026-12-04 a baseline without, say, ``ism_lora_unprotected`` silently left
    ``protection_ratio_lora`` out of the result."""
    wanted = [("ism_db_unprotected", "dreambooth", False, False)] \
        + ([("ism_db_other_unprotected", "dreambooth", True, False)] if "other" in attacks else []) \
        + [(f"ism_{m}_unprotected", m, False, False) for m in ("lora", "ti") if m in attacks] \
        + ([("ism_db_unprotected_2x_steps", "dreambooth", False, True)] if long_attack else [])
    return [w for w in wanted if w[0] not in res]


def load_baseline(path: str, res: dict) -> dict:
    """The unprotected numbers from earlier ``bench protect-model`` JSONs, checked to be comparable with ``res``.

    ``path`` is one file or several separated by commas (e.g. one run that attacked with LoRA and one that
    attacked the other subject): each is checked on its own, their keys are joined, and a key two files both
    hold must have the same value in both (the attacks are deterministic, so comparable runs agree).

    Raises:
        ValueError: naming the file and what does not match (model, subjects, sample count, another file's value)
            or is missing (one of :data:`BASELINE_KEYS`; the attack-specific :data:`OPTIONAL_BASELINE_KEYS` pass
            through where present, and the bench runs the attacks the files lack).
    """
    import json

    # results written before attack overrides / other identifiers existed used the defaults
    defaults = {"attack_overrides": [], "other_identifier": "sks", "identifier": "sks", "attack_seeds": 1,
                "attack_photos": "same", "model_weights_digest": res.get("model_weights_digest")}  # (older: unchecked)
    wanted = BASELINE_KEYS + OPTIONAL_BASELINE_KEYS
    merged: dict = {}
    origin: dict[str, Path] = {}
    for f in [Path(p) for p in path.split(",") if p]:
        try:
            old = json.loads(f.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"{f}: cannot read the baseline result ({e})") from e
        for key in ("model_fingerprint", "model_weights_digest", "instruments_fingerprint", "subject_protected",
                    "subject_other",
                    "samples_per_prompt", "attack_overrides", "other_identifier", "identifier", "attack_seeds",
                    "attack_photos"):
            if old.get(key, defaults.get(key)) != res.get(key):
                raise ValueError(f"{f}: baseline was measured with {key}={old.get(key)!r}, this run has "
                                 f"{res.get(key)!r}")
        # with several runs per attack, their seeds' spacing makes other runs (one run is run 0 either way);
        # results written before attack_seed_stride existed spaced them 1 apart
        if res["attack_seeds"] > 1 and old.get("attack_seed_stride", 1) != res.get("attack_seed_stride", 1):
            raise ValueError(f"{f}: baseline ran its attacks with seeds {old.get('attack_seed_stride', 1)} apart "
                             f"(attack_seed_stride), this run {res.get('attack_seed_stride', 1)} apart: other draws; "
                             f"rerun without baseline= or with attack_seed_stride={old.get('attack_seed_stride', 1)}")
        for k in [k for k in wanted if k in old] + [f"{k}_runs" for k in wanted if f"{k}_runs" in old]:
            if k in merged and merged[k] != old[k]:
                raise ValueError(f"{f}: baseline has {k}={old[k]!r}, but {origin[k]} has {merged[k]!r}")
            merged[k], origin[k] = old[k], f
    missing = [k for k in BASELINE_KEYS if k not in merged]
    if missing:
        raise ValueError(f"{path}: baseline result lacks {', '.join(missing)}")
    out = {k: merged[k] for k in BASELINE_KEYS + OPTIONAL_BASELINE_KEYS if k in merged}
    out.update({f"{k}_runs": merged[f"{k}_runs"] for k in list(out) if f"{k}_runs" in merged})
    out["baseline_from"] = path
    return out
