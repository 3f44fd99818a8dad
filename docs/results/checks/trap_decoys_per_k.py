"""How like person 1 are the decoys ``encoder_trap.targets=farthest`` picks when the protection holds K photos, as
``apdm bench protect-model protect_photos=K`` gives them (docs/protect_model.md, "Holding on new photos").

    python docs/results/checks/trap_decoys_per_k.py R --out F.json     # R: the recognizer folder; ~30 s

The candidates are the protection's class images and its x⁺ (one per photo), so with more photos there are more
candidates, but K decoys must be found among them. Each set is scored by the judge (``ism@toy-id``): mean and max
ISM to person 1's references, and the cosine of the decoys' mean embedding with the person's. Nothing is trained.
"""

import argparse
import dataclasses
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from apdm.bench.protect_model import protection_subject
from apdm.config import ProtectModelRunConfig, load_config
from apdm.core.models import load_sd
from apdm.evaluation.run import identity_backend
from apdm.protect_model.encoder_trap import trap_targets
from apdm.toy import instruments as I
from apdm.toy.world import heldout_subjects, instruments_path, model_path
from apdm.utils import atomic_write_json

ROOT = Path(__file__).resolve().parents[3]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recognizer")
    ap.add_argument("--out", required=True)
    ap.add_argument("--photos", default="4,16,32,64")
    args = ap.parse_args(argv)
    sd = load_sd(str(model_path()), device="cpu")
    judge = I.load_instruments(instruments_path()).encoder
    rc = load_config(ProtectModelRunConfig, ROOT / "recipes/toy-protect-model.yaml", [])
    embed, impl = identity_backend("toy:" + args.recognizer)
    a = heldout_subjects(1, num_images=4, offset=0)[0]
    ref = I.embed(judge, a.references).mean(0)
    rows = []
    for k in (int(v) for v in args.photos.split(",")):
        extra = heldout_subjects(1, num_images=k - 4, offset=0, seed=2)[0].images if k > 4 else a.images[:0]
        _, subj = protection_subject(sd, rc.personalization, rc.protect,
                                     dataclasses.replace(a, images=torch.cat([a.images, extra])))
        decoys, cos = trap_targets(subj, "farthest", embed)
        ism = I.identity_similarity(judge, decoys, a.references)
        blend = F.cosine_similarity(F.normalize(I.embed(judge, decoys), dim=-1).mean(0), ref, dim=0)
        rows.append({"protect_photos": k, "candidates": subj.class_images.shape[0] + subj.paired.shape[0],
                     "judge_ism_mean": round(float(ism.mean()), 4), "judge_ism_max": round(float(ism.max()), 4),
                     "judge_blend_cos": round(float(blend), 4),
                     "recognizer_cos_mean": round(float(cos.mean()), 4)})
        print(rows[-1], flush=True)
    atomic_write_json(Path(args.out), {"person": a.index, "recognizer": impl, "judge": "ism@toy-id", "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
