"""The unprotected model's noise-prediction error on each held-out subject's photos under the instance prompt
(docs/protect_model.md, "Along the attack": the subjects the recipe protects are among those with the highest error).

For each position P: the 4 photos the bench protects, encoded once (VAE posterior), then 32 rounds of a posterior
sample, fresh noise and 4 timesteps spread over [0, 1000); the mean of ``noise_prediction_loss`` (the same loss
every engine trains) of the base UNet under "a photo of sks person". No protection is run: ~1 s per subject.

    python docs/results/checks/subject_denoising_error.py $(seq -s, 0 49) --out docs/results/subject-denoising-error.json
"""

import argparse
import json

import torch

from apdm.bench import toy_setup
from apdm.core import diffusion as D
from apdm.toy.world import heldout_subjects
from apdm.utils import atomic_write_json

ap = argparse.ArgumentParser()
ap.add_argument("positions", help="comma-separated positions in the held-out list (the bench's subjects=P,...)")
ap.add_argument("--rounds", type=int, default=32)
ap.add_argument("--out")
args = ap.parse_args()

_, sd, _ = toy_setup([], set())
out = {}
for k in (int(p) for p in args.positions.split(",")):
    s = heldout_subjects(1, num_images=4, offset=k)[0]
    g = torch.Generator().manual_seed(0)
    n = s.images.shape[0]
    with torch.no_grad():
        mean, std = D.vae_posterior(sd.vae, s.images.to(sd.device), batch=n)
        cond = D.encode_prompt(sd.text_encoder, sd.tokenizer, [s.instance_prompt]).expand(n, -1, -1)
        errs = []
        for _ in range(args.rounds):
            lat = D.posterior_latents(sd.vae, mean, std, sample=True, generator=g).float()
            # n timesteps, one in each of n equal bands of [0, 1000), in random order
            band = sd.noise_scheduler.config.num_train_timesteps // n
            t = torch.randperm(n, generator=g) * band + torch.randint(0, band, (n,), generator=g)
            noise = torch.randn(lat.shape, generator=g)
            errs.append(float(D.noise_prediction_loss(sd.unet, sd.noise_scheduler, lat, cond, noise.to(lat.device),
                                                      t.to(lat.device))))
    out[k] = {"subject": s.index, "err_phi_instance": round(sum(errs) / len(errs), 4)}
    print(k, out[k], flush=True)
if args.out:
    atomic_write_json(args.out, out)
print(json.dumps(sorted(out.items(), key=lambda kv: -kv[1]["err_phi_instance"])))
