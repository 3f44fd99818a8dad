"""How far does the toy DreamBooth attacker's text encoder move "a photo of WORD person"? On the base model and on
given protected weights (docs/protect_model.md, "Another identifier").

    python docs/results/checks/protect_model_cond_shift.py --weights W.safetensors --identifiers sks,zwx,skss \
        [--subject 0] --out F.json

For each word and model: runs the full 300-step attack on the subject's photos (no sampling) and reports
``cond_shift`` = ‖c_after − c_base‖ / ‖c_base‖ of the prompt's conditioning and ``emb_shift``, the same for
the word's token embedding(s). W comes from ``protect_model_identifiers.py --save``. ~100 s per attack on one core.
"""

import argparse
import json

import torch

from apdm.bench import attack_config, jobs, toy_setup
from apdm.bench.toy_world import toy_recipe
from apdm.core import diffusion as D
from apdm.personalization import simulator as S
from apdm.toy.world import heldout_subjects
from apdm.utils import atomic_write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True, help="protected weights (safetensors, jobs.unet_state keys)")
    ap.add_argument("--identifiers", default="sks,zwx,skss")
    ap.add_argument("--subject", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    from safetensors.torch import load_file

    _, sd, _ = toy_setup([], set())
    subj = heldout_subjects(1, num_images=4, offset=args.subject)[0]
    attack = toy_recipe("dreambooth")
    emb0 = sd.text_encoder.get_input_embeddings().weight.detach().clone()

    def cond(text_encoder, prompt):
        with torch.no_grad():
            return D.encode_prompt(text_encoder, sd.tokenizer, [prompt]).float()

    res: dict = {"weights": args.weights, "subject_protected": subj.index}
    for name, state in (("base", None), ("protected", load_file(args.weights))):
        model = jobs.model(jobs.spec(sd), state)
        res[name] = {}
        for word in args.identifiers.split(","):
            cfg = attack_config(attack.personalization, subj, word)
            c0 = cond(sd.text_encoder, cfg.instance_prompt)
            st = S.setup(model, cfg, S.class_images_for(model, cfg, quiet=True))
            S.train(st, subj.images)
            ids = sd.tokenizer(word, add_special_tokens=False).input_ids
            e1 = st.sd.text_encoder.get_input_embeddings().weight.detach()[ids]
            res[name][word] = {
                "cond_shift": round(float((cond(st.sd.text_encoder, cfg.instance_prompt) - c0).norm() / c0.norm()), 4),
                "emb_shift": round(float((e1 - emb0[ids]).norm() / emb0[ids].norm()), 4),
                "loss_last": round(st.history[-1], 4)}
            print(name, word, res[name][word], flush=True)
    atomic_write_json(args.out, res)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
