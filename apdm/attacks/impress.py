"""IMPRESS-style consistency purification (Cao et al., NeurIPS 2023): an attacker who knows the model's VAE.

Latent-space protections (PhotoGuard's encoder attack, LDU, ASPL through the encoder) leave the protected image
*inconsistent* with the model's autoencoder: ``D(E(x))`` differs from ``x`` much more than for a clean photo.
IMPRESS searches, near the protected image, for the image that the autoencoder reproduces best:

    minimise over x   ‖x − D(E(x))‖² (mean over pixels)  +  w · max(LPIPS(x, x_in) − Δ, 0)     (paper's tie)
    subject to        ‖x − x_in‖∞ ≤ radius,  x ∈ [0, 1]                                      (apdm's box)

with Adam on the pixels and a cosine learning-rate schedule. ``E`` takes the posterior mean (deterministic). The
LPIPS tie needs the ``lpips`` extra (torchvision); without it (``tie="none"``, the default) the L∞ box alone keeps the
result near the input, in the same unit as every apdm budget (k/255 on [0, 1]).

The published code optimises pixels on [−1, 1] with ``Adam(lr=0.01, eps=1e-5)``, ``CosineAnnealingLR`` down to
``1e-5`` and loss ``MSE + 0.1 · hinge``. On [0, 1] pixels the MSE is 4× smaller and a step moves half as far, so the
same optimisation here is lr 0.005 (annealed to 5e-6, Adam's eps 5e-6) and ``w = 0.1 / 4 = 0.025``: the defaults.
Where apdm differs from the published attack and why: docs/evaluate.md, "Adaptive purification: IMPRESS and
GrIDPure".
"""

from __future__ import annotations

import math

import torch

from apdm.core import diffusion as D
from apdm.utils import LOG, optional_import, progress

#: the published attack's settings on [-1, 1] pixels (Cao et al.'s code: Adam lr, the cosine schedule's floor, Adam's
#: eps, the LPIPS hinge's weight α = pur_alpha) ...
PUBLISHED_LR, PUBLISHED_LR_MIN, PUBLISHED_EPS, PUBLISHED_ALPHA = 0.01, 1e-5, 1e-5, 0.1
#: ... and in apdm's units, [0, 1] pixels: a [0, 1] pixel is half a [-1, 1] one, so the gradient of the same loss is
#: twice as large and an Adam step (lr-sized, scale-free) moves half as far: lr, floor and eps halve; the consistency
#: MSE is 4x smaller on [0, 1], so the hinge's weight relative to it is α / 4. The same optimisation, exactly.
LR, LR_MIN, ADAM_EPS, TIE_WEIGHT = PUBLISHED_LR / 2, PUBLISHED_LR_MIN / 2, PUBLISHED_EPS / 2, PUBLISHED_ALPHA / 4


