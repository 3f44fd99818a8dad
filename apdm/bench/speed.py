"""``apdm bench speed``: seconds and peak GPU memory of every engine's unit of work, on any model.

What is timed (each after one warm-up call, median of ``repeats`` timed calls, CUDA synchronized):

* ``personalize``: one optimizer step of DreamBooth, LoRA and Textual Inversion (the shared simulator);
* ``protect-model``: one L2P outer step (``inner_steps`` simulated DreamBooth steps, each followed by the DPO +
  L_ppl protection gradient; the paper's SD setting is 20) and the projected hours of ``outer_steps`` such steps
  (the paper: 800 × 20);
* ``protect-images``: LDU per image (inversion + ρ + k-step denoise at model resolution, a fresh ρ: the cost does
  not depend on ρ's weights), one ρ training step, one ASPL outer iteration (3 surrogate + 6 PGD + 3 DreamBooth
  steps on the ``images`` photos), one PGD step of AdvDM, PhotoGuard, SDS, Mist and PID, one CAAT joint step
  (the difference of a 1 + ``repeats`` and a 1-step run, each the median of ``repeats`` timed runs; the projection
  adds the 1-step run's surrogate setup); each with its projected seconds per image at the method's default step
  count. A per-step time got by such a difference (ρ training, CAAT, MetaCloak's pool and iterations, Noisy
  Upscaling) is None, with a ``note_<key>`` and a warning, where the longer run was not slower (the step is lost in
  the timing noise); the projections that need it are then None too (until 2026-12-07 the difference was clipped
  to 0.0 and a projection counted those steps as free);
* ``encoder-trap``: one step of the encoder trap (apdm's addition, ``encoder_trap.*``: ``trap_images`` photos and
  pictures of the subject plus ``preserve_batch`` (8) kept images through the VAE encoder, forward and backward, and
  the AdamW step), with ``micro_batch`` images per encoder call, and the projected hours of ``trap_steps`` steps
  (the toy recipes' 1,500). ``gradient_checkpointing`` applies here too;
* ``purifiers``: the attacker's model purifiers on the ``images`` photos: one IMPRESS step (VAE encode + decode,
  forward and backward, one Adam step), one GrIDPure round (10 patch regenerations per photo) and one DiffPure call;
  each with its projected seconds per image at the attack's default (IMPRESS 3000 steps, GrIDPure 20 rounds). With
  ``upscaler=PATH|toy|tiny`` also Noisy Upscaling (its ×4 upscaler is a separate model, so only when named): a
  one-step and a two-step call, split into the call's fixed cost (prompt, ×4 VAE decode) and one sampling step,
  and the projection at the pipeline's 75 steps.

With ``model=random:sd15`` (or ``random:sd21base``) the model is the real architecture with random weights
(:func:`apdm.core.models.random_sd`): its numbers are real-size costs, measurable where no weights can be
downloaded. Efficacy is not measured here (see the toy-world benchmarks).

Options: ``model=PATH|tiny|toy|random:sd15`` ``device=auto|cpu|cuda`` ``dtype=auto|fp32|bf16|fp16``
``parts=personalize,protect-model,protect-images,encoder-trap,purifiers`` ``repeats=N`` ``batch_size=N`` ``images=N``
``inner_steps=N`` ``outer_steps=N`` ``mixed_precision=no|bf16`` (of the protection; fp16 is refused, as
protect-model refuses it) ``gradient_checkpointing=true|false``
``trainable=all|lora|NAMES`` (what θ trains, as ``protect.trainable``) ``trap_images=N`` (default: ``images``)
``trap_steps=N`` ``micro_batch=N`` ``keep_space=latent|decoded`` ``preserve_batch=N`` (as ``encoder_trap.*``)
``upscaler=PATH|toy|tiny`` (Noisy Upscaling's upscaler, timed with ``purifiers``).
``peak_rss_mb`` is the process's peak resident memory (the cost on a CPU).
"""

from __future__ import annotations

import inspect
import statistics
import time
from typing import Callable

from apdm.bench import option_bool, option_int

