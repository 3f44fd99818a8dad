"""``apdm protect-model``: produce a protected checkpoint (diffusers folder, safetensors) with a model card."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from apdm.config import ProtectModelRunConfig, to_yaml
from apdm.utils import LOG, atomic_dir, atomic_write_json, atomic_write_text, dtype_name, peak_rss_mb, seed_everything

#: how the log names the x⁺ images: with APDM steps they are the DPO pairs' winners; the encoder trap alone
#: (``protect.outer_steps=0``) uses them as kept images and decoy candidates (or decoys, with targets=paired)
PAIRED_WHAT = {True: "paired images (the DPO pairs' x⁺, one per photo)",
               False: "generic images (the encoder trap's decoy candidates and kept images, one per photo)"}


def paired_decoys(cfg: ProtectModelRunConfig) -> str:
    """What the encoder trap's ``targets=paired`` decoys are, for the log and the card: the DPO pairs' x⁺, or with
    the trap alone (``protect.outer_steps=0``) the same images under their plain name."""
    return "the DPO pairs' x⁺" if cfg.protect.outer_steps > 0 else "the base model's generic images of the class prompt"


def protection_images(sd, per_cfg, class_prompt: str, num_class_images: int, num_paired: int,
                      quiet: bool = False, weights_key: str | None = None, dpo: bool = True):
    """The class-prompt images a protection needs from the base model, generated once and cached.

    Whatever the simulated attacker (LoRA without prior preservation, TI), L_ppl and the DPO winners need them,
    so they are always made with the attacker's class-sampling settings and prior preservation on.

    Returns:
        (class_images, paired): (num_class_images,3,H,W) prior images of ``class_prompt`` and (num_paired,3,H,W)
        x⁺ images, one per subject photo, from another seed; both in [0,1] on the CPU.

    ``weights_key``: ``sd.weights_digest()`` when the caller has it (it reads every weight: once per run, not
    once per image set). ``dpo``: whether APDM steps run (only the log's name of the x⁺ images depends on it; the
    images are the same, and the encoder trap uses them either way).
    """
    weights_key = weights_key or sd.weights_digest()
    return (base_model_images(sd, per_cfg, class_prompt, num_class_images, quiet=quiet, weights_key=weights_key),
            base_model_images(sd, per_cfg, class_prompt, num_paired, PAIRED_SEED, quiet,
                              PAIRED_WHAT[dpo], weights_key))


#: offsets from ``personalization.seed`` of the seeds of the base model's images other than the class images: the
#: x⁺ images and ``encoder_trap.keep_generated``'s, so that no two sets share an image
PAIRED_SEED, KEEP_GENERATED_SEED = 7777, 3333


def base_model_images(sd, per_cfg, class_prompt: str, n: int, seed_offset: int = 0, quiet: bool = False,
                      what: str = "class images", weights_key: str | None = None):
    """``n`` images of ``class_prompt`` from the base model ``sd`` with the attacker's class-sampling settings
    (:func:`apdm.personalization.simulator.class_images_for`, cached), drawn ``seed_offset`` above the class
    images of seed ``per_cfg.seed`` (so that no two sets share an image), made
    whatever the attacker's method and prior-preservation setting; (n,3,H,W) in [0,1] on the CPU."""
    from apdm.personalization.simulator import class_images_for

    return class_images_for(sd, dataclasses.replace(per_cfg, class_prompt=class_prompt, num_class_images=n,
                                                    with_prior_preservation=True, method="dreambooth"),
                            quiet=quiet, what=what, weights_key=weights_key, seed_offset=seed_offset)


def generated_keep_images(sd, per_cfg, class_prompts: list[str], n: int, quiet: bool = False,
                          weights_key: str | None = None):
    """``encoder_trap.keep_generated``: ``n`` class-prompt images of the base model per distinct class prompt, for
    the encoder trap to keep, generated (and cached) like the class images but from another seed, so that neither
    the class images nor the x⁺ images change. Returns (n·P,3,H,W) in [0,1] on the CPU, or None for ``n`` = 0."""
    import torch

    if n <= 0:
        return None
    key = weights_key or sd.weights_digest()
    return torch.cat([base_model_images(sd, per_cfg, p, n, KEEP_GENERATED_SEED, quiet,
                                        "generated images to keep (encoder_trap.keep_generated)", key)
                      for p in dict.fromkeys(class_prompts)])


def load_subjects(sd, cfg: ProtectModelRunConfig, quiet: bool = False, weights_key: str | None = None):
    """Load each subject's photos and generate (or reuse cached) class and paired images from the base model
    (``weights_key``: its ``weights_digest()`` when the caller has it)."""
    from apdm.core.images import split_spec
    from apdm.protect_model.l2p import Subject

    check_subjects_given(cfg)
    size = cfg.resolution or sd.resolution
    subjects, skipped = [], []
    weights_key = weights_key or sd.weights_digest()  # the base model's, read once for all subjects
    for k, sc in enumerate(cfg.subjects):
        images, ok, errors = load_named(f"subjects[{k}].instance_data", sc.instance_data, size=size)
        skipped += errors
        if not ok:
            raise ValueError(f"subjects[{k}]: no usable images in {sc.instance_data}")
        instance_prompt = sc.instance_prompt or cfg.personalization.instance_prompt
        class_prompt = sc.class_prompt or cfg.personalization.class_prompt
        class_images, paired = protection_images(sd, cfg.personalization, class_prompt,
                                                 cfg.protect.num_class_images, len(ok), quiet=quiet,
                                                 weights_key=weights_key, dpo=cfg.protect.outer_steps > 0)
        src = split_spec(sc.instance_data)
        subjects.append(Subject(name=Path(str(src)).name if isinstance(src, str) else f"subject{k}",
                                images=images.to(sd.device), paired=paired.to(sd.device),
                                class_images=class_images.to(sd.device), instance_prompt=instance_prompt,
                                class_prompt=class_prompt))
        LOG.info("subject %d: %d photos from %s, prompt '%s'", k, len(ok), sc.instance_data, instance_prompt)
    return subjects, skipped


