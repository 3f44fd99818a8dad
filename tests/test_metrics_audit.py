"""Findings of the 2026-12-07 audit of the metrics and the pixel baselines, each with the behaviour it fixed."""
import torch

from apdm.evaluation import distribution as D


def _lin():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))


def test_kid_record_has_no_spread_when_every_subset_is_the_whole_set():
    g = torch.Generator().manual_seed(3)
    real, fake = torch.rand(6, 3, 8, 8, generator=g), torch.rand(6, 3, 8, 8, generator=g) ** 2
    kid = {r["name"]: r for r in D.distribution_records(real, fake, _lin(), "lin", kid_subsets=5)}["kid"]
    assert kid["available"] and kid["subset_size"] == 6
    assert kid["std"] is None and "whole set" in kid["note"]  # was ~1e-16, read as a precise estimate


def test_kid_record_keeps_its_spread_when_subsets_differ():
    g = torch.Generator().manual_seed(4)
    real, fake = torch.rand(9, 3, 8, 8, generator=g), torch.rand(6, 3, 8, 8, generator=g) ** 2
    kid = {r["name"]: r for r in D.distribution_records(real, fake, _lin(), "lin", kid_subsets=5)}["kid"]
    assert kid["subset_size"] == 6 and kid["std"] > 1e-6 and "note" not in kid


def test_pixel_pgd_leaves_out_the_surrogates_prior_term():
    """The prior-preservation term does not depend on the photos: PGD encodes only the photos (it encoded the
    class images with them, twice the batch, for the same gradient)."""
    from apdm.config import PersonalizationConfig
    from apdm.core.models import tiny_sd
    from apdm.protect_images import baselines as B

    sd = tiny_sd(seed=0)
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    cls = torch.rand(5, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    cfg = PersonalizationConfig(method="dreambooth", steps=2, learning_rate=1e-3, with_prior_preservation=True,
                                batch_size=2)
    surrogate = B.train_surrogate(sd, x, cfg, cls, steps=1, quiet=True)
    seen = []
    hook = sd.vae.encoder.register_forward_hook(lambda m, i, o: seen.append((i[0].shape[0], i[0].requires_grad)))
    try:
        out = B.protect_fsmg(sd, x, budget=8 / 255, steps=2, surrogate=surrogate, quiet=True)
    finally:
        hook.remove()
    pgd = [b for b, grad in seen if grad]
    assert pgd == [2, 2]  # the two photos, once per PGD step (was [4, 4]: photos + class images)
    assert 0 < (out - x).abs().max() <= 8 / 255 + 1e-6