PARTS = ("personalize", "protect-model", "protect-images", "encoder-trap", "purifiers")
#: the whole-number options and the smallest value each takes (all checked before the model loads)
INT_OPTIONS = {"repeats": 1, "batch_size": 1, "images": 1, "inner_steps": 1, "outer_steps": 1, "trap_images": 1,
               "trap_steps": 1, "micro_batch": 0, "preserve_batch": 0}


def _int(opts: dict, key: str, default: int) -> int:
    """A whole-number option of :data:`INT_OPTIONS`, at least its minimum there."""
    return option_int(opts, key, default, INT_OPTIONS[key])


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device, repeats: int) -> tuple[float, float | None]:
    """(median seconds of ``repeats`` calls of ``fn`` after one warm-up call, peak GPU MiB or None on CPU)."""
    import torch

    fn()  # warm-up: allocations, lazy init, kernel selection
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    peak = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None
    return statistics.median(times), peak


def _record(result: dict, key: str, seconds: float | None, peak: float | None, one: float | None = None) -> None:
    """``seconds_<key>`` (None when unmeasured: then ``note_<key>`` says why, ``one`` being the one-step run's
    seconds) and ``peak_gpu_mb_<key>``."""
    if seconds is None:
        _unmeasured(result, key, one)
    result[f"seconds_{key}"] = None if seconds is None else round(seconds, 4)
    if peak is not None:
        result[f"peak_gpu_mb_{key}"] = peak


def personalize_step_times(sd, images, class_images, batch_size: int, repeats: int) -> dict:
    """``{seconds_per_step_M, peak_gpu_mb_M}`` for M in dreambooth, lora, ti (one simulator step each)."""
    from apdm.config import PersonalizationConfig
    from apdm.personalization import simulator as S

    out: dict = {}
    for method, lr in {"dreambooth": 5e-6, "lora": 1e-4, "ti": 5e-4}.items():
        cfg = PersonalizationConfig(method=method, learning_rate=lr, batch_size=batch_size)
        state = S.setup(sd, cfg, class_images)
        seconds, peak = timed(lambda: S.step(state, images), sd.device, repeats)
        _record(out, f"per_step_{method}", seconds, peak)
        del state
    return out


def _checkpointing(opts: dict) -> bool:
    """The ``gradient_checkpointing=true|false`` option (both parts that train read it)."""
    return option_bool(opts, "gradient_checkpointing", False, "recompute activations in the backward pass")


def _protect_model(sd, images, class_images, opts: dict, repeats: int) -> dict:
    from apdm.config import PersonalizationConfig, ProtectConfig
    from apdm.protect_model import l2p

    inner = _int(opts, "inner_steps", 20)
    outer = _int(opts, "outer_steps", 800)
    pcfg = ProtectConfig(inner_steps=inner, checkpoint_every=0, trainable=opts.get("trainable", "all"),
                         mixed_precision=opts.get("mixed_precision", "no"),
                         gradient_checkpointing=_checkpointing(opts))
    per = PersonalizationConfig(method="dreambooth", learning_rate=5e-6, batch_size=1)
    n = images.shape[0]
    subject = l2p.Subject("speed", images, class_images[:n], class_images, "a photo of sks person",
                          "a photo of a person")
    theta, trainable, phi, optimizer, _ = l2p.init_protection(sd, pcfg)
    theta.train()
    step = iter(range(10**6))
    seconds, peak = timed(lambda: l2p.outer_step(next(step), theta, trainable, phi, sd, [subject], per, pcfg,
                                                 optimizer, 0), sd.device, repeats)
    out = {"protect_inner_steps": inner, "protect_outer_steps": outer,
           "protect_mixed_precision": pcfg.mixed_precision,
           "protect_gradient_checkpointing": pcfg.gradient_checkpointing, "protect_trainable": pcfg.trainable}
    _record(out, "per_outer_step", seconds, peak)
    out["hours_protect_model_projected"] = round(seconds * outer / 3600, 3)
    return out


def _default_steps(method, param: str = "steps") -> int:
    """The method's own default step count (its signature's ``steps=``, or another parameter's)."""
    return int(inspect.signature(method).parameters[param].default)


