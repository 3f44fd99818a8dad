"""The one copy of the diffusion math used by every apdm engine.

Notation (DDPM/DDIM, Ho et al. 2020; Song et al. 2021): ``ᾱ_t = alphas_cumprod[t]`` from the model's
training scheduler;

* forward noising (closed form):  ``x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε``
* epsilon target: ``ε``;  v-prediction target (Salimans & Ho 2022): ``v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0``
* deterministic DDIM step (η = 0) between any two levels a -> b:
  ``x_b = sqrt(ᾱ_b) x̂_0 + sqrt(1 - ᾱ_b) ε̂`` with ``x̂_0, ε̂`` predicted at level a.
  Sampling walks the levels downwards, inversion upwards (Mokady et al. 2023, "null-text inversion" §3).

Everything here works on *scaled* latents ``(N, 4, h, w)`` (``vae_latent * scaling_factor``), images
``(N, 3, H, W)`` in ``[0, 1]``, timesteps as int64 tensors ``(N,)`` and conditioning
``encoder_hidden_states`` ``(N, L, D)``. No function here holds state; none of them is toy-world specific.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# ============================================================================ images <-> latents
def encode_images(vae, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """Encode images to scaled latents. Differentiable w.r.t. ``images`` (pixel attacks use that).

    Args:
        vae: ``AutoencoderKL``.
        images: (N,3,H,W) float in [0,1].
        sample: draw from the posterior (``True``, as DreamBooth training does) or take its mean.
        generator: RNG for the posterior sample.

    Returns:
        (N,4,H/f,W/f) scaled latents, in the VAE's dtype.
    """
    mean, std = vae_posterior(vae, images)
    return posterior_latents(vae, mean, std, sample, generator)


def vae_posterior(vae, images: torch.Tensor, batch: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's diagonal Gaussian posterior q(z|x) of images (N,3,H,W) in [0,1]: (mean, std), each (N,4,h,w),
    *unscaled*, in the VAE's dtype (``batch > 0``: encode that many images at a time). Trainers that draw a fresh
    posterior sample of the same images every step encode them once with this and call
    :func:`posterior_latents` per step (the result is the same as :func:`encode_images` with the same generator)."""
    if batch > 0 and images.shape[0] > batch:
        parts = [vae_posterior(vae, chunk) for chunk in images.split(batch)]
        return torch.cat([m for m, _ in parts]), torch.cat([s for _, s in parts])
    dist = posterior(vae, images)
    return dist.mean, dist.std


def posterior(vae, images: torch.Tensor):
    """q(z|x) of images (N,3,H,W) in [0,1] as diffusers' ``DiagonalGaussianDistribution`` (its ``parameters`` are the
    (N, 2·latent channels, h, w) mean and log-variance, unscaled, in the VAE's dtype); differentiable w.r.t. the
    images and the encoder."""
    x = images.to(device=vae.device, dtype=vae.dtype) * 2.0 - 1.0
    return vae.encode(x).latent_dist


