"""A toy-world ×4 diffusion upscaler, so that Noisy Upscaling (:mod:`apdm.attacks.noisy_upscale`) can be measured.

Real attacks use ``stabilityai/stable-diffusion-x4-upscaler``; the toy world has no such model, so this recipe
trains one of the same structure (``StableDiffusionUpscalePipeline``: a UNet that sees the latents concatenated with
the noised low-resolution photo and takes the noise level as class label; a ×4 VAE; latents scaled by 0.08333),
small enough for CPU:

- **VAE**: the toy model's own (×4), with its latents rescaled so that the pipeline's fixed ``scaling_factor``
  0.08333 normalises them (the mean rows of ``quant_conv`` are multiplied by ``k``, the log-variance rows shifted by
  ``2 ln k``, ``post_quant_conv`` divided by ``k``: the same decoder, exactly).
- **Data**: pretraining identities only (never a held-out subject), drawn at ``4 × 64`` px; the low-resolution
  input is the drawing shrunk to 64 px, i.e. a toy photo. The UNet trains on aligned crops (``crop`` px of the
  high-resolution drawing, ``crop/4`` px of the photo), as the published upscaler trains on crops.
- **Noise augmentation**: the low-resolution input is noised with the pipeline's ``low_res_scheduler`` at a level
  drawn from 0..350, the level given as class label, as in the published model.
- **Target**: v-prediction, as the published upscaler (with ε-prediction a model this small mispredicts the first,
  almost pure-noise steps of sampling, and the photo never recovers: 15 dB against the 22 dB of its VAE).
- **Prompt**: none; the toy upscaler is unconditional (the empty prompt's embedding), which is how
  ``apdm evaluate`` calls every purifier.

Usage: ``apdm toy upscaler`` (about 15 minutes on 2 CPU cores; writes ``~/.cache/apdm/toy/upscaler``), then
``noisy_upscale:upscaler=toy``. Checkpoints every ``checkpoint_every`` steps and resumes; a checkpoint records the
settings it was trained with, and a run with other settings starts over (as ``apdm toy build`` does).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from apdm.utils import LOG, progress

#: the scaling factor the diffusers upscale pipeline assumes for its VAE
UPSCALER_SCALING = 0.08333


@dataclass
class ToyUpscalerConfig:
    """Recipe of the toy ×4 upscaler (``apdm toy upscaler key=value``)."""

    out: str = ""                    # output folder (default: <cache>/toy/upscaler)
    steps: int = 4000
    batch: int = 32
    lr: float = 1e-3
    identities: int = 200            # pretraining identities per class
    images_per_identity: int = 2
    crop: int = 64                   # high-resolution crop side (px); the low-resolution crop is crop / 4
    channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    norm_groups: int = 8             # GroupNorm groups (32 groups of 32 channels would normalise every channel alone)
    checkpoint_every: int = 500
    seed: int = 0
    quiet: bool = False


def rescale_vae(vae, scaling: float = UPSCALER_SCALING):
    """Make ``vae``'s latents ``k = vae.scaling_factor / scaling`` times larger without changing what it decodes,
    and set its ``scaling_factor`` to ``scaling`` (in place; returns ``vae``)."""
    k = vae.config.scaling_factor / scaling
    c = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[:c] *= k
        vae.quant_conv.bias[:c] *= k
        vae.quant_conv.bias[c:] += 2 * math.log(k)
        vae.post_quant_conv.weight /= k
    vae.register_to_config(scaling_factor=scaling)
    return vae


def _data(cfg: ToyUpscalerConfig, vae) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """High-resolution latent means and stds (scaled; (N,4,64,64)) and the 64-px photos in [-1,1] (N,3,64,64)."""
    from apdm.toy.world import pretraining_set

    hi, _ = pretraining_set(cfg.identities, cfg.images_per_identity, seed=cfg.seed + 7, size=4 * 64)
    lo = F.interpolate(hi, size=(64, 64), mode="bicubic", antialias=True).clamp(0, 1) * 2 - 1
    means, stds = [], []
    with torch.no_grad():
        for b in progress(hi.split(16), desc="toy upscaler: encoding drawings"):
            d = vae.encode(b * 2 - 1).latent_dist
            means.append(d.mean * vae.config.scaling_factor)
            stds.append(d.std * vae.config.scaling_factor)
    return torch.cat(means), torch.cat(stds), lo


def build_upscaler(cfg: ToyUpscalerConfig) -> Path:
    """Train the toy ×4 upscaler and write it as a diffusers ``StableDiffusionUpscalePipeline`` folder.

    Returns:
        the output folder.
    """
    from diffusers import (
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )

    from apdm.core import diffusion as D
    from apdm.core.models import load_sd, save_slow_vocabulary
    from apdm.toy.model import _load_train_state, _lr_lambda, _optimizer_step, _save_train_state, train_state_settings
    from apdm.toy.world import model_path
    from apdm.utils import atomic_dir, cache_dir, set_progress

    set_progress(not cfg.quiet)
    if cfg.crop % 16 or not 16 <= cfg.crop <= 256:
        raise ValueError(f"toy upscaler: crop must be a multiple of 16 in 16..256, got {cfg.crop}")
    if cfg.steps < 1 or cfg.batch < 1:
        raise ValueError(f"toy upscaler: steps and batch must be >= 1, got {cfg.steps} and {cfg.batch}")
    from apdm.toy.draw import pretraining_ids

    pretraining_ids(cfg.identities, "toy upscaler: identities")
    out = Path(cfg.out).expanduser() if cfg.out else cache_dir() / "toy" / "upscaler"
    if out.exists() and not out.is_dir():
        raise ValueError(f"toy upscaler: out={cfg.out or out}: is a file, not a folder; give a new or empty folder")
    if out.exists() and any(out.iterdir()) and not (out / "model_index.json").is_file():
        raise ValueError(f"toy upscaler: {out} exists and is not a diffusers model folder; the upscaler replaces its "
                         f"output folder, so choose a new or empty one")
    work = out.parent / (out.name + ".work")
    src = model_path()
    torch.manual_seed(cfg.seed)
    toy = load_sd(str(src), device="cpu", dtype="fp32")   # frozen, in eval mode
    vae, tokenizer, text_encoder = rescale_vae(toy.vae), toy.tokenizer, toy.text_encoder
    ch = tuple(int(c) for c in cfg.channels)
    unet = UNet2DConditionModel(
        sample_size=cfg.crop // 4, in_channels=4 + 3, out_channels=4, block_out_channels=ch, layers_per_block=1,
        down_block_types=("DownBlock2D",) * (len(ch) - 1) + ("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (len(ch) - 1),
        cross_attention_dim=text_encoder.config.hidden_size, attention_head_dim=8, norm_num_groups=cfg.norm_groups,
        num_class_embeds=1000)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False,
                              prediction_type="v_prediction", steps_offset=1)
    low_res = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
    max_noise = 350
    with torch.no_grad():
        empty = D.encode_prompt(text_encoder, tokenizer, [""])
    t0 = time.perf_counter()
    mean, std, lo = _data(cfg, vae)
    LOG.info("toy upscaler: %d drawings, UNet %.2f M parameters, %d steps", len(lo),
             sum(p.numel() for p in unet.parameters()) / 1e6, cfg.steps)
    g = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(200, cfg.steps // 10 + 1), cfg.steps))
    start, history = 0, []
    # what the training depends on (not where it writes, how often it checkpoints or whether it shows progress)
    settings = json.loads(json.dumps({**{k: v for k, v in dataclasses.asdict(cfg).items()
                                         if k not in ("out", "checkpoint_every", "quiet")},
                                      "source_model": str(src)}))
    if (work / "state.json").is_file():
        saved = train_state_settings(work)
        if saved != settings:
            old = saved or {}
            changed = [f"{k} {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(settings.keys() | old.keys())
                       if old.get(k) != settings.get(k)]
            LOG.info("toy upscaler: the checkpoint in %s is from other settings (%s); starting over", work,
                     ", ".join(changed) if saved else "it records none")
            import shutil

            shutil.rmtree(work)
        else:
            start, history = _load_train_state(work, {"unet": unet}, opt, sched, g)
            LOG.info("toy upscaler: resuming at step %d from %s", start, work)
    unet.train()
    zc = cfg.crop // 4      # latent crop side: the latents of a 4·64-px drawing and its 64-px photo align 1:1
    side = lo.shape[-1]
    bar = progress(range(start, cfg.steps), desc="toy upscaler: training", initial=start, total=cfg.steps)
    for step in bar:
        idx = torch.randint(len(lo), (cfg.batch,), generator=g).tolist()
        ys = torch.randint(0, side - zc + 1, (cfg.batch,), generator=g).tolist()
        xs = torch.randint(0, side - zc + 1, (cfg.batch,), generator=g).tolist()
        z = torch.stack([(mean[i] + std[i] * torch.randn(mean[i].shape, generator=g))[:, y:y + zc, x:x + zc]
                         for i, y, x in zip(idx, ys, xs)])
        low = torch.stack([lo[i][:, y:y + zc, x:x + zc] for i, y, x in zip(idx, ys, xs)])
        level = torch.randint(0, max_noise + 1, (cfg.batch,), generator=g)
        low = low_res.add_noise(low, torch.randn(low.shape, generator=g), level)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (cfg.batch,), generator=g)
        eps = torch.randn(z.shape, generator=g)
        zt = scheduler.add_noise(z, eps, t)
        pred = unet(torch.cat([zt, low], 1), t, empty.expand(cfg.batch, -1, -1), class_labels=level).sample
        loss = F.mse_loss(pred, scheduler.get_velocity(z, eps, t))
        history.append(_optimizer_step(loss, opt, sched, unet.parameters()))
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(history[-20:]) / len(history[-20:]):.4f}")
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _save_train_state(work, {"unet": unet}, opt, sched, g, step + 1, history, settings=settings)
    unet.eval().requires_grad_(False)
    pipe = StableDiffusionUpscalePipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, low_res_scheduler=low_res,
        scheduler=DDIMScheduler.from_config(scheduler.config), max_noise_level=max_noise)
    first, last = (sum(h) / max(1, len(h)) for h in (history[:100], history[-100:]))
    with atomic_dir(out) as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        save_slow_vocabulary(tokenizer, tmp / "tokenizer")  # so transformers 4 reads it too
        (tmp / "train_log.json").write_text(json.dumps({
            "config": dict(vars(cfg)), "steps": len(history), "steps_run_here": cfg.steps - start,
            "seconds_this_run": round(time.perf_counter() - t0, 1),
            "loss_first_100": first, "loss_last_100": last, "source_model": str(src)}, indent=1))
    if work.exists():
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    LOG.info("toy upscaler written to %s (loss %.4f -> %.4f)", out, first, last)
    return out
