"""What Noisy Upscaling with the toy upscaler does to clean toy photos (docs/evaluate.md, "Noisy Upscaling").

    apdm toy upscaler                                   # once, ~10 min on 2 cores
    python docs/results/checks/toy_upscaler_quality.py docs/results/purifiers/toy_upscaler_quality.json [UPSCALER]

Photos: the first two held-out toy persons (4 photos each). For each setting, the mean PSNR of the purified photos
to the clean ones and the wall time of the whole batch (2 CPU threads), next to two references: the pixel noise
alone (σ 0.1) and a bicubic ×¼-and-back resize.
"""

import sys
import time

import torch
import torch.nn.functional as F

from apdm.attacks.noisy_upscale import noisy_upscale
from apdm.core.models import load_sd
from apdm.evaluation.fidelity import psnr
from apdm.toy.world import heldout_subjects
from apdm.utils import atomic_write_json

torch.manual_seed(0)
UPS = sys.argv[2] if len(sys.argv) > 2 else "toy"
sd = load_sd("toy", device="cpu", dtype="fp32")
x = torch.cat([s.images for s in heldout_subjects(2)])
out = {"upscaler": UPS, "photos": len(x)}
for name, kw in [("sigma0_level0", {"sigma": 0.0, "noise_level": 0}), ("sigma0_level320", {"sigma": 0.0}),
                 ("sigma0.05", {"sigma": 0.05}), ("default", {}), ("default_steps25", {"num_inference_steps": 25}),
                 ("downscale4", {"downscale": 4}), ("level100", {"noise_level": 100})]:
    t = time.time()
    y = noisy_upscale(x, sd, upscaler=UPS, **kw)
    out[name] = {"psnr": round(psnr(y, x).mean().item(), 2), "seconds": round(time.time() - t, 1)}
    print(name, out[name], flush=True)
noisy = (x + 0.1 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
out["noisy_only"] = round(psnr(noisy, x).mean().item(), 2)
small = F.interpolate(x, size=16, mode="bicubic", antialias=True)
out["bicubic_down4_up"] = round(psnr(F.interpolate(small, size=64, mode="bicubic").clamp(0, 1), x).mean().item(), 2)
print(out)
atomic_write_json(sys.argv[1], out)
