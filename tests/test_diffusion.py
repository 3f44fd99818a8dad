"""The shared diffusion math against closed forms and diffusers."""

import math

import pytest
import torch

from apdm.core import diffusion as D


def test_add_noise_closed_form_and_matches_diffusers(tiny_sd):
    sched = tiny_sd.noise_scheduler
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    xt = D.add_noise(sched, x0, eps, t)
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2  # scaled_linear
    ab = torch.cumprod(1 - betas, 0)
    for i, ti in enumerate(t.tolist()):
        expect = math.sqrt(ab[ti]) * x0[i] + math.sqrt(1 - ab[ti]) * eps[i]
        torch.testing.assert_close(xt[i], expect.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xt, sched.add_noise(x0, eps, t), atol=1e-5, rtol=1e-5)


def test_v_prediction_target(tiny_sd):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(tiny_sd.noise_scheduler.config, prediction_type="v_prediction")
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([10, 700])
    torch.testing.assert_close(D.training_target(sched, x0, eps, t), sched.get_velocity(x0, eps, t), atol=1e-5, rtol=1e-5)
    assert torch.equal(D.training_target(tiny_sd.noise_scheduler, x0, eps, t), eps)


def test_noise_prediction_loss_equals_manual(tiny_sd):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    noise = torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([100, 800])
    cond = D.encode_prompt(tiny_sd.text_encoder, tiny_sd.tokenizer, ["a photo", "a dog"])
    per = D.noise_prediction_loss(tiny_sd.unet, tiny_sd.noise_scheduler, latents, cond, noise, t, reduction="none")
    pred = tiny_sd.unet(D.add_noise(tiny_sd.noise_scheduler, latents, noise, t), t, cond).sample
    manual = ((pred - noise) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(per, manual)
    assert per.shape == (2,)
    mean = D.noise_prediction_loss(tiny_sd.unet, tiny_sd.noise_scheduler, latents, cond, noise, t)
    torch.testing.assert_close(mean, manual.mean())



@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_noise_residual_is_eps_hat_minus_eps_for_every_prediction_type(tiny_sd, kind):
    """SDS's direction ε̂ − ε: the UNet output converted to ε̂ at each sample's level, by hand; for ε-prediction
    its squared mean is the denoising loss on the same draws (ε, then t, from one generator)."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(tiny_sd.noise_scheduler.config, prediction_type=kind)
    g = torch.Generator().manual_seed(0)
    latents, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    t = torch.tensor([30, 900])
    cond = D.encode_prompt(tiny_sd.text_encoder, tiny_sd.tokenizer, ["a photo", "a dog"]).detach()
    residual = D.noise_residual(tiny_sd.unet, sched, latents, cond, noise, t)
    assert residual.shape == latents.shape and not residual.requires_grad
    with torch.no_grad():
        xt = D.add_noise(sched, latents, noise, t)
        out = tiny_sd.unet(xt, t, cond).sample
    ab = D.alphas_cumprod(sched)[t].float().view(-1, 1, 1, 1)
    eps_hat = {"epsilon": out, "v_prediction": ab.sqrt() * out + (1 - ab).sqrt() * xt,
               "sample": (xt - ab.sqrt() * out) / (1 - ab).sqrt()}[kind]
    torch.testing.assert_close(residual, eps_hat - noise, atol=1e-4, rtol=1e-4)
    if kind == "v_prediction":  # the same direction as the v-error, scaled by sqrt(ᾱ_t)
        v = D.training_target(sched, latents, noise, t)
        torch.testing.assert_close(residual, ab.sqrt() * (out - v), atol=1e-4, rtol=1e-4)
    if kind == "epsilon":
        loss = D.noise_prediction_loss(tiny_sd.unet, sched, latents, cond, generator=torch.Generator().manual_seed(4),
                                       reduction="none")
        drawn = D.noise_residual(tiny_sd.unet, sched, latents, cond, generator=torch.Generator().manual_seed(4))
        torch.testing.assert_close(drawn.pow(2).mean(dim=(1, 2, 3)), loss.detach())

def test_ddim_grid_matches_diffusers(tiny_sd):
    from diffusers import DDIMScheduler

    s = DDIMScheduler.from_config(tiny_sd.noise_scheduler.config)
    for n in (4, 20, 50):
        s.set_timesteps(n)
        assert D.ddim_timesteps(tiny_sd.noise_scheduler, n) == s.timesteps.tolist()


def test_ddim_sample_matches_diffusers_ddim(tiny_sd):
    """Our DDIM (eta=0) equals diffusers' DDIMScheduler step by step (no guidance)."""
    from diffusers import DDIMScheduler

    g = torch.Generator().manual_seed(3)
    zT = torch.randn(2, 4, 8, 8, generator=g)
    cond = D.encode_prompt(tiny_sd.text_encoder, tiny_sd.tokenizer, ["a photo of a person"] * 2)
    ours = D.ddim_sample(tiny_sd.unet, tiny_sd.noise_scheduler, zT, cond, num_steps=10)
    s = DDIMScheduler.from_config(tiny_sd.noise_scheduler.config)
    s.set_timesteps(10)
    x = zT.clone()
    with torch.no_grad():
        for t in s.timesteps:
            x = s.step(tiny_sd.unet(x, t, cond).sample, t, x, eta=0.0).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-4, rtol=1e-4)


