"""The perturbation budget: parsing, printing, projection, and the guarantee on the saved 8-bit file.

Units. Every budget in apdm is an L∞ radius on ``[0, 1]`` images and is printed as ``k/255``. Legacy flags given
on ``[-1, 1]`` images (Anti-DreamBooth ``pgd_eps=0.05``) are half as large here: ``0.05 -> 6.4/255``.

The guarantee. Image attacks run at the model's resolution (e.g. 512x512) and project with :func:`project_linf`
after every step. ``apdm protect-images`` then maps the perturbation back onto the full-resolution photo with
:func:`apply_delta_to_original`, which upsamples δ, adds it, projects again at the output resolution and finally
quantizes to 8 bits with :func:`quantize_with_budget`, computed in grey levels so that the *saved PNG file*
satisfies

    max |saved_uint8 / 255 - original| <= budget

exactly, ``original`` being the input as read at its own precision (after EXIF orientation, see
:func:`apdm.core.images.load_image`): for an 8-bit photo that is
``max |saved − original_uint8| ≤ floor(255·budget)`` (8 grey levels for ``8/255``, 6 for ``6.4/255``: rounding
never goes above the budget); for a 16-bit photo each saved level is chosen within the budget of the 16-bit value,
not of its 8-bit rounding (which could add half a level). A JPEG file re-compresses the pixels after this step and
keeps no such bound; :func:`budget_report` on the decoded file says how far it went.
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch

from apdm.utils import LOG

#: Tolerance used when turning a float budget into whole 8-bit levels: ``8/255`` must give 8, not 7.
_LEVEL_EPS = 1e-6
#: A float original this close to an 8-bit level (in grey levels) is that level: float32 stores ``n/255`` with an
#: error of ~2e-5 levels, while a 16-bit value lies at least 1/257 ≈ 0.004 levels from any other 8-bit level.
_GRID_TOL = 1e-3

_NUM = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
_FRACTION = re.compile(rf"^\s*({_NUM})\s*/\s*({_NUM})\s*$")


# ============================================================================ parse / print
def parse_budget(s: str | float | int) -> float:
    """Turn a user budget into an L∞ radius on ``[0, 1]``.

    Accepted forms: ``"8/255"``, ``"6.4/255"`` (any ``a/b``), ``"0.0314"`` or ``0.0314`` (a value ``< 1`` is
    already on ``[0, 1]``), ``"8"`` or ``8`` or ``12.75`` (a value ``> 1`` counts grey levels and is divided by
    255). A bare ``1`` is ambiguous (1/255 or the whole range?) and rejected; ``0`` is allowed (no perturbation).

    Args:
        s: the budget as a string or number.

    Returns:
        float in ``[0, 1]``.

    Raises:
        ValueError: garbage, negative, non-finite, ambiguous, or more than the whole range (``> 255/255``).
    """
    original = s
    if isinstance(s, bool) or not isinstance(s, (str, int, float, np.integer, np.floating)):
        raise ValueError(f"budget must be a string like '8/255' or a number, got {type(s).__name__} {s!r}")
    if isinstance(s, str):
        text = s.strip()
        m = _FRACTION.match(text)
        if m:
            num, den = float(m.group(1)), float(m.group(2))
            if den <= 0 or not math.isfinite(den):
                raise ValueError(f"budget '{original}': the denominator must be a positive number")
            value = num / den
        else:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"cannot parse budget '{original}': write it as k/255 (e.g. '8/255'), "
                                 f"a grey-level count (e.g. '8') or a fraction of the range (e.g. '0.0314')") from None
            value = _levels_or_fraction(value, original)
    else:
        value = _levels_or_fraction(float(s), original)
    if not math.isfinite(value):
        raise ValueError(f"budget '{original}' is not a finite number")
    if value < 0:
        raise ValueError(f"budget '{original}' is negative; it must be between 0 and 255/255")
    if value > 1 + 1e-12:
        raise ValueError(f"budget '{original}' is {value * 255:g}/255, more than the whole pixel range (255/255)")
    return min(float(value), 1.0)


def _levels_or_fraction(value: float, original) -> float:
    if value == 1:
        raise ValueError(f"budget '{original}' is ambiguous: write '1/255' for one grey level or '255/255' for the "
                         f"whole range")
    return value / 255.0 if value > 1 else value


def format_budget(x: float) -> str:
    """Print a ``[0, 1]`` budget as ``k/255`` with ``k`` rounded to 2 decimals (``8/255``, ``6.4/255``, ``8.01/255``).

    ``parse_budget(format_budget(x))`` equals ``x`` to within ``0.005/255``.
    """
    x = float(x)
    if not math.isfinite(x):
        raise ValueError(f"budget {x} is not finite")
    k = round(x * 255.0, 2)
    if k == int(k):
        return f"{int(k)}/255"
    return f"{k:.2f}".rstrip("0").rstrip(".") + "/255"


def budget_levels(budget: float) -> int:
    """Whole 8-bit grey levels a budget allows: ``floor(255 * budget)`` (``8/255 -> 8``, ``6.4/255 -> 6``)."""
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    return int(math.floor(255.0 * float(budget) + _LEVEL_EPS))


# ============================================================================ projection
def project_linf(x_adv: torch.Tensor, x_clean: torch.Tensor, budget: float | torch.Tensor) -> torch.Tensor:
    """Project onto ``{x : ‖x − x_clean‖∞ ≤ budget} ∩ [0, 1]``.

    Args:
        x_adv: ``(..., 3, H, W)`` float tensor (any batch shape), typically ``(N, 3, H, W)`` in ``[0, 1]``.
        x_clean: same shape (or broadcastable), float in ``[0, 1]``.
        budget: L∞ radius on ``[0, 1]``; a float or a tensor broadcastable to ``x_adv`` (per-image budgets as
            ``(N, 1, 1, 1)``).

    Returns:
        Same shape/dtype/device as ``x_adv``; differentiable (gradients pass where the bounds are inactive).
    """
    if isinstance(budget, torch.Tensor):
        if (budget < 0).any():
            raise ValueError("budget must be >= 0")
        b = budget.to(device=x_adv.device, dtype=x_adv.dtype)
    else:
        if budget < 0 or not math.isfinite(budget):
            raise ValueError(f"budget must be a finite number >= 0, got {budget}")
        b = torch.as_tensor(float(budget), device=x_adv.device, dtype=x_adv.dtype)
    clean = x_clean.to(device=x_adv.device, dtype=x_adv.dtype)
    lo = (clean - b).clamp(min=0.0)
    hi = (clean + b).clamp(max=1.0)
    return torch.max(torch.min(x_adv, hi), lo)


# ============================================================================ 8-bit guarantee
def to_uint8(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``[0, 1]`` float -> uint8 by round-half-up (``floor(255·x + 0.5)``); uint8 input is returned as a tensor.

    Raises:
        ValueError: NaN or inf values (they would silently become 0).
    """
    t = torch.as_tensor(x)
    if t.dtype == torch.uint8:
        return t
    t = t.detach().cpu()
    t = t.to(torch.float64) if t.dtype == torch.float64 else t.to(torch.float32)  # float32 is exact enough
    if not torch.isfinite(t).all():
        raise ValueError("image contains NaN or inf values")
    out = t.clamp(0.0, 1.0).mul_(255.0).add_(0.5).floor_()
    return out.to(torch.uint8)


