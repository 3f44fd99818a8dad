"""``apdm bench personalize-steps``: seconds per optimizer step of each personalization method."""

from __future__ import annotations

import platform
import statistics
import time


def bench_personalize_steps(quick: bool, overrides: list[str]) -> dict:
    """Median seconds/step of DreamBooth, LoRA and TI on ``model.path`` (default: the tiny pipeline).

    Overrides: ``model=PATH``, ``resolution=N``, ``steps=N``, ``batch_size=N``, ``device=cpu|cuda``.
    """
    import torch

    from apdm.config import PersonalizationConfig
    from apdm.core.models import load_sd
    from apdm.personalization import simulator as S

    from apdm.bench import parse_options

    opts = parse_options(overrides, {"model", "resolution", "steps", "batch_size", "device", "dtype"})
    sd = load_sd(opts.get("model", "tiny"), opts.get("device", "auto"), opts.get("dtype", "auto"))
    steps = int(opts.get("steps", 5 if quick else 20))
    bs = int(opts.get("batch_size", 1))
    res = int(opts.get("resolution", sd.resolution))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, res, res, generator=g).to(sd.device)
    class_images = torch.rand(8, 3, res, res, generator=g).to(sd.device)
    result = {"model": sd.source, "device": str(sd.device), "resolution": res, "batch_size": bs,
              "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}
    lrs = {"dreambooth": 5e-6, "lora": 1e-4, "ti": 5e-4}
    for method, lr in lrs.items():
        cfg = PersonalizationConfig(method=method, learning_rate=lr, batch_size=bs, steps=steps)
        state = S.setup(sd, cfg, class_images)
        S.step(state, images)  # warm-up (allocations, lazy init)
        times = []
        for _ in range(steps):
            t = time.perf_counter()
            S.step(state, images)
            if sd.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t)
        result[f"seconds_per_step_{method}"] = round(statistics.median(times), 4)
        if sd.device.type == "cuda":
            result[f"peak_gpu_mb_{method}"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            torch.cuda.reset_peak_memory_stats()
        del state
    return result
