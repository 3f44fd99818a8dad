"""Independent benchmark jobs (a protection, an attack, a KID measurement) run side by side in worker processes.

A toy-world benchmark is a few dozen independent jobs of 1–5 minutes each (one DreamBooth attack is 300 small
optimizer steps). On a 2-core CPU one process with 2 torch threads runs such small steps only ~1.26× faster than
one thread; two single-threaded worker processes get ~1.3× the work done (docs/design.md, "Benchmarks").
``workers=1`` runs every job in the calling process, in submission order; the numbers are the same either way,
because every job draws its random numbers from its own seeded generators (nothing depends on which job ran
before, or where).

Job functions are module-level (picklable) and take plain values: a model *spec* ``(path, device)``, optionally a
UNet state dict (a protected model), tensors and config dataclasses. Each process loads a model and the toy
instruments once and keeps them (:func:`model`, :func:`instruments`).
"""

from __future__ import annotations

import concurrent.futures as cf
import copy
import dataclasses
import os

_CACHE: dict = {}


def default_workers(device: str = "auto") -> int:
    """2 worker processes on a CPU with ≥ 2 cores, else 1 (a GPU runs one job at a time best)."""
    from apdm.utils import select_device

    if select_device(device).type != "cpu":
        return 1
    return 2 if (os.cpu_count() or 1) >= 2 else 1


def _init_worker(threads: int, show_progress: bool, env: dict) -> None:
    import torch

    from apdm.utils import set_progress, setup_logging

    os.environ.update(env)
    torch.set_num_threads(threads)
    set_progress(show_progress)
    setup_logging()


