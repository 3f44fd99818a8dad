"""Is the toy subject detector calibrated for generated images? (docs/toy_world.md, "Instruments v2")

Every generated image passes the model's VAE decoder, so the detector must accept VAE round trips of valid
photos while still rejecting non-subjects. Prints acceptance rates (score >= 0.5) of: 64 held-out photos (16
subjects × 4) as drawn and after a VAE round trip; 400 negatives as drawn and after a round trip (false accepts);
class-prompt samples (the benchmark's 32 of seed 123, then 48 each of seeds 123 and 7; 25 DDIM steps, guidance 3).

    python docs/results/checks/detector_calibration.py                        # the installed instruments
    python docs/results/checks/detector_calibration.py instruments=DIR        # e.g. v1:
    #   mkdir -p /tmp/v1 && git archive 7aacaf1 assets/toy/instruments | tar x -C /tmp/v1
    #   python docs/results/checks/detector_calibration.py instruments=/tmp/v1/assets/toy/instruments
"""

import sys

import torch

from apdm.bench import toy_setup
from apdm.core import diffusion as D
from apdm.toy import draw as DR
from apdm.toy import instruments as I
from apdm.toy.world import heldout_subjects

args = dict(a.split("=", 1) for a in sys.argv[1:])
_, sd, inst = toy_setup([f"{k}={v}" for k, v in args.items() if k != "instruments"], set())
if "instruments" in args:
    inst = I.load_instruments(args["instruments"])


def rate(x: torch.Tensor) -> float:
    return round(float((I.detector_scores(inst.detector, x, "person") >= 0.5).float().mean()), 3)


photos = torch.cat([s.images for s in heldout_subjects(16, num_images=4)])
neg = I._u8_to_tensor(DR.render_negatives(400, seed=999)[0])
gens = [D.generate(sd, ["a photo of a person"], 48, 25, 3.0, seed=s, quiet=True) for s in (123, 7)]
print(f"instruments {inst.config['fingerprint']}:",
      f"held-out photos {rate(photos)}, after VAE round trip {rate(I.vae_round_trip(sd.vae, photos))};",
      f"negatives false-accept {rate(neg)}, after VAE round trip {rate(I.vae_round_trip(sd.vae, neg))};",
      f"class prompt: benchmark's 32 {rate(gens[0][:32])}, seed 123 {rate(gens[0])}, seed 7 {rate(gens[1])},",
      f"all 96 {rate(torch.cat(gens))}")
