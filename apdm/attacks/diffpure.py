"""DiffPure-style purification with the loaded latent diffusion model (Nie et al. 2022; SDEdit, Meng et al. 2022).

The attacker's cleaning step before personalization: encode the (protected) images, noise them to a level t* of the
DDIM grid and denoise them back with DDIM (:func:`apdm.core.diffusion.img2img`, the one copy of that math). t* is
the grid's timestep at which the last ``strength`` of its ``num_inference_steps`` steps begin, not ``strength·T``:
strength 0.2 of 50 runs the last 10 steps from t* = 181 (SD's "leading" spacing with ``steps_offset`` 1), not 200.
Default ``strength=0.2`` follows the SD img2img DiffPure used in the protection literature (Hönig et al.); the
original DiffPure used t* = 0.1–0.15 with a pixel-space model.
"""

from __future__ import annotations

import torch

from apdm.core import diffusion as D
from apdm.utils import progress


def diffpure(images: torch.Tensor, sd, strength: float = 0.2, num_inference_steps: int = 50, prompt: str = "",
             guidance_scale: float = 1.0, seed: int = 0, batch_size: int = 8, quiet: bool = True) -> torch.Tensor:
    """Purify images with the diffusion model ``sd``.

    Args:
        images: (N,3,H,W) float in [0,1]; resized to the model resolution and back if they differ.
        sd: :class:`apdm.core.models.SD` (typically the model the attacker will personalize).
        strength: fraction of the DDIM grid regenerated (0 < strength ≤ 1).
        num_inference_steps: DDIM grid size.
        prompt: conditioning (the image caption if known; empty = unconditional).
        quiet: no progress bar over the batches.

    Returns:
        (N,3,H,W) float in [0,1] on the CPU.
    """
    import torch.nn.functional as F

    if not 0.0 < strength <= 1.0:
        raise ValueError(f"diffpure: strength must be in (0, 1], got {strength}")
    if num_inference_steps < 1 or batch_size < 1:
        raise ValueError(f"diffpure: num_inference_steps and batch_size must be >= 1, got {num_inference_steps} "
                         f"and {batch_size}")
    if num_inference_steps > 1000:  # DDIM grids lie on the schedulers' 1000 training steps
        raise ValueError(f"diffpure: num_inference_steps must be at most 1000, got {num_inference_steps}")
    if len(images) == 0:
        return images.detach().float().cpu()
    h, w = images.shape[-2:]
    res = sd.resolution
    x = images if (h, w) == (res, res) else F.interpolate(images, size=(res, res), mode="bicubic", antialias=True)
    outs = []
    noise = D.purification_noise(sd, x.shape[0], seed)  # drawn for the set: the batch size changes nothing
    for i in progress(range(0, x.shape[0], batch_size), desc="DiffPure batches", disable=quiet):
        chunk = x[i:i + batch_size].to(sd.device).clamp(0, 1)
        outs.append(D.img2img(sd, chunk, strength, prompt, guidance_scale, num_inference_steps,
                              noise=noise[i:i + batch_size]))
    out = torch.cat(outs)
    if (h, w) != (res, res):
        out = F.interpolate(out, size=(h, w), mode="bicubic", antialias=True).clamp(0, 1)
    return out
