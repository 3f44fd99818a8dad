"""How like each held-out person are the encoder trap's decoys? (docs/protect_model.md, "What the trap's DreamBooth
learns"). Writes docs/results/decoy_likeness.json.

    apdm toy build skip_model=true seed=1 output_dir=R     # an independent recognizer (~18 min on 2 cores)
    python docs/results/decoy_likeness.py R [N]            # N held-out persons (default 40), ~1 min

For each person: the DPO pairs' x⁺ (the trap's default decoys) and the decoys ``encoder_trap.targets=farthest``
chooses with recognizer R, each scored by the toy world's judge (``ism@toy-id``, the committed identity encoder):
the mean ISM of the four images, and the cosine of their mean embedding with the person's (DreamBooth on four
people learns a blend of them, which lands between the two). Nothing is trained; the decoys are chosen by the
engine's own :func:`apdm.protect_model.encoder_trap.trap_targets`.
"""

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from apdm.bench import jobs
from apdm.bench.protect_model import protection_subject
from apdm.config import ProtectModelRunConfig, load_config
from apdm.core.models import load_sd
from apdm.evaluation.run import identity_backend
from apdm.protect_model.encoder_trap import trap_targets
from apdm.toy import instruments as I
from apdm.toy.world import heldout_subjects, model_path

ROOT = Path(__file__).resolve().parents[2]


def likeness(encoder, images: torch.Tensor, references: torch.Tensor) -> tuple[float, float]:
    """(mean ISM of ``images`` to the person, cosine of their mean normalised embedding with the person's)."""
    ism = I.identity_similarity(encoder, images, references)
    e = F.normalize(I.embed(encoder, images), dim=-1).mean(0)
    ref = I.embed(encoder, references).mean(0)
    return float(ism.mean()), float(F.cosine_similarity(e, ref, dim=0))


def main() -> None:
    recognizer, n = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 40
    sd = load_sd(str(model_path()), device="cpu")
    judge = jobs.instruments().encoder
    embed, tag = identity_backend(f"toy:{recognizer}")
    rc = load_config(ProtectModelRunConfig, ROOT / "recipes" / "toy-protect-model.yaml", [])
    rows = []
    for person in heldout_subjects(n, num_images=4, num_references=8):
        _, subject = protection_subject(sd, rc.personalization, rc.protect, person)
        decoys, cos = trap_targets(subject, "farthest", embed)
        paired, farthest = (likeness(judge, x, person.references) for x in (subject.paired, decoys))
        rows.append({"person": person.index, "paired_ism": paired[0], "paired_blend_cos": paired[1],
                     "farthest_ism": farthest[0], "farthest_blend_cos": farthest[1],
                     "farthest_recognizer_cos": float(cos.mean())})

    def summary(key: str) -> dict:
        v = torch.tensor([r[key] for r in rows])
        return {"mean": round(float(v.mean()), 4), "sd": round(float(v.std()), 4), "max": round(float(v.max()), 4),
                "share_above_0.13": round(float((v > 0.13).float().mean()), 4)}

    keys = ("paired_ism", "paired_blend_cos", "farthest_ism", "farthest_blend_cos", "farthest_recognizer_cos")
    out = {"persons": len(rows), "judge": "ism@toy-id", "recognizer": tag, "recognizer_path": recognizer,
           "summary": {k: summary(k) for k in keys}, "per_person": rows}
    path = Path(__file__).resolve().parent / "decoy_likeness.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    for k in keys:
        print(f"{k:24s} {out['summary'][k]}")


if __name__ == "__main__":
    main()
