"""Noisy Upscaling (Hönig et al., "Adversarial perturbations cannot reliably protect artists from generative AI",
ICLR 2025): add Gaussian noise to the photo, then regenerate it with a diffusion ×4 upscaler.

The noise drowns the protective perturbation; the upscaler, conditioned on the noisy photo, draws a clean photo at
four times the size, which the attacker's fine-tuning then resizes to the model's resolution. It is one of the simple
purifiers with which Hönig et al. undid the protections they tested. Their recipe, and our defaults:

1. Gaussian noise of standard deviation ``sigma`` = 0.1 on [0, 1] pixels, clipped, saved as 8-bit (scikit-image
   ``random_noise(var=σ²)``, then a PNG);
2. ``stabilityai/stable-diffusion-x4-upscaler`` (diffusers ``StableDiffusionUpscalePipeline``) with
   ``noise_level=320``, the pipeline's 75 steps and guidance 9.0, the image's caption as prompt;
3. the ×4 output, here resized back to the input's size so that the attack keeps shapes (the personalization
   simulator resizes to the model's resolution in any case).

``downscale=4`` first shrinks the photo four times, so that the upscaler returns it at its own size: MetaCloak's
"resize to 128, then the SD ×4 upscaler" robustness hook (at 512 px), with noise added. It costs 16× less than the
default, which runs the upscaler's UNet at the photo's full size (a 512-px photo gives a 2048-px result).

The upscaler is a separate model, not the one under attack: ``upscaler`` is a diffusers folder or hub id, or
``toy`` (the toy world's, built by ``apdm toy upscaler``) or ``tiny`` (random weights of the real
classes, for tests). Weights load from safetensors only.
"""

from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch

from apdm.utils import LOG, progress

DEFAULT_UPSCALER = "stabilityai/stable-diffusion-x4-upscaler"


def tiny_upscaler(seed: int = 0):
    """A ×4 ``StableDiffusionUpscalePipeline`` with random weights and tiny configs of the real classes.

    Same structure as the published upscaler (UNet with 7 input channels, the noise level as class label, a ×4 VAE,
    a DDPM scheduler for the low-resolution noise, v-prediction), about 0.4 M parameters. For tests and smoke runs.
    """
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        DDPMScheduler,
        StableDiffusionUpscalePipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    from apdm.core.tokenizer import build_tokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=16, in_channels=7, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8, num_class_embeds=1000)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
        norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        scaling_factor=0.08333)
    tokenizer = build_tokenizer()
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    low_res = DDPMScheduler(beta_schedule="scaled_linear", num_train_timesteps=1000)
    sched = DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction", num_train_timesteps=1000)
    return StableDiffusionUpscalePipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                          low_res_scheduler=low_res, scheduler=sched, max_noise_level=350)


