"""Protocol building blocks shared by ``apdm evaluate`` and the benchmarks: personalize, then sample.

The attacker is always the shared simulator (:mod:`apdm.personalization.simulator`); nothing here knows which
world (Stable Diffusion or the toy world) the model comes from.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from apdm.config import PersonalizationConfig, SampleConfig
from apdm.core import diffusion as D
from apdm.core.models import SD
from apdm.personalization import simulator as S


def personalize_and_sample(sd: SD, instance_images: torch.Tensor, per_cfg: PersonalizationConfig,
                           prompts: list[str], sample: SampleConfig, class_images: torch.Tensor | None = None,
                           quiet: bool = True) -> dict:
    """Personalize ``sd`` on ``instance_images`` with ``per_cfg`` and generate ``sample.num_images_per_prompt``
    images for each prompt (the identifier word is mapped to the method's token, e.g. TI's ``<sks>``).

    Args:
        sd: the (clean or protected) model; not modified.
        instance_images: (N,3,H,W) in [0,1], the attacker's training photos.
        per_cfg: the personalization method and settings.
        prompts: sampling prompts written with the identifier word (``a photo of sks person``).
        sample: sampling settings.
        class_images: prior-preservation images; generated (and cached) from ``sd`` when needed and ``None``, at
            the size of ``instance_images``.
        quiet: no progress bars (class images, training, sampling).

    Returns:
        dict with ``images`` {prompt: (n,3,H,W) [0,1] CPU, H×W that of ``instance_images``}, ``seconds_train``,
        ``seconds_sample``, ``loss_first``, ``loss_last``, ``state`` (the personalization state, for saving).
    """
    h, w = (int(n) for n in instance_images.shape[-2:])
    if class_images is None:  # class_images_for returns None when the config needs none
        class_images = S.class_images_for(sd, per_cfg, quiet=quiet, size=(h, w))
    dev = sd.device
    state = S.setup(sd, per_cfg, class_images.to(dev) if class_images is not None else None)
    t0 = time.perf_counter()
    S.train(state, instance_images.to(dev), quiet=quiet)
    t1 = time.perf_counter()
    images = {}
    for p in prompts:
        images[p] = D.generate(state.sd, [S.prompt_for(state, p)], sample.num_images_per_prompt,
                               sample.num_inference_steps, sample.guidance_scale, sample.negative_prompt,
                               sample.seed, sample.batch_size, sample.sampler, height=h, width=w, quiet=quiet)
    return {"images": images, "seconds_train": t1 - t0, "seconds_sample": time.perf_counter() - t1,
            "loss_first": state.history[0] if state.history else None,
            "loss_last": state.history[-1] if state.history else None, "state": state}


def check_sampler_steps(sd: SD, sample: SampleConfig, key: str = "sample") -> None:
    """Refuse a ``sample.num_inference_steps`` that ``sample.sampler`` cannot run with ``sd``'s noise schedule, before
    any image is drawn: diffusers' ``pndm`` without ``skip_prk_steps`` (a scheduler config that does not set it, as
    ``tiny`` and ``toy``) needs at least 4 steps and otherwise fails deep in its ``set_timesteps`` with "operands
    could not be broadcast together". The scheduler is asked itself (no model call), so a model whose scheduler
    config skips the PRK steps (SD 1.5's) keeps its 1-3 step samplings. ``ddim`` (apdm's own) takes any count.

    Raises:
        ValueError: names ``key``'s ``num_inference_steps`` and ``sampler``, the least (or, for too many, the most)
            count that works and the way out.
    """
    from apdm.core.models import make_scheduler

    n = int(sample.num_inference_steps)
    if sample.sampler == "ddim" or n < 1:  # apdm's own; n < 1 is refused by check_sample
        return
    scheduler = make_scheduler(sd.noise_scheduler, sample.sampler)

    def works(steps: int) -> bool:
        try:
            scheduler.set_timesteps(steps)
        except Exception:  # noqa: BLE001 (whatever the scheduler raises, that count does not work)
            return False
        return True

    if works(n):
        return
    need = next((m for m in range(n + 1, n + 64) if works(m)), None)
    if need is not None:
        why = " (its scheduler config does not set skip_prk_steps)" if sample.sampler == "pndm" else ""
        raise ValueError(f"{key}.num_inference_steps={n}: the {sample.sampler} sampler needs at least {need} steps "
                         f"with this model{why}; use {need}+ or {key}.sampler=ddim")
    # too many: more than the model's training timesteps (ddpm at 1001 of 1000)
    most = next((m for m in range(n - 1, 0, -1) if works(m)), None)
    raise ValueError(f"{key}.num_inference_steps={n}: the {sample.sampler} sampler "
                     + (f"takes at most {most} steps with this model; use {most} or fewer" if most else
                        "cannot run with this model at any step count; use " + f"{key}.sampler=ddim"))


def check_optimizer_extra(optimizer: str, key: str) -> None:
    """Raise :class:`apdm.utils.MissingDependency` now, before the model loads or any image is generated, when the
    optimizer ``optimizer`` (the setting ``key``, e.g. ``personalization.optimizer``) needs a package that is not
    installed (``adamw8bit``: bitsandbytes), with the message the optimizer would give hours later."""
    if optimizer == "adamw8bit":
        from apdm.utils import optional_import

        optional_import("bitsandbytes", "gpu", f"{key}=adamw8bit (8-bit Adam)")


def with_prompts(per_cfg: PersonalizationConfig, instance_prompt: str, class_prompt: str) -> PersonalizationConfig:
    """A copy of ``per_cfg`` for another subject's prompts."""
    return dataclasses.replace(per_cfg, instance_prompt=instance_prompt, class_prompt=class_prompt)
