"""The keep term's two forms at a trapped encoder: latent (mse of the posterior moments) against decoded
(:func:`apdm.protect_model.encoder_trap.keep_decoded`, one shared draw), on 16 class-prompt images of the toy model, to
set ``encoder_trap.preserve_weight`` for ``keep_space=decoded`` (docs/protect_model.md, "The keep term in image
space").

    python docs/results/checks/keep_term_scale.py TRAP.safetensors [...]   # weights saved by save_protected=
"""

import argparse
import json

import torch
import torch.nn.functional as F
from safetensors import safe_open

from apdm.bench import jobs
from apdm.bench.protect_model import load_protected
from apdm.core import diffusion as D
from apdm.core.models import load_sd
from apdm.protect_model import encoder_trap as T
from apdm.toy.world import heldout_subjects, model_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights", nargs="+")
    args = ap.parse_args()
    torch.set_num_threads(1)
    sd = load_sd(str(model_path()), device="cpu")
    spec = jobs.remember_model(sd)
    images = D.generate(sd, ["a photo of a person"], 16, 25, 3.0, seed=99, quiet=True)
    subject = heldout_subjects(1, num_images=4, offset=0)[0]
    for path in args.weights:
        meta = json.loads(safe_open(path, framework="pt").metadata()["apdm_protected"])
        info = load_protected(path, {"model_fingerprint": sd.fingerprint(), "subject_protected": subject.index,
                                     "protect_photos": meta.get("protect_photos", 4)})
        trapped = jobs.model(spec, info["state"]).vae
        with torch.no_grad():
            target, params = T.moments(sd.vae, images).float(), T.moments(trapped, images).float()
            noise = torch.randn(target[:, : target.shape[1] // 2].shape, generator=torch.Generator().manual_seed(0))
            latent = float(F.mse_loss(params, target))
            decoded = float(T.keep_decoded(sd.vae, params, target, noise))
        print(json.dumps({"weights": path, "keep_latent": round(latent, 5), "keep_decoded": round(decoded, 6),
                          "ratio": round(latent / decoded, 1)}))


if __name__ == "__main__":
    main()
