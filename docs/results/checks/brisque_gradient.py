"""brisque@apdm against the pip brisque package (apdm/evaluation/iqa.py's module docstring): close on noise
images, further apart on a smooth colour ramp, where MSCN values of ~1e-16 fall on either side of the AGGD fit's
left/right split in the two float orders.

    python docs/results/checks/brisque_gradient.py
"""

import torch

from apdm.evaluation import iqa

h, w = 128, 96
yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
ramp = torch.stack([xx, yy, (xx + yy) / 2]).unsqueeze(0)  # a smooth colour gradient
noisy = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))  # textured
for name, x in (("colour ramp 128x96", ramp), ("3 noise images 64x64", noisy)):
    a, p = iqa.brisque(x).double(), iqa.brisque_pip(x).double()
    print(f"{name}: brisque@apdm {a.tolist()}, brisque@pip-brisque {p.tolist()}, "
          f"largest difference {float((a - p).abs().max()):.2e}")