def _step_by_difference(run, device, repeats: int) -> tuple[float, float | None, float | None]:
    """For ``run(steps)`` = a fixed setup + ``steps`` steps: ``(seconds of run(1), seconds per step, peak memory)``,
    the step from the difference of ``run(1 + repeats)`` and ``run(1)``, each the median of ``repeats`` timed runs
    after a warm-up. The step is None where ``run(1 + repeats)`` was not slower than ``run(1)`` (before 2026-12-07
    each side was timed once and such a difference became 0.0 s, so a projection counted every step as free)."""
    one, _ = timed(lambda: run(1), device, repeats)
    more, peak = timed(lambda: run(1 + repeats), device, repeats)
    return one, _difference(more - one, repeats), peak


def _difference(seconds: float, steps: int) -> float | None:
    """Seconds per step from the extra time of ``steps`` more steps; None when that time is not positive."""
    return seconds / steps if seconds > 0 else None


def _unmeasured(out: dict, key: str, seconds_one: float | None) -> None:
    """Record that ``seconds_<key>`` could not be measured by difference: a ``note_<key>`` and a warning."""
    from apdm.utils import LOG

    one = "" if seconds_one is None else f" ({seconds_one:.4f} s)"
    note = (f"seconds_{key} unavailable: the run with more steps was not slower than the one-step run{one}; the "
            f"step is within the timing noise here. Projections that need it are None; more repeats= may measure it")
    LOG.warning(note)
    out[f"note_{key}"] = note


def _projected(parts: list[float | None], per: float, digits: int = 3) -> float | None:
    """``round(sum(parts) / per, digits)``, or None when a part is unavailable (a step not measured)."""
    if any(p is None for p in parts):
        return None
    return round(sum(parts) / per, digits)


def _protect_images(sd, images, class_images, opts: dict, repeats: int) -> dict:
    from apdm.protect_images import ldu
    from apdm.protect_images.baselines import METHODS, protect_aspl

    n = images.shape[0]
    budget = 8 / 255
    out: dict = {"images": n}
    rho = ldu.build_rho(sd.unet.config.in_channels).to(sd.device)
    seconds, peak = timed(lambda: ldu.apply(sd, rho, images, budget, batch_size=n, quiet=True), sd.device, repeats)
    _record(out, "per_image_ldu", seconds / n, peak)

    anchors = ldu.train_anchors(sd, [images], ldu.default_personalization(), steps=1, quiet=True)

    def train(steps):
        ldu.train_perturber(sd, [images], budget=budget, steps=steps, batch_size=n, anchors=anchors, quiet=True)

    # ρ training = preparation (inversion of the photos) + steps
    one, per_step, peak = _step_by_difference(train, sd.device, repeats)
    _record(out, "per_step_ldu_train", per_step, peak, one)

    seconds, peak = timed(lambda: protect_aspl(sd, images, budget=budget, steps=1, class_images=class_images,
                                               quiet=True), sd.device, repeats)
    _record(out, "per_iteration_aspl", seconds, peak)
    out["seconds_per_image_aspl_projected"] = round(seconds * _default_steps(protect_aspl) / n, 3)
    for name in ("advdm", "photoguard", "sds", "mist", "pid"):
        fn = METHODS[name]
        seconds, peak = timed(lambda: fn(sd, images, budget=budget, steps=1, quiet=True), sd.device, repeats)
        _record(out, f"per_step_{name}", seconds, peak)
        out[f"seconds_per_image_{name}_projected"] = round(seconds * _default_steps(fn) / n, 3)

    # CAAT = its surrogate's setup (a copy of the UNet) + joint steps
    def caat(steps):
        return METHODS["caat"](sd, images, budget=budget, steps=steps, quiet=True)

    one, per_step, peak = _step_by_difference(caat, sd.device, repeats)
    _record(out, "per_step_caat", per_step, peak, one)
    out["seconds_per_image_caat_projected"] = _projected(
        [one, None if per_step is None else per_step * (_default_steps(METHODS["caat"]) - 1)], n)

    # SimAC = its timestep selection (rounds per photo) + ASPL iterations on its objective
    from apdm.protect_images.baselines import protect_simac, simac_timesteps

    seconds, peak = timed(lambda: simac_timesteps(sd, images[:1], "a photo of sks person", budget=budget, steps=1),
                          sd.device, repeats)
    _record(out, "per_round_simac_selection", seconds, peak)
    sets = simac_timesteps(sd, images, "a photo of sks person", budget=budget, steps=1)
    iteration, peak = timed(lambda: protect_simac(sd, images, budget=budget, steps=1, class_images=class_images,
                                                  timesteps=sets, quiet=True), sd.device, repeats)
    _record(out, "per_iteration_simac", iteration, peak)
    out["seconds_per_image_simac_projected"] = round(
        seconds * _default_steps(protect_simac, "select_steps") + iteration * _default_steps(protect_simac) / n, 3)

    # MetaCloak = its pool (the surrogate's setup + H DreamBooth steps on the clean photos) + iterations
    from apdm.personalization import simulator as S
    from apdm.protect_images.baselines import antidreambooth_personalization, metacloak_pool

    def pool(steps):
        state = S.setup(sd, antidreambooth_personalization(class_images is not None, steps), class_images)
        return metacloak_pool(state, images, 2)

    setup_and_step, db_step, peak = _step_by_difference(pool, sd.device, repeats)
    _record(out, "per_step_metacloak_pool", db_step, peak, setup_and_step)

    def metacloak(steps):  # a pool of the pretrained weights only: no pool training timed here
        return METHODS["metacloak"](sd, images, budget=budget, steps=steps, pool_size=1, class_images=class_images,
                                    quiet=True)

    one, per_iteration, peak = _step_by_difference(metacloak, sd.device, repeats)
    _record(out, "per_iteration_metacloak", per_iteration, peak, one)
    horizon = antidreambooth_personalization().steps
    out["seconds_per_image_metacloak_projected"] = _projected(
        [setup_and_step, None if db_step is None else db_step * (horizon - 1),
         None if per_iteration is None else per_iteration * _default_steps(METHODS["metacloak"])], n)
    return out


