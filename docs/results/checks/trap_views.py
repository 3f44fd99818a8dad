"""The pictures ``encoder_trap.synthetic_photos`` adds for person 1, as ``apdm bench protect-model
encoder_trap.synthetic_photos=N`` makes them (docs/protect_model.md, "Few photos: pictures from a personalized copy").

    python docs/results/checks/trap_views.py --n 12 --grid docs/img/protect_model/trap_views.png --out F.json  # ~3 min
    python docs/results/checks/trap_views.py --photos 8 --n 24 --recognizer R --pool 1 --out F.json  # 8 photos

A copy of the toy model is personalized on the protection's four photos of person 1 (``--photos K``: the bench's
K photos, ``protect_photos=K``) (the bench's recipe,
"a photo of sks person") and samples N pictures; the grid shows the four photos, the pictures, and the four new
photos the attacker of ``attack_photos=fresh`` trains on. Each picture is scored by the judge (``ism@toy-id``,
against person 1's references) and, for comparison, so are the photos and the new photos. With ``--recognizer R``
(the decoy recognizer, ``toy:R``) the pictures are screened as ``encoder_trap.synthetic_pool=P`` screens them
(``--pool P``, default 3: the N most alike of P·N), each kept picture's cosine to the photos' mean embedding is
recorded, and each photo's leave-one-out cosine to the others'. ``--copies C`` as
``encoder_trap.synthetic_copies=C`` (C personalized copies share the P·N samples); ``--seed K`` as the bench's
``protect_seed=K``.

How much of what new photos vary do the pictures add? In the base VAE's latent space (posterior means), each new
photo's distance to the nearest photo and to the nearest kept picture, relative to its own norm
(``latent_nearest_fresh_to_photos`` / ``_to_views``: the trap sends what is near what it holds), each picture's
distance to the nearest photo (``latent_nearest_views_to_photos``: near-copies of the photos add little), and the
pictures' mean pairwise judge cosine (``judge_pairwise_views_mean``: higher = less varied).
"""

import argparse
import dataclasses
from pathlib import Path

import torch

from apdm.bench.protect_model import protection_subject
from apdm.config import ProtectModelRunConfig, load_config
from apdm.core import diffusion as D
from apdm.core.images import save_grid
from apdm.core.models import load_sd
from apdm.evaluation.run import identity_backend
from apdm.protect_model.encoder_trap import leave_one_out_cosines, likeness, synthetic_views
from apdm.toy import instruments as I
from apdm.toy.world import heldout_subjects, instruments_path, model_path
from apdm.utils import atomic_write_json, set_progress, setup_logging

ROOT = Path(__file__).resolve().parents[3]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=12)
    ap.add_argument("--photos", type=int, default=4)
    ap.add_argument("--recognizer", default="")
    ap.add_argument("--pool", type=int, default=3)
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--grid", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    set_progress(False)
    setup_logging()
    sd = load_sd(str(model_path()), device="cpu")
    judge = I.load_instruments(instruments_path()).encoder
    rc = load_config(ProtectModelRunConfig, ROOT / "recipes/toy-protect-model.yaml", [])
    a = heldout_subjects(1, num_images=4, offset=0)[0]
    fresh = heldout_subjects(1, num_images=4, offset=0, seed=1)[0].images
    if args.photos > 4:  # the bench's protect_photos=K: the 4 and K - 4 from a third draw
        extra = heldout_subjects(1, num_images=args.photos - 4, offset=0, seed=2)[0].images
        a = dataclasses.replace(a, images=torch.cat([a.images, extra]))
    per, subj = protection_subject(sd, rc.personalization, rc.protect, a)
    embed, impl = identity_backend("toy:" + args.recognizer) if args.recognizer else (None, None)
    views = synthetic_views(sd, subj, per, args.n, embed=embed, pool=args.pool, copies=args.copies,
                            seed=args.seed)

    def ism(x):
        return [round(float(v), 4) for v in I.identity_similarity(judge, x, a.references)]

    res = {"person": a.index, "judge": "ism@toy-id", "n": args.n, "photos": args.photos,
           "prompt": subj.instance_prompt,
           "ism_views": ism(views), "ism_photos": ism(a.images), "ism_fresh_photos": ism(fresh)}
    for k in ("views", "photos", "fresh_photos"):
        res[f"ism_{k}_mean"] = round(sum(res[f"ism_{k}"]) / len(res[f"ism_{k}"]), 4)
    res["seed"] = args.seed
    with torch.no_grad():
        mu = {k: D.vae_posterior(sd.vae, x, 32)[0].float().flatten(1) for k, x in
              (("photos", a.images), ("views", views), ("fresh", fresh))}
        e = torch.nn.functional.normalize(I.embed(judge, views), dim=-1)

    def nearest(x, y):  # (len(x),): min_j ||x_i - y_j|| / ||x_i||
        return (torch.cdist(mu[x], mu[y]).min(1).values / mu[x].norm(dim=1)).tolist()

    for x, y in (("fresh", "photos"), ("fresh", "views"), ("views", "photos")):
        v = nearest(x, y)
        res[f"latent_nearest_{x}_to_{y}"] = [round(c, 4) for c in v]
        res[f"latent_nearest_{x}_to_{y}_mean"] = round(sum(v) / len(v), 4)
    pair = (e @ e.T)[~torch.eye(len(e), dtype=torch.bool)]
    res["judge_pairwise_views_mean"] = round(float(pair.mean()), 4)
    if embed is not None:
        res["pool"] = args.pool
        if args.copies > 1:
            res["copies"] = args.copies
        _, cos, unit = likeness(a.images, views, embed, "trap_views", "person 1's photos")
        res["recognizer"] = impl
        res["recognizer_cos_views"] = [round(float(c), 4) for c in cos]
        res["recognizer_cos_photos_loo"] = [round(float(c), 4) for c in leave_one_out_cosines(unit)]
        for k in ("views", "photos_loo"):
            v = res[f"recognizer_cos_{k}"]
            res[f"recognizer_cos_{k}_mean"] = round(sum(v) / len(v), 4)
    print({k: v for k, v in res.items() if k.endswith("_mean")}, flush=True)
    if args.grid:
        save_grid(torch.cat([a.images, views, fresh]), args.grid, nrow=4)
    atomic_write_json(Path(args.out), res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