class _Inline(cf.Executor):
    """``workers=1``: run each job at submission, in this process."""

    def submit(self, fn, /, *args, **kwargs):
        fut: cf.Future = cf.Future()
        try:
            fut.set_result(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - handed to the caller through the future, as a pool would
            fut.set_exception(e)
        return fut


class _Pool(cf.ProcessPoolExecutor):
    """A process pool that, when its ``with`` block fails, cancels the jobs not yet started instead of running
    them all before the error can surface."""

    def __exit__(self, exc_type, exc, tb):
        self.shutdown(wait=True, cancel_futures=exc_type is not None)
        return False


def executor(workers: int) -> cf.Executor:
    """A process pool of ``workers`` (spawned, torch threads split between them), or an inline executor for 1."""
    if workers <= 1:
        return _Inline()
    import multiprocessing

    import torch

    from apdm.utils import progress_enabled

    threads = max(1, torch.get_num_threads() // workers)
    env = {k: v for k, v in os.environ.items() if k.startswith("APDM_")}
    return _Pool(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                 initargs=(threads, progress_enabled(), env))


def cached(key, make):
    """``make()``, computed once per process and kept under ``key``."""
    if key not in _CACHE:
        _CACHE[key] = make()
    return _CACHE[key]


def spec(sd) -> tuple[str, str]:
    """How a job names a loaded model: ``(path, device)``."""
    return sd.source, str(sd.device)


def remember_model(sd) -> tuple[str, str]:
    """Register an already loaded model under its :func:`spec` (this process then does not load it again)."""
    _CACHE[("model", spec(sd))] = sd
    return spec(sd)


def worker_count(opts: dict, sd) -> int:
    """The benchmark option ``workers=N``, else :func:`default_workers` for the model's device."""
    from apdm.bench import option_int

    return option_int(opts, "workers", default_workers(str(sd.device)), 1, "parallel job processes")


def model(model_spec: tuple[str, str], unet_state: dict | None = None):
    """The model of ``model_spec = (path, device)``, loaded once per process; with ``unet_state``
    (:func:`unet_state`), a shallow copy whose UNet is a fresh copy carrying those weights (a protected model), and
    whose text encoder is too when the state has ``text_encoder.*`` keys (a protected text encoder), and whose VAE is
    when it has ``vae.*`` keys (an encoder trap)."""
    from apdm.core.models import load_sd

    sd = cached(("model", model_spec), lambda: load_sd(model_spec[0], device=model_spec[1]))
    if unet_state is None:
        return sd
    te_state = {k[len(TE_PREFIX):]: v for k, v in unet_state.items() if k.startswith(TE_PREFIX)}
    vae_state = {k[len(VAE_PREFIX):]: v for k, v in unet_state.items() if k.startswith(VAE_PREFIX)}
    unet = copy.deepcopy(sd.unet)
    unet.load_state_dict({k: v for k, v in unet_state.items() if not k.startswith((TE_PREFIX, VAE_PREFIX))})
    text_encoder, vae = sd.text_encoder, sd.vae
    if te_state:
        text_encoder = copy.deepcopy(sd.text_encoder)
        text_encoder.load_state_dict(te_state)
        text_encoder.eval().requires_grad_(False)
    if vae_state:  # an encoder trap (apdm.protect_model.encoder_trap)
        vae = copy.deepcopy(sd.vae)
        vae.load_state_dict(vae_state)
        vae.eval().requires_grad_(False)
    return dataclasses.replace(sd, unet=unet.eval().requires_grad_(False), text_encoder=text_encoder, vae=vae)


def instruments():
    """The toy world's instruments, loaded once per process."""
    from apdm.toy import instruments as I
    from apdm.toy.world import instruments_path

    return cached("instruments", lambda: I.load_instruments(instruments_path()))


TE_PREFIX = "text_encoder."
VAE_PREFIX = "vae."


def unet_state(unet, text_encoder=None, vae=None) -> dict:
    """A UNet's weights as CPU tensors (what a job returns or receives for a protected model); with
    ``text_encoder`` / ``vae``, their weights too, under ``text_encoder.<name>`` / ``vae.<name>``."""
    out = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
    if text_encoder is not None:
        out.update({TE_PREFIX + k: v.detach().cpu() for k, v in text_encoder.state_dict().items()})
    if vae is not None:
        out.update({VAE_PREFIX + k: v.detach().cpu() for k, v in vae.state_dict().items()})
    return out


def attack(model_spec, unet_state_dict: dict | None, train_images, references, per_cfg, prompt: str, sample,
           keep_images: int = 0, identity: dict | None = None, subject_class: str = "person") -> dict:
    """Personalize the model on ``train_images`` ((N,3,H,W) in [0,1]) with ``per_cfg``, sample ``prompt`` and
    score the samples against the subject's ``references`` with the toy instruments (the detector asks for a
    subject of ``subject_class``: a dog's samples were scored as persons).

    Returns:
        ``{"ism": mean identity similarity (ism@toy-id), "fdfr": share rejected by the detector (fdfr@toy-det),
        "attr_match": attribute agreement with ``identity`` (attr_match@toy-attr; only when given),
        "images": the first ``keep_images`` samples (CPU) or None, "seconds": this job's time,
        "seconds_train": the personalization's, "peak_rss_mb": this process's peak}``.
    """
    import time

    from apdm.evaluation.identity import fdfr
    from apdm.evaluation.protocol import personalize_and_sample
    from apdm.toy import instruments as I
    from apdm.utils import peak_rss_mb

    t0 = time.perf_counter()
    sd, inst = model(model_spec, unet_state_dict), instruments()
    out = personalize_and_sample(sd, train_images.to(sd.device), per_cfg, [prompt], sample)
    gen = out["images"][prompt]
    res = {"ism": float(I.identity_similarity(inst.encoder, gen, references).mean()),
           "fdfr": float(fdfr(I.detector_scores(inst.detector, gen, subject_class)).mean()),
           "images": gen[:keep_images].cpu() if keep_images else None, "seconds": time.perf_counter() - t0,
           "seconds_train": out["seconds_train"], "peak_rss_mb": peak_rss_mb()}
    if identity is not None:
        res["attr_match"] = float(I.attribute_match(inst.encoder, gen, identity).mean())
    return res
