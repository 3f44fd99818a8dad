"""IMPRESS-style consistency purification (Cao et al., NeurIPS 2023): an attacker who knows the model's VAE.

Latent-space protections (PhotoGuard's encoder attack, LDU, ASPL through the encoder) leave the protected image
*inconsistent* with the model's autoencoder: ``D(E(x))`` differs from ``x`` much more than for a clean photo.
IMPRESS searches, near the protected image, for the image that the autoencoder reproduces best:

    minimise over x   ‖x − D(E(x))‖² (mean over pixels)  +  w · max(LPIPS(x, x_in) − Δ, 0)     (paper's tie)
    subject to        ‖x − x_in‖∞ ≤ radius,  x ∈ [0, 1]                                      (apdm's box)

with Adam on the pixels. ``E`` takes the posterior mean (deterministic). The LPIPS tie needs the ``lpips`` extra
(torchvision); without it (``tie="none"``, the default) the L∞ box alone keeps the result near the input, in the
same unit as every apdm budget (k/255 on [0, 1]). Where apdm differs from the published attack and why:
docs/evaluate.md, "Adaptive purification: IMPRESS and GrIDPure".
"""

from __future__ import annotations

import torch

from apdm.core import diffusion as D
from apdm.utils import LOG, progress


def consistency_error(vae, images: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error between images and their VAE reconstruction ``D(E(x))`` (posterior mean).

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


def impress(images: torch.Tensor, sd, steps: int = 3000, lr: float = 0.01, radius: float = 16 / 255,
            tie: str = "none", lpips_bound: float = 0.1, tie_weight: float = 1.0, batch_size: int = 4,
            seed: int = 0, quiet: bool = True) -> torch.Tensor:
    """Purify images by making them consistent with ``sd``'s autoencoder.

    Args:
        images: (N,3,H,W) float in [0,1], any size; a side that is not a multiple of the VAE factor is rounded to
            the nearest one for the optimisation, and the *change* is resized back and added to the original.
        sd: :class:`apdm.core.models.SD` whose VAE the attacker uses (the model it will personalize).
        steps: Adam steps (the published attack uses 3000).
        lr: Adam learning rate on [0,1] pixels (published 0.01).
        radius: L∞ bound of the change on [0,1] (``0`` = no box; then only the LPIPS tie or nothing restrains it).
        tie: ``"none"`` or ``"lpips"`` (the paper's hinge on LPIPS-VGG to the input; extra ``lpips``).
        lpips_bound: Δ of the LPIPS hinge (published 0.1).
        tie_weight: w of the LPIPS hinge.
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
    if radius < 0:
        raise ValueError(f"impress: radius must be >= 0 (0 = no box), got {radius}")
    if tie not in ("none", "lpips"):
        raise ValueError(f"impress: tie must be 'none' or 'lpips', got {tie!r}")
    if radius == 0 and tie == "none":
        raise ValueError("impress: with radius=0 and tie=none nothing keeps the result near the input; "
                         "set a radius (e.g. 16/255) or tie=lpips")
    if batch_size < 1:
        raise ValueError(f"impress: batch_size must be >= 1, got {batch_size}")
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
            opt = torch.optim.Adam([x], lr=lr)
            bar = progress(range(steps), desc=f"IMPRESS images {i + 1}-{i + len(ref)}", disable=quiet)
            for _ in bar:
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
