"""``apdm bench protect-images``: image protection on the toy world (issue #6).

For held-out subjects (4 photos each) and every method m in ``methods`` (default ldu, aspl, advdm, photoguard; also
fsmg, sds, mist, pid, caat, metacloak, simac) at the budget
(8/255 unless ``budget=``): imperceptibility (``psnr_m``, ``ssim_m``, ``linf255_m``: the largest change over every
subject, in k/255, since 2026-12-07; before, the mean of each subject's largest), cost (``seconds_per_image_m``)
and protection: identity similarity (``ism@toy-id``) of DreamBooth generations trained on the protected photos
(``ism_db_m``), after JPEG-75 / blur / DiffPure purification of the protected photos, and with one clean photo
among them (``ism_db_m_one_clean``). With ``clean_references=true`` (the default without ``--quick``, since
2026-12-07; ``--quick`` leaves it off to stay within 10 minutes) each robustness attack is also run on the clean
photos (``ism_db_clean_jpeg75``, ``_blur``, ``_diffpure``), the reference that separates what the protection keeps
from what the transform alone does (on the toy world DiffPure alone lowers a DreamBooth attacker's ISM about as
much as it does after LDU). Each ``ism_db_*`` key has an ``fdfr_db_*`` twin (share of those generations the toy
detector rejects, ``fdfr@toy-det``). ``ism_db_clean`` and ``ism_class_prompt`` are the unprotected references.
LDU uses the ρ given by ``rho=`` (default: the toy world's shipped ρ; the JSON records its path and a digest of its
files). The protected photos are rounded to 8 bits, as the PNG files a user publishes (``eight_bit=false``: the
float photos, as every result before 2026-12-07; on LDU at 8/255 rounding costs about 0.2 dB of PSNR), with the
quantizer of ``apdm protect-images``' saved files (:func:`apdm.protect_images.budget.quantize_with_budget`), so a
fractional budget holds in the 8-bit photos too: at most floor(255 · budget) grey levels (12.75/255 -> 12). Until
2026-12-07 they were rounded to the nearest level, which could pass a fractional budget by a level (12.75/255 -> 13);
at a whole k/255 budget the photos are the same as before. ``psnr_m`` is the mean PSNR over the photos the method
changed (an unchanged photo's PSNR is infinite: ``budget=0``, a skipped photo), and ``psnr_m_n_identical`` counts
the unchanged ones (before 2026-12-07 one unchanged photo made ``psnr_m`` infinite, written as ``Infinity``, which
is not JSON); ``psnr_m`` is None where every photo is unchanged. The same holds for ``psnr_clean_{m}_{name}``.
Overrides: ``subjects=N samples=N methods=ldu,aspl robust_methods=ldu|none budget=8/255 rho=DIR <m>_steps=N
grid=DIR`` (``<m>_steps``: PGD or outer iterations of method m; by default ASPL and SimAC 20 / 50, AdvDM 50 / 100,
PhotoGuard 200 / 1000 and MetaCloak 100 / 400 (of its 2,400) with / without ``--quick``, the other methods their
published defaults; ASPL's, FSMG's (since 2026-12-07; before, Anti-DreamBooth's SD surrogate: 1,000 steps at lr
5e-7, 400× below the toy DreamBooth's rate), SimAC's and MetaCloak's surrogate is the toy DreamBooth without prior
preservation;
``sds_direction=-|+``, ``pid_loss=...``, ``simac_feature_weight=W`` and ``metacloak_pool_device=model|cpu`` as in
``apdm protect-images``; ``grid`` writes PNG grids of the first subject: protected photos, amplified perturbations
and DreamBooth samples per method), ``attacker=dreambooth|lora|ti|custom_diffusion`` (the evaluation attacker's toy
recipe, DreamBooth by default; the keys keep their ``ism_db_*`` names and the JSON records ``attacker``; the
surrogates of ASPL, FSMG, SimAC and MetaCloak stay DreamBooth, since a protector cannot know the attack),
``identifier=WORD`` (the attacker names the subject "a photo of WORD person" instead of the recipe's "sks"; ASPL's
simulated DreamBooth keeps "sks", since a protector cannot know the attacker's word)
and ``attack_seeds=K`` (every evaluation attack is run K times, run r with the attacker's seed and the sampling seed
raised by r · ``attack_seed_stride``, default 100,003: runs share no sampling noise or class image; 1 reproduces
results written before 2026-12-04; K is 1 by default with ``--quick``, 3 in the full run); each ``ism_db_*`` /
``fdfr_db_*`` key is then the mean over runs and subjects, ``<key>_runs`` lists each run's mean over subjects and
``<key>_se`` the standard error of that mean (:func:`apdm.bench.standard_error`); one toy DreamBooth attack is one draw,
docs/protect_model.md, "One attack is one draw"). With several subjects every key also has a ``<key>_subjects``
twin listing each subject's value (since 2026-12-07).

``workers=N`` runs the protections and attacks as N parallel processes (default 2 on a CPU with ≥ 2 cores, 1 on a
GPU; :mod:`apdm.bench.jobs`); ``seconds_per_image_m`` is then measured on one of N processes sharing the machine,
alike for every method.

Each DreamBooth attack costs ~1–3 min on 2 CPU cores (Custom Diffusion ~1 min), and the full grid is 1 + 5 attacks
per method and subject, plus 1 + 3 for the clean photos.
``--quick`` therefore runs the four robustness attacks (JPEG-75, blur, DiffPure, one clean photo) only for the
methods in ``robust_methods`` (default with ``--quick``: ``ldu`` when ``ldu`` is among ``methods``, else none; every
method without ``--quick``); every method still gets its fidelity, cost and plain ``ism_db_m``. ``methods=`` and
``robust_methods=`` name each method once (a repeated one is refused).

``purifiers='impress:steps=300;gridpure'`` adds model purifiers (:data:`apdm.attacks.transforms.MODEL_ATTACKS`,
specs separated by ``;``, none by default) to the robustness attacks: for the clean photos and for every method in
``robust_methods``, ``ism_db_{m}_{name}`` / ``fdfr_db_{m}_{name}`` (m = ``clean`` or the method) and
``psnr_clean_{m}_{name}``, the purified photos' PSNR to the clean photos (how much of the protection, and of the
photo, the purifier leaves). ``diffpure`` is refused there: the robustness attacks already include DiffPure at
strength 0.2 under ``ism_db_{m}_diffpure`` (for the clean photos with ``clean_references=true``), and a purifier of
that name wrote into the same keys, averaging two strengths; another DiffPure strength is measured by ``apdm
evaluate`` (``attacks=[..., "diffpure:strength=0.4"]``).

``metric_impl`` names the implementation of each key family (``linf255``: ``linf_255@apdm``).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from pathlib import Path

#: the keys the built-in robustness attacks write (``ism_db_{m}_{name}``): a purifier may not take these names
ROBUSTNESS_ATTACKS = ("jpeg75", "blur", "diffpure", "one_clean")


def bench_protect_images(quick: bool, overrides: list[str]) -> dict:
    from apdm.bench import (attack_config, attack_seed_stride, attack_seeds, check_subjects, identifier_option,
                            jobs, method_list, option_bool, option_int, submit_attack_runs, toy_setup)
    from apdm.attacks.diffpure import diffpure
    from apdm.attacks.transforms import MODEL_ATTACKS, check_attack, gaussian_blur, jpeg
    from apdm.bench.toy_world import METHOD_RECIPES, toy_recipe
    from apdm.core import diffusion as D
    from apdm.evaluation.fidelity import linf_255, ssim
    from apdm.evaluation.protocol import with_prompts
    from apdm.evaluation.run import apply_attack
    from apdm.protect_images import ldu
    from apdm.protect_images.baselines import METHOD_OPTIONS, METHODS, caat_personalization, check_method_option
    from apdm.protect_images.budget import format_budget, parse_budget
    from apdm.toy import instruments as I
    from apdm.toy.world import heldout_subjects, rho_path, toy_root
    from apdm.utils import LOG

    t_start = time.perf_counter()
    opts, sd, inst = toy_setup(overrides, {"budget", "subjects", "samples", "methods", "rho",
                                           *(f"{m}_steps" for m in METHODS), "robust_methods",
                                           "grid", "identifier", "attack_seeds", "attack_seed_stride", "attacker",
                                           "purifiers", "clean_references", "eight_bit", *METHOD_OPTIONS})
    budget = parse_budget(opts.get("budget", "8/255"))
    n_subjects = option_int(opts, "subjects", 1 if quick else 3)
    check_subjects(n_subjects)
    eight_bit = option_bool(opts, "eight_bit", True, "whether the protected photos are rounded to 8 bits, as the "
                            "PNG files a user publishes (false: the float photos, as before 2026-12-07)")
    n_samples = option_int(opts, "samples", 8 if quick else 16)
    methods = method_list(opts.get("methods", "ldu,aspl,advdm,photoguard"), ["ldu", *METHODS])
    # --quick: the robustness attacks for LDU only, and only where LDU is measured (before 2026-12-07 the default
    # named ldu even when it was not among methods, and every --quick run without ldu was refused)
    robust = opts.get("robust_methods", ("ldu" if "ldu" in methods else "none") if quick else ",".join(methods))
    robust = [] if robust in ("", "none") else method_list(robust, methods, "robust_methods", "not among methods:")
    clean_refs = option_bool(opts, "clean_references", not quick, "whether JPEG-75, blur and DiffPure also attack "
                             "the clean photos, the reference the robust methods are read against") and bool(robust)
    identifier, n_seeds = identifier_option(opts, "identifier"), attack_seeds(opts, quick)
    stride = attack_seed_stride(opts)
    attacker = opts.get("attacker", "dreambooth")
    if attacker not in METHOD_RECIPES:
        raise ValueError(f"attacker={attacker!r}: choose one of {', '.join(METHOD_RECIPES)} (the toy recipe the "
                         f"evaluation attack personalizes with)")
    purifiers, pur_names = check_purifiers(opts.get("purifiers", ""), MODEL_ATTACKS, check_attack)
    method_kw = {"aspl": {"steps": option_int(opts, "aspl_steps", 20 if quick else 50)},
                 "advdm": {"steps": option_int(opts, "advdm_steps", 50 if quick else 100)},
                 "photoguard": {"steps": option_int(opts, "photoguard_steps", 200 if quick else 1000)}}
    if "simac" in methods:  # ASPL's outer loop: as ASPL
        method_kw["simac"] = {"steps": option_int(opts, "simac_steps", 20 if quick else 50)}
    if "metacloak" in methods:  # its published 2,400 iterations would take ~55 min per subject here
        method_kw["metacloak"] = {"steps": option_int(opts, "metacloak_steps", 100 if quick else 400)}
    for m in methods:  # the other methods at their published defaults unless <m>_steps= is given
        if m != "ldu" and m not in method_kw and f"{m}_steps" in opts:
            method_kw[m] = {"steps": option_int(opts, f"{m}_steps", 0)}
    for key, (m, name, _) in METHOD_OPTIONS.items():
        if key in opts:  # checked here, before any work
            method_kw.setdefault(m, {})[name] = check_method_option(key, opts[key])
    res: dict = {"model": sd.source, "model_fingerprint": sd.fingerprint(),
                 "instruments_fingerprint": inst.config.get("fingerprint"),
                 "budget": format_budget(budget), "subjects": n_subjects, "eight_bit": eight_bit,
                 "samples_per_prompt": n_samples, "method_settings": method_kw, "robust_methods": robust,
                 "identifier": identifier, "attacker": attacker, "attack_seeds": n_seeds, "attack_seed_stride": stride,
                 "purifiers": purifiers, "clean_references": clean_refs}
    sample = toy_recipe("dreambooth").sample
    sample.num_images_per_prompt = n_samples
    db_cfg = toy_recipe("dreambooth").personalization  # the surrogate of ASPL, FSMG, SimAC, MetaCloak (CAAT's rate)
    attack_cfg = toy_recipe(attacker).personalization  # the evaluation attacker
    if "caat" in methods:  # CAAT's surrogate, as set per subject below
        res["caat_surrogate"] = {"learning_rate": db_cfg.learning_rate, "prompt": "the class prompt",
                                 "unet_trainable": caat_personalization().unet_trainable}

    shown: dict = {}      # first subject's protected photos and DreamBooth samples, for grid=DIR
    generated: dict = {}

    acc: dict[str, list[float]] = {}  # key -> one value per subject
    acc_runs: dict[str, list[list[float]]] = {}  # key -> per attack run, one value per subject

    def add(key, value):
        acc.setdefault(key, []).append(None if value is None else float(value))

    def add_psnr(key, clean_photos, photos):
        """``key``: the subject's mean PSNR over the photos that differ; ``key_n_identical``: those that do not."""
        value, n_identical = psnr_summary(clean_photos, photos)
        add(key, value)
        add(f"{key}_n_identical", n_identical)

    spec, workers = jobs.spec(sd), jobs.worker_count(opts, sd)
    res["workers"] = workers
    rho_dir = opts.get("rho", str(rho_path() or toy_root() / "rho"))
    if "ldu" in methods:  # a bad ρ folder fails here, before any work
        rho_dir = str(ldu.rho_folder(rho_dir))  # rho=toy: the folder it names (hashed below)
        jobs.cached(("rho", rho_dir), lambda: ldu.load_rho(rho_dir, device=sd.device))
        res["rho"] = {"path": rho_dir, "sha256": _folder_digest(Path(rho_dir))}  # which ρ produced the LDU numbers
    attacks: list[tuple[str, str | None, list]] = []  # (key, grid row or None, one future per attack run)

    def attack_db(pool, subj, train_images, key: str, keep: str | None = None) -> None:
        """DreamBooth on ``train_images`` (``n_seeds`` runs), as jobs; records ``ism_db_{key}`` and
        ``fdfr_db_{key}``; run 0's samples go to the grid."""
        futs = submit_attack_runs(pool, spec, None, train_images.cpu(), subj.references,
                                  attack_config(attack_cfg, subj, identifier), sample, n_seeds,
                                  keep_images=8 if keep and keep not in generated else 0, stride=stride,
                                  subject_class=subj.cls)
        if keep:
            generated.setdefault(keep, None)
        attacks.append((key, keep, futs))

    def purified(pool, subj, clean, images, m):
        """Each purifier on ``images`` (method m's protected photos, or m = clean): its DreamBooth attack
        (``ism_db_{m}_{name}``) and the purified photos' PSNR to the clean ones (``psnr_clean_{m}_{name}``)."""
        for spec_p, name in zip(purifiers, pur_names):
            out = apply_attack(images.cpu(), spec_p, sd, seed=0)
            add_psnr(f"psnr_clean_{m}_{name}", clean.cpu(), out)
            attack_db(pool, subj, out, f"{m}_{name}")
            LOG.info("subject %d, %s after %s: PSNR to the clean photos %s dB", subj.index, m, spec_p,
                     _db(acc[f"psnr_clean_{m}_{name}"][-1]))

    def robustness(pool, subj, clean, images, m):
        """The robustness attacks on ``images`` (method m's protected photos, or m = clean: the reference each
        method's row is read against, separating the protection from what the transform alone does):
        ``ism_db_{m}_jpeg75``, ``_blur``, ``_diffpure`` and the model purifiers."""
        attack_db(pool, subj, jpeg(images.cpu(), 75), f"{m}_jpeg75")
        attack_db(pool, subj, gaussian_blur(images.cpu(), 7), f"{m}_blur")
        attack_db(pool, subj, diffpure(images.to(sd.device), sd, strength=0.2), f"{m}_diffpure")
        purified(pool, subj, clean, images, m)

    cls_gen = D.generate(sd, ["a photo of a person"], n_samples, 25, 3.0, seed=123, quiet=True)
    with jobs.executor(workers) as pool:
        for subj in heldout_subjects(n_subjects, num_images=4):
            clean = subj.images.to(sd.device)
            add("ism_class_prompt", I.identity_similarity(inst.encoder, cls_gen, subj.references).mean())
            attack_db(pool, subj, clean, "clean", keep="clean")
            shown.setdefault("clean", clean.cpu())
            if clean_refs:  # each robustness attack also on the clean photos (since 2026-12-07)
                robustness(pool, subj, clean, clean, "clean")
            else:
                purified(pool, subj, clean, clean, "clean")
            kws = {}
            for m in methods:
                kw = dict(method_kw.get(m, {}))
                if m in ("aspl", "fsmg", "simac", "metacloak"):  # the toy DreamBooth (FSMG's steps, MetaCloak's span)
                    kw["personalization"] = dataclasses.replace(
                        with_prompts(db_cfg, subj.instance_prompt, subj.class_prompt), with_prior_preservation=False)
                if m == "caat":  # CAAT's surrogate at the toy DreamBooth's learning rate (tiny models need larger)
                    kw["personalization"] = caat_personalization(
                        method_kw.get("caat", {}).get("steps", 250), db_cfg.learning_rate, subj.class_prompt)
                kws[m] = kw
            protections = {m: pool.submit(_protect_job, spec, m, rho_dir, clean.cpu(), budget, kws[m])
                           for m in methods}
            for m in methods:
                prot, seconds = protections[m].result()
                if eight_bit:  # what a user publishes and an attacker reads: 8-bit files (the photos are 8-bit)
                    prot = eight_bit_photos(prot, clean.cpu(), budget)
                prot = prot.to(sd.device)
                add(f"seconds_per_image_{m}", seconds / len(clean))
                add_psnr(f"psnr_{m}", clean.cpu(), prot.cpu())
                add(f"ssim_{m}", ssim(clean.cpu(), prot.cpu()).mean())
                add(f"linf255_{m}", linf_255(clean.cpu(), prot.cpu()).max())  # unrounded: 1.6/255 stays 1.6
                attack_db(pool, subj, prot, m, keep=m)
                LOG.info("subject %d, %s: PSNR %s dB, %.2f s per image", subj.index, m, _db(acc[f"psnr_{m}"][-1]),
                         acc[f"seconds_per_image_{m}"][-1])
                shown.setdefault(m, prot.cpu())
                if m not in robust:
                    continue
                robustness(pool, subj, clean, prot, m)
                mixed = prot.clone()
                mixed[0] = clean[0]
                attack_db(pool, subj, mixed, f"{m}_one_clean")
        for key, keep, futs in attacks:  # in submission order, so per-subject lists line up
            outs = [fut.result() for fut in futs]
            for name in ("ism", "fdfr"):
                values = [o[name] for o in outs]
                add(f"{name}_db_{key}", statistics.mean(values))
                runs = acc_runs.setdefault(f"{name}_db_{key}", [[] for _ in values])
                for r, v in enumerate(values):
                    runs[r].append(float(v))
            if keep and outs[0]["images"] is not None:
                generated[keep] = outs[0]["images"]
    generated = {k: v for k, v in generated.items() if v is not None}
    res.update(summarize(acc, acc_runs, n_seeds))
    if "ldu" in methods and "aspl" in methods:
        res["speedup_ldu_vs_aspl"] = round(res["seconds_per_image_aspl"] / max(1e-9, res["seconds_per_image_ldu"]), 1)
    if "grid" in opts:
        _write_grids(Path(opts["grid"]), shown, generated, budget, methods)
        res["grids"] = opts["grid"]
    res["metric_impl"] = {"ism": "ism@toy-id", "fdfr": "fdfr@toy-det", "psnr": "psnr@torchmetrics",
                          "ssim": "ssim@apdm", "linf255": LINF255_IMPL}
    res["seconds_total"] = round(time.perf_counter() - t_start, 1)
    return res