def quantize_with_budget(protected: torch.Tensor, orig: torch.Tensor | np.ndarray, budget: float) -> torch.Tensor:
    """Quantize a protected image to 8 bits so that the saved file keeps the budget exactly, against the original at
    its own precision.

    With ``o = 255·orig`` in grey levels (a whole number for an 8-bit original, a fraction for a 16-bit one) and
    ``r = 255·budget``: ``q = clip(round(255·protected), ceil(o − r), floor(o + r)) ∩ [0, 255]``, so every saved
    value satisfies ``|q/255 − orig| ≤ budget``. For an 8-bit original the bounds are ``o ± k`` with
    ``k = floor(255·budget)`` (:func:`budget_levels`), so ``max |q − orig_uint8| ≤ k``. Where no 8-bit level lies
    within the budget of a value (a budget under half a grey level, 0 included, on a 16-bit original), ``q`` is the
    level nearest to it, the closest an 8-bit file can come.

    Args:
        protected: ``(3, H, W)`` or ``(N, 3, H, W)`` float in ``[0, 1]`` (values outside are clipped).
        orig: the original, same shape: uint8, or float in ``[0, 1]`` at full precision (``value/65535`` for a
            16-bit file; float32 values within 0.001 grey levels of an 8-bit level count as that level).
        budget: L∞ radius on ``[0, 1]``.

    Returns:
        uint8 tensor, same shape as ``protected``, on CPU; ``protected_float = q / 255``.
    """
    if budget_levels(budget) == 0 and budget > 0:
        LOG.warning("budget %s is below one 8-bit grey level: the saved image of an 8-bit original will equal the "
                    "original", format_budget(budget))
    t = torch.as_tensor(orig).detach().cpu()
    if t.dtype == torch.uint8:
        o = t.to(torch.float32)
    else:
        o = t.to(torch.float32)
        if not torch.isfinite(o).all():
            raise ValueError("original image contains NaN or inf values")
        o = o.clamp(0.0, 1.0).mul_(255.0)
        level = o.round()
        o = torch.where((o - level).abs() < _GRID_TOL, level, o)  # 8-bit values stored as float32
    if tuple(o.shape) != tuple(protected.shape):
        raise ValueError(f"shape mismatch: protected {tuple(protected.shape)} vs original {tuple(o.shape)}")
    r = 255.0 * float(budget)
    lo = (o - (r + _LEVEL_EPS)).ceil_().clamp_(min=0.0)
    hi = (o + (r + _LEVEL_EPS)).floor_().clamp_(max=255.0)
    empty = lo > hi
    if bool(empty.any()):  # no level within the budget: the nearest one
        nearest = (o + 0.5).floor_()
        lo, hi = torch.where(empty, nearest, lo), torch.where(empty, nearest, hi)
    q = to_uint8(protected).to(torch.float32)
    return torch.min(torch.max(q, lo), hi).to(torch.uint8)


