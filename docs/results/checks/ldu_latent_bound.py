"""Is LDU's ρ or LDU's latent family the limit? The best perturbation the family reaches, per photo, without ρ.

LDU perturbs a photo only through its inverted latent: out = x0 + (D(denoise_k(z_T + s)) − D(denoise_k(z_T))), hard
projected to the budget, with the shift s = r_ρ(z_T) given by the trained network ρ. Here s is optimized for each
photo directly (Adam on s, ``STEPS`` steps, gradients through the projection, the k DDIM steps and the decoder) to
maximize AdvDM's objective (the frozen model's denoising loss of "a photo", fresh t and noise each step), the pixel
attack that registers most against a Custom Diffusion attacker on the toy world. Held-out subject 1, 4 photos, 8/255,
ρ's sampling settings (k = 4). Four photo sets are then attacked by the bench's evaluation attacker (toy recipe
ATTACKER, "a photo of zwx person", 3 seeds 1 apart, 8 samples: the `apdm bench protect-images --quick
attack_seeds=3 attack_seed_stride=1 identifier=zwx` protocol, so the clean runs repeat the bench's): clean, LDU with
ρ, the latent optimum, and AdvDM in pixels with as many PGD steps. Also printed: AdvDM's objective on each set, with
fixed draws (32 (t, ε) pairs), i.e. how far each one pushes what it is meant to push.

    python docs/results/checks/ldu_latent_bound.py OUT.json [ATTACKER=custom_diffusion] [STEPS=50] [LR=0.05] [RHO]
"""

import json
import statistics
import sys
import time

import torch

from apdm.bench import attack_config, jobs, submit_attack_runs, toy_setup
from apdm.bench.toy_world import toy_recipe
from apdm.evaluation.fidelity import psnr
from apdm.protect_images import ldu
from apdm.protect_images.baselines import advdm_loss, protect_advdm
from apdm.protect_images.budget import project_linf
from apdm.toy.world import REPO_ASSETS, heldout_subjects
from apdm.utils import atomic_write_json, progress


class LatentShift(torch.nn.Module):
    """ρ's place in :func:`apdm.protect_images.ldu.perturb`: z_T (N,C,h,w) -> z_T + s, one free shift per photo."""

    def __init__(self, z_T: torch.Tensor):
        super().__init__()
        self.s = torch.nn.Parameter(torch.zeros_like(z_T))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z + self.s


def main() -> None:  # under a main guard: the attack workers are spawned processes that import this file
    out_path = sys.argv[1]
    attacker = sys.argv[2] if len(sys.argv) > 2 else "custom_diffusion"
    steps = int(sys.argv[3]) if len(sys.argv) > 3 else 50
    lr = float(sys.argv[4]) if len(sys.argv) > 4 else 0.05
    rho_dir = sys.argv[5] if len(sys.argv) > 5 else str(REPO_ASSETS / "rho")
    budget = 8 / 255
    t0 = time.perf_counter()
    _, sd, _ = toy_setup([], set())
    for module in (sd.unet, sd.vae, sd.text_encoder):
        module.requires_grad_(False)
    subj = heldout_subjects(1, num_images=4)[0]
    clean = subj.images.to(sd.device)
    rho = ldu.load_rho(rho_dir, device=sd.device)

    # the latent optimum: Adam on the shift s of z_T, for each photo at once (the objective is a mean over photos),
    # through LDU's own path (ldu.perturb with the shift in ρ's place) and its hard projection
    prepared = ldu.prepare(sd, clean, rho.sampling)
    shift = LatentShift(prepared["z_T"])
    opt = torch.optim.Adam(shift.parameters(), lr=lr)
    objective = advdm_loss(sd, "a photo", seed=1)

    def protected(checkpoint: bool) -> torch.Tensor:
        out = ldu.perturb(sd, shift, prepared, rho.sampling, checkpoint=checkpoint)
        return project_linf(out, prepared["images"], budget).clamp(0, 1)

    trace = []
    for _ in progress(range(steps), desc="latent shift"):
        loss = objective(protected(checkpoint=True))
        opt.zero_grad()
        (-loss).backward()
        opt.step()
        trace.append(float(loss.detach()))
    with torch.no_grad():
        latent = protected(checkpoint=False)
    sets = {"clean": clean, "ldu_rho": ldu.apply(sd, rho, clean, budget, quiet=True), "ldu_latent_optimum": latent,
            "advdm_pixels": protect_advdm(sd, clean, budget=budget, steps=steps, quiet=True)}
    fixed = advdm_loss(sd, "a photo", mc_samples=32, seed=12345, resample=False)
    res = {"attacker": attacker, "budget": "8/255", "steps": steps, "lr": lr, "rho": rho_dir, "subject": subj.index,
           "objective_trace_first10": round(statistics.mean(trace[:10]), 4),
           "objective_trace_last10": round(statistics.mean(trace[-10:]), 4), "sets": {}}
    for name, x in sets.items():
        with torch.no_grad():
            db = float(psnr(clean.cpu(), x.cpu()).mean())
            res["sets"][name] = {"psnr": round(db, 2) if db != float("inf") else None,
                                 "linf255": round(float((x - clean).abs().max() * 255), 2),
                                 "advdm_objective_fixed_draws": round(float(fixed(x)), 5)}
    sample = toy_recipe("dreambooth").sample
    sample.num_images_per_prompt = 8
    cfg = attack_config(toy_recipe(attacker).personalization, subj, "zwx")
    with jobs.executor(2) as pool:
        futures = {name: submit_attack_runs(pool, jobs.spec(sd), None, x.cpu(), subj.references, cfg, sample, 3,
                                            stride=1) for name, x in sets.items()}
        for name, futs in futures.items():
            outs = [f.result() for f in futs]
            for key in ("ism", "fdfr"):
                runs = [round(float(o[key]), 4) for o in outs]
                res["sets"][name][f"{key}_runs"] = runs
                res["sets"][name][key] = round(statistics.mean(runs), 4)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(res, indent=1))
    atomic_write_json(out_path, res)


if __name__ == "__main__":
    main()