def summarize(acc: dict[str, list[float]], acc_runs: dict[str, list[list[float]]], n_seeds: int) -> dict:
    """The bench's keys from its per-subject values: ``key`` the mean over subjects (``acc[key]``, one value per
    subject, each the mean over its attack runs); with several subjects ``key_subjects`` lists them; with
    ``n_seeds`` > 1, ``key_runs`` is each attack run's mean over subjects (``acc_runs[key][r]``) and ``key_se`` the
    standard error of their mean. Values rounded to 4 decimals. ``linf255_*`` keys are the budget check: the largest
    over subjects, not the mean; ``*_n_identical`` keys are counts, summed over subjects. A subject's ``None`` (a PSNR
    of photos all unchanged) is left out of the mean (``None`` when every subject's is)."""
    from apdm.bench import standard_error

    res: dict = {}
    for k, v in acc.items():
        known = [x for x in v if x is not None]
        if k.endswith("_n_identical"):
            res[k] = int(sum(known))
        elif not known:
            res[k] = None
        else:
            res[k] = round(max(known) if k.startswith("linf255_") else statistics.mean(known), 4)
        if len(v) > 1:
            res[f"{k}_subjects"] = [None if x is None else int(x) if k.endswith("_n_identical") else round(x, 4)
                                    for x in v]
        if n_seeds > 1 and k in acc_runs:
            res[f"{k}_runs"] = [round(statistics.mean(run), 4) for run in acc_runs[k]]
            res[f"{k}_se"] = standard_error(res[f"{k}_runs"])
    return res


