"""Audit of the pixel baselines called from Python (the command passes floats in [0,1] and frozen models, so it
was not affected): images outside [0,1] broke the budget guarantee silently; ASPL and SimAC left the caller's
VAE and text encoder frozen."""

import pytest
import torch

from apdm.config import PersonalizationConfig
from apdm.protect_images import baselines as B

BUDGET = 8 / 255


def _db_cfg():
    return PersonalizationConfig(method="dreambooth", learning_rate=1e-3, batch_size=2, with_prior_preservation=False,
                                 max_grad_norm=0, adam_weight_decay=0.0, sample_vae_posterior=False, steps=1)


@pytest.mark.parametrize("images, says", [
    (torch.full((1, 3, 32, 32), 128, dtype=torch.uint8), "floats in \\[0,1\\], got torch.uint8"),
    (torch.full((1, 3, 32, 32), 128.0), "values in \\[128, 128\\]"),
    (torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32), "diffusers' \\[-1,1\\]"),
    (torch.zeros(0, 3, 32, 32), "the batch is empty"),
])
def test_images_outside_the_unit_range_are_refused(tiny_sd, images, says):
    """A uint8 photo came back almost white (254/255 away from the input under an 8/255 budget)."""
    with pytest.raises(ValueError, match=says):
        B.protect_advdm(tiny_sd, images, budget=BUDGET, steps=1, quiet=True)


def test_a_budget_string_says_how_to_parse_it(tiny_sd, rand_images):
    with pytest.raises(TypeError, match=r"parse_budget\('8/255'\)"):
        B.protect_photoguard(tiny_sd, rand_images[:1], budget="8/255", steps=1, quiet=True)


def test_aspl_gives_the_callers_modules_their_flags_back(tiny_sd, rand_images):
    """ASPL's long-lived surrogate θ was never finished: the caller's trainable VAE and text encoder came back
    frozen (SimAC runs ASPL's loop, the same)."""
    import copy

    sd = copy.copy(tiny_sd)
    sd.vae, sd.text_encoder = copy.deepcopy(tiny_sd.vae), copy.deepcopy(tiny_sd.text_encoder)
    sd.vae.requires_grad_(True)
    sd.text_encoder.requires_grad_(True)
    out = B.protect_aspl(sd, rand_images[:2], budget=BUDGET, steps=1, surrogate_steps=1, pgd_steps=1,
                         pgd_alpha=2 / 255, personalization=_db_cfg(), quiet=True)
    assert (out - rand_images[:2]).abs().max() <= BUDGET + 1e-6
    assert all(p.requires_grad for p in sd.vae.parameters())
    assert all(p.requires_grad for p in sd.text_encoder.parameters())