def upsample_delta(delta: torch.Tensor, hw: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize a perturbation ``(3, s, s)`` (or ``(N, 3, h, w)``) to ``hw = (H, W)``; no clamping.

    Antialiasing is on, so the same call also shrinks a delta for images smaller than the model resolution.
    """
    squeeze = delta.ndim == 3
    d = delta[None] if squeeze else delta
    if tuple(d.shape[-2:]) != tuple(hw):
        d = torch.nn.functional.interpolate(d.float(), size=tuple(int(v) for v in hw), mode=mode,
                                            align_corners=False if mode in ("bilinear", "bicubic") else None,
                                            antialias=mode in ("bilinear", "bicubic"))
    return d[0] if squeeze else d


def apply_delta_to_original(orig: torch.Tensor, delta_model: torch.Tensor, budget: float, *,
                            mode: str = "bicubic", quantize: bool = True) -> torch.Tensor:
    """Map a perturbation computed at model resolution onto the full-resolution original.

    ``out = Q(project(orig + upsample(δ)))``: δ (``protected_model − clean_model``, both at ``s×s``) is resized to
    the original ``H×W`` (:func:`upsample_delta`, bicubic; the whole image was resized to ``s×s``, see
    :func:`apdm.core.images.to_model_resolution`, so every original pixel receives a perturbation), added,
    projected onto the budget ball around ``orig`` and ``[0, 1]`` (:func:`project_linf`), and, with
    ``quantize=True``, snapped to the 8-bit grid with :func:`quantize_with_budget`, so saving the result as PNG
    keeps ``max |saved/255 − orig| ≤ budget`` exactly (for an 8-bit original: ``max |saved − round(255·orig)| ≤
    floor(255·budget)``).

    Args:
        orig: ``(3, H, W)`` float32 in ``[0, 1]``, the original at full resolution and precision (16-bit values
            as ``value/65535``).
        delta_model: ``(3, s, s)`` (or ``(1, 3, s, s)``) float perturbation at model resolution.
        budget: L∞ radius on ``[0, 1]``.
        mode: interpolation for δ (``"bicubic"`` or ``"bilinear"``).
        quantize: snap to the 8-bit grid (default). ``False`` returns the projected float image.

    Returns:
        ``(3, H, W)`` float32 in ``[0, 1]`` on ``orig``'s device; with ``quantize`` every value is ``k/255``.
    """
    if orig.ndim != 3 or orig.shape[0] != 3:
        raise ValueError(f"orig must be (3,H,W), got {tuple(orig.shape)}")
    if delta_model.ndim == 4:
        if delta_model.shape[0] != 1:
            raise ValueError(f"delta_model must be one image, got {tuple(delta_model.shape)}")
        delta_model = delta_model[0]
    if delta_model.ndim != 3 or delta_model.shape[0] != 3:
        raise ValueError(f"delta_model must be (3,s,s), got {tuple(delta_model.shape)}")
    orig = orig.detach().float()
    delta = upsample_delta(delta_model.detach().float().to(orig.device), tuple(orig.shape[-2:]), mode)
    out = project_linf(orig + delta, orig, budget)
    if not quantize:
        return out
    q = quantize_with_budget(out, orig, budget)
    return (q.to(torch.float32) / 255.0).to(orig.device)


# ============================================================================ report
#: SSIM settings of the report (Wang et al. 2004 as in skimage/Anti-DreamBooth evaluations): Gaussian window
#: σ=1.5 truncated at 3.5σ (11x11), population covariance, data range 1, mean over the interior (5-px border
#: excluded), averaged over the 3 channels. ``apdm.evaluation.fidelity.ssim`` (``ssim@apdm``) uses the same
#: definition.
SSIM_KW = dict(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
_SSIM_PAD = 5


def budget_report(orig: torch.Tensor, protected: torch.Tensor, budget: float | None = None) -> dict:
    """Per-image closeness of a protected image to its original, for the run manifest.

    Args:
        orig: ``(3, H, W)`` (or ``(1, 3, H, W)``) float in ``[0, 1]`` or uint8, any device: the original at the
            precision it was read (16-bit values as ``value/65535``).
        protected: same shape; float in ``[0, 1]`` or uint8: what was saved, as decoded from the file (a JPEG's
            pixels differ from those it was encoded from).
        budget: if given, also report whether the images respect it.

    Returns:
        ``{"linf_255@apdm": max |Δ| in grey levels (an int for 8-bit data), "psnr@apdm": ``10·log10(1/MSE)`` in dB
        (data range 1; the same formula as skimage and torchmetrics), or None when the images are identical
        (infinite PSNR), "ssim@skimage": see :data:`SSIM_KW`, or None when a side is shorter than 11 px or
        scikit-image (extra ``metrics``) is missing}`` plus
        ``"budget_255"`` and ``"within_budget"`` when ``budget`` is given. Both are computed in row bands
        (:func:`_ssim_banded`), giving the whole-image values with memory bounded for 24+ MP photos (SSIM costs
        about 0.5 s per megapixel on one CPU core).
    """
    def as_np(x):
        x = torch.as_tensor(x).detach().cpu()
        x = x.to(torch.float32) / 255.0 if x.dtype == torch.uint8 else x.to(torch.float32)
        x = x[0] if x.ndim == 4 and x.shape[0] == 1 else x
        return x.numpy()

    a, b = as_np(orig), as_np(protected)
    if a.shape != b.shape or a.ndim != 3 or a.shape[0] != 3:
        raise ValueError(f"budget_report takes one (3,H,W) image pair, got {a.shape} and {b.shape}")
    h, w = a.shape[1:]
    d255, sq = 0.0, 0.0
    for r in range(0, h, 1024):  # bands keep float64 temporaries small on 24+ MP photos
        d = a[:, r:r + 1024].astype(np.float64) - b[:, r:r + 1024]
        d255 = max(d255, float(np.abs(d).max()) * 255.0)
        sq += float(np.square(d).sum())
    mse = sq / a.size
    linf = int(round(d255)) if abs(d255 - round(d255)) < 1e-3 else round(d255, 4)
    report: dict = {"linf_255@apdm": linf,
                    "psnr@apdm": round(10.0 * math.log10(1.0 / mse), 4) if mse > 0 else None,
                    "ssim@skimage": _ssim_or_none(a, b) if min(h, w) >= 2 * _SSIM_PAD + 1 else None}
    if budget is not None:
        report["budget_255"] = round(float(budget) * 255.0, 4)
        report["within_budget"] = bool(d255 <= float(budget) * 255.0 + 1e-3)
    return report


_SKIMAGE_WARNED = False


def _ssim_or_none(a: np.ndarray, b: np.ndarray) -> float | None:
    global _SKIMAGE_WARNED
    from apdm.utils import MissingDependency, optional_import

    try:
        optional_import("skimage.metrics", "metrics", "the SSIM column of the protect-images manifest")
    except MissingDependency as exc:
        if not _SKIMAGE_WARNED:
            LOG.warning("%s", exc)
            _SKIMAGE_WARNED = True
        return None
    return round(_ssim_banded(a, b), 6)


def _ssim_banded(a: np.ndarray, b: np.ndarray, band_rows: int = 1024) -> float:
    """skimage SSIM (:data:`SSIM_KW`) of one ``(3, H, W)`` float32 pair, computed in bands of rows.

    skimage averages the SSIM map over the pixels at least 5 px (the window radius) from the border, and each of
    those values depends only on its 11x11 neighbourhood. So the interior rows are split into bands of
    ``band_rows``, each band is passed with 5 extra rows on both sides (which skimage crops again), and the band
    means are averaged weighted by their row counts: the whole-image value (to float rounding), with memory
    bounded by the band size.
    """
    from skimage.metrics import structural_similarity

    h = a.shape[1]
    pad = _SSIM_PAD
    total, rows = 0.0, 0
    for start in range(pad, h - pad, band_rows):
        stop = min(start + band_rows, h - pad)
        band = slice(start - pad, stop + pad)
        v = structural_similarity(a[:, band], b[:, band], channel_axis=0, **SSIM_KW)
        total += float(v) * (stop - start)
        rows += stop - start
    return total / rows
