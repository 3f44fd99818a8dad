"""Does diffusers' Custom Diffusion loader change the model? (docs/evaluate.md: why apdm saves Custom Diffusion
weights under the UNet's own parameter names.)

Builds a Custom Diffusion state dict for the tiny model in diffusers' format
(``<processor>.to_k_custom_diffusion.weight`` and ``...to_v...`` for each cross-attention, an empty tensor for every
other processor), loads it with
``unet.load_attn_procs`` as documented, then with the private ``_pipeline=`` argument, and prints the processor
classes after each.

    python docs/results/checks/custom_diffusion_attn_procs.py
"""

import diffusers
import torch

from apdm.core.models import load_sd

sd = load_sd("tiny", "cpu")
unet = sd.unet
state = {}
for name in unet.attn_processors:
    attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
    if "attn2" in name:
        state[f"{name}.to_k_custom_diffusion.weight"] = torch.randn_like(attn.to_k.weight)
        state[f"{name}.to_v_custom_diffusion.weight"] = torch.randn_like(attn.to_v.weight)
    else:
        state[name] = torch.empty(0)
unet.load_attn_procs(state)
print(f"diffusers {diffusers.__version__}, unet.load_attn_procs(state):",
      sorted({type(p).__name__ for p in unet.attn_processors.values()}))
pipe = sd.pipeline()
pipe.unet.load_attn_procs(state, _pipeline=pipe)
print("unet.load_attn_procs(state, _pipeline=pipe):",
      sorted({type(p).__name__ for p in pipe.unet.attn_processors.values()}))
