"""Helpers shared by several test files (pytest puts tests/ on sys.path)."""

import torch

from apdm.personalization import simulator as S


def fixed_personalization_loss(state, images, seeds=range(4)) -> float:
    """The simulator loss on fixed noise/timesteps (reseeded generator), averaged over a few draws, so values
    before and after training (or protecting) are comparable."""
    vals = []
    for s in seeds:
        state.generator.manual_seed(1000 + s)
        with torch.no_grad():
            vals.append(S.loss(state, images, batch_size=images.shape[0])[0].item())
    return sum(vals) / len(vals)
