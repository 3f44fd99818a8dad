"""``apdm bench personalize-steps``: seconds per optimizer step of each personalization method."""

from __future__ import annotations


def bench_personalize_steps(quick: bool, overrides: list[str]) -> dict:
    """Median seconds/step of DreamBooth, LoRA and TI on ``model.path`` (default: the tiny pipeline); the
    ``personalize`` part of ``apdm bench speed`` with this benchmark's own defaults.

    Overrides: ``model=PATH``, ``resolution=N``, ``steps=N``, ``batch_size=N``, ``device=cpu|cuda``,
    ``dtype=auto|fp32|bf16|fp16``. The JSON records the ``dtype`` the model ran in and ``steps``, the number of timed
    steps each median is over (after one warm-up step).
    """
    import torch

    from apdm.bench import option_int, parse_options
    from apdm.bench.speed import personalize_step_times
    from apdm.core.models import load_sd

    opts = parse_options(overrides, {"model", "resolution", "steps", "batch_size", "device", "dtype"})
    sd = load_sd(opts.get("model", "tiny"), opts.get("device", "auto"), opts.get("dtype", "auto"))
    steps = option_int(opts, "steps", 5 if quick else 20)
    bs = option_int(opts, "batch_size", 1)
    res = option_int(opts, "resolution", sd.resolution, 8)
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, res, res, generator=g).to(sd.device)
    class_images = torch.rand(8, 3, res, res, generator=g).to(sd.device)
    result = {"model": sd.source, "device": str(sd.device), "dtype": str(sd.dtype).replace("torch.", ""),
              "resolution": res, "batch_size": bs, "steps": steps}  # the machine, torch and its threads are in
    # every result's provenance
    result.update(personalize_step_times(sd, images, class_images, bs, steps))
    return result
