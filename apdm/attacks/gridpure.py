"""GrIDPure-style purification (Zhao et al., CVPR 2024): small DiffPure steps on a grid of patches, iterated.

Plain DiffPure at a strength that removes a protection also blurs the face; GrIDPure instead regenerates
half-size patches at a *small* noise level many times, blending each round with its input so the structure stays.
One round on images ``x`` (N,3,H,W):

1. patches of side ``p = min(H, W) // 2`` at stride ``p // 2`` (3×3 on a square image; the last row/column is
   aligned to the border), plus one mosaic of the four ``p/2`` corner blocks, so that corners are regenerated
   twice like the rest of the image;
2. each patch is resized to the model's resolution, regenerated with :func:`apdm.core.diffusion.img2img`
   (``strength`` of a ``num_inference_steps`` DDIM grid), resized back;
3. overlapping patches are averaged pixel by pixel; the round's output is ``(1 − γ)·merged + γ·x`` with ``x`` the
   round's own input (``blend="round"``, the default and the published code: the protected photo's weight falls as
   γ^r); ``blend="photo"`` blends with the attack's input ``x₀`` in every round instead.

Published defaults: 10 of 1000 diffusion steps per round (t* = 0.01, with a 256-px pixel-space model), 20 rounds,
γ = 0.1. With apdm's latent model the defaults are ``strength=0.02`` on a 100-step grid (two DDIM steps from
t = 11 on SD's grid, t* ≈ 0.01) and 20 rounds. Where apdm differs from the published attack: docs/evaluate.md,
"Adaptive purification: IMPRESS and GrIDPure".
"""

from __future__ import annotations

import torch

from apdm.core import diffusion as D
from apdm.utils import progress


def grid_boxes(h: int, w: int) -> tuple[int, list[tuple[int, int]]]:
    """The patch side and the top-left corners (y, x) of GrIDPure's grid on an ``h × w`` image.

    Returns ``(p, corners)`` with ``p = min(h, w) // 2`` and corners at stride ``p // 2``, the last row and column
    flush with the border, so every pixel is covered.
    """
    p = min(h, w) // 2
    if p < 2:
        raise ValueError(f"gridpure: image {h}x{w} is too small for a patch grid (need at least 4 px per side)")
    s = max(1, p // 2)

    def starts(n: int) -> list[int]:
        out = list(range(0, n - p + 1, s))
        if out[-1] != n - p:
            out.append(n - p)
        return out

    return p, [(y, x) for y in starts(h) for x in starts(w)]


def _mosaic(x: torch.Tensor, p: int) -> torch.Tensor:
    """The four (p/2)-corner blocks of images (N,3,H,W) tiled into (N,3,2·(p//2),2·(p//2))."""
    q = p // 2
    top = torch.cat([x[..., :q, :q], x[..., :q, -q:]], dim=-1)
    bottom = torch.cat([x[..., -q:, :q], x[..., -q:, -q:]], dim=-1)
    return torch.cat([top, bottom], dim=-2)


def gridpure(images: torch.Tensor, sd, strength: float = 0.02, num_inference_steps: int = 100, rounds: int = 20,
             gamma: float = 0.1, blend: str = "round", prompt: str = "", seed: int = 0, batch_size: int = 16,
             quiet: bool = True) -> torch.Tensor:
    """Purify images with ``rounds`` rounds of patch-wise DiffPure.

    Args:
        images: (N,3,H,W) float in [0,1], any size (each patch is resized to the model's resolution and back).
        sd: :class:`apdm.core.models.SD` (the model the attacker personalizes, or any compatible one).
        strength: fraction of the DDIM grid regenerated per round (see :func:`apdm.core.diffusion.img2img`).
        num_inference_steps: DDIM grid size.
        rounds: purification rounds (published 20).
        gamma: weight of the blended image in each round's output (published 0.1).
        blend: what each round blends with: ``round`` (its own input, so the photo's weight shrinks as γ^r: the
            published code) or ``photo`` (the attack's input, the protected photo, kept at γ every round: apdm's
            reading before 2026-12-07, a weaker attack).
        prompt: conditioning (empty = unconditional).
        seed: noise seed (round r draws the noise of all its patches from ``seed + 100003·r``, so ``batch_size``
            does not change the result).
        batch_size: patches regenerated per call.

    Returns:
        (N,3,H,W) float32 in [0,1] on the CPU.
    """
    import torch.nn.functional as F

    if rounds < 1:
        raise ValueError(f"gridpure: rounds must be >= 1, got {rounds}")
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gridpure: gamma must be in [0, 1), got {gamma}")
    if blend not in ("round", "photo"):
        raise ValueError(f"gridpure: blend must be round or photo, got {blend!r}")
    if batch_size < 1:
        raise ValueError(f"gridpure: batch_size must be >= 1, got {batch_size}")
    if not 0.0 < strength <= 1.0 or num_inference_steps < 1:
        raise ValueError(f"gridpure: strength must be in (0, 1] and num_inference_steps >= 1, got {strength} and "
                         f"{num_inference_steps}")
    if num_inference_steps > 1000:  # DDIM grids lie on the schedulers' 1000 training steps
        raise ValueError(f"gridpure: num_inference_steps must be at most 1000, got {num_inference_steps}")
    x0 = images.detach().float().clamp(0, 1).cpu()
    if len(x0) == 0:
        return x0
    n, _, h, w = x0.shape
    p, corners = grid_boxes(h, w)
    q = p // 2
    res = sd.resolution
    x = x0
    for r in progress(range(rounds), desc="GrIDPure rounds", disable=quiet):
        crops = [x[..., y:y + p, c:c + p] for y, c in corners] + [_mosaic(x, p)]
        sizes = [(p, p)] * len(corners) + [(2 * q, 2 * q)]
        batch = torch.cat([F.interpolate(c, size=(res, res), mode="bicubic", antialias=True) for c in crops])
        batch = batch.clamp(0, 1)
        outs = []
        noise = D.purification_noise(sd, len(batch), seed + r * 100_003)  # per round, for all its patches
        for i in range(0, len(batch), batch_size):
            chunk = batch[i:i + batch_size].to(sd.device)
            outs.append(D.img2img(sd, chunk, strength, prompt, 1.0, num_inference_steps,
                                  noise=noise[i:i + batch_size]))
        pur = torch.cat(outs).float().cpu().split(n)
        acc = torch.zeros_like(x)
        cnt = torch.zeros(1, 1, h, w)
        for (y, c), (ph, pw), patch in zip(corners, sizes, pur):
            acc[..., y:y + p, c:c + p] += F.interpolate(patch, size=(ph, pw), mode="bicubic", antialias=True)
            cnt[..., y:y + p, c:c + p] += 1
        mos = F.interpolate(pur[-1], size=sizes[-1], mode="bicubic", antialias=True)
        for (ys, xs), (yb, xb) in zip(((slice(0, q), slice(0, q)), (slice(0, q), slice(w - q, w)),
                                       (slice(h - q, h), slice(0, q)), (slice(h - q, h), slice(w - q, w))),
                                      ((slice(0, q), slice(0, q)), (slice(0, q), slice(q, 2 * q)),
                                       (slice(q, 2 * q), slice(0, q)), (slice(q, 2 * q), slice(q, 2 * q)))):
            acc[..., ys, xs] += mos[..., yb, xb]
            cnt[..., ys, xs] += 1
        merged = (acc / cnt).clamp(0, 1)
        x = ((1 - gamma) * merged + gamma * (x if blend == "round" else x0)).clamp(0, 1)
    return x
