"""Where the toy-world build spends its time, and whether a layout or precision switch would cut it
(docs/toy_world.md, "Build time").

    python docs/results/checks/toy_build_step_time.py     # run on an otherwise idle machine

Times one training step of the VAE and of the UNet + text encoder at the recipe's sizes and batch (32), with the
recipe's math (the VAE's encode/decode round trip with an L1 loss; the shared noise-prediction loss), three ways:
plain fp32 (what the build does), channels_last memory format, and bf16 autocast. Prints seconds per step and the
build time they project (recipe step counts; instruments and drawing not included).
"""

import sys
import time

import torch
import yaml

from apdm.core import diffusion as D
from apdm.toy import draw
from apdm.toy.model import ToyModelConfig, build_components

recipe = yaml.safe_load(open("recipes/toy-build.yaml"))
mcfg = ToyModelConfig(**recipe["model"])
vae_steps = recipe["train"]["vae_steps"]
unet_steps = recipe["train"]["unet_steps"] + sum(s["unet_steps"] for s in recipe.get("more_stages", []))


def timed(step, n=5):
    for _ in range(2):
        step()
    t = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - t) / n


print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; VAE {vae_steps} steps, UNet {unet_steps} steps")
for name, fmt, bf16 in (("fp32", torch.contiguous_format, False), ("channels_last", torch.channels_last, False),
                        ("bf16 autocast", torch.contiguous_format, True)):
    vae, te, tok, unet, sched = build_components(mcfg, draw.vocabulary(), 0)
    vae.to(memory_format=fmt)
    unet.to(memory_format=fmt)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(32, 3, 64, 64, generator=g) * 2 - 1).contiguous(memory_format=fmt)
    lat = torch.randn(32, 4, 16, 16, generator=g).contiguous(memory_format=fmt)
    texts = ["a photo of a person with red hair"] * 32
    opt_v = torch.optim.AdamW(vae.parameters(), 1e-3)
    opt_u = torch.optim.AdamW(list(unet.parameters()) + list(te.parameters()), 1e-4)

    def vae_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            d = vae.encode(x).latent_dist
            loss = (vae.decode(d.sample(generator=g)).sample - x).abs().mean()
        opt_v.zero_grad()
        loss.backward()
        opt_v.step()

    def unet_step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = D.noise_prediction_loss(unet, sched, lat, D.encode_prompt(te, tok, texts), generator=g)
        opt_u.zero_grad()
        loss.backward()
        opt_u.step()

    tv, tu = timed(vae_step), timed(unet_step)
    print(f"{name:14s} VAE {tv:.3f} s/step, UNet {tu:.3f} s/step -> {(tv * vae_steps + tu * unet_steps) / 60:.0f} min "
          "of training")
    sys.stdout.flush()