def _encoder_trap(sd, class_images, opts: dict, repeats: int) -> dict:
    import torch

    from apdm.config import EncoderTrapConfig
    from apdm.protect_model import encoder_trap as T

    res = sd.resolution
    n = _int(opts, "trap_images", _int(opts, "images", 4))
    g = torch.Generator().manual_seed(1)
    photos = torch.rand(n, 3, res, res, generator=g).to(sd.device)
    paired = class_images[torch.arange(n) % class_images.shape[0]]  # each photo's decoy
    cfg = EncoderTrapConfig(steps=_int(opts, "trap_steps", 1500),
                            micro_batch=_int(opts, "micro_batch", 0),
                            keep_space=opts.get("keep_space", "latent"),
                            preserve_batch=_int(opts, "preserve_batch", 8),
                            gradient_checkpointing=_checkpointing(opts))
    T.check_trap_config(cfg)
    trapped, _, optimizer = T.trainable_copy(sd.vae, cfg)
    trapped.train()
    step = iter(range(10**6))
    seconds, peak = timed(lambda: T.train_step(trapped, sd.vae, optimizer, photos, paired, class_images, cfg,
                                               torch.Generator().manual_seed(next(step))), sd.device, repeats)
    out = {"trap_images": n, "trap_preserve_batch": cfg.preserve_batch, "trap_micro_batch": cfg.micro_batch,
           "trap_keep_space": cfg.keep_space, "trap_gradient_checkpointing": cfg.gradient_checkpointing,
           "trap_steps": cfg.steps}
    _record(out, "per_step_encoder_trap", seconds, peak)
    out["hours_encoder_trap_projected"] = round(seconds * cfg.steps / 3600, 3)
    return out


