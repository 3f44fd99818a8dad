"""What the encoder trap does to images it was not meant to trap (docs/protect_model.md, "Holding on new photos").

    python docs/results/checks/trap_collateral.py W.safetensors [W2.safetensors ...] --out F.json

Each W is a protection saved by ``apdm bench protect-model ... save_protected=W`` with an encoder trap (of the
bench's default subjects ``subjects=0,1``). For groups of
images (the protected person's photos the trap saw, four other photos of the person, its references, the other
person B, 32 freshly drawn persons, 32 drawn dogs, and 32 class-prompt generations of the base model) it writes the
mean latent change ‖μ_θ − μ_φ‖ / ‖μ_φ‖ (:func:`apdm.protect_model.encoder_trap.latent_change`) and the PSNR of
encode → decode with the original and with the trapped encoder: what img2img, inpainting or SDEdit (anything that
encodes a photo with the checkpoint's VAE) would see. Nothing is trained; ~1 min per file on one core.
"""

import argparse
import json
import sys
from pathlib import Path

from safetensors import safe_open

from apdm.bench import jobs
from apdm.bench.protect_model import drawn_dogs, load_protected
from apdm.core import diffusion as D
from apdm.core.models import load_sd
from apdm.protect_model.encoder_trap import latent_change, recon_psnr
from apdm.toy import draw
from apdm.toy.world import heldout_subjects, model_path
from apdm.utils import atomic_write_json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", nargs="+")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    sd = load_sd(str(model_path()), device="cpu")
    spec = jobs.remember_model(sd)
    generated = D.generate(sd, ["a photo of a person"], 32, 25, 3.0, seed=321, quiet=True)
    rows = {}
    for w in args.weights:
        a, b = (heldout_subjects(1, num_images=4, offset=k)[0] for k in (0, 1))  # the bench's default subjects
        meta = json.loads(safe_open(w, framework="pt").metadata()["apdm_protected"])
        info = load_protected(w, {"model_fingerprint": sd.fingerprint(), "subject_protected": a.index,
                                  "protect_photos": meta.get("protect_photos", 4)})
        a_pos = 0
        real, _, _ = draw.render_dataset("person", draw.split()["heldout"][100:132], 1, seed=77)
        groups = {"photos": a.images, "fresh_photos": heldout_subjects(1, num_images=4, offset=a_pos, seed=1)[0].images,
                  "references": a.references, "other_subject": b.images, "class_drawn": draw.to_tensor(real),
                  "dog": drawn_dogs(32), "class_generated": generated}
        trapped = jobs.model(spec, info["state"]).vae
        rows[w] = {"protect_photos": info["info"].get("protect_photos", 4),
                   "keep_photos": info["info"].get("keep_photos", 0),
                   "encoder_trap_config": info["info"].get("encoder_trap_config"),
                   **{f"{g}_latent_change": round(float(latent_change(sd.vae, trapped, x).mean()), 4)
                      for g, x in groups.items()},
                   **{f"{g}_recon_psnr_base": round(float(recon_psnr(sd.vae, x).mean()), 2)
                      for g, x in groups.items()},
                   **{f"{g}_recon_psnr_trapped": round(float(recon_psnr(trapped, x).mean()), 2)
                      for g, x in groups.items()}}
        print(w, json.dumps(rows[w]), flush=True)
    atomic_write_json(Path(args.out), {"model_fingerprint": sd.fingerprint(), "files": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