def load_keep_images(spec: str, size: int, quiet: bool = False):
    """``encoder_trap.keep_images``: the photos whose latents the trapped encoder must keep.

    Args:
        spec: a folder (searched with its sub-folders: a photo collection), or comma-separated files / folders /
            globs; empty = none.
        size: model resolution (images are resized and center-cropped to it).

    Returns:
        ((K,3,size,size) in [0,1] on the CPU, or None when ``spec`` is empty; the skipped files as
        ``{"path", "error"}``).

    Raises:
        ValueError: when ``spec`` names no usable image.
    """
    if not spec:
        return None, []
    images, ok, errors = load_named("encoder_trap.keep_images", spec, size=size, recursive=True, quiet=quiet)
    if not ok:
        raise ValueError(f"encoder_trap.keep_images: no usable images in {spec}")
    LOG.info("encoder trap: %d photos to keep from %s", len(ok), spec)
    return images, errors


def load_held_back(cfg: ProtectModelRunConfig, size: int, quiet: bool = False):
    """``subjects[k].check_data``: photos of each subject held back from the protection, to check the encoder trap
    on photos it never saw (as an attacker's own photos would be).

    Args:
        size: model resolution (images are resized and center-cropped to it).

    Returns:
        (one (M,3,size,size) tensor in [0,1] on the CPU, or None, per subject; the skipped files as
        ``{"path", "error"}``).

    Raises:
        ValueError: when a subject's ``check_data`` names no usable image, or a file that is also one of its
            training photos (the check would then measure nothing new).
    """
    from apdm.core.images import list_images, split_spec

    held, skipped = [], []
    for k, sc in enumerate(cfg.subjects):
        if not sc.check_data:
            held.append(None)
            continue
        images, ok, errors = load_named(f"subjects[{k}].check_data", sc.check_data, size=size, quiet=quiet)
        train = list_images(split_spec(sc.instance_data)) if sc.instance_data else []  # empty: load_subjects says so
        both = sorted({p.resolve() for p in ok} & {p.resolve() for p in train})
        if both:
            raise ValueError(f"subjects[{k}].check_data: {', '.join(map(str, both))} also in its instance_data; "
                             "held-back photos must be photos the protection does not train on")
        skipped += errors
        if not ok:
            raise ValueError(f"subjects[{k}].check_data: no usable images in {sc.check_data}")
        LOG.info("subject %d: %d held-back photos from %s to check the encoder trap with (never trained on)", k,
                 len(ok), sc.check_data)
        held.append(images)
    return held, skipped


#: below this share of the trained photos' latent change, the trap is said not to reach the held-back photos
#: (docs/protect_model.md, "Checking the trap on held-back photos": measured on the toy world)
HELD_BACK_WARN = 0.75
#: below this latent change of its own trained photos the trap did not send them to their decoys (≈ 1 when it did;
#: 0.47-0.57 were the weakest traps of the toy world's tables that still moved photos): a reach is then meaningless
TRAINED_FLOOR = 0.4
#: above this share of the protected photos' latent change, the images the trap was to keep moved with them: the
#: trap is not specific to the subjects
KEPT_MOVED_WARN = 0.5


def check_keep_apart(keep_images, subjects: list, held: list) -> None:
    """Refuse a keep set (``encoder_trap.keep_images``) that holds a protected subject's photo or held-back photo
    (compared by content, so a copy under another name counts): the trap would be asked to send the photo to its
    decoy and to leave it alone, and a held-back photo trained on makes the held-back check meaningless.

    Raises:
        ValueError: naming how many of the keep set's photos are whose.
    """
    if keep_images is None:
        return
    from apdm.protect_model.l2p import tensor_digest

    def digests(images) -> set[str]:
        return {tensor_digest(x[None].float().cpu()) for x in images} if images is not None else set()

    keep = [tensor_digest(x[None].float().cpu()) for x in keep_images]
    for k, s in enumerate(subjects):
        for what, own in (("photos", digests(s.images)), ("held-back photos (check_data)", digests(held[k]))):
            n = sum(d in own for d in keep)
            if n:
                raise ValueError(f"encoder_trap.keep_images holds {n} of subject {k}'s ({s.name}) {what}: the trap "
                                 "would be told to move them and to keep them; keep other people's photos only")


def check_held_back(vae_ref, trapped, subjects: list, held: list, batch: int = 32) -> list[dict]:
    """The encoder trap on each subject's held-back photos (:func:`load_held_back`) against its trained photos:
    their mean :func:`~apdm.protect_model.encoder_trap.latent_change` (``batch`` images per encoder call) and the
    ratio held-back / trained, logged in words, with a warning when the ratio is below ``HELD_BACK_WARN``.

    Returns:
        one dict per subject with held-back photos: ``index``, ``subject``, ``images``, ``latent_change``,
        ``latent_change_trained``, ``reach`` (the ratio), ``metric_impl``.
    """
    from apdm.protect_model.encoder_trap import latent_change

    rows = []
    for k, (s, h) in enumerate(zip(subjects, held)):
        if h is None:
            continue
        seen = float(latent_change(vae_ref, trapped, s.images, batch).mean())
        unseen = float(latent_change(vae_ref, trapped, h.to(s.images.device), batch).mean())
        # a ratio of two tiny numbers says nothing: a trap that moved nothing read 100 %
        reach = unseen / seen if seen >= TRAINED_FLOOR else None
        rows.append({"index": k, "subject": s.name, "images": int(h.shape[0]), "latent_change": round(unseen, 4),
                     "latent_change_trained": round(seen, 4), "reach": None if reach is None else round(reach, 3),
                     "metric_impl": "latent_change@apdm"})
        LOG.info("encoder trap check, subject %d (%s): its %d held-back photos moved %.2f, its trained photos %.2f "
                 "(%s)", k, s.name, h.shape[0], unseen, seen, "no reach" if reach is None else f"{100 * reach:.0f} %")
        if reach is None:
            LOG.warning("encoder trap: subject %d (%s): its own trained photos moved only %.2f (about 1 when they "
                        "land on their decoys; below %.1f the trap did not take): the held-back check means nothing. "
                        "Train the trap longer or at a higher encoder_trap.learning_rate", k, s.name, seen,
                        TRAINED_FLOOR)
        elif reach < HELD_BACK_WARN:
            LOG.warning("encoder trap: subject %d (%s): photos it never saw moved only %.0f %% as far as its trained "
                        "photos (below %.0f %%): other photos of this person may personalize almost as before. "
                        "Protect with more photos (16 held on the toy world) or with encoder_trap.synthetic_photos",
                        k, s.name, 100 * reach, 100 * HELD_BACK_WARN)
    return rows