#: the implementation tag of ``linf255_*`` (what :func:`apdm.evaluation.fidelity.linf_255`'s record names)
LINF255_IMPL = "linf_255@apdm"


def check_purifiers(text: str, model_attacks, check_attack) -> tuple[list[str], list[str]]:
    """``purifiers='impress:steps=300;gridpure'`` -> (specs, names): each a model attack of ``model_attacks`` given at
    most once, checked by ``check_attack(spec, loadable=True)``, and none named like a built-in robustness attack
    (:data:`ROBUSTNESS_ATTACKS`), whose ``ism_db_{m}_{name}`` keys it would share.

    Raises:
        ValueError: naming the option and what to give instead.
    """
    purifiers = [p.strip() for p in text.split(";") if p.strip()]
    names = [p.partition(":")[0].strip().lower() for p in purifiers]
    taken = [n for n in names if n in ROBUSTNESS_ATTACKS]
    if taken:
        raise ValueError(f"purifiers={text!r}: {', '.join(taken)} is already one of the robustness attacks "
                         f"({', '.join(ROBUSTNESS_ATTACKS)}): the robustness rows include DiffPure at strength 0.2 "
                         f"(ism_db_<m>_diffpure, for every method in robust_methods, and for the clean photos with "
                         f"clean_references=true), and a purifier of the same name would write into those keys. "
                         f"Leave it out of purifiers=; for another DiffPure strength run apdm evaluate with "
                         f"attacks=[..., \"diffpure:strength=0.4\"]")
    for p in purifiers:
        check_attack(p, loadable=True)
    if len(set(names)) != len(names) or any(n not in model_attacks for n in names):
        raise ValueError(f"purifiers={text!r}: give each model attack ({', '.join(model_attacks)}) "
                         f"at most once, specs separated by ';', e.g. purifiers='impress:steps=300;gridpure'")
    return purifiers, names


