"""L∞ projected gradient descent (PGD) on images, shared by every pixel-space protection baseline.

One loop, used by every pixel baseline (ASPL, FSMG, AdvDM, PhotoGuard, SDS, Mist, PID, MetaCloak;
:mod:`apdm.protect_images.baselines`; CAAT's joint step projects with the same function)::

    x_0 = x_init (+ U(-ε, ε) when random_start), projected
    x_{i+1} = Proj_{‖x - images‖∞ ≤ ε, x ∈ [0,1]} ( x_i ± α_i · sign(∇_x L(x_i)) )      (+ to maximize)

(Madry et al. 2018). The projection is :func:`apdm.protect_images.budget.project_linf`, the one copy of the budget
arithmetic, followed by a clamp to [0, 1]; the budget therefore holds exactly after every step, not only at the end.

**Expectation over transformation (EOT, Athalye et al. 2018).** With ``eot_transforms`` the gradient of each step is
the mean of ``eot_samples`` gradients, each taken through one robustness transform drawn uniformly from the list
(a mixture over the transforms; each transform is itself random). Transforms (:data:`EOT_TRANSFORMS`):

* ``flip``: horizontal flip of each image with probability 0.5 — exactly differentiable;
* ``blur``: Gaussian blur, kernel 7, σ ~ U(0.1, 2.0) per draw (MetaCloak's ``gau`` setting), reflect padding —
  exactly differentiable (a depthwise convolution);
* ``resize``: bilinear (antialiased) downscale by a factor ~ U(0.25, 0.75), then bilinear upscale back —
  exactly differentiable;
* ``jpeg``: a real JPEG round trip through Pillow at quality ~ U{50..90}. JPEG's rounding has no useful gradient,
  so the *straight-through estimator* (BPDA with the identity, Athalye et al. 2018) is used: the forward value is
  the true JPEG image, the backward pass treats the codec as the identity
  (``x + (jpeg(x) - x).detach()``). The loss is thus evaluated on real JPEG output while its gradient is the
  gradient at the decoded image, passed straight to the input.
* ``blur+flip``: ``blur`` then ``flip`` in one draw (MetaCloak's ``gau`` EOT, the default of its method).

Images are float32 ``(N, 3, H, W)`` in ``[0, 1]`` throughout.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from apdm.attacks.transforms import gaussian_blur, jpeg  # the one copy of the robustness transforms
from apdm.protect_images.budget import project_linf
from apdm.utils import progress

LossFn = Callable[[torch.Tensor], torch.Tensor]


# ============================================================================ EOT transforms
def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return float(low + (high - low) * torch.rand((), generator=generator))


def eot_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Flip each image horizontally with probability 0.5. (N,3,H,W) -> same."""
    flip = (torch.rand(images.shape[0], generator=generator) < 0.5).to(images.device).view(-1, 1, 1, 1)
    return torch.where(flip, images.flip(-1), images)


def eot_blur(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian blur, kernel 7, σ ~ U(0.1, 2.0) (one σ per call)."""
    return gaussian_blur(images, 7, _uniform(generator, 0.1, 2.0))


def eot_resize(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Downscale by a factor ~ U(0.25, 0.75) (bilinear, antialiased), then upscale back (bilinear)."""
    h, w = images.shape[-2:]
    s = _uniform(generator, 0.25, 0.75)
    small = F.interpolate(images, size=(max(1, round(h * s)), max(1, round(w * s))), mode="bilinear",
                          align_corners=False, antialias=True)
    return F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)


