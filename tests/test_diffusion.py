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


def _scheduler(tiny_sd, **changes):
    """The tiny model's DDPMScheduler with config keys changed; keys DDPM does not take (``set_alpha_to_one``) are
    kept in its config, as diffusers keeps them when ``load_sd`` converts a PNDM/DDIM config (diffusers would drop
    a changed key that ``_use_default_values`` lists: it is left out)."""
    from diffusers import DDPMScheduler

    config = {k: v for k, v in tiny_sd.noise_scheduler.config.items() if k != "_use_default_values"}
    return DDPMScheduler.from_config({**config, **changes})


def test_ddim_default_grid_and_levels_are_pinned(tiny_sd):
    """The leading grid with steps_offset=1 of the tiny and toy models (every recorded number depends on it): the grid,
    each step to the next grid level, the last one to the clean end at ᾱ = 1."""
    from diffusers import DDPMScheduler

    toy_like = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", clip_sample=False,
                             prediction_type="epsilon", steps_offset=1)
    expected = {1: [1], 3: [667, 334, 1], 4: [751, 501, 251, 1], 10: list(range(901, 0, -100)),
                50: list(range(981, 0, -20)), 1000: [999] + list(range(999, 0, -1))}
    for sched in (tiny_sd.noise_scheduler, toy_like):
        assert "set_alpha_to_one" not in sched.config and sched.config.timestep_spacing == "leading"
        for n, grid in expected.items():
            assert D.ddim_timesteps(sched, n) == grid
            assert D.ddim_steps(sched, n) == list(zip(grid, grid[1:] + [-1]))
        assert D.final_alpha_cumprod(sched).item() == 1.0


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_grid_follows_timestep_spacing_as_diffusers(tiny_sd, spacing):
    from diffusers import DDIMScheduler

    sched = _scheduler(tiny_sd, timestep_spacing=spacing)
    ref = DDIMScheduler.from_config(sched.config)
    for n in (1, 3, 4, 6, 7, 10, 50, 61, 999):
        ref.set_timesteps(n)
        # diffusers' trailing arange yields an extra level -1 for some n (61): the first n are the grid
        assert D.ddim_timesteps(sched, n) == ref.timesteps.tolist()[:n], n
    assert D.ddim_timesteps(sched, 3) == {"leading": [667, 334, 1], "trailing": [999, 666, 332],
                                          "linspace": [999, 500, 0]}[spacing]


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("alpha_to_one", [True, False])
def test_ddim_sample_equals_diffusers_ddim_for_each_spacing_and_clean_end(tiny_sd, kind, spacing, alpha_to_one):
    """Step by step as diffusers' DDIMScheduler (eta=0) built from the same config: its grid, its levels
    (t - T//n), and its clean end (ᾱ_0 with set_alpha_to_one=false, as SD-1.x/2.x configs set it)."""
    from diffusers import DDIMScheduler

    sched = _scheduler(tiny_sd, prediction_type=kind, timestep_spacing=spacing, set_alpha_to_one=alpha_to_one)
    zT = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond = D.encode_prompt(tiny_sd.text_encoder, tiny_sd.tokenizer, ["a photo of a person"] * 2)
    ref = DDIMScheduler.from_config(sched.config)
    with torch.no_grad():
        for n in (3, 10):
            ours = D.ddim_sample(tiny_sd.unet, sched, zT, cond, num_steps=n)
            ref.set_timesteps(n)
            x = zT.clone()
            for t in ref.timesteps:
                x = ref.step(tiny_sd.unet(x, t, cond).sample, t, x, eta=0.0).prev_sample
            torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)
    assert ref.final_alpha_cumprod.item() == D.final_alpha_cumprod(sched).item()


def test_generate_ddim_equals_the_diffusers_pipeline_of_an_sd2_style_config(tiny_sd):
    """Trailing spacing, v-prediction, set_alpha_to_one=false, with guidance: the whole generate() against diffusers'
    DDIM pipeline (before: 4e-1 apart for trailing, 2.5e-2 for the clean end of v-prediction)."""
    from dataclasses import replace

    sd = replace(tiny_sd, noise_scheduler=_scheduler(tiny_sd, prediction_type="v_prediction",
                                                      timestep_spacing="trailing", set_alpha_to_one=False))
    ours = D.generate(sd, "a photo of a person", 1, 3, 3.0, seed=0, quiet=True)
    pipe = sd.pipeline("ddim")
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(0))[None]
    ref = pipe("a photo of a person", num_inference_steps=3, guidance_scale=3.0, latents=latents,
               output_type="pt").images
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_load_sd_keeps_set_alpha_to_one_of_an_sd15_scheduler_config(tiny_sd, tmp_path):
    """An SD-1.5 folder ships a PNDMScheduler config with set_alpha_to_one=false; load_sd converts it to a
    DDPMScheduler, which must keep the key, so that DDIM ends at ᾱ_0 as diffusers' DDIM built from that folder."""
    import json

    from diffusers import DDIMScheduler

    from apdm.core.models import load_sd, save_sd

    folder = save_sd(tiny_sd, tmp_path / "sd15", quiet=True)
    config = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
              "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
              "steps_offset": 1, "trained_betas": None, "clip_sample": False}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    sd = load_sd(str(folder), "cpu")
    assert sd.noise_scheduler.config["set_alpha_to_one"] is False
    ref = DDIMScheduler.from_pretrained(str(folder / "scheduler"))
    zT = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = D.encode_prompt(sd.text_encoder, sd.tokenizer, ["a photo of a person"])
    with torch.no_grad():
        ours = D.ddim_sample(sd.unet, sd.noise_scheduler, zT, cond, num_steps=4)
        ref.set_timesteps(4)
        x = zT.clone()
        for t in ref.timesteps:
            x = ref.step(sd.unet(x, t, cond).sample, t, x).prev_sample
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)
    assert D.final_alpha_cumprod(sd.noise_scheduler).item() == sd.noise_scheduler.alphas_cumprod[0].item() < 1


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


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_ddim_inversion_follows_set_alpha_to_one_as_diffusers_inverse(tiny_sd, spacing):
    """With set_alpha_to_one=false the inversion starts from ᾱ_0, as diffusers' DDIMInverseScheduler (ε-prediction;
    before apdm started from ᾱ = 1), on the levels of the sampler's steps; and it stays the sampler's exact inverse
    when ε̂ does not depend on x."""
    from diffusers import DDIMInverseScheduler

    sched = _scheduler(tiny_sd, timestep_spacing=spacing, set_alpha_to_one=False)
    z0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = D.encode_prompt(tiny_sd.text_encoder, tiny_sd.tokenizer, [""] * 2)
    inverse = DDIMInverseScheduler.from_config(sched.config)
    inverse.set_timesteps(3)
    x = z0.clone()
    unet = _InputFreeUNet(tiny_sd.unet)
    with torch.no_grad():
        for t in inverse.timesteps:
            x = inverse.step(tiny_sd.unet(x, t, cond).sample, t, x).prev_sample
        torch.testing.assert_close(D.ddim_invert(tiny_sd.unet, sched, z0, cond, num_steps=3), x, atol=1e-5, rtol=1e-5)
        zT = D.ddim_invert(unet, sched, z0, cond, num_steps=3)
        torch.testing.assert_close(D.ddim_sample(unet, sched, zT, cond, num_steps=3), z0, atol=1e-4, rtol=1e-4)


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


