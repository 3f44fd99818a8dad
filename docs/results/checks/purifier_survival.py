"""How much of each protection survives each purifier, without a DreamBooth run (docs/evaluate.md,
"Adaptive purification: IMPRESS and GrIDPure").

    python docs/results/checks/purifier_survival.py --subjects 3 --budget 8/255 --out survival.json

Photos: held-out toy subjects (4 photos each). Methods (the quick bench's settings): LDU (shipped ρ), ASPL (20 steps,
DreamBooth without prior), AdvDM (50 steps), PhotoGuard (200 steps, gray target). Purifiers P: JPEG-75, blur (k=7),
DiffPure (strength 0.2), GrIDPure and IMPRESS (apdm defaults unless --gridpure / --impress give a spec). Every
purifier is applied to the protected *and* to the clean photos with the same seed, and the protection that is left is
measured against what the purifier does to the clean photo anyway:

  pixel     ‖P(x̄) − P(x)‖₂ / ‖x̄ − x‖₂                   the perturbation's share left in the pixels
  latent    ‖E(P(x̄)) − E(P(x))‖₂ / ‖E(x̄) − E(x)‖₂         ... in the attacked model's latents (posterior means)
  objective the method's own objective, left after P, as a share of what the protection achieved:
            AdvDM, ASPL  (L(P(x̄)) − L(P(x))) / (L(x̄) − L(x)), L = the frozen model's denoising loss
                         (64 fixed (t, noise) draws per photo; AdvDM's objective, ASPL's without its surrogate)
            PhotoGuard   (G(P(x)) − G(P(x̄))) / (G(x) − G(x̄)), G = latent distance to the gray target
            LDU          not measured (its objective is the TI anchors' loss)
plus the PSNR of P(x) and of P(x̄) to the clean photo x. Each value is a mean over photos.
"""

import argparse
import dataclasses
import time

import torch

from apdm.attacks.diffpure import diffpure
from apdm.attacks.transforms import gaussian_blur, jpeg
from apdm.bench import toy_setup
from apdm.bench.toy_world import toy_recipe
from apdm.core import diffusion as D
from apdm.evaluation.fidelity import psnr
from apdm.evaluation.protocol import with_prompts
from apdm.evaluation.run import apply_attack
from apdm.protect_images import ldu
from apdm.protect_images.baselines import METHODS, advdm_loss
from apdm.protect_images.budget import parse_budget
from apdm.toy.world import heldout_subjects, rho_path, toy_root
from apdm.utils import atomic_write_json

ap = argparse.ArgumentParser()
ap.add_argument("--subjects", type=int, default=3)
ap.add_argument("--budget", default="8/255")
ap.add_argument("--methods", default="ldu,aspl,advdm,photoguard")
ap.add_argument("--gridpure", default="gridpure", help="the GrIDPure spec, e.g. gridpure:rounds=5")
ap.add_argument("--impress", default="impress", help="the IMPRESS spec, e.g. impress:steps=500")
ap.add_argument("--out", default="")
args = ap.parse_args()

_, sd, _ = toy_setup([], set())
budget = parse_budget(args.budget)
methods = args.methods.split(",")
db_cfg = toy_recipe("dreambooth").personalization
fixed_loss = advdm_loss(sd, mc_samples=64, seed=12345, resample=False)
steps = {"aspl": 20, "advdm": 50, "photoguard": 200}


def model_purifier(spec):
    return lambda x: apply_attack(x, spec, sd, seed=0)


purifiers = {"jpeg75": lambda x: jpeg(x, 75), "blur": lambda x: gaussian_blur(x, 7),
             "diffpure": lambda x: diffpure(x, sd, strength=0.2), "gridpure": model_purifier(args.gridpure),
             "impress": model_purifier(args.impress)}


def latents(x):
    with torch.no_grad():
        return D.encode_images(sd.vae, x).float().flatten(1)


def loss(x):
    with torch.no_grad():
        return torch.stack([fixed_loss(im[None]) for im in x])


def gray(x):
    return (latents(x) - latents(torch.full_like(x, 0.5))).norm(dim=1)


def ratio(num, den):
    return (num / den.clamp(min=1e-12)).tolist()


rows: dict = {}
t0 = time.time()
for subj in heldout_subjects(args.subjects, num_images=4):
    x = subj.images
    pur_clean = {p: f(x).float() for p, f in purifiers.items()}
    for m in methods:
        if m == "ldu":
            rho_dir = str(rho_path() or toy_root() / "rho")
            xb = ldu.apply(sd, ldu.load_rho(rho_dir, device=sd.device), x, budget, quiet=True)
        else:
            kw = {"steps": steps[m]}
            if m == "aspl":
                kw["personalization"] = dataclasses.replace(
                    with_prompts(db_cfg, subj.instance_prompt, subj.class_prompt), with_prior_preservation=False)
            xb = METHODS[m](sd, x, budget=budget, quiet=True, **kw)
        xb = xb.detach().float().clamp(0, 1).cpu()
        d_pix = (xb - x).flatten(1).norm(dim=1)
        d_lat = (latents(xb) - latents(x)).norm(dim=1)
        if m == "photoguard":
            d_obj = gray(x) - gray(xb)
        elif m in ("advdm", "aspl"):
            d_obj = loss(xb) - loss(x)
        for p, f in purifiers.items():
            pb, pc = f(xb).float(), pur_clean[p]
            r = rows.setdefault(f"{m}/{p}", {k: [] for k in ("pixel", "latent", "objective", "psnr_clean_purified",
                                                            "psnr_protected_purified")})
            r["pixel"] += ratio((pb - pc).flatten(1).norm(dim=1), d_pix)
            r["latent"] += ratio((latents(pb) - latents(pc)).norm(dim=1), d_lat)
            if m == "photoguard":
                r["objective"] += ratio(gray(pc) - gray(pb), d_obj)
            elif m in ("advdm", "aspl"):
                r["objective"] += ratio(loss(pb) - loss(pc), d_obj)
            r["psnr_clean_purified"] += psnr(x, pc).tolist()
            r["psnr_protected_purified"] += psnr(x, pb).tolist()
        print(f"subject {subj.index} {m} done ({time.time() - t0:.0f} s)", flush=True)

out = {"budget": args.budget, "subjects": args.subjects, "gridpure": args.gridpure, "impress": args.impress,
       "seconds": round(time.time() - t0),
       "rows": {k: {n: round(sum(v) / len(v), 4) if v else None for n, v in r.items()} for k, r in rows.items()}}
print(f"{'method/purifier':24s} {'pixel':>7s} {'latent':>7s} {'object.':>7s} {'PSNR P(x)':>10s} {'PSNR P(x̄)':>10s}")
for k, r in out["rows"].items():
    obj = "-" if r["objective"] is None else f"{r['objective']:.3f}"
    print(f"{k:24s} {r['pixel']:7.3f} {r['latent']:7.3f} {obj:>7s} {r['psnr_clean_purified']:10.2f} "
          f"{r['psnr_protected_purified']:10.2f}")
if args.out:
    atomic_write_json(args.out, out)