def eight_bit_photos(protected, clean, budget: float):
    """Protected photos ``(N,3,H,W)`` in [0,1] as the 8-bit files a user publishes: ``q / 255`` with ``q`` from
    :func:`apdm.protect_images.budget.quantize_with_budget` (the quantizer of ``apdm protect-images``' saved files),
    so no grey level leaves the budget around the clean photos ``clean`` (a fractional budget b allows
    floor(255 · b) levels). The photos are first rounded to the nearest level half to even, as the bench did before
    2026-12-07, so at a whole k/255 budget (every documented run) the photos are bit for bit the same as before;
    the quantizer's own rounding (half up) differs from that only at exact half-level ties. Float32, on CPU."""
    from apdm.protect_images.budget import quantize_with_budget

    nearest = (protected.detach().float().cpu() * 255).round() / 255
    return quantize_with_budget(nearest, clean.detach().float().cpu(), budget).float() / 255


def _db(value: float | None) -> str:
    """A PSNR for the log: one decimal, or "unchanged" (every photo identical)."""
    return "unchanged (inf)" if value is None else f"{value:.1f}"


def psnr_summary(clean, photos) -> tuple[float | None, int]:
    """(mean PSNR over the pairs that differ, number of identical pairs), as the ``psnr@torchmetrics`` record of
    :func:`apdm.evaluation.fidelity.psnr_record` (an identical pair's PSNR is infinite and left out of the mean; mean
    None when every pair is identical). The mean is the float32 mean of the per-image values, as the bench computed
    it before 2026-12-07, so a result without identical pairs keeps its numbers."""
    import torch

    from apdm.evaluation.fidelity import psnr

    values = psnr(clean, photos)
    finite = values[torch.isfinite(values)]
    return (float(finite.mean()) if finite.numel() else None), int(values.numel() - finite.numel())