def test_generate_ddpm_follows_the_seed_and_diffusers(tiny_sd):
    """DDPM's step noise comes from the image's own generator (seeded seed + index, as its initial noise), not from
    torch's global RNG: same seed, same images whatever ran before; another seed, other images; batch size does not
    matter; and it equals diffusers' pipeline given that generator. The deterministic samplers are unchanged
    (equal to their pipelines)."""
    torch.manual_seed(123)
    a = D.generate(tiny_sd, "a photo of a person", 2, 4, 3.0, seed=0, batch_size=2, sampler="ddpm", quiet=True)
    torch.manual_seed(456)
    b = D.generate(tiny_sd, "a photo of a person", 2, 4, 3.0, seed=0, batch_size=1, sampler="ddpm", quiet=True)
    c = D.generate(tiny_sd, "a photo of a person", 2, 4, 3.0, seed=1, batch_size=2, sampler="ddpm", quiet=True)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(a[1], c[0], atol=1e-5, rtol=1e-4)  # image 1 of seed 0 is image 0 of seed 1
    assert (a[0] - c[1]).abs().max() > 1e-2
    for sampler in ("ddpm", "pndm", "euler", "dpmsolver"):
        ours = D.generate(tiny_sd, "a photo of a person", 1, 4, 3.0, seed=0, sampler=sampler, quiet=True)
        pipe = tiny_sd.pipeline(sampler)
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator().manual_seed(0)
        latents = torch.randn((4, 8, 8), generator=g)[None]
        torch.manual_seed(789)
        ref = pipe("a photo of a person", num_inference_steps=4, guidance_scale=3.0, latents=latents, generator=[g],
                   output_type="pt").images
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5, msg=sampler)


def test_img2img_runs_the_steps_diffusers_img2img_runs(tiny_sd, rand_images):
    """int(strength·N) of the grid's last steps, at least 1, as diffusers' img2img pipeline (before: round(), 4 of 5
    steps at 0.7, half-to-even at .5); whole-number products (DiffPure's 0.2 of 50, GrIDPure's 0.02 of 100) as
    before, also where the float product falls a hair short."""
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline(**tiny_sd.pipeline("ddim").components)
    grid = D.ddim_timesteps(tiny_sd.noise_scheduler, 5)
    seen = []
    hook = tiny_sd.unet.register_forward_pre_hook(lambda module, args: seen.append(int(args[1][0])))
    try:
        for strength in (0.1, 0.3, 0.5, 0.7, 0.9, 1.0):
            seen.clear()
            D.img2img(tiny_sd, rand_images[:1], strength, num_inference_steps=5)
            pipe.scheduler.set_timesteps(5)
            expected, count = pipe.get_timesteps(5, strength, "cpu")
            assert seen == (expected.tolist() if count else grid[-1:]), strength  # diffusers runs none at 0.1
    finally:
        hook.remove()
    assert [D.img2img_steps(s, n) for s, n in [(0.7, 5), (0.3, 5), (0.5, 5), (0.9, 5), (0.1, 5), (1.0, 5)]] == \
        [3, 1, 2, 4, 1, 5]
    assert [D.img2img_steps(s, n) for s, n in [(0.2, 50), (0.02, 100), (0.29, 100), (0.57, 100), (0.1, 10)]] == \
        [10, 2, 29, 57, 1]


def test_img2img_strength(tiny_sd, rand_images):
    low = D.img2img(tiny_sd, rand_images[:2], strength=0.1, num_inference_steps=10)
    high = D.img2img(tiny_sd, rand_images[:2], strength=0.9, num_inference_steps=10)
    assert low.shape == rand_images[:2].shape
    recon = D.decode_latents(tiny_sd.vae, D.encode_images(tiny_sd.vae, rand_images[:2]))
    assert (low - recon).abs().mean() < (high - recon).abs().mean()
    with pytest.raises(ValueError):
        D.img2img(tiny_sd, rand_images[:1], strength=0.0)
