"""Which images an encoder trap costs most, image by image (docs/protect_model.md, "What the trap costs, image by
image").

    python docs/results/checks/trap_cost_per_image.py W.safetensors [W2 ...] --subjects P,O --recognizer toy:R \
        --out F.json

Each W is a protection saved by ``apdm bench protect-model ... save_protected=W`` with ``encoder_trap.targets=
farthest encoder_trap.decoys=1`` of the person at held-out position P (every W must protect the same P with the
same number of photos). The decoy is chosen again, as the bench chose it, with the recognizer ``--recognizer``
(the bench's ``encoder_trap.identity``); its cosine must equal the W's recorded ``decoy_cosines`` (else the
recognizer is another build and the file is refused). For every image of the groups of ``trap_collateral.py``
(32 class-prompt generations of the base model, 32 drawn persons, 32 drawn dogs, the 200 kept photos when W has
them) it computes what the trap costs it, the encode → decode PSNR lost (dB, original − trapped encoder), and
four things that might explain it, all with the original encoder or the judge:

* ``to_decoy``: ‖μ_φ(x) − μ_φ(decoy)‖ / ‖μ_φ(x)‖, how far the image's latent is from the decoy's;
* ``to_photos``: the same to the nearest of the protected photos' latents;
* ``ism_person``: the judge's cosine of the image to the protected person (ism@toy-id against its references);
* ``psnr_base``: how well the original encoder reconstructs it.

It writes, per W and group, the mean cost and the Spearman rank correlation of the cost with each of the four, and
the same pooled over the groups; and the cost on a linear scale: the mean squared error the trap adds to the
reconstruction (``mse_added``, images in [0,1]; ``mse_base`` that of the original encoder) and the PSNR between the
trapped and the original encoder's decoded picture (``change_psnr``, what the trap changes in what a user sees).
A loss in dB is relative to how well the image reconstructed before: the same added error costs more dB on an
image that reconstructed well. Nothing is trained; ~34 s for two files on one core (the original encoder's side is
computed once).
"""

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from apdm.bench import jobs
from apdm.bench.protect_model import (drawn_dogs, drawn_persons, generated_persons, keep_photos, load_protected,
                                      protection_subject)
from apdm.config import ProtectModelRunConfig, load_config
from apdm.core import diffusion as D
from apdm.core.models import load_sd
from apdm.evaluation.fidelity import psnr
from apdm.evaluation.run import identity_backend
from apdm.protect_model.encoder_trap import encode_decode, trap_targets
from apdm.toy import instruments as I
from apdm.toy.world import heldout_subjects, model_path
from apdm.utils import atomic_write_json

