"""``apdm personalize``: run the personalization attack on a folder of images, save the result and samples."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from apdm.config import PersonalizeRunConfig, to_yaml
from apdm.utils import LOG, atomic_write_json, atomic_write_text, peak_rss_mb, seed_everything


def run(cfg: PersonalizeRunConfig) -> dict:
    """Personalize ``cfg.model`` on ``cfg.instance_data``; write model/LoRA/embedding, samples and a summary.

    Output folder layout::

        output_dir/config.yaml            the resolved config (written with the weights: it describes them)
        output_dir/model|lora|ti|custom_diffusion/
                                          diffusers-loadable weights (see simulator.save); an earlier run's of
                                          another method are removed
        output_dir/personalization.json   method, prompts, steps
        output_dir/samples/*.png          sample images, plus grid.png
        output_dir/summary.json           timings, loss curve, skipped input files

    ``cfg.seed`` is the attacker's seed: it replaces ``personalization.seed`` (its noise, timesteps, minibatches,
    LoRA init and class images), as ``apdm evaluate``'s ``seed`` does; samples follow ``sample.seed``. Images are
    trained, class images generated and samples drawn at ``cfg.resolution`` (0 = the model's).
    """
    from apdm.core import diffusion as D
    from apdm.core.images import list_images, load_spec, save_grid, save_image, split_spec
    from apdm.core.models import load_sd, warn_if_untrained
    from apdm.evaluation.protocol import check_optimizer_extra, check_sampler_steps
    from apdm.personalization import simulator as S

    if not cfg.instance_data:
        raise ValueError("instance_data is empty: pass instance_data=FOLDER (the subject's photos)")
    if cfg.resolution < 0:
        raise ValueError(f"resolution={cfg.resolution}: must be 0 (the model's own) or an image side in pixels")
    if cfg.personalization.seed not in (0, cfg.seed):
        LOG.warning("personalization.seed=%d is replaced by seed=%d (the attacker's seed of apdm personalize)",
                    cfg.personalization.seed, cfg.seed)
    per = dataclasses.replace(cfg.personalization, seed=cfg.seed)
    S.check_personalization(per)  # a typo stops here, not after the training
    D.check_sample(cfg.sample)
    check_optimizer_extra(per.optimizer, "personalization.optimizer")  # not after the class images
    out = Path(cfg.output_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output_dir {out} is a file, not a folder")
    if not list_images(split_spec(cfg.instance_data)):  # a missing folder is named here, before the model loads
        raise ValueError(f"no images in {cfg.instance_data}")
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed)

    sd = load_sd(cfg.model.path, cfg.model.device, cfg.model.dtype, cfg.model.revision)
    warn_if_untrained(cfg.model.path, "the personalized model and its samples say nothing about a real model")
    check_sampler_steps(sd, cfg.sample)  # before the class images and the training, not at the first sample
    size = cfg.resolution or sd.resolution
    check_size(sd, size)
    S.check_lora_targets(sd.unet, per)  # before the class images, not when the adapters are added
    images, ok, errors = load_spec(cfg.instance_data, size=size)
    if len(ok) == 0:
        raise ValueError(f"no usable images in {cfg.instance_data}")
    LOG.info("personalizing with %s on %d images of %s", per.method, len(ok), cfg.instance_data)
    images = images.to(sd.device)

    t0 = time.perf_counter()
    class_images = S.class_images_for(sd, per, quiet=cfg.quiet, size=size)
    t_class = time.perf_counter() - t0
    state = S.setup(sd, per, class_images.to(sd.device) if class_images is not None else None)
    t1 = time.perf_counter()
    history = S.train(state, images, quiet=cfg.quiet)
    t_train = time.perf_counter() - t1
    before = _weights_folder(out)
    S.save(state, out, quiet=cfg.quiet)
    # config.yaml with the weights (written first, a failed or interrupted rerun left a config of other weights)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    if before not in (None, S.WEIGHTS_FOLDER[per.method]) and (out / before).is_dir():  # plain diffusers would find the old method's weights
        import shutil

        LOG.info("removing %s: the weights of the earlier %s run in this folder", out / before, before)
        shutil.rmtree(out / before)

    prompts = [S.prompt_for(state, p) for p in cfg.sample.prompts]
    samples = D.generate(state.sd, prompts, cfg.sample.num_images_per_prompt, cfg.sample.num_inference_steps,
                         cfg.sample.guidance_scale, cfg.sample.negative_prompt, cfg.sample.seed,
                         cfg.sample.batch_size, cfg.sample.sampler, height=size, width=size, quiet=cfg.quiet)
    (out / "samples").mkdir(exist_ok=True)
    for old in (out / "samples").glob("[0-9][0-9]_[0-9][0-9][0-9].png"):  # an earlier run's, which could outnumber ours
        old.unlink()
    for i, img in enumerate(samples):
        save_image(img, out / "samples" / f"{i // cfg.sample.num_images_per_prompt:02d}_{i % cfg.sample.num_images_per_prompt:03d}.png")
    save_grid(samples, out / "samples" / "grid.png", nrow=cfg.sample.num_images_per_prompt)
    summary = {
        "method": per.method, "seed": per.seed, "model": sd.source, "device": str(sd.device),
        "num_instance_images": len(ok), "skipped_inputs": errors, "steps": state.global_step,
        "seconds_class_images": round(t_class, 3), "seconds_train": round(t_train, 3),
        "seconds_per_step": round(t_train / max(1, state.global_step), 4),
        "loss_first": history[0] if history else None, "loss_last": history[-1] if history else None,
        "loss_history": history, "sample_prompts": prompts, "peak_rss_mb": round(peak_rss_mb(), 1),
    }
    atomic_write_json(out / "summary.json", summary)
    LOG.info("done: %d steps in %.1fs (%.3f s/step); results in %s", state.global_step, t_train,
             summary["seconds_per_step"], out)
    return summary


def _weights_folder(out: Path) -> str | None:
    """The weights subfolder an apdm ``personalization.json`` in ``out`` names (one of
    :data:`apdm.personalization.simulator.WEIGHTS_FOLDER`'s), else None."""
    import json

    from apdm.personalization.simulator import WEIGHTS_FOLDER

    try:
        where = json.loads((out / "personalization.json").read_text(encoding="utf-8")).get("weights")
    except (OSError, ValueError, AttributeError):
        return None
    return where if where in WEIGHTS_FOLDER.values() else None


def check_size(sd, size: int) -> None:
    """Refuse an image side ``size`` (``resolution=``) that ``sd`` cannot train and sample at: not a multiple of the
    VAE's pixels per latent cell (the images were cut to the next lower multiple, the samples smaller than asked),
    or, for a UNet whose group norms hold one channel per group (the tiny test model), so small that a 1x1 map
    reaches one of them (it fails at the first step, with a message naming no setting): such a model needs
    ``vae_scale_factor * (2 ** downsamplings + 1)`` (24 for the tiny model). Other UNets (SD's, the toy model's) run
    down to a one-cell latent; every multiple of the VAE factor is taken."""
    step = sd.vae_scale_factor
    cfg = sd.unet.config
    one_per_group = min(cfg.block_out_channels) <= int(getattr(cfg, "norm_num_groups", 32) or 32)
    least = step * (2 ** (len(cfg.block_out_channels) - 1) + 1) if one_per_group else step
    if size % step or size < least:
        raise ValueError(f"resolution={size}: this model takes image sides that are multiples of {step} (its VAE's "
                         f"pixels per latent cell) from {least} up, e.g. {least}, {least + step} or "
                         f"{sd.resolution} (its own, resolution=0)")
