"""How noisy is the class-prompt KID of apdm bench protect-model? (docs/protect_model.md, "KID noise").

KID (kid@toy-features) of the *unprotected* toy model's "a photo of a person" samples against freshly drawn
persons, for several sampling seeds and two sample sizes, plus drawn-vs-drawn as the floor.

    python docs/results/checks/kid_noise.py [n=32] [seeds=321,322,323,324]
"""

import statistics, sys
from apdm.bench import toy_setup
from apdm.bench.protect_model import drawn_persons
from apdm.core import diffusion as D
from apdm.evaluation.distribution import kid
from apdm.toy import draw

args = dict(a.split("=", 1) for a in sys.argv[1:])
n = int(args.get("n", 32))
seeds = [int(s) for s in args.get("seeds", "321,322,323,324").split(",")]
opts, sd, inst = toy_setup([], set())
held = draw.split()["heldout"]
real = drawn_persons(n)   # the bench's real set
real2 = draw.to_tensor(draw.render_dataset("person", held[200:200 + n], 1, seed=78)[0])
print("drawn vs drawn", round(float(kid(real, real2, inst.features, subsets=50)[0]), 4))
vals = []
for s in seeds:
    gen = D.generate(sd, ["a photo of a person"], n, 25, 3.0, seed=s, quiet=True)
    vals.append(float(kid(real, gen, inst.features, subsets=50)[0]))
    print("seed", s, "kid", round(vals[-1], 4))
print(f"n={n}: mean {statistics.mean(vals):.4f}, sd {statistics.stdev(vals):.4f}, "
      f"sd/mean {statistics.stdev(vals) / statistics.mean(vals):.3f}")
