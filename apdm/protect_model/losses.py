"""Protection losses of APDM (Lee et al., "Perturb a Model, Not an Image", NeurIPS 2025).

Pure functions on tensors; the L2P loop (:mod:`apdm.protect_model.l2p`) computes their inputs with
:func:`apdm.core.diffusion.noise_prediction_loss`.

**Direct Protective Optimization** (paper eq. 14–15, a Diffusion-DPO loss with fixed roles). With
``e_m(x) = (ε_m(x_t, t, c) - ε)²`` the squared noise-prediction error of model m ∈ {θ, φ} (φ = frozen original)
on image x noised with *shared* ε and t, under the personalization prompt c ("a photo of sks person"):

    r⁺ = e_θ(x⁺) - e_φ(x⁺)        (x⁺: generic class-prompt image, the "winner")
    r⁻ = e_θ(x⁻) - e_φ(x⁻)        (x⁻: the subject's photo, the "loser")
    L_DPO = -log σ(-β (r⁺ - r⁻))

Minimising it lowers θ's error on x⁺ and raises it on x⁻ relative to φ: the personalization prompt is pulled
towards generic images and away from the subject. Two reductions:

* ``elementwise`` (reference code, our default): the log-sigmoid is applied per latent element, then averaged.
  With β = 1 the sigmoid stays in its linear regime, so the loss acts like ½·(MSE_θ(x⁺) − MSE_θ(x⁻)) with a
  soft bound; this is the form that produced the paper's numbers.
* ``summed`` (paper eq. 14 literally): r± use ‖·‖² summed over each sample's elements before the sigmoid. On
  SD latents (16,384 elements) it saturates quickly at β = 1; kept for comparison.

The **naive** loss (paper eq. 8) ``-L_simple^per + λ·L_ppl`` is provided as the baseline the paper argues fails.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpo_loss(err_theta_win: torch.Tensor, err_ref_win: torch.Tensor, err_theta_lose: torch.Tensor,
             err_ref_lose: torch.Tensor, beta: float = 1.0, form: str = "elementwise") -> torch.Tensor:
    """The DPO protection loss (see module docstring).

    Args:
        err_theta_win, err_ref_win: (N,C,h,w) squared errors of θ and φ on the winner x⁺.
        err_theta_lose, err_ref_lose: (N,C,h,w) squared errors of θ and φ on the loser x⁻ (the subject).
            All four must come from the same ε and t per sample.
        beta: inverse temperature β (1 in the paper's experiments).
        form: ``elementwise`` or ``summed``.

    Returns:
        scalar loss (float32). Its minimum is approached as θ's error on x⁻ grows and on x⁺ shrinks.
    """
    if form == "elementwise":
        d = (err_theta_win - err_ref_win) - (err_theta_lose - err_ref_lose)
    elif form == "summed":
        dims = tuple(range(1, err_theta_win.ndim))
        d = (err_theta_win.sum(dims) - err_ref_win.sum(dims)) - (err_theta_lose.sum(dims) - err_ref_lose.sum(dims))
    else:
        raise ValueError(f"dpo form must be 'elementwise' or 'summed', got '{form}'")
    return -F.logsigmoid(-beta * d.float()).mean()


def naive_loss(loss_instance: torch.Tensor, loss_prior: torch.Tensor, lam: float = 1.0) -> torch.Tensor:
    """The naive anti-personalization objective ``-L_simple^per + λ·L_ppl`` (paper eq. 8; scalars in, scalar out)."""
    return -loss_instance + lam * loss_prior