def _folder_digest(folder: Path) -> str:
    """A short SHA-256 over the names and bytes of a folder's files (e.g. a ρ's weights and config)."""
    import hashlib

    from apdm.utils import file_sha256

    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(folder).as_posix()}:{file_sha256(f)}\n".encode())
    return h.hexdigest()[:16]


def _protect_job(spec, method: str, rho_dir: str, clean, budget: float, kw: dict):
    """Protect the photos ``clean`` ((N,3,H,W) in [0,1]) with ``method``; returns (protected photos (CPU),
    seconds)."""
    from apdm.bench import jobs
    from apdm.protect_images import ldu
    from apdm.protect_images.baselines import METHODS

    sd = jobs.model(spec)
    clean = clean.to(sd.device)
    rho = jobs.cached(("rho", rho_dir), lambda: ldu.load_rho(rho_dir, device=sd.device)) if method == "ldu" else None
    t0 = time.perf_counter()
    if method == "ldu":
        prot = ldu.apply(sd, rho, clean, budget, quiet=True)
    else:
        prot = METHODS[method](sd, clean, budget=budget, quiet=True, **kw)
    seconds = time.perf_counter() - t0
    return prot.detach().clamp(0, 1).cpu(), seconds


def _write_grids(folder: Path, shown: dict, generated: dict, budget: float, methods: list[str]) -> None:
    """Rows: clean then each method. ``protected.png`` (the 4 photos), ``perturbation.png`` (|x̄ − x| scaled so
    that the budget is white), ``dreambooth.png`` (8 DreamBooth samples trained on those photos)."""
    import torch

    from apdm.core.images import save_grid

    folder.mkdir(parents=True, exist_ok=True)
    rows = ["clean", *[m for m in methods if m in shown]]
    clean = shown["clean"]
    save_grid(torch.cat([shown[r] for r in rows]), folder / "protected.png", nrow=clean.shape[0])
    pert = [((shown[r] - clean).abs() / budget).clamp(0, 1) for r in rows[1:]]
    if pert:
        save_grid(torch.cat(pert), folder / "perturbation.png", nrow=clean.shape[0])
    gens = [generated[r] for r in rows if r in generated]
    save_grid(torch.cat(gens), folder / "dreambooth.png", nrow=gens[0].shape[0])
