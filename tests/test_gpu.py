"""The CUDA path: every engine on the GPU, in the dtypes a real run uses (skipped without CUDA).

Run on a GPU machine with ``python -m pytest -m gpu``. The tiny model keeps these fast; one test builds the real
SD-1.5 architecture (random weights) to check that real-size tensors flow in bf16.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from apdm.config import PersonalizationConfig, ProtectConfig

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def gpu_sd():
    """The tiny model on CUDA with bf16 (or fp16) frozen weights, as ``load_sd(device='auto')`` gives a GPU."""
    from apdm.core.models import load_sd

    return load_sd("tiny", device="cuda")


def _images(n, size=64, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_auto_device_and_dtype_on_cuda(gpu_sd):
    assert gpu_sd.device.type == "cuda"
    assert gpu_sd.dtype in (torch.bfloat16, torch.float16)
    assert next(gpu_sd.unet.parameters()).dtype == gpu_sd.dtype


def test_noise_prediction_loss_agrees_with_cpu():
    """fp32 on both devices, same latents, noise and t: the loss agrees to well under TF32 rounding."""
    from apdm.core import diffusion as D
    from apdm.core.models import tiny_sd

    cpu, gpu = tiny_sd(seed=3), tiny_sd(seed=3, device="cuda")
    g = torch.Generator().manual_seed(0)
    lat, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.randint(1000, (4,), generator=g)
    cond = D.encode_prompt(cpu.text_encoder, cpu.tokenizer, ["a photo of sks person"]).expand(4, -1, -1)
    with torch.no_grad():
        ref = D.noise_prediction_loss(cpu.unet, cpu.noise_scheduler, lat, cond, noise, t).item()
        got = D.noise_prediction_loss(gpu.unet, gpu.noise_scheduler, lat.cuda(), cond.cuda(), noise.cuda(),
                                      t.cuda()).item()
    assert got == pytest.approx(ref, rel=5e-3)


@pytest.mark.parametrize("method", ["dreambooth", "lora", "ti"])
@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_personalization_steps_on_cuda(gpu_sd, method, mixed_precision):
    from apdm.personalization import simulator as S

    cfg = PersonalizationConfig(method=method, learning_rate=1e-3, batch_size=2, steps=3,
                                with_prior_preservation=method == "dreambooth", mixed_precision=mixed_precision,
                                gradient_checkpointing=method != "ti")
    state = S.setup(gpu_sd, cfg, _images(3, seed=1).cuda() if cfg.with_prior_preservation else None)
    before = {n: p.detach().clone() for n, p in state.sd.unet.named_parameters() if p.requires_grad}
    before.update({n: p.detach().clone() for n, p in state.sd.text_encoder.named_parameters() if p.requires_grad})
    losses = [S.step(state, _images(2).cuda()) for _ in range(3)]
    assert all(torch.isfinite(torch.tensor(losses)))
    params = dict(state.sd.unet.named_parameters()) | dict(state.sd.text_encoder.named_parameters())
    assert any(not torch.equal(params[n], b) for n, b in before.items())


@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_l2p_on_cuda_changes_theta_not_phi(gpu_sd, trainable):
    from apdm.protect_model import l2p

    subj = l2p.Subject("s", _images(2).cuda(), _images(2, seed=2).cuda(), _images(3, seed=3).cuda(),
                       "a photo of sks person", "a photo of a person")
    phi = {n: p.detach().clone() for n, p in gpu_sd.unet.named_parameters()}
    pcfg = ProtectConfig(outer_steps=2, inner_steps=2, learning_rate=1e-3, checkpoint_every=0,
                         mixed_precision="bf16", gradient_checkpointing=True, anchor_weight=1.0, trainable=trainable,
                         lora_rank=4)
    per = PersonalizationConfig(method="dreambooth", learning_rate=1e-3, batch_size=1)
    theta, hist, _ = l2p.protect(gpu_sd, [subj], per, pcfg)
    assert all(torch.isfinite(torch.tensor(h["loss_protect"])) for h in hist)
    # full θ: fp32 master weights; LoRA-θ: adapters merged into a base kept in the model's dtype
    assert next(theta.parameters()).is_cuda
    assert next(theta.parameters()).dtype == (torch.float32 if trainable == "all" else gpu_sd.dtype)
    assert all(torch.equal(p, phi[n]) for n, p in gpu_sd.unet.named_parameters())
    assert any(not torch.equal(p.to(phi[n].dtype), phi[n]) for n, p in theta.named_parameters())


def test_encoder_trap_on_cuda(gpu_sd):
    """The trap's fp32 encoder copy trains on the GPU against the bf16 original, micro-batched and checkpointed, and
    sends the photos' latents away while the class images' stay (as on the CPU, tests/test_encoder_trap.py)."""
    from apdm.config import EncoderTrapConfig
    from apdm.protect_model import encoder_trap as T
    from apdm.protect_model import l2p

    subj = l2p.Subject("s", _images(3).cuda(), _images(3, seed=1).cuda(), _images(4, seed=2).cuda(),
                       "a photo of sks person", "a photo of a person")
    cfg = EncoderTrapConfig(steps=30, learning_rate=2e-3, augment=0.0, preserve_batch=4, micro_batch=2,
                            gradient_checkpointing=True)
    trapped, hist, _ = T.trap_encoder(gpu_sd.vae, [subj], cfg, quiet=True)
    assert trapped.device.type == "cuda" and next(trapped.parameters()).dtype == torch.float32
    assert sum(h["loss_trap"] for h in hist[-5:]) < 0.5 * sum(h["loss_trap"] for h in hist[:5])
    change = T.latent_change(gpu_sd.vae, trapped, torch.cat([subj.images, subj.class_images]))
    assert change[3:].max() < change[:3].min(), change


def test_image_protection_on_cuda_keeps_the_budget(gpu_sd):
    from apdm.protect_images import ldu
    from apdm.protect_images.baselines import METHODS

    images = _images(2).cuda()
    budget = 8 / 255
    steps = {"aspl": 1, "fsmg": 2, "advdm": 2, "photoguard": 2}
    outs = {m: fn(gpu_sd, images, budget=budget, steps=steps[m], quiet=True) for m, fn in METHODS.items()}
    rho = ldu.train_perturber(gpu_sd, [images], budget=budget, steps=2, anchor_steps=2, batch_size=2, quiet=True)
    outs["ldu"] = ldu.apply(gpu_sd, rho, images, budget, quiet=True)
    for m, out in outs.items():
        assert out.shape == images.shape and torch.isfinite(out).all(), m
        assert (out - images).abs().max() <= budget + 1e-6, m
        assert out.min() >= 0 and out.max() <= 1, m
        assert not torch.equal(out, images), m


def test_protect_images_cli_on_cuda(tmp_path):
    """The user's command on the GPU: odd sizes, a bad file skipped, the budget at the output resolution."""
    from PIL import Image

    from apdm.cli import main

    src, dst = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    for i, size in enumerate([(71, 53), (64, 90)]):
        arr = (_images(1, seed=i)[0].permute(1, 2, 0).numpy() * 255).astype("uint8")
        Image.fromarray(arr).resize(size).save(src / f"p{i}.png")
    (src / "broken.png").write_bytes(b"not a png")
    assert main(["protect-images", "--method", "advdm", "--budget", "8/255", "--input", str(src), "--output",
                 str(dst), "model.path=tiny", "model.device=cuda", "steps=3", "quiet=true"]) == 0
    import json

    from apdm.core.images import load_image

    manifest = json.loads((dst / "manifest.json").read_text())
    assert (manifest["num_protected"], manifest["num_failed"]) == (2, 1)
    assert manifest["device"].startswith("cuda")
    for entry in manifest["images"]:
        orig, prot = load_image(entry["input"]), load_image(entry["output"])
        assert prot.size == orig.size
        assert ((prot.pixels * 255).round() - (orig.pixels * 255).round()).abs().max() <= 8


def test_real_size_sd15_forward_in_bf16():
    """The real SD-1.5 architecture (random weights) runs a bf16 UNet step and a VAE round trip at 512 px."""
    from apdm.core import diffusion as D
    from apdm.core.models import random_sd

    sd = random_sd("sd15", device="cuda", dtype=torch.bfloat16)
    x = _images(1, size=512).cuda()
    with torch.no_grad():
        z = D.encode_images(sd.vae, x)
        assert z.shape == (1, 4, 64, 64)
        cond = D.encode_prompt(sd.text_encoder, sd.tokenizer, ["a photo of sks person"])
        assert cond.shape == (1, 77, 768)
        loss = D.noise_prediction_loss(sd.unet, sd.noise_scheduler, z, cond,
                                       generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(loss)
    assert dataclasses.is_dataclass(sd) and sd.resolution == 512