def posterior_latents(vae, mean: torch.Tensor, std: torch.Tensor, sample: bool = False,
                      generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled latents from a posterior of :func:`vae_posterior`: a draw ``mean + std·ε`` (ε from ``generator``,
    drawn as diffusers' ``DiagonalGaussianDistribution.sample`` draws it, or the given ``noise``, shaped as ``mean``)
    or the mean."""
    if noise is not None:
        latents = mean + std * noise.to(device=mean.device, dtype=mean.dtype)
    elif sample:
        from diffusers.utils.torch_utils import randn_tensor

        latents = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    else:
        latents = mean
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """Decode scaled latents (N,4,h,w) to images (N,3,H,W) float32 in [0,1] (clamped)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(dtype=vae.dtype) / vae.config.scaling_factor + shift
    images = vae.decode(z).sample
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


# ============================================================================ text
def tokenize(tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids (N, model_max_length), padded/truncated as Stable Diffusion does."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
                     truncation=True, return_tensors="pt").input_ids


def encode_prompt(text_encoder, tokenizer, prompts: Sequence[str] | str) -> torch.Tensor:
    """Prompt(s) -> ``encoder_hidden_states`` (N, L, D) (the text encoder's last hidden state, as SD uses).

    Gradients flow into the text encoder if its parameters require grad (DreamBooth-TE, Textual Inversion).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    ids = tokenize(tokenizer, prompts).to(text_encoder.device)
    return text_encoder(ids)[0]


# ============================================================================ noise schedule
#: Device types without float64 tensors (Apple's MPS): :func:`alphas_cumprod` gives float32 there.
NO_FLOAT64 = ("mps",)


def alphas_cumprod(noise_scheduler, device=None) -> torch.Tensor:
    """ᾱ for t = 0..T-1 as float64 on ``device`` (float64 keeps DDIM round trips exact to ~1e-6).

    On a device without float64 (:data:`NO_FLOAT64`: Apple MPS) it is float32 (the dtype diffusers computes the
    schedule in, so no value changes; only what is derived from it is computed in float32 there); nothing is ever
    asked of such a device in float64. CPU and CUDA get float64 as always."""
    ac = noise_scheduler.alphas_cumprod
    if device is not None and torch.device(device).type in NO_FLOAT64:
        return ac.to(device=device, dtype=torch.float32)
    return ac.to(device=device, dtype=torch.float64)


def _bcast(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def add_noise(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Forward diffusion in closed form: ``sqrt(ᾱ_t) x_0 + sqrt(1-ᾱ_t) ε`` (per-sample t). Shapes as ``latents``."""
    ac = alphas_cumprod(noise_scheduler, latents.device)[timesteps.to(latents.device)]
    return _bcast(ac.sqrt(), latents) * latents + _bcast((1 - ac).sqrt(), latents) * noise


def training_target(noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
                    ) -> torch.Tensor:
    """The regression target of the model: ε (``epsilon``) or v (``v_prediction``); ``sample`` gives x_0."""
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        ac = alphas_cumprod(noise_scheduler, latents.device)[timesteps.to(latents.device)]
        return _bcast(ac.sqrt(), latents) * noise - _bcast((1 - ac).sqrt(), latents) * latents
    if kind == "sample":
        return latents
    raise ValueError(f"unsupported prediction_type '{kind}'")


def sample_timesteps(noise_scheduler, n: int, device=None, generator: torch.Generator | None = None,
                     t_min: int = 0, t_max: int | None = None) -> torch.Tensor:
    """Uniform integer timesteps in ``[t_min, t_max)`` (default the full training range), shape (n,)."""
    t_max = noise_scheduler.config.num_train_timesteps if t_max is None else t_max
    t = torch.randint(t_min, t_max, (n,), generator=generator, device=generator.device if generator else "cpu")
    return t.to(device) if device is not None else t


def noise_prediction_loss(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                          noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                          generator: torch.Generator | None = None, reduction: str = "mean") -> torch.Tensor:
    """The denoising loss ``|| model(x_t, t, c) - target ||²`` (the loss every personalization method trains).

    Args:
        unet: ``UNet2DConditionModel``.
        noise_scheduler: training scheduler (schedule + ``prediction_type``).
        latents: (N,4,h,w) clean scaled latents x_0.
        encoder_hidden_states: (N,L,D) conditioning.
        noise: (N,4,h,w) ε; drawn from ``generator`` when ``None``. Pass it to share noise between models
            (the DPO loss compares two models on the same ε and t).
        timesteps: (N,) int; uniform over the training range when ``None``.
        reduction: ``mean`` (scalar), ``none`` (per-sample mean over C,H,W, shape (N,)) or ``elementwise``
            (the unreduced squared error (N,C,h,w), used by the element-wise DPO loss).

    Returns:
        scalar, (N,) or (N,C,h,w) float32 loss.
    """
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=generator.device if generator else "cpu",
                            dtype=latents.dtype).to(latents.device)
    if timesteps is None:
        timesteps = sample_timesteps(noise_scheduler, latents.shape[0], latents.device, generator)
    noisy_latents = add_noise(noise_scheduler, latents, noise, timesteps)
    dtype = getattr(unet, "dtype", noisy_latents.dtype)  # frozen reference models may be bf16/fp16
    model_pred = unet(noisy_latents.to(dtype), timesteps, encoder_hidden_states.to(dtype)).sample
    target = training_target(noise_scheduler, latents, noise, timesteps)
    squared = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    if reduction == "elementwise":
        return squared
    per_sample = squared.mean(dim=tuple(range(1, latents.ndim)))
    if reduction == "none":
        return per_sample
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'mean', 'none' or 'elementwise', got '{reduction}'")


@torch.no_grad()
def noise_residual(unet, noise_scheduler, latents: torch.Tensor, encoder_hidden_states: torch.Tensor,
                   noise: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """``ε̂(x_t, t, c) − ε`` at per-sample levels t: the score-distillation (SDS) direction, without the UNet's
    Jacobian (computed under ``no_grad``).

    For an ε-prediction model it is ``C·h·w / 2`` times the gradient of the per-sample
    :func:`noise_prediction_loss` w.r.t. the model output. v- and x_0-prediction outputs are converted to ε̂ first
    (:func:`eps_and_x0`), so the direction means the same for every model (for v-prediction it is
    ``sqrt(ᾱ_t)·(v̂ − v)``). Draws (ε, then t) from ``generator`` as :func:`noise_prediction_loss` does.

    Args:
        latents: (N,4,h,w) clean scaled latents x_0 (any grad they carry is ignored).
        encoder_hidden_states: (N,L,D) conditioning.
        noise, timesteps: as :func:`noise_prediction_loss`.

    Returns:
        (N,4,h,w) float32, no grad.
    """
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, device=generator.device if generator else "cpu",
                            dtype=latents.dtype).to(latents.device)
    if timesteps is None:
        timesteps = sample_timesteps(noise_scheduler, latents.shape[0], latents.device, generator)
    noisy = add_noise(noise_scheduler, latents.detach(), noise, timesteps)
    dtype = getattr(unet, "dtype", noisy.dtype)
    out = unet(noisy.to(dtype), timesteps, encoder_hidden_states.to(dtype)).sample.float()
    a = alphas_cumprod(noise_scheduler, latents.device)[timesteps.to(latents.device)].float()
    eps, _ = eps_and_x0(noise_scheduler, out, noisy.float(), a)
    return eps - noise.float()


# ============================================================================ DDIM (deterministic)
#: the ``timestep_spacing`` values of a scheduler config that :func:`ddim_timesteps` builds (diffusers' names)
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def ddim_timesteps(noise_scheduler, num_steps: int) -> list[int]:
    """The descending timestep grid DDIM uses: n = ``num_steps`` levels in [0, T-1], built from the scheduler
    config's ``timestep_spacing`` as diffusers' ``DDIMScheduler.set_timesteps`` builds it:

    * ``leading`` (the default, also when the key is absent): ``i·(T//n) + steps_offset``, i = n-1 … 0 (clamped to
      T-1; the tiny and toy models, e.g. 3 steps -> [667, 334, 1]);
    * ``trailing``: ``round(T - k·T/n) - 1``, k = 0 … n-1 (3 steps -> [999, 666, 332]; diffusers' float ``arange``
      gives one level too many, -1, for some n, e.g. 61: that level is left out here);
    * ``linspace``: ``round(linspace(0, T-1, n))`` descending (3 steps -> [999, 500, 0]).
    """
    import numpy as np

    config = noise_scheduler.config
    T = config.num_train_timesteps
    if not 1 <= num_steps <= T:
        raise ValueError(f"num_steps must be in [1, {T}], got {num_steps}")
    spacing = config.get("timestep_spacing") or "leading"
    if spacing == "leading":
        ratio = T // num_steps
        offset = config.get("steps_offset") or 0
        return [min(i * ratio + offset, T - 1) for i in range(num_steps)][::-1]
    if spacing == "trailing":  # the same float arithmetic as diffusers' np.arange(T, 0, -T/n)
        grid = np.round(T + np.arange(num_steps) * -(T / num_steps)).astype(np.int64) - 1
    elif spacing == "linspace":
        grid = np.linspace(0, T - 1, num_steps).round()[::-1].astype(np.int64)
    else:
        raise ValueError(f"timestep_spacing={spacing!r} of the scheduler config is not supported; "
                         f"choose one of {', '.join(TIMESTEP_SPACINGS)}")
    return [int(t) for t in grid]


def ddim_steps(noise_scheduler, num_steps: int) -> list[tuple[int, int]]:
    """The steps of the ``num_steps`` DDIM grid in sampling order, as (t, t_prev) pairs: step i denoises from level
    ``t = ddim_timesteps(...)[i]`` to level ``t_prev``; -1 is the clean end (ᾱ of :func:`final_alpha_cumprod`).

    ``t_prev = t - T//n``, the level diffusers' ``DDIMScheduler.step`` steps to (for the leading spacing the next
    grid level; for trailing and linspace grids it can lie a level or more above it), and the last step always ends
    at the clean end. That differs from diffusers only where its last step stops at level 0 instead (t_last = T//n:
    leading grids with n > T/2, some trailing ones, e.g. n = 6), and only with ``set_alpha_to_one`` true (false:
    both end at ᾱ_0). :func:`ddim_invert` walks the same steps backwards.
    """
    grid = ddim_timesteps(noise_scheduler, num_steps)
    ratio = noise_scheduler.config.num_train_timesteps // num_steps
    # max(): the clamped top level of a leading grid with n = T (999 twice) stays one level, as before
    return [(t, max(t - ratio, grid[i + 1]) if i + 1 < len(grid) else -1) for i, t in enumerate(grid)]


def _predict(unet, noise_scheduler, x: torch.Tensor, t: int, cond: torch.Tensor, uncond: torch.Tensor | None,
             guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (ε̂, x̂_0) at level t with classifier-free guidance. ``x`` (N,4,h,w); ``cond``/``uncond`` (N,L,D)."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    inp = x.to(unet.dtype)
    if uncond is not None and guidance_scale != 1.0:
        out = unet(torch.cat([inp, inp]), torch.cat([tt, tt]), torch.cat([uncond, cond]).to(unet.dtype)).sample
        out_u, out_c = out.float().chunk(2)
        out = out_u + guidance_scale * (out_c - out_u)
    else:
        out = unet(inp, tt, cond.to(unet.dtype)).sample.float()
    a = alphas_cumprod(noise_scheduler, x.device)[t].float()
    return eps_and_x0(noise_scheduler, out, x.float(), a)


def eps_and_x0(noise_scheduler, out: torch.Tensor, x: torch.Tensor, a: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε̂, x̂_0) from the model output ``out`` at the noisy latents ``x`` (both (N,4,h,w) float32) and ᾱ ``a``
    (a scalar or (N,) per sample), for each ``prediction_type``."""
    if a.ndim == 1:
        a = _bcast(a, x)
    kind = noise_scheduler.config.prediction_type
    if kind == "epsilon":
        eps = out
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    elif kind == "v_prediction":
        x0 = a.sqrt() * x - (1 - a).sqrt() * out
        eps = a.sqrt() * out + (1 - a).sqrt() * x
    elif kind == "sample":
        x0 = out
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
    else:
        raise ValueError(f"unsupported prediction_type '{kind}'")
    return eps, x0


def final_alpha_cumprod(noise_scheduler, device=None) -> torch.Tensor:
    """ᾱ at the clean end of a DDIM grid (float32 scalar): 1 when the scheduler config's ``set_alpha_to_one`` is true
    or absent, else ``alphas_cumprod[0]``, as diffusers' ``DDIMScheduler`` (``final_alpha_cumprod``) and
    ``DDIMInverseScheduler`` (``initial_alpha_cumprod``). SD-1.x/2.x configs set it false; ``load_sd`` keeps the key
    on its ``DDPMScheduler`` (diffusers registers a compatible scheduler's keys)."""
    if noise_scheduler.config.get("set_alpha_to_one", True):
        return torch.ones((), device=device)
    return alphas_cumprod(noise_scheduler, device)[0].float()


def _level_alpha(noise_scheduler, t: int, device) -> torch.Tensor:
    """ᾱ at level t; t < 0 is the clean end (:func:`final_alpha_cumprod`)."""
    if t < 0:
        return final_alpha_cumprod(noise_scheduler, device)
    return alphas_cumprod(noise_scheduler, device)[t].float()


def ddim_sample(unet, noise_scheduler, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None = None,
                guidance_scale: float = 1.0, num_steps: int = 50, start_step: int = 0,
                checkpoint: bool = False, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Deterministic DDIM sampling (η = 0) from noisy latents ``z_T`` to clean latents ``z_0``.

    Differentiable when called under grad mode (LDU trains its perturbation network *through* these steps);
    ``checkpoint=True`` recomputes each UNet call in backward to save memory.

    Args:
        unet, noise_scheduler: the model and its training schedule.
        latents: (N,4,h,w) scaled latents at the first level of the grid.
        cond: (N,L,D) conditioning; ``uncond`` (N,L,D) the empty-prompt conditioning for CFG.
        guidance_scale: classifier-free guidance weight (1 = no guidance).
        num_steps: size of the DDIM grid (e.g. 50 for sampling, 4 for LDU's few-step denoise).
        start_step: skip the first grid levels (img2img/DiffPure start from an intermediate level).
        callback: called as ``callback(i, num_steps)`` after each step (progress bars).

    Returns:
        (N,4,h,w) float32 latents z_0.
    """
    steps = ddim_steps(noise_scheduler, num_steps)
    x = latents.float()
    for i in range(start_step, len(steps)):
        t, t_next = steps[i]
        if checkpoint and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint as ckpt

            eps, x0 = ckpt(_predict, unet, noise_scheduler, x, t, cond, uncond, guidance_scale, use_reentrant=False)
        else:
            eps, x0 = _predict(unet, noise_scheduler, x, t, cond, uncond, guidance_scale)
        a_next = _level_alpha(noise_scheduler, t_next, x.device)
        x = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        if callback is not None:
            callback(i, len(steps))
    return x


def ddim_invert(unet, noise_scheduler, latents: torch.Tensor, cond: torch.Tensor, num_steps: int = 50,
                end_step: int | None = None, callback: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """DDIM inversion (η = 0): clean latents ``z_0`` -> ``z_T`` along the deterministic ODE.

    Walks the steps of :func:`ddim_steps` backwards (each from its ``t_prev`` up to its ``t``, the first from the
    clean end, ᾱ of :func:`final_alpha_cumprod`, as diffusers' ``DDIMInverseScheduler``); at each step the noise is
    predicted at the *target* level from the current latents (the standard approximation
    ``ε(x_{t+1}, t+1) ≈ ε(x_t, t+1)``), so that ``ddim_sample(ddim_invert(z0))`` ≈ ``z0`` (exactly when ε̂ does not
    depend on the latents). Use no guidance (``cond`` is usually the empty prompt).

    Args:
        latents: (N,4,h,w) clean scaled latents.
        cond: (N,L,D) conditioning.
        num_steps: grid size; must match the sampler's for a faithful round trip.
        end_step: stop after this many grid levels (``None`` = all the way to the top level).

    Returns:
        (N,4,h,w) float32 latents at the top level (or at level ``end_step``).
    """
    steps = ddim_steps(noise_scheduler, num_steps)[::-1]  # ascending
    stop = len(steps) if end_step is None else end_step
    x = latents.float()
    for i in range(stop):
        t, t_prev = steps[i]
        a_prev = _level_alpha(noise_scheduler, t_prev, x.device)
        a_t = _level_alpha(noise_scheduler, t, x.device)
        eps, _ = _predict(unet, noise_scheduler, x, t, cond, None, 1.0)
        x0 = (x - (1 - a_prev).sqrt() * eps) / a_prev.sqrt()
        x = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
        if callback is not None:
            callback(i, stop)
    return x


# ============================================================================ generation
#: the distance between the seeds of two independent draws of a sampling (or of anything seeded per image): image i
#: of a :func:`generate` seeded s starts from noise seeded s + i, so seeds s and s + 1 share all but one image;
#: draws k = 0, 1, … seeded s + SEED_STRIDE·k share none (up to 100,003 images each)
SEED_STRIDE = 100_003


def check_sample(cfg, key: str = "sample") -> None:
    """The checks of a :class:`apdm.config.SampleConfig` that need no model (a known sampler, counts >= 1, at least
    one prompt), for commands to run before any work: a typo found after training loses the training.

    Raises:
        ValueError: names ``key`` and the field.
    """
    from apdm.core.models import SCHEDULERS

    if cfg.sampler not in SCHEDULERS:
        raise ValueError(f"{key}.sampler={cfg.sampler!r} is unknown; choose one of {', '.join(SCHEDULERS)}")
    for name in ("num_images_per_prompt", "num_inference_steps", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"{key}.{name} must be a whole number >= 1, got {getattr(cfg, name)}")
    if not cfg.prompts or not all(isinstance(p, str) and p.strip() for p in cfg.prompts):
        raise ValueError(f"{key}.prompts must list at least one non-empty prompt, got {cfg.prompts!r}")
    check_guidance_scale(cfg.guidance_scale, f"{key}.guidance_scale")


def check_guidance_scale(value, key: str) -> None:
    """Raise ValueError naming ``key`` unless ``value`` is a finite number >= 0: a negative classifier-free guidance
    scale pushes the samples away from their prompt (0 = unconditional, 1 = conditional without guidance)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{key}={value!r}: must be a number >= 0 (7.5 is Stable Diffusion's usual; 1 = no guidance, "
                         "0 = unconditional); a negative scale steers the samples away from their prompt")


@torch.no_grad()
def generate(sd, prompts: Sequence[str] | str, num_images_per_prompt: int = 1, num_inference_steps: int = 25,
             guidance_scale: float = 7.5, negative_prompt: str = "", seed: int = 0, batch_size: int = 8,
             sampler: str = "ddim", height: int | None = None, width: int | None = None,
             quiet: bool = False) -> torch.Tensor:
    """Text-to-image generation; returns (len(prompts)*num_images_per_prompt, 3, H, W) float32 in [0,1] (CPU).

    Images come out grouped by prompt (all images of prompt 0 first). Each image's initial noise is drawn from
    a generator seeded with ``seed + index``, and a stochastic sampler (``ddpm``) draws that image's step noise from
    the same generator, so results do not depend on ``batch_size`` nor on torch's global RNG (and two samplings whose
    seeds are less than their image count apart share images: space independent draws :data:`SEED_STRIDE` apart).

    Args:
        sd: :class:`apdm.core.models.SD`.
        sampler: ``ddim`` (this module's sampler) or a diffusers scheduler name (``pndm``, ``dpmsolver``,
            ``euler``, ``ddpm``), stepped with diffusers' own ``step``.
    """
    from apdm.utils import progress

    if isinstance(prompts, str):
        prompts = [prompts]
    h = (height or sd.resolution) // sd.vae_scale_factor
    w = (width or sd.resolution) // sd.vae_scale_factor
    jobs = [(p, k) for p in prompts for k in range(num_images_per_prompt)]
    uncond_all = encode_prompt(sd.text_encoder, sd.tokenizer, [negative_prompt])
    out = []
    bar = progress(total=len(jobs), desc="generating", disable=quiet)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        cond = encode_prompt(sd.text_encoder, sd.tokenizer, [p for p, _ in chunk])
        uncond = uncond_all.expand(len(chunk), -1, -1)
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        noise = torch.stack([torch.randn((sd.unet.config.in_channels, h, w), generator=g) for g in generators])
        noise = noise.to(sd.device)
        if sampler == "ddim":
            latents = ddim_sample(sd.unet, sd.noise_scheduler, noise, cond, uncond, guidance_scale, num_inference_steps)
        else:
            latents = _diffusers_sample(sd, sampler, noise, cond, uncond, guidance_scale, num_inference_steps,
                                        generators)
        out.append(decode_latents(sd.vae, latents).cpu())
        bar.update(len(chunk))
    bar.close()
    return torch.cat(out)


def _diffusers_sample(sd, sampler: str, noise, cond, uncond, guidance_scale: float, num_steps: int,
                      generators: list[torch.Generator] | None = None) -> torch.Tensor:
    """Sampling loop with a diffusers scheduler (for protocols that specify e.g. PNDM 20 steps).

    ``generators`` (one per image of ``noise`` (N,C,h,w)) feed every scheduler whose ``step`` takes a ``generator``
    (``ddpm`` draws its step noise from it; ``euler`` and ``dpmsolver`` draw nothing that changes their result in
    their default settings), as diffusers' pipelines pass theirs; without it ``step`` would draw from torch's global
    RNG. ``pndm`` takes none.
    """
    import inspect

    from apdm.core.models import make_scheduler

    scheduler = make_scheduler(sd.noise_scheduler, sampler)
    scheduler.set_timesteps(num_steps, device=sd.device)
    step_kwargs = {}
    if generators is not None and "generator" in inspect.signature(scheduler.step).parameters:
        step_kwargs["generator"] = generators
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t).to(sd.unet.dtype)
        out = sd.unet(inp, t, torch.cat([uncond, cond]).to(sd.unet.dtype)).sample.float()
        out_u, out_c = out.chunk(2)
        x = scheduler.step(out_u + guidance_scale * (out_c - out_u), t, x, **step_kwargs).prev_sample
    return x


@torch.no_grad()
def purification_noise(sd, n: int, seed: int) -> torch.Tensor:
    """The noise :func:`img2img` adds to ``n`` images at the model's resolution, drawn at once from ``seed``:
    (n, C, res/f, res/f) on the CPU. Slice it per batch, so that regenerating a set in batches of any size gives
    the set's result (and a batch of all n images gives exactly ``img2img(..., seed=seed)``)."""
    side = sd.resolution // sd.vae_scale_factor
    return torch.randn((n, sd.vae.config.latent_channels, side, side), generator=torch.Generator().manual_seed(seed))


def img2img_steps(strength: float, num_inference_steps: int) -> int:
    """How many of the last steps of a ``num_inference_steps`` DDIM grid :func:`img2img` runs at ``strength``:
    ``int(strength·N)`` as diffusers' img2img pipelines count them (strength 0.7 of 5 steps: 3), at least 1 and at
    most N. The product is floored after adding 1e-9, so that one whose float is a hair below a whole number
    counts as that number (0.29·100 = 28.999999999999996 -> 29, where diffusers runs 28).

    Until 2026-12-07 apdm rounded (``round(strength·N)``: 4 of 5 steps at 0.7, and Python's half-to-even rounding
    gave 2 at 0.3 and 0.5 alike); strengths whose product is a whole number (0.2 of 50, 0.02 of 100) run as before.
    """
    return min(max(1, int(strength * num_inference_steps + 1e-9)), num_inference_steps)


def img2img(sd, images: torch.Tensor, strength: float, prompt: str = "", guidance_scale: float = 1.0,
            num_inference_steps: int = 50, seed: int = 0, noise: torch.Tensor | None = None) -> torch.Tensor:
    """SDEdit-style regeneration: noise images to a level of the DDIM grid and DDIM-denoise them back.

    This is the purification primitive (DiffPure with a latent diffusion model). ``strength`` in (0, 1]:
    the fraction of the ``num_inference_steps`` DDIM grid that is re-generated, :func:`img2img_steps` of its last
    steps (as diffusers' img2img; strength 0.2 of 50 steps: the last 10, from t = 181 on the tiny and toy grids).

    Args:
        images: (N,3,H,W) in [0,1]. Returns the same shape in [0,1].
        noise: the latents' noise (N,C,h,w) (see :func:`purification_noise`, which a caller regenerating a set in
            batches uses so that the batch size does not change the result); ``None`` = drawn from ``seed``.
    """
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    latents = encode_images(sd.vae, images)
    grid = ddim_timesteps(sd.noise_scheduler, num_inference_steps)
    start = num_inference_steps - img2img_steps(strength, num_inference_steps)
    t_start = torch.full((latents.shape[0],), grid[start], device=latents.device, dtype=torch.long)
    if noise is None:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    elif tuple(noise.shape) != tuple(latents.shape):
        raise ValueError(f"img2img: noise of shape {tuple(noise.shape)} for latents {tuple(latents.shape)}")
    noise = noise.to(latents.device, torch.float32)  # not rounded to a bf16/fp16 model's dtype: add_noise is fp32
    noisy = add_noise(sd.noise_scheduler, latents.float(), noise, t_start)
    cond = encode_prompt(sd.text_encoder, sd.tokenizer, [prompt] * len(images))
    uncond = encode_prompt(sd.text_encoder, sd.tokenizer, [""] * len(images)) if guidance_scale != 1.0 else None
    z0 = ddim_sample(sd.unet, sd.noise_scheduler, noisy, cond, uncond, guidance_scale, num_inference_steps,
                     start_step=start)
    return decode_latents(sd.vae, z0).cpu()