def consistency_error(vae, images: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error between images and their VAE reconstruction ``D(E(x))`` (posterior mean),
    the reconstruction clamped to [0, 1] as every apdm decode (the reference code compares the raw decoder output;
    docs/evaluate.md, the differences table).

    Args:
        vae: ``AutoencoderKL``.
        images: (N,3,H,W) float in [0,1] (H, W multiples of the VAE's downsampling factor).

    Returns:
        (N,) float32, differentiable w.r.t. ``images``.
    """
    recon = D.decode_latents(vae, D.encode_images(vae, images))
    return (recon.float() - images.float()).pow(2).flatten(1).mean(dim=1)


def _lpips_model(net: str, device):
    from apdm.evaluation.fidelity import lpips_model

    return lpips_model(net).to(device)


def cosine_lr(step: int, steps: int, lr: float, lr_min: float) -> float:
    """The learning rate of Adam step ``step`` (0-based) of ``steps``: cosine from ``lr`` (step 0) towards ``lr_min``
    (PyTorch's ``CosineAnnealingLR(T_max=steps, eta_min=lr_min)`` stepped after every step, as the published code)."""
    return lr_min + (lr - lr_min) * (1 + math.cos(math.pi * step / steps)) / 2


def impress(images: torch.Tensor, sd, steps: int = 3000, lr: float = LR, radius: float = 16 / 255,
            tie: str = "none", lpips_bound: float = 0.1, tie_weight: float = TIE_WEIGHT, lr_min: float = LR_MIN,
            adam_eps: float = ADAM_EPS, batch_size: int = 4, seed: int = 0, quiet: bool = True) -> torch.Tensor:
    """Purify images by making them consistent with ``sd``'s autoencoder.

    Args:
        images: (N,3,H,W) float in [0,1], any size; a side that is not a multiple of the VAE factor is rounded to
            the nearest one for the optimisation, and the *change* is resized back and added to the original.
        sd: :class:`apdm.core.models.SD` whose VAE the attacker uses (the model it will personalize).
        steps: Adam steps (the published attack uses 3000).
        lr: Adam's initial learning rate on [0,1] pixels: 0.005, the published 0.01 on [-1,1] pixels.
        radius: L∞ bound of the change on [0,1] (``0`` = no box; then only the LPIPS tie or nothing restrains it).
        tie: ``"none"`` or ``"lpips"`` (the paper's hinge on LPIPS-VGG to the input; extra ``lpips``).
        lpips_bound: Δ of the LPIPS hinge (published 0.1).
        tie_weight: w of the LPIPS hinge, relative to the [0,1] consistency MSE: 0.025, the published α = 0.1
            relative to the [-1,1] MSE, which is 4× larger.
        lr_min: where the cosine schedule ends (published 1e-5 on [-1,1] = 5e-6 here); ``lr_min=lr`` keeps the rate
            constant.
        adam_eps: Adam's eps (published 1e-5 on [-1,1] = 5e-6 here). It matters: a pixel's gradient of the mean
            MSE shrinks with the pixel count (~1e-4 on a 64-px photo with the tiny model, 64× less at 512 px), so
            at SD's size it nears this eps and Adam's steps fall below ``lr``, as in the published code.
            (Before 2026-12-07 apdm ran ``lr=0.01,lr_min=0.01,adam_eps=1e-8,tie_weight=1``.)
        batch_size: images optimised together (each image's loss is its own; batching changes nothing but speed).
        seed: unused by the deterministic objective; kept so every model attack takes the same arguments.

    Returns:
        (N,3,H,W) float32 in [0,1] on the CPU, within ``radius`` of the input when ``radius > 0``.
    """
    import torch.nn.functional as F

    if steps < 0:
        raise ValueError(f"impress: steps must be >= 0, got {steps}")
    if lr <= 0:
        raise ValueError(f"impress: lr must be > 0, got {lr}")
    if not 0 <= lr_min <= lr:
        raise ValueError(f"impress: lr_min must be in [0, lr] = [0, {lr}], got {lr_min} (lower it with lr)")
    if adam_eps <= 0:
        raise ValueError(f"impress: adam_eps must be > 0, got {adam_eps}")
    if radius < 0:
        raise ValueError(f"impress: radius must be >= 0 (0 = no box), got {radius}")
    if tie not in ("none", "lpips"):
        raise ValueError(f"impress: tie must be 'none' or 'lpips', got {tie!r}")
    if radius == 0 and tie == "none":
        raise ValueError("impress: with radius=0 and tie=none nothing keeps the result near the input; "
                         "set a radius (e.g. 16/255) or tie=lpips")
    if batch_size < 1:
        raise ValueError(f"impress: batch_size must be >= 1, got {batch_size}")
    if tie_weight < 0 or lpips_bound < 0:
        raise ValueError(f"impress: tie_weight and lpips_bound must be >= 0, got {tie_weight} and {lpips_bound}")
    if tie == "lpips":  # now, so that check_attack (zero images) refuses it before a run rather than hours into one
        optional_import("lpips", "lpips", "IMPRESS's tie=lpips (the LPIPS hinge)")
    del seed
    if len(images) == 0:
        return images.detach().float().cpu()
    h, w = images.shape[-2:]
    f = sd.vae_scale_factor
    shape = (max(f, round(h / f) * f), max(f, round(w / f) * f))  # the VAE needs multiples of its factor
    src = images.float().clamp(0, 1)
    x_in = src if shape == (h, w) else F.interpolate(src, size=shape, mode="bicubic", antialias=True).clamp(0, 1)
    vae = sd.vae
    req = [p.requires_grad for p in vae.parameters()]
    vae.requires_grad_(False)
    lp = _lpips_model("vgg", sd.device) if tie == "lpips" else None
    outs = []
    try:
        for i in range(0, len(x_in), batch_size):
            ref = x_in[i:i + batch_size].to(sd.device)
            x = ref.clone().requires_grad_(True)
            opt = torch.optim.Adam([x], lr=lr, eps=adam_eps)
            bar = progress(range(steps), desc=f"IMPRESS images {i + 1}-{i + len(ref)}", disable=quiet)
            for k in bar:
                opt.param_groups[0]["lr"] = cosine_lr(k, steps, lr, lr_min)
                opt.zero_grad(set_to_none=True)
                loss = consistency_error(vae, x).sum()
                if lp is not None:
                    d = lp(x.float() * 2 - 1, ref.float() * 2 - 1).flatten()
                    loss = loss + tie_weight * (d - lpips_bound).clamp(min=0).sum()
                loss.backward()
                opt.step()
                with torch.no_grad():
                    if radius > 0:
                        x.copy_(torch.minimum(torch.maximum(x, ref - radius), ref + radius))
                    x.clamp_(0, 1)
            with torch.no_grad():
                outs.append(x.detach().float().cpu())
            LOG.debug("IMPRESS: images %d-%d purified in %d steps", i + 1, i + len(ref), steps)
    finally:
        for p, r in zip(vae.parameters(), req):
            p.requires_grad_(r)
    out = torch.cat(outs) if outs else x_in.cpu()
    if shape != (h, w):  # apply the change at the original size, within the same box
        delta = F.interpolate(out - x_in.cpu(), size=(h, w), mode="bicubic", antialias=True)
        if radius > 0:
            delta = delta.clamp(-radius, radius)
        out = (src.cpu() + delta).clamp(0, 1)
    return out
