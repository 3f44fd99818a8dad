"""The encoder trap: the augmentation pairs x⁻ and x⁺, training moves the subject's latents towards the generic
images' and not the others', only the encoder changes, exact resume, the CLI writes it, the bench carries it."""

import copy

import pytest
import torch

from apdm.config import EncoderTrapConfig
from apdm.core import diffusion as D
from apdm.protect_model import encoder_trap as T
from apdm.protect_model import l2p


def _subject():
    g = torch.Generator().manual_seed(0)
    return l2p.Subject(name="s", images=torch.rand(2, 3, 64, 64, generator=g),
                       paired=torch.rand(2, 3, 64, 64, generator=g), class_images=torch.rand(4, 3, 64, 64, generator=g),
                       instance_prompt="a photo of sks person", class_prompt="a photo of a person")


def test_augment_is_reproducible_and_in_range():
    x = torch.rand(3, 3, 17, 23)
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    a = T.augment(x, g)
    g.set_state(state)
    torch.testing.assert_close(T.augment(x, g), a, atol=0, rtol=0)  # x⁻ and x⁺ get the same change
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1
    assert not torch.allclose(a, x, atol=1e-2)
    assert not torch.allclose(T.augment(x, g), a, atol=1e-2)  # the next draw is another change


def test_augment_geometry_strength_zero_is_flip_and_colour_only():
    """With strength 0 the only geometric change is the flip: each output is gain·x + bias of x or of x flipped."""
    x = torch.rand(4, 3, 16, 16) * 0.5 + 0.25  # no clamping at these values
    y = T.augment(x, torch.Generator().manual_seed(2), strength=0.0)
    for i in range(4):
        fits = []
        for src in (x[i], x[i].flip(-1)):
            a = torch.stack([src.reshape(3, -1), torch.ones(3, 256)], -1)  # per channel: y = gain·x + bias
            sol = torch.linalg.lstsq(a, y[i].reshape(3, -1, 1)).solution
            fits.append(float((a @ sol - y[i].reshape(3, -1, 1)).abs().max()))
        assert min(fits) < 1e-4, fits


def test_trap_moves_the_subject_latents_and_keeps_the_rest(tiny_sd):
    subj = _subject()
    vae0 = copy.deepcopy(tiny_sd.vae)
    cfg = EncoderTrapConfig(steps=30, learning_rate=2e-3, augment=0.0, preserve_batch=4)
    trapped, hist = T.trap_encoder(tiny_sd.vae, [subj], cfg, quiet=True)
    for (n, a), (_, b) in zip(tiny_sd.vae.named_parameters(), vae0.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)  # the base VAE is untouched
    changed = {n.split(".")[0] for n, p in trapped.named_parameters()
               if not torch.equal(p, dict(vae0.named_parameters())[n])}
    assert changed == {"encoder", "quant_conv"}  # the decoder (and post_quant_conv) generate exactly as before
    first = sum(h["loss_trap"] for h in hist[:5]) / 5
    last = sum(h["loss_trap"] for h in hist[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    with torch.no_grad():
        def dist(vae, x, target):
            return float((D.vae_posterior(vae, x)[0] - target).pow(2).mean())

        to_paired = D.vae_posterior(vae0, subj.paired)[0]
        assert dist(trapped, subj.images, to_paired) < 0.5 * dist(vae0, subj.images, to_paired)
        keep = D.vae_posterior(vae0, subj.class_images)[0]
        moved_subject = dist(trapped, subj.images, D.vae_posterior(vae0, subj.images)[0])
        assert dist(trapped, subj.class_images, keep) < 0.2 * moved_subject


def test_trap_resume_after_interruption_is_exact(tiny_sd, tmp_path):
    subj = [_subject()]
    cfg = EncoderTrapConfig(steps=4, learning_rate=1e-3, preserve_batch=2, checkpoint_every=1)
    full, _ = T.trap_encoder(tiny_sd.vae, subj, cfg, seed=3, checkpoint_dir=tmp_path / "a", quiet=True)
    T.trap_encoder(tiny_sd.vae, subj, cfg, seed=3, checkpoint_dir=tmp_path / "b", quiet=True, stop_after=2)
    resumed, hist = T.trap_encoder(tiny_sd.vae, subj, cfg, seed=3, checkpoint_dir=tmp_path / "b", quiet=True)
    assert [h["step"] for h in hist] == [0, 1, 2, 3]
    for (n, a), (_, b) in zip(full.named_parameters(), resumed.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)


@pytest.mark.parametrize("key,value", [("steps", -1), ("preserve_batch", 0), ("learning_rate", -1.0),
                                       ("augment", float("nan"))])
def test_trap_config_is_checked(key, value):
    with pytest.raises(ValueError, match=f"encoder_trap.{key}"):
        T.check_trap_config(EncoderTrapConfig(**{key: value}))


def test_cli_protect_model_writes_the_trapped_encoder(tmp_path):
    from diffusers import AutoencoderKL

    from helpers import tiny_protect_model_args

    from apdm.cli import main
    from apdm.core.models import load_sd

    assert main(["protect-model", *tiny_protect_model_args(tmp_path), "protect.outer_steps=0",
                 "encoder_trap.steps=3", "encoder_trap.learning_rate=1e-3"]) == 0  # the trap alone (its recipe)
    saved = AutoencoderKL.from_pretrained(str(tmp_path / "out" / "model" / "vae"))
    base = load_sd("tiny", device="cpu").vae
    assert not torch.equal(saved.encoder.conv_in.weight, base.encoder.conv_in.weight)
    for (n, a), (_, b) in zip(saved.decoder.named_parameters(), base.decoder.named_parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=n)
    card = (tmp_path / "out" / "model" / "README.md").read_text()
    assert "Encoder trap" in card and "no APDM steps" in card
    unet, base_unet = load_sd(str(tmp_path / "out" / "model"), device="cpu").unet, load_sd("tiny", device="cpu").unet
    assert all(torch.equal(a, b) for a, b in zip(unet.parameters(), base_unet.parameters()))
    assert not (tmp_path / "out" / "checkpoint").exists()


def test_bench_carries_a_trapped_vae(tiny_sd):
    from apdm.bench import jobs

    vae = copy.deepcopy(tiny_sd.vae)
    with torch.no_grad():
        vae.encoder.conv_in.weight.add_(0.5)
    spec = jobs.remember_model(tiny_sd)
    sd = jobs.model(spec, jobs.unet_state(tiny_sd.unet, vae=vae))
    torch.testing.assert_close(sd.vae.encoder.conv_in.weight, vae.encoder.conv_in.weight, atol=0, rtol=0)
    assert jobs.model(spec, jobs.unet_state(tiny_sd.unet)).vae is tiny_sd.vae
