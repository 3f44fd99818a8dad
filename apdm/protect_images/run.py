"""``apdm protect-images`` and ``apdm train-perturber``: protect a folder of photos with one command.

Resolution policy: every photo is resized (whole image, aspect ratio not kept) to the model resolution, the
method computes a perturbation there, and the perturbation (``protected − clean`` at model resolution) is
upsampled bicubically to the photo's own size, added to the *original* pixels, projected onto the L∞ budget
ball and [0,1], and quantized to 8 bits so that the saved file itself satisfies ``|saved − original| ≤ budget``
(:func:`apdm.protect_images.budget.apply_delta_to_original`). Inputs are never modified; a bad file is reported in
the manifest and skipped; outputs are written atomically.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from apdm.config import ProtectImagesRunConfig, TrainPerturberRunConfig, to_yaml
from apdm.utils import LOG, atomic_write_json, atomic_write_text, peak_rss_mb, progress, seed_everything

METHOD_NAMES = ("ldu", "aspl", "fsmg", "advdm", "photoguard")


def _method_kwargs(cfg: ProtectImagesRunConfig, sd, target: torch.Tensor | None = None) -> dict:
    """The pixel method's keyword arguments from ``cfg``; ``target``: PhotoGuard's (3,H,W) target image in [0,1]."""
    kw: dict = {}
    if cfg.steps:
        kw["steps"] = cfg.steps
    if cfg.pgd_alpha:
        kw["pgd_alpha"] = cfg.pgd_alpha
    if cfg.eot:
        kw["eot_transforms"] = list(cfg.eot)
    if target is not None:
        from apdm.core.images import to_model_resolution

        kw["target"] = to_model_resolution(target, sd.resolution)[None]
    if cfg.method in ("aspl", "fsmg"):
        from apdm.personalization.simulator import class_images_for

        kw["personalization"] = cfg.personalization
        kw["class_images"] = class_images_for(sd, cfg.personalization, quiet=cfg.quiet)
    return kw


def protect_batch(sd, images: torch.Tensor, cfg: ProtectImagesRunConfig, budget: float, rho=None,
                  extra: dict | None = None) -> torch.Tensor:
    """Protect (N,3,s,s) images at model resolution with ``cfg.method``; returns the same shape in [0,1]."""
    if cfg.method == "ldu":
        from apdm.protect_images import ldu

        return ldu.apply(sd, rho, images, budget, batch_size=cfg.batch_size, quiet=cfg.quiet)
    from apdm.protect_images.baselines import METHODS

    return METHODS[cfg.method](sd, images, budget=budget, seed=cfg.seed, quiet=cfg.quiet, **(extra or {}))


def run(cfg: ProtectImagesRunConfig) -> dict:
    """Protect every image of ``cfg.input`` into ``cfg.output_dir``; write ``manifest.json``.

    Returns:
        the manifest dict (method, budget, per-image PSNR/SSIM/L∞ and time, skipped files).
    """
    from apdm.core.images import (JPEG_WARNING, ImageLoadError, list_images, load_image, output_metadata,
                                  protect_output_path, save_image, split_spec, to_model_resolution)
    from apdm.core.models import load_sd
    from apdm.protect_images.budget import apply_delta_to_original, budget_report, format_budget, parse_budget

    if cfg.method not in METHOD_NAMES:
        raise ValueError(f"unknown method '{cfg.method}'; choose one of {', '.join(METHOD_NAMES)}")
    if not cfg.input:
        raise ValueError("no input: pass --input DIR_OR_FILES (or input=...)")
    target = None
    if cfg.target:  # checked before the model loads
        if cfg.method != "photoguard":
            raise ValueError(f"target={cfg.target}: a target image is used by method photoguard only, "
                             f"not {cfg.method}")
        try:
            target = load_image(cfg.target).pixels
        except ImageLoadError as exc:
            raise ValueError(f"PhotoGuard target: {exc}") from exc
    budget = parse_budget(cfg.budget)
    fmt = {"jpg": "jpeg"}.get(cfg.format.lower(), cfg.format.lower())
    if fmt == "jpeg":
        LOG.warning(JPEG_WARNING)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)
    paths = list_images(split_spec(cfg.input))
    sd = load_sd(cfg.model.path, cfg.model.device, cfg.model.dtype, cfg.model.revision)
    rho = None
    if cfg.method == "ldu":
        from apdm.protect_images import ldu

        if not cfg.rho_path:
            raise ValueError("method ldu needs a trained perturbation network: rho_path=FOLDER (train one with "
                             "`apdm train-perturber`)")
        rho = ldu.load_rho(cfg.rho_path, device=sd.device)
    LOG.info("protecting %d file(s) with %s at budget %s (model %s)", len(paths), cfg.method,
             format_budget(budget), sd.source)

    # load everything first: bad files are reported, the rest go on
    loaded, errors = [], []
    for p in paths:
        try:
            loaded.append(load_image(p))
        except ImageLoadError as exc:
            LOG.warning("skipping %s", exc)
            errors.append({"input": str(p), "error": exc.reason})
    extra = _method_kwargs(cfg, sd, target) if cfg.method != "ldu" and loaded else {}
    taken = {str(Path(p).resolve()) for p in paths}
    entries = []
    size = sd.resolution
    t_all = time.perf_counter()
    for start in progress(range(0, len(loaded), cfg.batch_size), desc=f"protect-images ({cfg.method})"):
        group = loaded[start:start + cfg.batch_size]
        t0 = time.perf_counter()
        clean = torch.stack([to_model_resolution(im.pixels, size) for im in group]).to(sd.device)
        protected = protect_batch(sd, clean, cfg, budget, rho, extra)
        per_image = (time.perf_counter() - t0) / len(group)
        for im, c, p in zip(group, clean, protected):
            final = apply_delta_to_original(im.pixels, (p - c).cpu(), budget)
            dest = protect_output_path(im.path, out, cfg.suffix, fmt, taken)
            save_image(final, dest, format=fmt, quality=cfg.jpeg_quality, alpha=im.alpha, source=im.path,
                       **output_metadata(im, cfg.keep_exif, cfg.strip_metadata))
            report = budget_report(im.pixels, final, budget)
            entries.append({"input": str(im.path), "output": str(dest), "size_hw": list(im.size),
                            "mode": im.mode, "seconds": round(per_image, 3), **report})
    manifest = {
        "method": cfg.method, "budget": format_budget(budget), "budget_float": budget, "model": sd.source,
        **({"target": cfg.target or "flat gray (0.5)"} if cfg.method == "photoguard" else {}),
        "device": str(sd.device), "format": fmt, "metadata": "EXIF kept" if cfg.keep_exif else
        ("all stripped" if cfg.strip_metadata else "EXIF stripped, ICC profile kept"),
        "num_protected": len(entries), "num_failed": len(errors), "images": entries, "failed": errors,
        "seconds_total": round(time.perf_counter() - t_all, 2),
        "seconds_per_image": round((time.perf_counter() - t_all) / max(1, len(entries)), 3),
        "peak_rss_mb": round(peak_rss_mb(), 1), "config": to_yaml(cfg),
    }
    atomic_write_json(out / "manifest.json", manifest)
    LOG.info("protected %d image(s) into %s (%d skipped); manifest.json written", len(entries), out, len(errors))
    return manifest


def train(cfg: TrainPerturberRunConfig) -> dict:
    """Train ρ on ``cfg.data`` (one sub-folder per identity) and save it to ``cfg.output_dir``."""
    from apdm.core.images import list_images, load_images
    from apdm.core.models import load_sd
    from apdm.personalization.simulator import class_images_for
    from apdm.protect_images import ldu
    from apdm.protect_images.budget import parse_budget

    root = Path(cfg.data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    sd = load_sd(cfg.model.path, cfg.model.device, cfg.model.dtype, cfg.model.revision)
    identities = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        images, ok, errors = load_images(list_images(sub), size=sd.resolution)
        for e in errors:
            LOG.warning("skipped %s: %s", e["path"], e["error"])
        if ok:
            identities[sub.name] = images.to(sd.device)
    if not identities:
        raise ValueError(f"{root}: expected one sub-folder of photos per identity, found none with images")
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "train_config.yaml", to_yaml(cfg))
    LOG.info("training the LDU perturbation network on %d identities for %d steps", len(identities), cfg.steps)
    history: list[dict] = []
    t0 = time.perf_counter()
    class_images = class_images_for(sd, cfg.personalization, quiet=cfg.quiet)  # None unless the anchors need them
    rho = ldu.train_perturber(
        sd, identities, budget=parse_budget(cfg.budget), steps=cfg.steps, learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size, personalization=cfg.personalization, anchor_steps=cfg.anchor_steps or None,
        class_images=class_images, shuffle_prob=cfg.shuffle_prob, lambda_init=cfg.lambda_init,
        lambda_step=cfg.lambda_step, min_psnr=cfg.min_psnr or None, denoise_steps=cfg.denoise_steps,
        width=cfg.width, seed=cfg.seed, quiet=cfg.quiet, history=history)
    ldu.save_rho(rho, out)
    summary = {"seconds": round(time.perf_counter() - t0, 1), "identities": list(identities),
               "parameters": ldu.count_parameters(rho), "history": history}
    atomic_write_json(out / "train_log.json", summary)
    return summary