class _InputFreeUNet(torch.nn.Module):
    """A UNet whose prediction ignores its input latents (depends on t and c only)."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet
        self.dtype = unet.dtype

    def forward(self, x, t, c):
        return self.unet(torch.zeros_like(x), t, c)


def test_ddim_inversion_is_exact_inverse_when_eps_is_input_free(tiny_sd):
    """Algebra check: inversion and sampling are exact inverses when ε̂ does not depend on x."""
    unet = _InputFreeUNet(tiny_sd.unet)
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = D.encode_prompt(tiny_sd.text_encoder, tiny_sd.tokenizer, [""] * 2)
    with torch.no_grad():
        zT = D.ddim_invert(unet, tiny_sd.noise_scheduler, z0, cond, num_steps=20)
        back = D.ddim_sample(unet, tiny_sd.noise_scheduler, zT, cond, num_steps=20)
    assert (zT - z0).abs().mean() > 0.5  # it really went somewhere
    torch.testing.assert_close(back, z0, atol=1e-4, rtol=1e-4)


def test_ddim_round_trip_reconstructs_latents_with_smooth_unet(tiny_sd):
    """A random UNet is far from smooth (its ODE is chaotic); damping its output layer gives a smooth denoiser,
    for which inversion -> sampling must reconstruct the latents, better with a finer grid."""
    import copy

    unet = copy.deepcopy(tiny_sd.unet)
    with torch.no_grad():
        unet.conv_out.weight.mul_(0.01)
        unet.conv_out.bias.mul_(0.01)
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # unit-variance, like SD latents
    cond = D.encode_prompt(tiny_sd.text_encoder, tiny_sd.tokenizer, [""] * 2)
    errs = []
    with torch.no_grad():
        for n in (10, 200):
            zT = D.ddim_invert(unet, tiny_sd.noise_scheduler, z0, cond, num_steps=n)
            errs.append((D.ddim_sample(unet, tiny_sd.noise_scheduler, zT, cond, num_steps=n) - z0).abs().max().item())
    assert errs[1] < errs[0]
    assert errs[1] < 0.01 * z0.abs().max().item()


def test_few_step_sampling_is_differentiable(tiny_sd):
    zT = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    cond = D.encode_prompt(tiny_sd.text_encoder, tiny_sd.tokenizer, [""])
    z0 = D.ddim_sample(tiny_sd.unet, tiny_sd.noise_scheduler, zT, cond, num_steps=4, checkpoint=True)
    z0.square().mean().backward()
    assert zT.grad is not None and zT.grad.abs().sum() > 0


def test_encode_decode_shapes_and_range(tiny_sd, rand_images):
    z = D.encode_images(tiny_sd.vae, rand_images)
    assert z.shape == (4, 4, 8, 8)
    x = D.decode_latents(tiny_sd.vae, z)
    assert x.shape == rand_images.shape and x.min() >= 0 and x.max() <= 1
    # gradient reaches the pixels (pixel attacks rely on it)
    imgs = rand_images.clone().requires_grad_(True)
    D.encode_images(tiny_sd.vae, imgs).sum().backward()
    assert imgs.grad.abs().sum() > 0


def test_generate_is_seeded_and_batch_independent(tiny_sd):
    a = D.generate(tiny_sd, ["a photo of a person"], 3, num_inference_steps=3, batch_size=3, seed=5, quiet=True)
    b = D.generate(tiny_sd, ["a photo of a person"], 3, num_inference_steps=3, batch_size=1, seed=5, quiet=True)
    c = D.generate(tiny_sd, ["a photo of a person"], 3, num_inference_steps=3, batch_size=3, seed=6, quiet=True)
    assert a.shape == (3, 3, 64, 64)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert (a - c).abs().max() > 1e-3


def test_img2img_strength(tiny_sd, rand_images):
    low = D.img2img(tiny_sd, rand_images[:2], strength=0.1, num_inference_steps=10)
    high = D.img2img(tiny_sd, rand_images[:2], strength=0.9, num_inference_steps=10)
    assert low.shape == rand_images[:2].shape
    recon = D.decode_latents(tiny_sd.vae, D.encode_images(tiny_sd.vae, rand_images[:2]))
    assert (low - recon).abs().mean() < (high - recon).abs().mean()
    with pytest.raises(ValueError):
        D.img2img(tiny_sd, rand_images[:1], strength=0.0)