def trap_views(sd, subjects: list, cfg: ProtectModelRunConfig, cache_dir: Path, embed=None,
               weights_key: str | None = None) -> list | None:
    """``encoder_trap.synthetic_photos`` pictures of each subject (:func:`apdm.protect_model.encoder_trap.
    synthetic_views`, chosen by the recognizer ``embed`` (:func:`~apdm.protect_model.encoder_trap.trap_embedder`)
    when given), kept in ``cache_dir`` (safetensors) so that a resumed run reuses them; None when off.

    Returns:
        one (V,3,H,W) tensor in [0,1] on the CPU per subject.
    """
    tc = cfg.encoder_trap
    if tc.synthetic_photos <= 0:
        return None
    from safetensors import safe_open
    from safetensors.torch import save

    from apdm.protect_model.encoder_trap import synthetic_views
    from apdm.utils import atomic_write_bytes

    per = cfg.personalization
    if embed is None:
        LOG.warning("encoder trap: the synthetic pictures are not screened (no face recognizer: set "
                    "encoder_trap.identity); a personalization that misses the subject teaches the trap other people")
    import hashlib

    from apdm.protect_model.l2p import tensor_digest

    count = f"{tc.synthetic_photos}x{tc.synthetic_pool if embed is not None else 1}" + (
        f"x{tc.synthetic_copies}c" if tc.synthetic_copies > 1 else "")
    model = weights_key or sd.weights_digest()  # once: it reads every weight
    views = []
    for k, s in enumerate(subjects):
        path = cache_dir / f"views_{k}.safetensors"
        # everything the pictures depend on: a cache of another person's (changed photos, reordered subjects) or of
        # another personalization, seed or recognizer was reused before, and the trap sent the wrong pictures
        made_of = json.dumps({"photos": tensor_digest(s.images), "prompts": [s.instance_prompt, s.class_prompt],
                              "personalization": dataclasses.asdict(per), "seed": cfg.seed + k,
                              "model": model, "identity": tc.identity if embed is not None else None},
                             sort_keys=True, default=str)
        key = f"{count}-{hashlib.sha256(made_of.encode()).hexdigest()[:16]}"
        v = None
        if path.is_file():
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("request") == key:
                    v = f.get_tensor("views")
                else:
                    LOG.info("encoder trap: the cached pictures %s were made for other photos or settings; making "
                             "them again", path)
        if v is None:
            LOG.info("encoder trap: %d pictures of %s from %s of the model personalized on its %d photos (%s, "
                     "%d steps), prompt '%s'", tc.synthetic_photos, s.name,
                     f"{tc.synthetic_copies} copies" if tc.synthetic_copies > 1 else "a copy", s.images.shape[0],
                     per.method, per.steps, s.instance_prompt)
            v = synthetic_views(sd, s, per, tc.synthetic_photos, seed=cfg.seed + k, quiet=cfg.quiet, embed=embed,
                                pool=tc.synthetic_pool, copies=tc.synthetic_copies)
            cache_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, save({"views": v.contiguous()}, metadata={"request": key}))
        views.append(v)
    return views


TRAP_GROUPS = {"protected_photos": "the protected photos", "class_images": "the class images it keeps",
               "keep_images": "the keep_images photos", "keep_generated": "the generated images it keeps",
               "synthetic_views": "the synthetic pictures"}


def log_trap_report(vae_ref, trapped, subjects: list, keep_images, views: list | None = None,
                    generated=None, batch: int = 32) -> dict:
    """:func:`apdm.protect_model.encoder_trap.trap_report` on the images the trap trained with (the subjects'
    photos, their class images, ``keep_images``, the ``keep_generated`` images ``generated``, the synthetic
    ``views``; ``batch`` images per VAE call), logged in words; returned for protect_log.json and the card."""
    import torch

    from apdm.protect_model.encoder_trap import trap_report

    dev = trapped.device
    report = trap_report(vae_ref, trapped, {
        "protected_photos": torch.cat([s.images for s in subjects]).to(dev),
        "class_images": torch.cat([s.class_images for s in subjects]).to(dev),
        "keep_images": None if keep_images is None else keep_images.to(dev),
        "keep_generated": None if generated is None else generated.to(dev),
        "synthetic_views": None if not views else torch.cat(views).to(dev)}, batch)
    LOG.info("encoder trap check (latent change ‖μ_trapped − μ_original‖ / ‖μ_original‖: ≈ 1 sent to a decoy, "
             "≈ 0 left alone): %s", "; ".join(f"{TRAP_GROUPS[k]} {v['latent_change']:.2f}" for k, v in report.items()))
    LOG.info("encoder trap check (encode → decode PSNR, original → trapped encoder; what img2img / inpainting with "
             "this checkpoint start from; and the PSNR between the two encoders' decoded pictures, the change "
             "itself): %s", "; ".join(
                 f"{TRAP_GROUPS[k]} {v['recon_psnr_base']:.1f} → {v['recon_psnr_trapped']:.1f} dB, changed "
                 + (f"at {v['decode_change_psnr']:.1f} dB" if v["decode_change_psnr"] is not None else "not at all")
                 for k, v in report.items() if k != "protected_photos"))
    moved = report["protected_photos"]["latent_change"]
    if moved < TRAINED_FLOOR:
        LOG.warning("encoder trap: the protected photos moved only %.2f (about 1 when they land on their decoys): "
                    "the trap did not take; train it longer or at a higher encoder_trap.learning_rate", moved)
    for k, v in report.items():
        if k not in ("protected_photos", "synthetic_views") and v["latent_change"] > KEPT_MOVED_WARN * moved:
            LOG.warning("encoder trap: %s moved %.2f, more than %.0f %% of the protected photos' %.2f: the trap is "
                        "not specific to the subjects (other people's images encode differently too); lower "
                        "encoder_trap.learning_rate or raise its keep weight", TRAP_GROUPS[k], v["latent_change"],
                        100 * KEPT_MOVED_WARN, moved)
    return report


