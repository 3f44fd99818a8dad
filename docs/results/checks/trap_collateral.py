"""What the encoder trap does to images it was not meant to trap (docs/protect_model.md, "Holding on new photos").

    python docs/results/checks/trap_collateral.py W.safetensors [W2.safetensors ...] --out F.json

Each W is a protection saved by ``apdm bench protect-model ... save_protected=W`` with an encoder trap, of the
subjects ``--subjects P,O`` (the bench's ``subjects=``, default 0,1; every W must protect the same P). For groups
of images (the protected person's photos the trap saw, four other photos of the person, its references, the other
person B, 32 freshly drawn persons, 32 drawn dogs, and 32 class-prompt generations of the base model) it writes the
mean latent change ‖μ_θ − μ_φ‖ / ‖μ_φ‖ (:func:`apdm.protect_model.encoder_trap.latent_change`) and the PSNR of
encode → decode with the original and with the trapped encoder: what img2img, inpainting or SDEdit (anything that
encodes a photo with the checkpoint's VAE) would see. A W trained with a keep set (``keep_photos=N``) also gets
the group ``keep_set``: those N photos themselves (the others above are not in it), so that what the trap costs the
photos it was told to keep can be told from what it costs photos like them that it never saw. For the person's own
photos (the ones the trap saw and the four new ones) it also writes what the attacker trains on, decode(posterior
mean of the trapped encoder), as the toy instruments judge it: ``<group>_decoded_ism`` (ism@toy-id against the
person's references; with the original encoder: ``_decoded_ism_base``) and ``<group>_decoded_fdfr`` (share the
detector rejects, fdfr@toy-det). Nothing is trained; ~1 min per file on one core.
"""

import argparse
import json
import sys
from pathlib import Path

from safetensors import safe_open

from apdm.bench import jobs
from apdm.bench.protect_model import drawn_dogs, drawn_persons, generated_persons, keep_photos, load_protected
from apdm.core.models import load_sd
from apdm.evaluation.identity import fdfr
from apdm.protect_model.encoder_trap import encode_decode, latent_change, recon_psnr
from apdm.toy import instruments as I
from apdm.toy.world import heldout_subjects, model_path
from apdm.utils import atomic_write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", nargs="+")
    ap.add_argument("--out", required=True)
    ap.add_argument("--subjects", default="0,1", help="P,O: held-out positions of the protected person and B")
    args = ap.parse_args(argv)
    positions = [int(k) for k in args.subjects.split(",")]
    sd = load_sd(str(model_path()), device="cpu")
    spec, inst = jobs.remember_model(sd), jobs.instruments()
    generated = generated_persons(sd)
    a, b = (heldout_subjects(1, num_images=4, offset=k)[0] for k in positions)  # as the bench's subjects=P,O
    fresh = heldout_subjects(1, num_images=4, offset=positions[0], seed=1)[0].images
    groups = {"photos": a.images, "fresh_photos": fresh,
              "references": a.references, "other_subject": b.images, "class_drawn": drawn_persons(32),
              "dog": drawn_dogs(32), "class_generated": generated}
    attacked = ("photos", "fresh_photos")  # what the attacker trains on, judged by the toy instruments

    def ism(images) -> float:  # (N,3,H,W) in [0,1] against the person's references, ism@toy-id
        return round(float(I.identity_similarity(inst.encoder, images, a.references).mean()), 4)

    # the original encoder's numbers are the same for every file
    psnr_base = {f"{g}_recon_psnr_base": round(float(recon_psnr(sd.vae, x).mean()), 2) for g, x in groups.items()}
    ism_base = {g: ism(encode_decode(sd.vae, groups[g])) for g in attacked}
    rows = {}
    for w in args.weights:
        meta = json.loads(safe_open(w, framework="pt").metadata()["apdm_protected"])
        info = load_protected(w, {"model_fingerprint": sd.fingerprint(), "subject_protected": a.index,
                                  "protect_photos": meta.get("protect_photos", 4)})
        trapped = jobs.model(spec, info["state"]).vae
        n_keep = int(info["info"].get("keep_photos", 0) or 0)
        own = {"keep_set": keep_photos(n_keep)} if n_keep else {}
        own_base = {f"{g}_recon_psnr_base": round(float(recon_psnr(sd.vae, x).mean()), 2) for g, x in own.items()}
        rows[w] = {"protect_photos": info["info"].get("protect_photos", 4),
                   "keep_photos": info["info"].get("keep_photos", 0),
                   "encoder_trap_config": info["info"].get("encoder_trap_config"),
                   **{f"{g}_latent_change": round(float(latent_change(sd.vae, trapped, x).mean()), 4)
                      for g, x in (groups | own).items()},
                   **psnr_base, **own_base,
                   **{f"{g}_recon_psnr_trapped": round(float(recon_psnr(trapped, x).mean()), 2)
                      for g, x in (groups | own).items()}}
        for g in attacked:
            x = encode_decode(trapped, groups[g])
            rejected = fdfr(I.detector_scores(inst.detector, x, "person"))
            rows[w] |= {f"{g}_decoded_ism": ism(x), f"{g}_decoded_ism_base": ism_base[g],
                        f"{g}_decoded_fdfr": round(float(rejected.mean()), 4)}
        print(w, json.dumps(rows[w]), flush=True)
    atomic_write_json(Path(args.out), {"model_fingerprint": sd.fingerprint(), "subjects": positions,
                                       "files": rows,
                                       "metric_impl": {"psnr": "psnr@torchmetrics", "ism": "ism@toy-id",
                                                       "fdfr": "fdfr@toy-det"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