RECIPE = Path(__file__).resolve().parents[3] / "recipes" / "toy-protect-model.yaml"


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation of two (N,) tensors (no ties expected in continuous values)."""
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return round(float((ra * rb).sum() / (ra.norm() * rb.norm())), 3)


def relative_distance(x: torch.Tensor, to: torch.Tensor) -> torch.Tensor:
    """min over rows of ``to`` of ‖x_i − to_j‖ / ‖x_i‖, for latents flattened to (N, D) and (M, D)."""
    return (torch.cdist(x, to).min(dim=1).values / x.norm(dim=1)).float()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--subjects", default="0,1", help="P,O: held-out positions of the protected person and B")
    ap.add_argument("--recognizer", required=True, help="the bench's encoder_trap.identity, e.g. toy:R")
    args = ap.parse_args(argv)
    positions = [int(k) for k in args.subjects.split(",")]
    sd = load_sd(str(model_path()), device="cpu")
    spec, inst = jobs.remember_model(sd), jobs.instruments()
    embed, recognizer = identity_backend(args.recognizer)
    a = heldout_subjects(1, num_images=4, offset=positions[0])[0]
    metas = [json.loads(safe_open(w, framework="pt").metadata()["apdm_protected"]) for w in args.weights]
    n_protect = metas[0].get("protect_photos", 4)
    if any(m.get("protect_photos", 4) != n_protect for m in metas):
        sys.exit("every W must hold the same number of photos of the person")
    photos = a.images if n_protect == 4 else torch.cat(
        [a.images, heldout_subjects(1, num_images=n_protect - 4, offset=positions[0], seed=2)[0].images])
    rc = load_config(ProtectModelRunConfig, RECIPE, [])
    _, subject = protection_subject(sd, rc.personalization, rc.protect, dataclasses.replace(a, images=photos))
    decoy, cos = trap_targets(subject, "farthest", embed, 1)
    decoy = decoy[:1].cpu()

    generated = generated_persons(sd)
    groups = {"class_generated": generated, "class_drawn": drawn_persons(32), "dog": drawn_dogs(32)}

    def latents(x: torch.Tensor) -> torch.Tensor:
        return D.vae_posterior(sd.vae, x, 32)[0].float().flatten(1).cpu()

    z_decoy, z_photos = latents(decoy), latents(photos)
    base_of: dict = {}

    def original(g: str, x: torch.Tensor) -> dict:
        """What the original encoder and the judge give the group (the same for every W): computed once."""
        key = (g, x.shape[0])  # a keep set's size can differ between W
        if key not in base_of:
            dec = encode_decode(sd.vae, x)
            z = latents(x)
            base_of[key] = {"dec": dec, "mse": (x - dec).pow(2).mean((1, 2, 3)), "psnr_base": psnr(x, dec),
                            "to_decoy": relative_distance(z, z_decoy), "to_photos": relative_distance(z, z_photos),
                            "ism_person": I.identity_similarity(inst.encoder, x, a.references)}
        return base_of[key]

    rows = {}
    for w, meta in zip(args.weights, metas):
        chosen = meta.get("decoy_cosines")
        if chosen is not None and abs(chosen[0] - float(cos[0])) > 1e-3:
            sys.exit(f"{w}: its decoy had cosine {chosen[0]} to the person, {args.recognizer} chooses one at "
                     f"{float(cos[0]):.4f}: another build of the recognizer")
        info = load_protected(w, {"model_fingerprint": sd.fingerprint(), "subject_protected": a.index,
                                  "protect_photos": n_protect})
        trapped = jobs.model(spec, info["state"]).vae
        n_keep = int(info["info"].get("keep_photos", 0) or 0)
        mine = groups | ({"keep_set": keep_photos(n_keep)} if n_keep else {})
        per_group, pooled = {}, {k: [] for k in ("cost", "to_decoy", "to_photos", "ism_person", "psnr_base")}
        for g, x in mine.items():
            x = x.float().cpu()
            o, dec = original(g, x), encode_decode(trapped, x)
            v = {"cost": o["psnr_base"] - psnr(x, dec),
                 **{k: o[k] for k in ("psnr_base", "to_decoy", "to_photos", "ism_person")}}
            # the same cost on a linear scale, and what the trap changes in the decoded picture itself
            added = {"mse_added": float(((x - dec).pow(2).mean((1, 2, 3)) - o["mse"]).mean()),
                     "mse_base": float(o["mse"].mean()),
                     "change_psnr": float(psnr(dec, o["dec"]).mean())}
            per_group[g] = {"images": x.shape[0], "cost_mean": round(float(v["cost"].mean()), 3),
                            **{f"{k}_mean": round(val, 6 if k.startswith("mse") else 3) for k, val in added.items()},
                            **{f"{k}_mean": round(float(v[k].mean()), 3) for k in v if k != "cost"},
                            **{f"spearman_cost_{k}": spearman(v["cost"], v[k]) for k in v if k != "cost"}}
            for k in pooled:
                pooled[k].append(v[k])
        cat = {k: torch.cat(v) for k, v in pooled.items()}
        rows[w] = {"encoder_trap_config": info["info"].get("encoder_trap_config"), "groups": per_group,
                   "pooled": {f"spearman_cost_{k}": spearman(cat["cost"], cat[k]) for k in cat if k != "cost"}}
        print(w, json.dumps(rows[w]["pooled"]), json.dumps({g: (v["cost_mean"], v["to_decoy_mean"],
                                                                 v["spearman_cost_to_decoy"])
                                                             for g, v in per_group.items()}), flush=True)
    atomic_write_json(Path(args.out), {"model_fingerprint": sd.fingerprint(), "subjects": positions,
                                       "decoy_identity_impl": recognizer, "decoy_cosine": round(float(cos[0]), 4),
                                       "files": rows,
                                       "metric_impl": {"psnr": "psnr@torchmetrics", "ism": "ism@toy-id",
                                                       "latent_distance": "posterior-mean@apdm"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