def save_decoys(folder: Path, chosen: list[dict], recognizer: str) -> list[dict]:
    """Write the decoys the encoder trap sends each subject's photos to as ``folder/subject{k}_decoy{j}.png``
    (generic class images of the base model, not the subject's photos: outside ``model/``, for the provider to see
    what the photos now encode as).

    Args:
        chosen: :func:`apdm.protect_model.encoder_trap.trap_encoder`'s decoys, one dict per subject.
        recognizer: the implementation tag of the face recognizer that chose them ("" if none did).

    Returns:
        One JSON-ready dict per subject (for protect_log.json and the model card): ``index``, ``subject``,
        ``files``, ``cosines`` (None unless a recognizer chose) and ``recognizer``.
    """
    from apdm.core.images import save_image

    rows = []
    with atomic_dir(folder) as tmp:  # the whole folder at once: no decoy of an earlier run is left beside these
        for k, c in enumerate(chosen):
            files = [save_image(img, tmp / f"subject{k}_decoy{j}.png").name for j, img in enumerate(c["images"])]
            rows.append({"index": k, "subject": c["subject"], "files": files, "cosines": c["cosines"],
                         "recognizer": recognizer if c["cosines"] is not None else ""})
    if rows:
        LOG.info("encoder trap: %d decoy image(s) written to %s", sum(len(r["files"]) for r in rows), folder)
    return rows


def load_named(key: str, spec, list_only: bool = False, **kw):
    """:func:`apdm.core.images.load_spec` of the photos the setting ``key`` names (``subjects[0].instance_data``),
    or with ``list_only`` just their list; a missing folder or file raises FileNotFoundError naming ``key``
    (``subjects[0].instance_data: input '…/trian' does not exist``)."""
    from apdm.core.images import list_images, load_spec, split_spec

    try:
        if list_only:
            return list_images(split_spec(spec), recursive=kw.get("recursive", False))
        return load_spec(spec, **kw)
    except FileNotFoundError as exc:
        raise FileNotFoundError(f"{key}: {exc}") from None


def check_subjects_given(cfg: ProtectModelRunConfig) -> None:
    """Raise ValueError when the config names no subject, or a subject without ``instance_data``."""
    if not cfg.subjects:
        raise ValueError("no subjects to protect: set subjects=[{instance_data: DIR, instance_prompt: ..., "
                         "class_prompt: ...}] in the recipe")
    for k, sc in enumerate(cfg.subjects):
        if not sc.instance_data:
            raise ValueError(f"subjects[{k}].instance_data is empty")


def check_inputs(cfg: ProtectModelRunConfig) -> None:
    """Raise, before the model loads, when a photo setting the run will read names nothing: each subject's
    ``instance_data`` and, with the encoder trap, its ``check_data`` and ``encoder_trap.keep_images`` (listed only,
    as :func:`apdm.core.images.list_images` does; the photos load later). The message names the setting
    (``subjects[0].instance_data: input '…/trian' does not exist``), found in seconds, not after subject 0's class
    images."""
    check_subjects_given(cfg)
    trap = cfg.encoder_trap.steps > 0
    specs = []
    for k, sc in enumerate(cfg.subjects):
        specs.append((f"subjects[{k}].instance_data", sc.instance_data, False))
        if trap and sc.check_data:
            specs.append((f"subjects[{k}].check_data", sc.check_data, False))
    if trap and cfg.encoder_trap.keep_images:
        specs.append(("encoder_trap.keep_images", cfg.encoder_trap.keep_images, True))
    for key, spec, recursive in specs:
        load_named(key, spec, recursive=recursive, list_only=True)


def check_extras(cfg: ProtectModelRunConfig, attackers: list) -> None:
    """Raise :class:`apdm.utils.MissingDependency` before the model loads when an optional package the run will
    need is not installed: the trap's face recognizer (:func:`~apdm.protect_model.encoder_trap.check_trap_extras`)
    and bitsandbytes for an ``adamw8bit`` optimizer (θ's, ``protect.optimizer``; the simulated ``attackers``' with
    inner steps; the copy personalized for ``encoder_trap.synthetic_photos``). Otherwise the run stops with the same
    message after the class images, the DPO pairs (minutes on SD) or the protection (hours)."""
    from apdm.evaluation.protocol import check_optimizer_extra
    from apdm.protect_model.encoder_trap import check_trap_extras

    p, trap = cfg.protect, cfg.encoder_trap
    check_optimizer_extra(p.optimizer, "protect.optimizer")
    if p.outer_steps > 0 and p.inner_steps > 0:
        for k, per in enumerate(attackers):
            check_optimizer_extra(per.optimizer, "personalization.optimizer" if k == 0
                                  else f"protect.attacker_mix[{k - 1}]'s optimizer")
    if trap.steps > 0 and trap.synthetic_photos > 0:
        check_optimizer_extra(cfg.personalization.optimizer, "personalization.optimizer")
    check_trap_extras(trap)


def check_output_dir(cfg: ProtectModelRunConfig) -> None:
    """Raise ValueError, before any work, when the protected model would overwrite its own source: when
    ``output_dir/model`` is the local ``model.path`` folder, lies inside it or holds it, or when ``output_dir`` lies
    inside it (the model folder is replaced as a whole when the run ends). A hub id or ``tiny`` is never checked."""
    src = Path(cfg.model.path).expanduser()
    if not src.is_dir():
        return
    src, out = src.resolve(), Path(cfg.output_dir).expanduser().resolve()
    model = out / "model"
    if out.is_relative_to(src) or model.is_relative_to(src) or src.is_relative_to(model):
        raise ValueError(f"output_dir={cfg.output_dir} would overwrite the source model model.path={cfg.model.path}: "
                         f"the protected model is written to {model}, and {src} is the source model folder; choose "
                         "an output_dir outside the source model folder")


def run_identity(cfg: ProtectModelRunConfig) -> dict:
    """What decides a protect-model run's output, recorded in ``protect_log.json`` so that a rerun can tell it has
    nothing to do: the config without what does not change the model (``quiet``, ``output_dir``,
    ``protect.resume``, ``protect.checkpoint_every``), the source model's files (:func:`model_fingerprint`) and the
    SHA-256 of every photo the run reads (the subjects', their held-back photos, ``encoder_trap.keep_images``)."""
    from apdm.config import to_dict
    from apdm.core import distributed
    from apdm.core.images import list_images, split_spec
    from apdm.core.models import model_fingerprint
    from apdm.utils import file_sha256

    settings = to_dict(cfg)
    for key in ("quiet", "output_dir"):
        settings.pop(key, None)
    for key in ("resume", "checkpoint_every"):
        settings["protect"].pop(key, None)
    photos = {}
    for spec in [s.instance_data for s in cfg.subjects] + [s.check_data for s in cfg.subjects] + \
            [cfg.encoder_trap.keep_images]:
        if spec:
            try:
                photos.update({str(p): file_sha256(p) for p in list_images(split_spec(spec))})
            except (FileNotFoundError, OSError):
                photos[spec] = None
    # the number of processes changes the model (each step averages the gradients of that many draws)
    return json.loads(json.dumps({"settings": settings, "model": model_fingerprint(cfg.model), "photos": photos,
                                  "processes": distributed.rank_world()[1]}, default=str))