@functools.lru_cache(maxsize=2)
def load_upscaler(path: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """The ×4 upscaler pipeline at ``path`` (diffusers folder, hub id, ``toy`` or ``tiny``), cached per process.

    Raises:
        ValueError: with the path and the reason when the folder is missing or is not a diffusers upscaler.
    """
    from diffusers import StableDiffusionUpscalePipeline

    if path == "tiny":
        pipe = tiny_upscaler()
        if dtype != torch.float32:
            pipe.to(dtype=dtype)
    else:
        p = _check_upscaler(path)  # "toy" resolves to the toy world's folder, named from here on
        if path == "toy":
            path = str(p)
        try:
            pipe = StableDiffusionUpscalePipeline.from_pretrained(
                str(p) if p.exists() else path, torch_dtype=dtype, use_safetensors=True,
                local_files_only=p.exists())
        except (OSError, ValueError) as exc:
            raise ValueError(_unloadable(path, f"{type(exc).__name__}: {exc}")) from exc
        LOG.info("loaded the upscaler %s", path)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def _unloadable(path: str, why: str) -> str:
    """The message for an upscaler that cannot be loaded, at check time or at run time."""
    return (f"noisy_upscale: could not load the upscaler '{path}' ({why}). Without network access it must be a "
            f"local folder (e.g. `hf download {DEFAULT_UPSCALER} --local-dir ./x4`, then upscaler=./x4)")


def _hub_offline() -> bool:
    """Whether Hugging Face Hub downloads are switched off (``HF_HUB_OFFLINE``, now or when the hub was imported)."""
    import os

    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in (
        "1", "true", "yes", "on")


def _upscaler_folder(path: str) -> Path | None:
    """The local folder of the upscaler ``path``: its own folder (``toy``: the toy world's upscaler, where
    :func:`apdm.core.models.local_folder`'s ``toy`` is the toy SD model), else a hub id's snapshot in the Hugging
    Face cache, found as the SD loader finds a cached model (``local_folder``); None for ``tiny`` and for a hub id
    that is not here.

    Raises:
        ValueError: as :func:`_check_upscaler`.
    """
    from apdm.core.models import local_folder

    path = path.strip()
    if path == "tiny":
        return None
    p = _check_upscaler(path)
    return p if p.exists() else local_folder(path)


def _upscaler_index(path: str) -> Path | None:
    """The ``model_index.json`` of the upscaler ``path`` (:func:`_upscaler_folder`), or None when it is not here."""
    folder = _upscaler_folder(path)
    index = folder / "model_index.json" if folder is not None else None
    return index if index is not None and index.is_file() else None


def max_noise_level(path: str) -> int | None:
    """The upscaler's ``max_noise_level`` as far as it can be known without loading it, or None.

    Read from ``model_index.json`` (where ``StableDiffusionUpscalePipeline`` keeps it; 350, the pipeline's default,
    when the file does not say) in a local folder, the toy world's folder, or the Hugging Face cache for a hub id;
    350 for ``tiny`` and for the published upscaler when it is not cached.

    Raises:
        ValueError: a local folder that is missing or is not a diffusers model (as the loader would).
    """
    import json

    path = path.strip()
    if path == "tiny":
        return 350  # tiny_upscaler's
    index = _upscaler_index(path)
    if index is None:  # a hub id that is not cached
        return 350 if path == DEFAULT_UPSCALER else None
    try:
        level = json.loads(index.read_text()).get("max_noise_level", 350)
    except (OSError, ValueError, AttributeError):  # unreadable: the loader will report it
        return None
    return level if isinstance(level, int) else None


def check_loadable(upscaler: str = DEFAULT_UPSCALER, **_) -> None:
    """Refuse an upscaler that cannot be loaded here, before a run: a hub id that is not in the Hugging Face cache
    while ``HF_HUB_OFFLINE`` is set (the loader would fail with this message, after the run's earlier work).
    Called by :func:`apdm.attacks.transforms.check_attack` with ``loadable=True`` (the other keyword arguments of
    the spec are ignored).

    Raises:
        ValueError: as :func:`max_noise_level`, or the hub id is not cached while offline.
    """
    path = upscaler.strip()
    if path == "tiny" or _check_upscaler(path).exists():
        return
    if _hub_offline() and _upscaler_index(path) is None:
        raise ValueError(_unloadable(path, "it is not in the Hugging Face cache and HF_HUB_OFFLINE is set"))


def _toy_upscaler():
    """The toy world's upscaler folder (``apdm toy upscaler`` writes it)."""
    from apdm.toy.world import _part

    p = _part("upscaler", "model_index.json")
    if p is None:
        raise ValueError("noisy_upscale: upscaler=toy, but no toy upscaler is built: run `apdm toy upscaler` "
                         "(about 15 minutes on 2 CPU cores)")
    return p


def _check_upscaler(path: str):
    """``path`` as a Path; raises ValueError for a local folder that is missing or is not a diffusers model."""
    if not path.strip():
        raise ValueError("noisy_upscale: upscaler is empty (a diffusers folder, hub id, 'toy' or 'tiny')")
    if path == "toy":
        return _toy_upscaler()
    p = Path(path).expanduser()
    if p.exists() and not (p / "model_index.json").is_file():
        raise ValueError(f"noisy_upscale: {p} is not a diffusers model folder (model_index.json is missing)")
    if not p.exists() and path != "tiny" and (path.startswith((".", "/", "~")) or path.count("/") != 1):
        raise ValueError(f"noisy_upscale: upscaler folder not found: {p}")
    return p


def model_files(upscaler: str = DEFAULT_UPSCALER, **_) -> list | None:
    """The upscaler's files (:func:`apdm.core.models.folder_files`) for the key of a cell computed with it, so that
    a rebuilt or replaced upscaler at the same path is not served from old cells; None for ``tiny`` and for a hub
    id that is not here (its id then keys it)."""
    from apdm.core.models import folder_files

    folder = _upscaler_folder(upscaler)
    return folder_files(folder) if folder is not None and folder.is_dir() else None


#: Keys ``apdm evaluate``'s cells (:func:`apdm.evaluation.run._attack_parts`): 2 since the upscaler's noise is
#: drawn independently of the pixel noise (2026-12-07), so cells computed before are not reused.
CELL_VERSION = 2


def _pipeline_noise(pipe, noisy: torch.Tensor, g: torch.Generator, device: str, dtype: torch.dtype):
    """The upscaler's noise for all of ``noisy``, drawn on the CPU from ``g`` (the generator that drew the pixel
    noise, so the two are independent draws of one stream and a GPU run draws the same numbers as a CPU run): first
    the noise augmentation of the (preprocessed) low-resolution photos, then the starting latents, each (N,C,h,w)
    on ``device`` in ``dtype``."""
    n = len(noisy)
    lh, lw = pipe.image_processor.preprocess(noisy[:1]).shape[-2:]  # the pipeline's size for its input
    low_res = torch.randn((n, noisy.shape[1], lh, lw), generator=g)
    latents = torch.randn((n, pipe.vae.config.latent_channels, lh, lw), generator=g)
    return low_res.to(device=device, dtype=dtype), latents.to(device=device, dtype=dtype)


@contextlib.contextmanager
def _low_res_noise(pipe, noise: torch.Tensor):
    """Within the block, ``pipe``'s noise augmentation of its input uses ``noise`` instead of its own draw (the
    pipeline takes the starting latents as an argument, but not this noise)."""
    sched = pipe.low_res_scheduler

    def add_noise(original_samples, _drawn, timesteps):
        return type(sched).add_noise(sched, original_samples, noise.to(original_samples), timesteps)

    sched.add_noise = add_noise
    try:
        yield
    finally:
        del sched.add_noise


def noisy_upscale(images: torch.Tensor, sd, sigma: float = 0.1, noise_level: int = 320,
                  upscaler: str = DEFAULT_UPSCALER, downscale: int = 1, prompt: str = "",
                  num_inference_steps: int = 75, guidance_scale: float = 9.0, seed: int = 0, batch_size: int = 4,
                  quiet: bool = True) -> torch.Tensor:
    """Purify images by noising them and regenerating them with a ×4 diffusion upscaler.

    Args:
        images: (N,3,H,W) float in [0,1].
        sd: the attacked :class:`apdm.core.models.SD`; only its device and dtype are used (``None``: CPU, fp32).
        sigma: standard deviation of the pixel noise on [0,1] (0.1 in Hönig et al.; 0.05 for their plain noising).
        noise_level: the upscaler's own noise augmentation of its low-resolution input, 0..``max_noise_level``
            (350 for the published model); 320 as in Hönig et al.
        upscaler: diffusers folder or hub id of a ``StableDiffusionUpscalePipeline``, ``toy`` or ``tiny``.
        downscale: shrink the photo by this factor first (1 = Hönig et al.; with 4 the ×4 result has the input's
            size, so the final resize does nothing).
        prompt: the caption (empty: unconditional; guidance is then skipped, as it would change nothing).
        num_inference_steps, guidance_scale: the upscaler's sampling (pipeline defaults 75 and 9.0).
        seed: seeds one CPU generator that draws, for the whole set and in this order, the pixel noise, the
            upscaler's noise augmentation of the low-resolution photos and its starting latents: three independent
            draws (until 2026-12-07's second fix the upscaler's noise came from a second generator seeded ``seed``
            too, so on the CPU its augmentation noise repeated the pixel noise exactly and the photo got one noise
            twice, ~25 % more than published at level 320), the same on CPU and GPU. So, as in
            :func:`apdm.attacks.diffpure.diffpure`, ``batch_size`` changes nothing. A stochastic sampler (not the
            published DDIM at its default eta 0) draws its step noise per photo, from ``seed + 1 + i`` for photo
            ``i``.
        batch_size: photos per upscaler call.
        quiet: no progress bar over the batches.

    Returns:
        (N,3,H,W) float in [0,1] on the CPU, on the 1/255 grid of an 8-bit image.
    """
    import torch.nn.functional as F

    if not 0.0 <= sigma <= 1.0:
        raise ValueError(f"noisy_upscale: sigma must be in [0, 1] (pixels on [0, 1]), got {sigma}")
    if not 0 <= noise_level <= 1000:
        raise ValueError(f"noisy_upscale: noise_level must be in 0..1000 (the published upscaler allows up to 350), "
                         f"got {noise_level}")
    if downscale < 1 or num_inference_steps < 1 or batch_size < 1:
        raise ValueError(f"noisy_upscale: downscale, num_inference_steps and batch_size must be >= 1, got "
                         f"{downscale}, {num_inference_steps} and {batch_size}")
    if guidance_scale < 0:
        raise ValueError(f"noisy_upscale: guidance_scale must be >= 0, got {guidance_scale}")
    known = max_noise_level(upscaler)  # also refuses a missing folder or one that is not a model
    if known is not None and noise_level > known:
        raise ValueError(f"noisy_upscale: noise_level {noise_level} exceeds the upscaler's max_noise_level {known}")
    if len(images) == 0:
        return images.detach().float().cpu()
    device = str(sd.device) if sd is not None else "cpu"
    dtype = sd.dtype if sd is not None else torch.float32
    pipe = load_upscaler(upscaler.strip(), device, dtype)
    if noise_level > pipe.config.max_noise_level:
        raise ValueError(f"noisy_upscale: noise_level {noise_level} exceeds the upscaler's max_noise_level "
                         f"{pipe.config.max_noise_level}")
    h, w = images.shape[-2:]
    lh, lw = max(1, round(h / downscale)), max(1, round(w / downscale))
    x = images.detach().float().cpu().clamp(0, 1)
    if (lh, lw) != (h, w):
        x = F.interpolate(x, size=(lh, lw), mode="bicubic", antialias=True).clamp(0, 1)
    scale = guidance_scale if prompt else 1.0
    # every draw is made for the whole set, so batch_size changes nothing (see ``seed``)
    g = torch.Generator().manual_seed(seed)
    noisy_all = (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1).mul(255).round().div(255)
    low_res_noise, latents = _pipeline_noise(pipe, noisy_all, g, device, dtype)
    outs = []
    for i in progress(range(0, x.shape[0], batch_size), desc="Noisy Upscaling batches", disable=quiet):
        noisy = noisy_all[i:i + batch_size]
        steps_g = [torch.Generator(device).manual_seed(seed + 1 + j) for j in range(i, i + len(noisy))]
        with torch.no_grad(), _low_res_noise(pipe, low_res_noise[i:i + batch_size]):
            up = pipe(prompt=[prompt] * len(noisy), image=noisy.to(device=device, dtype=dtype),
                      noise_level=noise_level, num_inference_steps=num_inference_steps, guidance_scale=scale,
                      generator=steps_g, latents=latents[i:i + batch_size], output_type="pt").images
        up = up.float().cpu().clamp(0, 1)
        if tuple(up.shape[-2:]) != (h, w):
            up = F.interpolate(up, size=(h, w), mode="bicubic", antialias=True)
        outs.append(up.clamp(0, 1))
    return torch.cat(outs).mul(255).round().div(255)
