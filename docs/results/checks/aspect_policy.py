"""Non-square photos: does protecting a squeezed square copy weaken the perturbation an attacker sees?
(docs/protect_images.md, "Non-square photos")

    python docs/results/checks/aspect_policy.py --subjects 2 --aspect 1.5 --out aspect.json

Photos: held-out toy photos drawn at 192 px, reflect-padded left and right to the given aspect ratio (so the centre
square is the drawn photo). The attacker's view is DreamBooth's: short side to the model's 64 px, centre crop.
Policies, each mapped back onto the full photo and quantized by the runner's own functions:
  squeeze  the whole photo squeezed to 64x64 (apdm's policy before 2026-12-06)
  aspect   the whole photo at short side 64, aspect kept (the runner's default now; apdm.core.images.model_shape)
  crop     only the attacker's centre crop is protected (a reference: the best case for that one view)
Measured in the attacker's view against the clean photos: PhotoGuard (200 steps, gray target) as the share of the
latent distance to the target that it closes; AdvDM (50 steps) as the rise of the frozen model's denoising loss
(64 fixed (t, noise) draws per photo).
"""

import argparse
import time

import torch
import torch.nn.functional as F

from apdm.bench import toy_setup
from apdm.core import diffusion as D
from apdm.core.images import model_shape, resize, resize_center_crop, to_model_resolution
from apdm.protect_images.baselines import advdm_loss, protect_advdm, protect_photoguard
from apdm.protect_images.budget import apply_delta_to_original
from apdm.toy.world import heldout_subjects
from apdm.utils import atomic_write_json

ap = argparse.ArgumentParser()
ap.add_argument("--subjects", type=int, default=2)
ap.add_argument("--aspect", type=float, default=1.5, help="width / height of the padded photos")
ap.add_argument("--out", default="")
args = ap.parse_args()

_, sd, _ = toy_setup([], set())
s, budget = sd.resolution, 8 / 255
photos = torch.cat([h.images for h in heldout_subjects(args.subjects, num_images=4, num_references=0, size=192)])
pad = round(192 * (args.aspect - 1) / 2)
wide = F.pad(photos, (pad, pad, 0, 0), mode="reflect")
H, W = wide.shape[-2:]


def view(x):
    return torch.stack([resize_center_crop(im, s) for im in x])


def gray_distance(x):
    with torch.no_grad():
        return (D.encode_images(sd.vae, x) - D.encode_images(sd.vae, torch.full_like(x, 0.5))).flatten(1).norm(dim=1)


fixed_loss = advdm_loss(sd, mc_samples=64, seed=12345, resample=False)


def denoising_loss(x):
    with torch.no_grad():
        return torch.stack([fixed_loss(im[None]) for im in x])


def protect(method, policy):
    if policy == "crop":
        x = view(wide)
    else:
        x = to_model_resolution(wide, model_shape((H, W), s, sd.size_multiple, policy))
    if method == "photoguard":
        p = protect_photoguard(sd, x, budget=budget, steps=200, quiet=True)
    else:
        p = protect_advdm(sd, x, budget=budget, steps=50, quiet=True)
    delta = p - x
    if policy == "crop":  # the crop's delta into its window of the photo, zero elsewhere
        full = torch.zeros_like(wide)
        left = (W - H) // 2
        full[..., left:left + H] = resize(delta, (H, H), "bicubic", clamp=False)
        delta = full
    return torch.stack([apply_delta_to_original(o, d, budget) for o, d in zip(wide, delta)]), tuple(x.shape[-2:])


result = {"photos": len(wide), "photo_hw": [H, W], "budget": "8/255", "attacker_view": [s, s]}
for method in ("photoguard", "advdm"):
    for policy in ("squeeze", "aspect", "crop"):
        t0 = time.time()
        out, hw = protect(method, policy)
        if method == "photoguard":
            clean = gray_distance(view(wide))
            value = float(((clean - gray_distance(view(out))) / clean).mean())
        else:
            value = float((denoising_loss(view(out)) - denoising_loss(view(wide))).mean())
        result[f"{method}_{policy}"] = round(value, 4)
        result[f"{method}_{policy}_model_hw"] = list(hw)
        print(f"{method:10s} {policy:8s} at {hw}: {value:.4f}  ({time.time() - t0:.0f} s)", flush=True)
if args.out:
    atomic_write_json(args.out, result)
