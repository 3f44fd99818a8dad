"""The common record format of every evaluation metric, and the helpers that build records.

The metric functions themselves are pure functions on tensors, grouped by family:

- :mod:`apdm.evaluation.fidelity` - imperceptibility, clean vs protected: PSNR, SSIM, MS-SSIM, L∞ (k/255), LPIPS.
- :mod:`apdm.evaluation.identity` - subject identity of generated images: ISM on any embedding backend
  (dlib 128-d, the toy identity encoder, ...), FDFR and SDS on any detector, DINO, CLIP-I, CLIP-T.
- :mod:`apdm.evaluation.iqa` - no-reference quality: BRISQUE (own features + the ``brisque`` package's SVM, or the
  package itself), CLIP-IQA (transformers CLIP from a local path, or pyiqa), LIQE (pyiqa).
- :mod:`apdm.evaluation.distribution` - set-level: FID and KID on any feature extractor (torchmetrics).

Every result is reported as a record (a plain JSON-serialisable dict) tagged ``"name@impl"``::

    {"metric": "psnr@torchmetrics", "name": "psnr", "impl": "torchmetrics", "value": 38.2,
     "higher_is_better": True, "n": 16, "available": True, "std": 1.1, ...extra}

A metric that cannot run here (missing extra, missing weights, images too small) is *reported* with
:func:`unavailable` (``value: None``, ``available: False``, ``reason: "..."``); it is never silently dropped or
replaced by a number from another implementation. Metric functions signal this by raising
:class:`MetricUnavailable` (or :class:`apdm.utils.MissingDependency` from ``optional_import``); :func:`measure`
turns either into an unavailable record.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from apdm.utils import LOG, MissingDependency

#: What protection wants of each metric (docs/metrics.md, last column), by metric name: ``"high"``, ``"low"``,
#: ``"≤ budget"`` (L∞), or absent (utility metrics such as CLIP-T). A metric's own ``higher_is_better`` is its
#: direction of quality or similarity; for identity metrics protection wants the opposite, for FDFR, FID, KID and
#: BRISQUE it wants the metric's "worse" direction too (the personalized model fails to produce the subject).
PROTECTION_WANTS = {"psnr": "high", "ssim": "high", "ms_ssim": "high", "linf_255": "≤ budget", "lpips": "low",
                    "ism": "low", "fdfr": "high", "sds": "low", "dino": "low", "clip_i": "low", "brisque": "high",
                    "clip_iqa": "low", "liqe": "low", "fid": "high", "kid": "high"}


class MetricUnavailable(RuntimeError):
    """A metric cannot be computed here (weights missing, input unsuitable, ...); the message says why."""


def _finite_or_none(x: float | None) -> float | None:
    """``x``, or ``None`` when it is a non-finite float (NaN, ±inf): records hold numbers strict JSON can carry."""
    return None if x is None or (isinstance(x, float) and not math.isfinite(x)) else x


def metric_record(name: str, impl: str, value: float | None, higher_is_better: bool | None, n: int | None,
                  **extra: Any) -> dict:
    """One metric result in the common format.

    Args:
        name: metric name, e.g. ``"psnr"``, ``"ism"``, ``"fid"``.
        impl: implementation tag, e.g. ``"torchmetrics"``, ``"dlib-resnet"``, ``"toy-features"``.
        value: the (mean) value; NaN -> ``None`` (PSNR leaves identical pairs out of its mean:
            :func:`apdm.evaluation.fidelity.psnr_record`); ±inf -> ``None`` too, with a ``note`` saying so (strict
            JSON has no ``Infinity``). Non-finite floats in ``extra`` (also inside lists/dicts) become ``None``.
        higher_is_better: direction of *quality/similarity* for this metric (protection wants the opposite for
            identity metrics; the record states the metric's own direction).
        n: number of items the value is computed over (images, or generated images for set metrics).
        **extra: anything else worth keeping (``std``, ``n_no_face``, ``reliable``, ``scales``, ...).

    Returns:
        ``{"metric": "name@impl", "name", "impl", "value", "higher_is_better", "n", "available": True, **extra}``.
    """
    infinite = None
    if value is not None:
        value = float(value)
        if math.isinf(value):
            infinite = value
        value = _finite_or_none(value)
    rec = {"metric": f"{name}@{impl}", "name": name, "impl": impl, "value": value,
           "higher_is_better": None if higher_is_better is None else bool(higher_is_better),
           "n": None if n is None else int(n), "available": True}
    for k, v in extra.items():
        rec[k] = _plain(v)
    if infinite is not None:
        said = f"the value was {infinite} (not a finite number): reported as None"
        rec["note"] = "; ".join(t for t in (rec.get("note") or "", said) if t)
    return rec


def unavailable(name: str, impl: str, reason: str, higher_is_better: bool | None = None, n: int | None = None,
                **extra: Any) -> dict:
    """A record for a metric that could not be computed: ``value`` is ``None`` and ``reason`` says why.

    Example: ``unavailable("fid", "inception", "Inception weights are downloaded by torch-fidelity; offline")``.
    """
    rec = metric_record(name, impl, None, higher_is_better, n, **extra)
    rec["available"] = False
    rec["reason"] = str(reason)
    return rec


def _plain(v: Any) -> Any:
    """Tensors/numpy scalars -> Python numbers, so records stay JSON-serialisable; non-finite floats (NaN, ±inf,
    also inside tensors, lists, tuples and dicts) -> ``None``, so they stay strict JSON."""
    if hasattr(v, "detach"):
        v = v.detach().cpu()
        v = v.item() if v.numel() == 1 else v.tolist()
    elif hasattr(v, "item") and getattr(v, "shape", None) == ():
        v = v.item()
    if isinstance(v, float):
        return _finite_or_none(v)
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_plain(x) for x in v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def summarize(name: str, impl: str, values, higher_is_better: bool, **extra: Any) -> dict:
    """Record of per-item values: mean as ``value``, sample ``std`` (``None`` for one item or non-finite), ``n``.

    Args:
        values: ``(N,)`` tensor / sequence of per-item values (e.g. per-image PSNR).
    """
    import torch

    v = torch.as_tensor(values, dtype=torch.float64).flatten()
    n = int(v.numel())
    if n == 0:
        return unavailable(name, impl, "no items to average (empty input)", higher_is_better, 0, **extra)
    mean = float(v.mean())
    std = float(v.std()) if n > 1 else None
    if std is not None and not math.isfinite(std):
        std = None
    return metric_record(name, impl, mean, higher_is_better, n, std=std, **extra)


def measure(name: str, impl: str, higher_is_better: bool, fn: Callable, *args, n: int | None = None,
            extra: dict | None = None, **kwargs) -> dict:
    """Run a metric function and return its record; an unavailable record if it cannot run.

    ``fn(*args, **kwargs)`` may return an ``(N,)`` tensor of per-item values (summarised with mean/std/n), a
    number (set-level metrics such as FID; pass ``n``), or a ``(mean, std)`` tuple (KID). A raised
    :class:`MetricUnavailable` or :class:`~apdm.utils.MissingDependency` becomes :func:`unavailable` with the
    exception message as reason. Other exceptions propagate (they are bugs, not missing dependencies).

    Example:
        ``measure("psnr", "torchmetrics", True, fidelity.psnr, clean, protected)``
    """
    extra = dict(extra or {})
    try:
        out = fn(*args, **kwargs)
    except (MetricUnavailable, MissingDependency) as exc:
        LOG.info("%s@%s unavailable: %s", name, impl, exc)
        return unavailable(name, impl, str(exc), higher_is_better, n, **extra)
    if isinstance(out, tuple) and len(out) == 2:
        return metric_record(name, impl, float(out[0]), higher_is_better, n, std=float(out[1]), **extra)
    if hasattr(out, "dim") and out.dim() >= 1:
        return summarize(name, impl, out, higher_is_better, **extra)
    return metric_record(name, impl, float(out), higher_is_better, n, **extra)


# ---------------------------------------------------------------------------------------------- inputs
def check_images(images, what: str = "images"):
    """Validate an apdm image batch: float tensor ``(N, 3, H, W)``; returns it. Raises ``ValueError`` otherwise."""
    import torch

    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"{what}: expected a float tensor (N, 3, H, W) in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"{what}: expected a float tensor in [0, 1], got dtype {images.dtype}")
    return images


def nonfinite_count(items) -> int:
    """How many of ``items`` (``(N, ...)``: images or feature vectors) hold a NaN or inf value; 0 when every one is
    finite (and for a 1-D tensor, which holds no items)."""
    import torch

    return int((~torch.isfinite(items.detach())).flatten(1).any(dim=1).sum()) if items.dim() >= 2 else 0


def check_pair(a, b) -> None:
    """Validate two image batches of identical shape (clean vs protected)."""
    check_images(a, "clean images")
    check_images(b, "protected images")
    if a.shape != b.shape:
        raise ValueError(f"clean and protected images differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    for images, what in ((a, "clean"), (b, "protected")):  # NaN counted as an identical pair (PSNR inf) before
        bad = nonfinite_count(images)
        if bad:
            raise ValueError(f"{bad} of {len(images)} {what} images hold NaN/inf pixels: no fidelity number compares "
                             "them (a diverged protection?)")


def to_uint8(images):
    """``(N, 3, H, W)`` float ``[0, 1]`` tensor -> ``(N, H, W, 3)`` uint8 numpy array (rounded, clipped).

    This is what image files on disk hold, and what uint8-based packages (brisque, dlib, OpenCV) expect.
    """
    import numpy as np
    import torch

    check_images(images)
    x = images.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8)
    return np.ascontiguousarray(x.permute(0, 2, 3, 1).numpy())
