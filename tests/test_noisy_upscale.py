"""Noisy Upscaling (Gaussian noise, then a x4 diffusion upscaler) and the toy upscaler recipe, on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from apdm.attacks import transforms as T
from apdm.attacks.noisy_upscale import load_upscaler, noisy_upscale, tiny_upscaler
from apdm.toy.upscaler import ToyUpscalerConfig, build_upscaler, rescale_vae


def _by_hand(images, seed, sigma, noise_level, steps, size=None):
    """The attack written out: 8-bit noisy photo -> the diffusers pipeline, drawing its noise augmentation and
    starting latents from the generator that drew the pixel noise -> back to the input size."""
    pipe = load_upscaler("tiny")
    g = torch.Generator().manual_seed(seed)
    x = images if size is None else F.interpolate(images, size=size, mode="bicubic", antialias=True).clamp(0, 1)
    noisy = (x + sigma * torch.randn(x.shape, generator=g)).clamp(0, 1).mul(255).round().div(255)
    up = pipe(prompt=[""] * len(x), image=noisy, noise_level=noise_level, num_inference_steps=steps,
              guidance_scale=1.0, generator=g, output_type="pt").images
    assert up.shape[-2:] == (4 * x.shape[-2], 4 * x.shape[-1])   # the pipeline upscales by 4
    up = F.interpolate(up.float(), size=images.shape[-2:], mode="bicubic", antialias=True).clamp(0, 1)
    return up.mul(255).round().div(255)


def test_noisy_upscale_is_noise_then_the_upscaler_then_the_input_size(rand_images):
    x = rand_images[:2, :, :24, :20].contiguous()
    got = noisy_upscale(x, None, sigma=0.1, noise_level=300, upscaler="tiny", num_inference_steps=2, seed=3)
    torch.testing.assert_close(got, _by_hand(x, 3, 0.1, 300, 2), atol=1.5 / 255, rtol=0)
    assert got.shape == x.shape and got.min() >= 0 and got.max() <= 1
    assert torch.allclose(got * 255, (got * 255).round(), atol=1e-4)          # an 8-bit image
    again = noisy_upscale(x, None, sigma=0.1, noise_level=300, upscaler="tiny", num_inference_steps=2, seed=3)
    other = noisy_upscale(x, None, sigma=0.1, noise_level=300, upscaler="tiny", num_inference_steps=2, seed=4)
    assert torch.equal(got, again) and (got - other).abs().max() > 0.01


def test_the_upscalers_noise_is_not_the_pixel_noise_again(rand_images, monkeypatch):
    """The upscaler's noise augmentation came from a second generator seeded like the pixel noise's, so on the CPU
    it was the pixel noise again (correlation 1.0): one noise added twice, ~25 % more than published at level 320."""
    import apdm.attacks.noisy_upscale as nu

    seen = []
    real = nu._low_res_noise

    def spy(pipe, noise):
        seen.append(noise.clone())
        return real(pipe, noise)

    monkeypatch.setattr(nu, "_low_res_noise", spy)
    x = rand_images[:2, :, :16, :16].contiguous()
    noisy_upscale(x, None, sigma=0.1, noise_level=300, upscaler="tiny", num_inference_steps=1, seed=5)
    pixel = torch.randn(x.shape, generator=torch.Generator().manual_seed(5))
    assert seen[0].shape == pixel.shape
    corr = torch.corrcoef(torch.stack([seen[0].flatten(), pixel.flatten()]))[0, 1]
    assert corr.abs() < 0.3


def test_noisy_upscale_downscale_feeds_the_upscaler_a_smaller_photo(rand_images):
    x = rand_images[:1, :, :32, :32].contiguous()
    got = noisy_upscale(x, None, sigma=0.05, upscaler="tiny", downscale=4, num_inference_steps=2, seed=0)
    torch.testing.assert_close(got, _by_hand(x, 0, 0.05, 320, 2, size=(8, 8)), atol=1.5 / 255, rtol=0)


def test_noisy_upscale_loads_a_saved_upscaler_folder_by_spec(tmp_path, rand_images):
    tiny_upscaler().save_pretrained(tmp_path / "x4", safe_serialization=True)
    assert not list((tmp_path / "x4").rglob("*.bin"))
    x = rand_images[:1, :, :16, :16].contiguous()
    fn, kw = T.parse_model_attack(f"noisy_upscale:upscaler={tmp_path / 'x4'},sigma=26/255,num_inference_steps=2")
    assert kw["upscaler"] == str(tmp_path / "x4") and kw["sigma"] == pytest.approx(26 / 255)
    from_folder = fn(x, None, seed=1, **kw)
    from_tiny = noisy_upscale(x, None, sigma=26 / 255, upscaler="tiny", num_inference_steps=2, seed=1)
    torch.testing.assert_close(from_folder, from_tiny, atol=1.5 / 255, rtol=0)


def test_evaluate_applies_noisy_upscale_by_spec(tiny_sd, rand_images):
    from apdm.evaluation.run import apply_attack

    x = rand_images[:2, :, :16, :16].contiguous()
    got = apply_attack(x, "noisy_upscale:upscaler=tiny,num_inference_steps=2", tiny_sd, seed=7)
    torch.testing.assert_close(got, noisy_upscale(x, None, upscaler="tiny", num_inference_steps=2, seed=7))


@pytest.mark.parametrize("spec, message", [
    ("noisy_upscale:sigma=2", r"sigma must be in \[0, 1\]"),
    ("noisy_upscale:downscale=0", "downscale, num_inference_steps and batch_size must be >= 1"),
    ("noisy_upscale:upscaler=./no/such/x4", "upscaler folder not found"),
    ("noisy_upscale:noise_level=12.5", "not an integer"),
])
def test_check_attack_refuses_bad_noisy_upscale_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        T.check_attack(spec)


def test_noisy_upscale_refuses_a_folder_that_is_not_a_model_and_a_level_above_the_upscalers(tmp_path, rand_images):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="model_index.json is missing"):
        T.check_attack(f"noisy_upscale:upscaler={tmp_path / 'empty'}")
    with pytest.raises(ValueError, match="exceeds the upscaler's max_noise_level 350"):
        noisy_upscale(rand_images[:1], None, noise_level=351, upscaler="tiny", num_inference_steps=1)


def test_rescale_vae_scales_the_latents_and_decodes_the_same(tiny_sd, rand_images):
    import copy

    vae = copy.deepcopy(tiny_sd.vae).float()
    vae.register_to_config(scaling_factor=0.5)
    x = rand_images[:2] * 2 - 1
    with torch.no_grad():
        d0 = vae.encode(x).latent_dist
        dec0 = vae.decode(d0.mean).sample
        rescale_vae(vae, 0.05)
        d1 = vae.encode(x).latent_dist
        dec1 = vae.decode(d1.mean).sample
    assert vae.config.scaling_factor == 0.05
    torch.testing.assert_close(d1.mean, 10 * d0.mean, rtol=1e-4, atol=1e-5)       # k = 0.5 / 0.05
    torch.testing.assert_close(d1.std, 10 * d0.std, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(d1.mean * 0.05, d0.mean * 0.5, rtol=1e-4, atol=1e-6)  # same scaled latents
    torch.testing.assert_close(dec1, dec0, rtol=1e-4, atol=1e-4)


def test_toy_upscaler_trains_saves_a_pipeline_and_resumes(tmp_path, monkeypatch, rand_images):
    from helpers import stop_after_first_checkpoint

    cfg = ToyUpscalerConfig(out=str(tmp_path / "ups"), steps=4, batch=2, identities=1, images_per_identity=1,
                            crop=32, channels=[8, 16], checkpoint_every=2, quiet=True)
    stop_after_first_checkpoint(monkeypatch, build_upscaler, cfg)
    assert (tmp_path / "ups.work" / "state.json").is_file() and not (tmp_path / "ups").exists()
    out = build_upscaler(cfg)
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps_run_here"] == 2 and log["steps"] == 4        # resumed at step 2
    assert not (tmp_path / "ups.work").exists() and not list(out.rglob("*.bin"))
    x = rand_images[:1, :, :16, :16].contiguous()
    y = noisy_upscale(x, None, upscaler=str(out), num_inference_steps=2)
    assert y.shape == x.shape and (y - x).abs().mean() > 0.01


def test_toy_upscaler_cli_prints_its_config_and_refuses_bad_values(capsys, tmp_path):
    from apdm.cli import main

    assert main(["toy", "upscaler", "--print-config", "steps=7", "crop=32"]) == 0
    printed = capsys.readouterr().out
    assert "steps: 7" in printed and "crop: 32" in printed
    assert main(["toy", "upscaler", "crop=40", f"out={tmp_path / 'u'}", "quiet=true"]) == 2
    assert "crop must be a multiple of 16" in capsys.readouterr().err and not (tmp_path / "u").exists()
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "me.png").write_bytes(b"not replaced")
    assert main(["toy", "upscaler", f"out={tmp_path / 'photos'}", "quiet=true"]) == 2
    assert "is not a diffusers model folder" in capsys.readouterr().err
    assert (tmp_path / "photos" / "me.png").read_bytes() == b"not replaced"