def _purifiers(sd, images, repeats: int, upscaler: str = "") -> dict:
    from apdm.attacks.diffpure import diffpure
    from apdm.attacks.gridpure import gridpure
    from apdm.attacks.impress import impress
    from apdm.attacks.noisy_upscale import noisy_upscale

    n = images.shape[0]
    out: dict = {}
    for name, fn, unit, default in (
            ("impress", lambda: impress(images, sd, steps=1, batch_size=n), "per_step_impress",
             _default_steps(impress)),
            ("gridpure", lambda: gridpure(images, sd, rounds=1), "per_round_gridpure",
             _default_steps(gridpure, "rounds")),
            ("diffpure", lambda: diffpure(images, sd), "per_call_diffpure", 1)):
        seconds, peak = timed(fn, sd.device, repeats)
        _record(out, unit, seconds, peak)
        out[f"seconds_per_image_{name}_projected"] = round(seconds * default / n, 3)
    if upscaler:  # a call = prompt encoding + steps x UNet + one x4 VAE decode: time 1 and 2 steps, split the two
        out["upscaler"] = upscaler
        one, peak = timed(lambda: noisy_upscale(images, sd, upscaler=upscaler, num_inference_steps=1, batch_size=n),
                          sd.device, repeats)
        two, _ = timed(lambda: noisy_upscale(images, sd, upscaler=upscaler, num_inference_steps=2, batch_size=n),
                       sd.device, repeats)
        step = _difference(two - one, 1)
        _record(out, "per_call_noisy_upscale_1step", one, peak)
        _record(out, "per_step_noisy_upscale", step, None, one)
        steps = _default_steps(noisy_upscale, "num_inference_steps")
        out["seconds_per_image_noisy_upscale_projected"] = _projected(
            [None if step is None else one - step + steps * step], n)
    return out


def bench_speed(quick: bool, overrides: list[str]) -> dict:
    """See the module docstring."""
    import torch

    from apdm.bench import parse_options
    from apdm.core.models import load_sd
    from apdm.utils import peak_rss_mb

    opts = parse_options(overrides, {"model", "device", "dtype", "parts", "repeats", "batch_size", "images",
                                     "inner_steps", "outer_steps", "mixed_precision", "gradient_checkpointing",
                                     "trainable", "trap_images", "trap_steps", "micro_batch", "keep_space",
                                     "preserve_batch", "upscaler"})
    _checkpointing(opts)  # bad values are refused before any timing
    if opts.get("mixed_precision", "no") not in ("no", "bf16"):
        raise ValueError(f"mixed_precision must be no or bf16 (protect-model refuses fp16: no loss scaling), got "
                         f"'{opts['mixed_precision']}'")
    for key in INT_OPTIONS:
        _int(opts, key, 0)  # only checks: the parts read them where they are used
    parts = opts.get("parts", ",".join(PARTS)).split(",")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown} (choose from {', '.join(PARTS)})")
    if quick:
        opts.setdefault("inner_steps", "2")
    repeats = _int(opts, "repeats", 2 if quick else 5)
    t0 = time.perf_counter()
    sd = load_sd(opts.get("model", "tiny"), opts.get("device", "auto"), opts.get("dtype", "auto"))
    seconds_load = time.perf_counter() - t0
    res = sd.resolution
    g = torch.Generator().manual_seed(0)
    images = torch.rand(_int(opts, "images", 4), 3, res, res, generator=g).to(sd.device)
    class_images = torch.rand(8, 3, res, res, generator=g).to(sd.device)
    result = {"model": sd.source, "device": str(sd.device), "dtype": str(sd.dtype).replace("torch.", ""),
              "resolution": res, "repeats": repeats, "seconds_load": round(seconds_load, 2)}  # torch, its threads
    # and the CPU are in the result's provenance; the GPU that ran is named here (provenance names the first)
    if sd.device.type == "cuda":
        result["gpu"] = torch.cuda.get_device_name(sd.device)
    bs = _int(opts, "batch_size", 1)
    if "personalize" in parts:
        result.update(personalize_step_times(sd, images, class_images, bs, repeats))
    if "protect-model" in parts:
        result.update(_protect_model(sd, images, class_images, opts, repeats))
    if "protect-images" in parts:
        result.update(_protect_images(sd, images, class_images, opts, repeats))
    if "encoder-trap" in parts:
        result.update(_encoder_trap(sd, class_images, opts, repeats))
    if "purifiers" in parts:
        result.update(_purifiers(sd, images, repeats, opts.get("upscaler", "")))
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result