def finished_run(cfg: ProtectModelRunConfig) -> dict | None:
    """The ``protect_log.json`` of a finished run in ``cfg.output_dir`` made with the same settings, model and
    photos (:func:`run_identity`), or None: then there is work to do."""
    out = Path(cfg.output_dir)
    log_file = out / "protect_log.json"
    if not (cfg.protect.resume and log_file.is_file() and (out / "model" / "README.md").is_file()):
        return None
    try:
        log = json.loads(log_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(log, dict) or not isinstance(log.get("run"), dict):
        return None
    # logs written before the number of processes was recorded (2026-12-07) came from one process
    return log if {"processes": 1, **log["run"]} == run_identity(cfg) else None


#: what the model card shows instead of a local path (a folder name can be a person's name)
REDACTED = "<redacted: a local path>"


def card_settings(cfg: ProtectModelRunConfig) -> dict:
    """The settings for the model card: ``to_dict(cfg)`` with every local path that can name a person redacted
    (``subjects[].instance_data`` / ``check_data``, ``encoder_trap.keep_images``, ``class_data_dir`` (also in
    ``protect.attacker_mix``), ``output_dir``, and a local ``model.path`` cut to its folder name); prompts are kept.
    ``output_dir/config.yaml`` (not part of the model folder) keeps them all."""
    from apdm.config import to_dict

    d = to_dict(cfg)

    def hide(where: dict, key: str) -> None:
        if where.get(key):
            where[key] = REDACTED

    for sc in d.get("subjects") or []:
        hide(sc, "instance_data")
        hide(sc, "check_data")
    hide(d.get("encoder_trap") or {}, "keep_images")
    hide(d.get("personalization") or {}, "class_data_dir")
    for changes in (d.get("protect") or {}).get("attacker_mix") or []:
        if isinstance(changes, dict):
            hide(changes, "class_data_dir")
    hide(d, "output_dir")
    d["model"]["path"] = base_model_name(cfg.model.path)
    return d


def base_model_name(path: str) -> str:
    """``model.path`` as the card shows it: a hub id or ``tiny`` as is, a local folder by its own name only."""
    p = Path(path).expanduser()
    return p.resolve().name if p.exists() else path


def subject_steps_of(history: list[dict], n: int) -> list[int]:
    """The number of outer steps each of ``n`` subjects got (``history`` entries' ``subject``; round robin,
    ``step mod n``, for entries of an older checkpoint without it)."""
    counts = [0] * n
    for h in history:
        counts[int(h.get("subject", h["step"] % n))] += 1
    return counts


def protection_seconds(history: list[dict], this_run: float) -> float:
    """The protection's time over every process that worked on it (a resumed run included): the sum of the
    outer steps' ``seconds``; ``this_run`` (this process's time) when that is more, as when older checkpoint entries
    lack them."""
    return max(sum(h.get("seconds", 0.0) for h in history), this_run if not history or any(
        "seconds" not in h for h in history) else 0.0)


def run(cfg: ProtectModelRunConfig) -> dict:
    """Protect ``cfg.model`` against personalization of ``cfg.subjects``; write the protected model folder.

    Output::

        output_dir/config.yaml          resolved config
        output_dir/checkpoint/          resumable state (removed when the run completes): a rerun continues it if
                                        it was made with the same settings and refuses it otherwise;
                                        protect.resume=false removes it and starts over
        output_dir/model/               the protected model (StableDiffusionPipeline.from_pretrained loads it)
        output_dir/model/README.md      model card: protected prompts (never the photos), settings
        output_dir/protect_log.json     per-outer-step losses, timings; the encoder trap's check and decoys
        output_dir/encoder_trap_decoys/ the images each subject's photos now encode as (with the encoder trap)
    """
    import torch

    from apdm.core import distributed
    from apdm.core.models import (
        load_sd,
        local_folder,
        restore_source_precision,
        save_sd,
        stored_dtype,
        warn_if_untrained,
    )
    from apdm.protect_model.encoder_trap import check_trap_config
    from apdm.protect_model.l2p import check_protect_config, protect, restart_period

    # before any model loading or class-image generation
    check_output_dir(cfg)
    prompts = {f"subjects[{i}].instance_prompt": s.instance_prompt or cfg.personalization.instance_prompt
               for i, s in enumerate(cfg.subjects)}  # what each subject's attacker trains with
    attackers = check_protect_config(cfg.personalization, cfg.protect, encoder_trap_steps=cfg.encoder_trap.steps,
                                     num_subjects=len(cfg.subjects), instance_prompts=prompts or None)
    check_trap_config(cfg.encoder_trap)
    check_inputs(cfg)  # a misspelt photo folder, named by its setting
    check_extras(cfg, attackers)  # an extra not installed (dlib for encoder_trap.identity=dlib)
    rank, world = distributed.init_from_env()  # several processes under torchrun / accelerate launch
    main = rank == 0
    out = Path(cfg.output_dir)
    done = finished_run(cfg)
    if done is not None:  # the same command again: hours on SD, for the same model
        LOG.info("%s already holds this protection (same settings, model and photos): nothing to do; "
                 "protect.resume=false protects again", out / "model")
        return done
    if main:
        out.mkdir(parents=True, exist_ok=True)
        if not cfg.protect.resume and (out / "checkpoint").exists():  # start over: L2P, encoder trap and its views
            import shutil

            LOG.info("protect.resume=false: removing the checkpoint %s", out / "checkpoint")
            shutil.rmtree(out / "checkpoint")
        atomic_write_text(out / "config.yaml", to_yaml(cfg))
    seed_everything(cfg.seed)
    if main:
        warn_if_untrained(cfg.model.path, "the protected checkpoint protects no real model")
    sd = load_sd(cfg.model.path, cfg.model.device, cfg.model.dtype, cfg.model.revision)
    distributed.distinct_devices(sd.device)  # two processes on one GPU: refused here, not at the first gradient sum
    from apdm.personalization.simulator import check_lora_targets

    for k, per in enumerate(attackers):  # before the class images
        check_lora_targets(sd.unet, per, "personalization" if k == 0 else f"protect.attacker_mix[{k - 1}]")
    if cfg.resolution and cfg.resolution != sd.resolution:  # before the class images, generated at the model's
        raise ValueError(f"resolution={cfg.resolution}: protect-model works at the model's own resolution "
                         f"({sd.resolution} px for {cfg.model.path}), the size of the class images it generates; set "
                         f"resolution=0 (or {sd.resolution})")
    held, held_skipped = [None] * len(cfg.subjects), []
    if main and any(sc.check_data for sc in cfg.subjects):  # before the class images: a bad path fails in seconds
        if cfg.encoder_trap.steps > 0:
            held, held_skipped = load_held_back(cfg, cfg.resolution or sd.resolution, cfg.quiet)
        else:
            LOG.warning("subjects[].check_data is not used: it checks the encoder trap, which is off "
                        "(encoder_trap.steps=0)")
    keep_images, keep_skipped = None, []
    if cfg.encoder_trap.steps > 0 and main:  # read before the class images, so unreadable files fail in seconds
        keep_images, keep_skipped = load_keep_images(cfg.encoder_trap.keep_images, cfg.resolution or sd.resolution,
                                                     cfg.quiet)
    if not main:
        distributed.barrier()  # the main process generates the class images; the others read them from its cache
    weights_key = sd.weights_digest()  # the base model's, read once (GBs on SD) for every image set made from it
    subjects, skipped = load_subjects(sd, cfg, cfg.quiet or not main, weights_key)
    skipped += held_skipped + keep_skipped
    if cfg.encoder_trap.steps > 0 and main:  # needs the subjects' photos
        check_keep_apart(keep_images, subjects, held)
    generated = None
    if cfg.encoder_trap.steps > 0 and cfg.encoder_trap.keep_generated > 0 and main:
        LOG.info("encoder trap: %d more generated images of each class prompt to keep (encoder_trap.keep_generated)",
                 cfg.encoder_trap.keep_generated)
        generated = generated_keep_images(sd, cfg.personalization, [s.class_prompt for s in subjects],
                                          cfg.encoder_trap.keep_generated, quiet=cfg.quiet, weights_key=weights_key)
    if main:
        distributed.barrier()
    p = cfg.protect
    lr = " then ".join(f"{int(n)} at {r:g}" for n, r in p.lr_phases) if p.lr_phases else f"{p.learning_rate:g}"
    if main and p.outer_steps == 0:  # (check_protect_config allows 0 only with the encoder trap)
        LOG.info("the encoder trap alone (protect.outer_steps=0): no APDM step, the UNet and the text encoder keep "
                 "the base model's weights; only the VAE encoder is trained (encoder_trap.steps=%d)",
                 cfg.encoder_trap.steps)
    elif main:
        LOG.info("APDM: %s loss, %d outer x %d inner steps, lr %s, trainable=%s, %d subject(s)%s%s", p.loss,
                 p.outer_steps, p.inner_steps, lr, p.trainable, len(subjects),
                 (f", the simulated attacker continues and restarts after {p.inner_restart_every} visits "
                  f"(every {restart_period(p, len(subjects))} outer steps)" if p.inner_restart_every > 1 else "")
                 + (f", DPO pairs also conditioned on {p.dpo_extra_prompts}" if p.dpo_extra_prompts else "")
                 + (f", DPO pairs taken at the subject's best conditioning within {p.conditioning_attack_radius:g} "
                    f"of the prompt's ({p.conditioning_attack_steps} steps)" if p.conditioning_attack_steps else "")
                 + (f", the identifier drawn each step from {p.identifiers}" if p.identifiers else "")
                 + (f", text encoder protected too (lr {p.text_encoder_lr or lr})" if p.train_text_encoder else ""),
                 f", {world} processes (gradients averaged)" if world > 1 else "")
    t0 = time.perf_counter()
    unet, history, text_encoder = protect(sd, subjects, cfg.personalization, p, seed=cfg.seed,
                                          checkpoint_dir=out / "checkpoint")
    seconds = protection_seconds(history, time.perf_counter() - t0)
    if not main:  # θ is the same on every process; the main one writes it (and trains the encoder trap) alone
        distributed.finish()
        return {"seconds_protect": round(seconds, 2), "rank": rank, "world_size": world}
    vae, trap_history, seconds_trap, trap_check, decoys, held_check = sd.vae, [], 0.0, {}, [], []
    source = local_folder(cfg.model.path, cfg.model.revision)  # toy and a cached hub id resolve to their folder
    keep = stored_dtype(str(source)) if source is not None else None  # the source's own dtype: fp16 stays fp16
    finer = keep is not None and torch.finfo(keep).eps < torch.finfo(sd.dtype).eps
    # the trained weights (fp32 masters) go straight to a finer source dtype: through the computing dtype first
    # (bf16), a change smaller than half a bf16 step of its weight was lost and the others rounded to bf16 steps
    # (2 steps on an fp32 copy of the toy model: the saved change's relative error was 0.59 in the median tensor)
    out_dtype = keep if finer else sd.dtype
    if cfg.encoder_trap.steps > 0:
        from apdm.protect_model.encoder_trap import trap_embedder, trap_encoder

        LOG.info("encoder trap: %d steps at lr %g: the VAE encoder learns to encode the protected photos as generic "
                 "class images (%s; %s)", cfg.encoder_trap.steps, cfg.encoder_trap.learning_rate,
                 f"those least like the subject by {cfg.encoder_trap.identity}"
                 if cfg.encoder_trap.targets == "farthest" else paired_decoys(cfg),
                 f"{cfg.encoder_trap.decoys} per subject" if cfg.encoder_trap.decoys else "one per photo")
        t1 = time.perf_counter()
        embed, recognizer = trap_embedder(cfg.encoder_trap)
        kept = [k for k in (keep_images, generated) if k is not None]  # the photos, then the generated images
        views = trap_views(sd, subjects, cfg, out / "checkpoint" / "encoder_trap_views", embed,
                           weights_key)  # (the protection trained a copy: sd is still the base model)
        trapped, trap_history, chosen = trap_encoder(sd.vae, subjects, cfg.encoder_trap, seed=cfg.seed,
                                                     checkpoint_dir=out / "checkpoint" / "encoder_trap",
                                                     quiet=cfg.quiet, embed=embed,
                                                     keep_images=torch.cat(kept) if kept else None,
                                                     views=views, start_over="protect.resume=false")
        vae, seconds_trap = trapped.to(out_dtype), time.perf_counter() - t1
        batch = cfg.encoder_trap.micro_batch or 32  # images per VAE call of the checks (no gradient)
        trap_check = log_trap_report(sd.vae, trapped, subjects, keep_images, views, generated, batch)
        held_check = check_held_back(sd.vae, trapped, subjects, held, batch)
        decoys = save_decoys(out / "encoder_trap_decoys", chosen, recognizer)
    unet = torch.nn.Module.to(unet, out_dtype)  # (diffusers' own .to warns of its empty keep-in-fp32 list)
    protected = dataclasses.replace(sd, unet=unet, source=f"apdm-protected({sd.source})", vae=vae, text_encoder=(
        sd.text_encoder if text_encoder is None else text_encoder.to(out_dtype)))
    steps = subject_steps_of(history, len(subjects))
    for k, n in enumerate(steps if p.outer_steps > 0 else []):  # outer_steps=0: the encoder trap alone, on purpose
        if n == 0:
            LOG.warning("subject %d (%s, prompt '%s') got no protection step: %d outer steps went round robin over %d "
                        "subjects; set protect.outer_steps to at least %d (a multiple of it protects each equally)", k,
                        subjects[k].name, subjects[k].instance_prompt, len(history), len(subjects), len(subjects))
    card = model_card(cfg, history, seconds, trap_history=trap_history, trap_check=trap_check, decoys=decoys,
                      held_check=held_check, subject_steps=steps, world=world)
    summary = {"seconds_protect": round(seconds, 2), "outer_steps": p.outer_steps, "inner_steps": p.inner_steps,
               "world_size": world,
               "seconds_per_outer_step": round(seconds / max(1, len(history)), 3) if history else None,
               "subject_steps": steps,
               "skipped_inputs": skipped, "peak_rss_mb": round(peak_rss_mb(), 1), "history": history,
               "run": run_identity(cfg)}
    if trap_history:
        summary.update(seconds_encoder_trap=round(seconds_trap, 2), encoder_trap_check=trap_check,
                       encoder_trap_decoys=decoys, encoder_trap_held_back=held_check,
                       encoder_trap_history=trap_history)
    # one folder operation: the weights and the card appear together under model/. The previous run's log goes
    # first and this run's comes after the rename, so a log always describes the model/ beside it: a kill between
    # the two leaves no log (and the checkpoint, which a rerun resumes), never a log of one run beside another's
    # weights (before 2026-12-07 the new log came first, and a kill before the rename made a rerun of the new
    # settings report "nothing to do" beside the old model)
    if keep is not None and keep != protected.dtype:
        LOG.info("saving the protected model in the source's %s (computed in %s)%s", dtype_name(keep),
                 dtype_name(protected.dtype),
                 ": the protection's changes are added to the source's own weights, so what it did not change "
                 "keeps the source's precision" if finer else "")
        if finer:  # loading rounded every weight to the coarser dtype; undo that where the protection did nothing
            for part in ("unet", "vae", "text_encoder"):
                module = getattr(protected, part).to(keep)
                protected = dataclasses.replace(protected, **{part: module})
                n = restore_source_precision(module, source / part, protected.dtype)
                floats = sum(1 for t in module.state_dict().values() if t.is_floating_point())
                if n < floats:
                    LOG.warning("%s: %d of its %d weight tensors were not found in %s at the same shape; they keep "
                                "the %s rounding", part, floats - n, floats, source / part, dtype_name(protected.dtype))
    with atomic_dir(out / "model") as tmp:
        save_sd(protected, tmp, quiet=cfg.quiet, dtype=keep)  # (replaces the empty tmp folder as a whole)
        atomic_write_text(tmp / "README.md", card)
        (out / "protect_log.json").unlink(missing_ok=True)
    atomic_write_json(out / "protect_log.json", summary)
    import shutil

    shutil.rmtree(out / "checkpoint", ignore_errors=True)
    LOG.info("protected model written to %s (%.1f s)", out / "model", seconds)
    distributed.finish()
    return summary


def _method_phrase(protect) -> str:
    """What the card says the UNet was fine-tuned with: APDM (DPO loss + Learning-to-Protect), or what differs from
    it: the naive baseline's loss, no simulated personalization (``inner_steps`` 0: protection steps at θ itself)."""
    if protect.loss == "dpo" and protect.inner_steps > 0:
        return "APDM (DPO loss + Learning-to-Protect)"
    loss = "APDM's DPO loss" if protect.loss == "dpo" else "the naive loss (−L_per + λ·L_ppl, not APDM's DPO loss)"
    l2p = "with Learning-to-Protect" if protect.inner_steps > 0 else "without Learning-to-Protect (inner_steps=0)"
    return f"{loss}, {l2p}"


def model_card(cfg: ProtectModelRunConfig, history: list[dict], seconds: float,
               trap_history: list[dict] | None = None, trap_check: dict | None = None,
               decoys: list[dict] | None = None, held_check: list[dict] | None = None,
               subject_steps: list[int] | None = None, world: int = 1) -> str:
    """Markdown model card: what is protected (prompts only, never images or their paths: the settings are
    :func:`card_settings`), how, and the encoder trap's checks; ``seconds`` the protection's time over all its runs
    (:func:`protection_seconds`); ``decoys`` as :func:`save_decoys` returns them (their cosines, never the images);
    ``held_check`` as :func:`check_held_back` returns it; ``subject_steps`` the outer steps each subject got
    (:func:`subject_steps_of`; counted from ``history`` when not given); ``world`` the processes it ran on."""
    import yaml

    lines = [
        "---", "tags: [apdm, anti-personalization, stable-diffusion]", "---", "",
        "# Protected checkpoint (apdm protect-model)", "",
        (f"Base model: `{base_model_name(cfg.model.path)}`. This UNet"
         f"{' and its text encoder were' if cfg.protect.train_text_encoder else ' was'} fine-tuned with "
         f"{_method_phrase(cfg.protect)} so that personalizing it on the protected subject(s) fails, while other "
         "prompts keep working." if cfg.protect.outer_steps > 0 else
         f"Base model: `{base_model_name(cfg.model.path)}`. Its UNet and text encoder are unchanged (no APDM steps); "
         "only the VAE "
         "encoder was changed (see \"Encoder trap\")."), "",
        "## Protected subjects (prompts only; the photos are not included)", "",
    ]
    per = cfg.personalization
    if subject_steps is None:
        subject_steps = subject_steps_of(history, len(cfg.subjects)) if cfg.subjects else []
    lines += [f"- instance prompt `{s.instance_prompt or per.instance_prompt}`, class prompt "
              f"`{s.class_prompt or per.class_prompt}`"
              + (f": {n} protection step{'s' if n != 1 else ''}" if cfg.protect.outer_steps > 0 else "")
              + (" (NOT protected by the UNet: it got no step)" if cfg.protect.outer_steps > 0 and n == 0 else "")
              for s, n in zip(cfg.subjects, subject_steps)]
    if cfg.protect.identifiers:
        lines += ["", f"The identifier `{per.identifier}` of these prompts was replaced, one protection step at a "
                  f"time, by one drawn from {', '.join(f'`{w}`' for w in cfg.protect.identifiers)}."]
    lines += ["", "## Settings", "", "(Local paths redacted: the photos and their folders are not part of this model.)",
              "", "```yaml", yaml.safe_dump(card_settings(cfg), sort_keys=False).strip(), "```", "",
              f"Protection took {seconds:.0f} s for {len(history)} outer steps"
              + (f", data-parallel over {world} processes (gradients averaged; the losses below are process 0's "
                 "draws)." if world > 1 else "."), ""]
    if history:
        last = history[-1]
        not_losses = ("step", "lr", "subject", "seconds", "attacker", "attack_depth", "identifier_index")
        lines += ["Final protection losses: "
                  + ", ".join(f"{k}={v:.4g}" for k, v in last.items() if k not in not_losses), ""]
    if trap_history:
        last = trap_history[-1]
        lines += ["## Encoder trap", "",
                  f"The VAE encoder was also fine-tuned ({len(trap_history)} steps; apdm's addition, not part of APDM) "
                  "so that the protected subjects' photos encode as generic class images (decoys: "
                  + (f"those least like the subject by the face recognizer {cfg.encoder_trap.identity}"
                     if cfg.encoder_trap.targets == "farthest" else paired_decoys(cfg))
                  + (f", {cfg.encoder_trap.decoys} per subject, shared by its photos" if cfg.encoder_trap.decoys
                     else ", one per photo") + "); the decoder is the base "
                  "model's." + (" Besides the base model's class images, a set of other photos was kept unchanged "
                                "(`encoder_trap.keep_images`)." if cfg.encoder_trap.keep_images else "")
                  + (f" {cfg.encoder_trap.keep_generated} more class-prompt images of the base model were kept "
                     "unchanged (`encoder_trap.keep_generated`)." if cfg.encoder_trap.keep_generated else "")
                  + (f" Besides the photos, {cfg.encoder_trap.synthetic_photos} pictures of each subject sampled from "
                     + (f"{cfg.encoder_trap.synthetic_copies} copies" if cfg.encoder_trap.synthetic_copies > 1
                        else "a copy") + " of the base model personalized on its photos were trapped too "
                     "(`encoder_trap.synthetic_photos`)." if cfg.encoder_trap.synthetic_photos else "")
                  + " Someone who encodes the photos with another compatible VAE is not stopped by this part.",
                  "", f"Final trap losses: trap={last['loss_trap']:.4g}, preserve={last['loss_preserve']:.4g}", ""]
        chose = [d for d in decoys or [] if d["cosines"] is not None]
        if chose:
            lines += [f"The face recognizer `{chose[0]['recognizer']}` chose the decoys; their cosine to the "
                      "subject (−1 … 1, lowest first; only the order means something: each recognizer has its own "
                      "scale, dlib's puts strangers near +0.8; another build of the recognizer may choose others): "
                      + "; ".join(f"subject {d['index']}: " + ", ".join(f"{c:+.2f}" for c in d["cosines"])
                                  for d in chose) + ".", ""]
        if trap_check:
            lines += ["What the trapped encoder does to the images it trained with (latent change "
                      "‖μ_trapped − μ_original‖ / ‖μ_original‖; encode → decode PSNR with the original / trapped "
                      "encoder, what img2img and inpainting with this checkpoint start from; the PSNR between the two "
                      "encoders' decoded pictures, the change itself, on one scale for every kind of image):", "",
                      "| images | count | latent change (`latent_change@apdm`) "
                      "| encode → decode PSNR (`psnr@torchmetrics`) | decoded picture changed at (PSNR) |",
                      "|---|---|---|---|---|"]
            lines += [f"| {TRAP_GROUPS.get(k, k)} | {v['images']} | {v['latent_change']:.2f} | "
                      f"{v['recon_psnr_base']:.1f} → {v['recon_psnr_trapped']:.1f} dB | "
                      + (f"{v['decode_change_psnr']:.1f} dB |" if v.get("decode_change_psnr") is not None
                         else "unchanged |") for k, v in trap_check.items()]
            lines += [""]
        if held_check:
            lines += ["On photos of the subjects it never saw (held back, `subjects[].check_data`; an attacker's "
                      "photos are such photos): "
                      + "; ".join(f"subject {r['index']}: {r['images']} photos, latent change {r['latent_change']:.2f}"
                                  f" against {r['latent_change_trained']:.2f} on its trained photos "
                                  + ("(the trap did not take on its own photos)" if r["reach"] is None
                                     else f"({100 * r['reach']:.0f} %)") for r in held_check)
                      + f". On the toy world, most traps whose unseen photos moved less than {100 * HELD_BACK_WARN:.0f}"
                      " % as far as the trained ones did not hold on new photos (apdm's docs/protect_model.md, "
                      "\"Checking the trap on held-back photos\").", ""]
    where = ("Settings as a dict, with the local paths, are also in `../config.yaml` (beside the model folder, "
             "not part of it).")
    lines += ["", where, ""]
    return "\n".join(lines)
