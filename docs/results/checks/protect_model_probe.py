"""Attack given UNet weights on a held-out subject under several identifiers (docs/protect_model.md, "Another
identifier"): what does the toy DreamBooth attacker reach on weights saved by ``protect_model_identifiers.py --save``,
or on the base UNet plus random sign noise of size S per weight (``--weights random:S``, a control)?

    python docs/results/checks/protect_model_probe.py --weights F.safetensors --identifiers sks,zwx \
        [--attack train_text_encoder=false ...] [--subject 0] [--base] --out F.json

Scores the bench's 8 samples of "a photo of WORD person" (``ism@toy-id``); ``--base`` also attacks the base model.
~90 s per attack on one core.
"""

import argparse
import json

import torch

from apdm.bench import jobs, toy_setup
from apdm.bench.protect_model import attack_config
from apdm.bench.toy_world import toy_recipe
from apdm.toy.world import heldout_subjects
from apdm.utils import atomic_write_json


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True, help="a safetensors file of jobs.unet_state keys, or random:S")
    ap.add_argument("--identifiers", default="sks,zwx")
    ap.add_argument("--attack", nargs="*", default=[], metavar="KEY=VALUE", help="the bench's attack.KEY=VALUE")
    ap.add_argument("--subject", type=int, default=0, help="position in the held-out list")
    ap.add_argument("--base", action="store_true", help="also attack the unperturbed base model")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    _, sd, _ = toy_setup([], set())
    subj = heldout_subjects(1, num_images=4, offset=args.subject)[0]
    attack = toy_recipe("dreambooth", [f"personalization.{o}" for o in args.attack])
    sample = attack.sample
    sample.num_images_per_prompt = 8  # the quick bench's
    if args.weights.startswith("random:"):
        size = float(args.weights.split(":", 1)[1])
        g = torch.Generator().manual_seed(0)
        state = {k: v + size * torch.sign(torch.randn(v.shape, generator=g)) if v.is_floating_point() else v
                 for k, v in jobs.unet_state(sd.unet).items()}
    else:
        from safetensors.torch import load_file

        state = load_file(args.weights)
    models = {"probed": state} | ({"base": None} if args.base else {})
    res: dict = {"weights": args.weights, "subject_protected": subj.index, "attack_overrides": args.attack,
                 "metric_impl": {"ism": "ism@toy-id", "fdfr": "fdfr@toy-det"}}
    for name, st in models.items():
        res[name] = {}
        for word in args.identifiers.split(","):
            cfg = attack_config(attack.personalization, subj, word)
            out = jobs.attack(jobs.spec(sd), st, subj.images, subj.references, cfg, cfg.instance_prompt, sample)
            res[name][word] = round(out["ism"], 4)
            print(name, word, res[name][word], flush=True)
    atomic_write_json(args.out, res)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