def eot_jpeg(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """JPEG at quality ~ U{50..90} with a straight-through gradient (forward: real JPEG; backward: identity)."""
    quality = int(torch.randint(50, 91, (), generator=generator))
    return images + (jpeg(images, quality) - images).detach()


def eot_blur_flip(images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """MetaCloak's ``gau`` draw: :func:`eot_blur`, then :func:`eot_flip` (both in one draw)."""
    return eot_flip(eot_blur(images, generator), generator)


#: name -> ``fn(images, generator) -> images``; every entry keeps shape, dtype and device.
EOT_TRANSFORMS: dict[str, Callable[[torch.Tensor, torch.Generator | None], torch.Tensor]] = {
    "flip": eot_flip,
    "blur": eot_blur,
    "resize": eot_resize,
    "jpeg": eot_jpeg,
    "blur+flip": eot_blur_flip,
}


def resolve_transforms(eot_transforms: Sequence[str | Callable] | None) -> list[Callable]:
    """Names (keys of :data:`EOT_TRANSFORMS`) or callables -> list of callables. ``None``/empty -> ``[]``."""
    out = []
    for t in eot_transforms or ():
        if callable(t):
            out.append(t)
        elif t in EOT_TRANSFORMS:
            out.append(EOT_TRANSFORMS[t])
        else:
            raise ValueError(f"unknown EOT transform '{t}'; choose from {', '.join(EOT_TRANSFORMS)}")
    return out


# ============================================================================ PGD
def pgd_attack(images: torch.Tensor, loss_fn: LossFn, pgd_eps: float, pgd_alpha: float | Callable[[int], float],
               pgd_steps: int, maximize: bool = True, eot_transforms: Sequence[str | Callable] | None = None,
               generator: torch.Generator | None = None, random_start: bool = False, *,
               x_init: torch.Tensor | None = None, eot_samples: int | None = None, quiet: bool = True,
               desc: str = "pgd", history: list[float] | None = None) -> torch.Tensor:
    """L∞ PGD with sign-gradient steps around ``images``.

    Args:
        images: (N,3,H,W) float in [0,1] — the clean images; the budget ball is centred on them.
        loss_fn: ``x -> scalar tensor``, differentiable w.r.t. ``x`` ((N,3,H,W) in [0,1], possibly transformed).
        pgd_eps: L∞ budget on [0,1] (e.g. ``8/255``).
        pgd_alpha: step size on [0,1] per iteration, or a function ``i -> α_i`` (step schedules).
        pgd_steps: number of iterations (0 returns the projected starting point).
        maximize: ascend the loss (``True``, the usual protection) or descend it (PhotoGuard's target attack).
        eot_transforms: names of :data:`EOT_TRANSFORMS` and/or callables ``(images, generator) -> images``;
            ``None`` = no EOT.
        generator: CPU RNG for the random start and the transforms.
        random_start: start from a uniform random point of the ball.
        x_init: starting point (default ``images``); ASPL resumes from the current perturbed images. It is
            projected onto the ball first.
        eot_samples: gradients averaged per step under EOT (default: one per listed transform).
        quiet: hide the progress bar.
        history: if given, the loss of each iteration (before its step) is appended to it.

    Returns:
        (N,3,H,W) float32 in [0,1], detached, with ``‖out - images‖∞ ≤ pgd_eps`` (up to float rounding).
    """
    clean = images.detach().float()
    x = (clean if x_init is None else x_init.detach().float().to(clean.device)).clone()
    if random_start:
        u = torch.rand(x.shape, generator=generator).to(x.device)
        x = x + (2 * u - 1) * pgd_eps
    x = project_linf(x, clean, pgd_eps).clamp(0.0, 1.0)
    transforms = resolve_transforms(eot_transforms)
    n_samples = (eot_samples or len(transforms)) if transforms else 1
    for i in progress(range(pgd_steps), desc=desc, disable=quiet):
        x.requires_grad_(True)
        grad = torch.zeros_like(x)
        total = 0.0
        for _ in range(n_samples):
            if transforms:
                pick = int(torch.randint(len(transforms), (), generator=generator))
                value = loss_fn(transforms[pick](x, generator))
            else:
                value = loss_fn(x)
            g, = torch.autograd.grad(value, x)
            grad += g
            total += float(value.detach())
        if history is not None:
            history.append(total / n_samples)
        alpha = pgd_alpha(i) if callable(pgd_alpha) else pgd_alpha
        step = alpha * grad.sign()
        with torch.no_grad():
            x = x.detach() + step if maximize else x.detach() - step
            x = project_linf(x, clean, pgd_eps).clamp(0.0, 1.0)
    return x.detach()


def linear_decay(alpha: float, steps: int, final_fraction: float = 0.01) -> Callable[[int], float]:
    """Step-size schedule ``α_i = α - (α - α·final_fraction) · i / steps`` (PhotoGuard's linear decay to α/100)."""
    def schedule(i: int) -> float:
        return alpha - (alpha - alpha * final_fraction) * i / max(1, steps)

    return schedule
