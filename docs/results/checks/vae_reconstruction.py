"""How well does the toy VAE reconstruct held-out photos? (docs/toy_world.md, docs/protect_images.md)

    python docs/results/checks/vae_reconstruction.py        # prints PSNR (dB) over 4 held-out subjects × 4 photos
"""

import torch

from apdm.bench import toy_setup
from apdm.core import diffusion as D
from apdm.evaluation.fidelity import psnr
from apdm.toy.world import heldout_subjects

_, sd, _ = toy_setup([], set())
x = torch.cat([s.images for s in heldout_subjects(4, num_images=4)])
with torch.no_grad():
    r = D.decode_latents(sd.vae, D.encode_images(sd.vae, x)).clamp(0, 1)
print(f"VAE reconstruction on {len(x)} held-out photos: PSNR {float(psnr(x, r).mean()):.1f} dB, "
      f"L1 {float((r - x).abs().mean()):.3f}")
