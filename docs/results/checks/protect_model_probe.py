"""Attack given UNet weights on a held-out subject under several identifiers (docs/protect_model.md, "Another
identifier"): what does the toy DreamBooth attacker reach on weights saved by ``protect_model_identifiers.py --save``,
or on the base UNet plus random sign noise of size S per weight (``--weights random:S``, a control)?

    python docs/results/checks/protect_model_probe.py --weights F.safetensors --identifiers sks,zwx \
        [--attack train_text_encoder=false ...] [--subject 0] [--base] [--seeds 0,1,2,3] --out F.json

Scores the bench's 8 samples of "a photo of WORD person" (``ism@toy-id``); ``--base`` also attacks the base model.
``--seeds`` repeats every attack with those attacker seeds (``personalization.seed``: its noise, timesteps and prior
images); the sampling seed stays the bench's, so the runs differ by the training alone (docs/protect_model.md, "One
attack is one draw"). With one seed the JSON holds each ISM as a number, with several as
``{"mean", "runs", "seeds"}``. ~90 s per attack on one core.
"""

import argparse
import dataclasses
import json

import torch

from apdm.bench import attack_config, jobs, toy_setup
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
    ap.add_argument("--seeds", default=None, help="comma-separated attacker seeds (default: the recipe's)")
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
    seeds = [int(v) for v in args.seeds.split(",")] if args.seeds else [attack.personalization.seed]
    res: dict = {"weights": args.weights, "subject_protected": subj.index, "attack_overrides": args.attack,
                 "attack_seeds": seeds, "metric_impl": {"ism": "ism@toy-id", "fdfr": "fdfr@toy-det"}}
    for name, st in models.items():
        res[name] = {}
        for word in args.identifiers.split(","):
            runs = []
            for seed in seeds:
                cfg = dataclasses.replace(attack_config(attack.personalization, subj, word), seed=seed)
                out = jobs.attack(jobs.spec(sd), st, subj.images, subj.references, cfg, cfg.instance_prompt, sample)
                runs.append(round(out["ism"], 4))
                print(name, word, f"seed {seed}", runs[-1], flush=True)
            res[name][word] = runs[0] if len(runs) == 1 else {"mean": round(sum(runs) / len(runs), 4),
                                                               "runs": runs, "seeds": seeds}
    atomic_write_json(args.out, res)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
