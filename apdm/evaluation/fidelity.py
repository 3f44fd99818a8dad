"""Imperceptibility metrics: how close the protected images are to the clean ones.

All functions take two batches ``(N, 3, H, W)`` float32 in ``[0, 1]`` of identical shape (clean, protected) and
return one value per image, a ``(N,)`` float tensor on CPU. Records: :func:`fidelity_records` (one batch),
:func:`fidelity_records_pairs` (pairs of any size, one at a time: ``apdm evaluate`` measures the files as they are).

| metric | impl tag | direction |
|---|---|---|
| PSNR (dB, data range 1) | ``psnr@torchmetrics`` | higher = closer (``inf`` for identical images) |
| SSIM (Gaussian 11x11, σ=1.5, skimage border convention) | ``ssim@apdm`` | higher = closer, 1 for identical |
| MS-SSIM (5 scales, or fewer on small images) | ``ms_ssim@torchmetrics`` / ``ms_ssim@torchmetrics-s3`` | higher = closer |
| L∞ in k/255 | ``linf_255@apdm`` | lower = closer, 0 for identical |
| LPIPS (AlexNet) | ``lpips@lpips-alex`` (extra ``lpips``, needs torchvision weights) | lower = closer |
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from apdm.evaluation.metrics import MetricUnavailable, check_pair, metric_record, summarize, unavailable
from apdm.utils import LOG, MissingDependency, optional_import

#: MS-SSIM scale weights (Wang et al. 2003), as in torchmetrics / the original paper.
MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)

_LPIPS_CACHE: dict = {}


def psnr(clean: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for data range 1 (torchmetrics); ``inf`` where the images are identical.

    Args:
        clean: ``(N, 3, H, W)`` float in ``[0, 1]``.
        protected: same shape.

    Returns:
        ``(N,)`` float32, higher = more similar.
    """
    from torchmetrics.functional.image import peak_signal_noise_ratio

    check_pair(clean, protected)
    out = peak_signal_noise_ratio(protected.detach().double(), clean.detach().double(), data_range=1.0,
                                  reduction="none", dim=(1, 2, 3))
    return out.float().cpu()


def ssim(clean: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM (Gaussian window 11x11, σ=1.5, K1=0.01, K2=0.03, data range 1), scikit-image convention.

    The SSIM map is computed by torchmetrics in float64; the mean excludes the 5-px border that the window
    cannot cover without padding, as ``skimage.metrics.structural_similarity(a, b, channel_axis=0,
    data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)`` does (they agree to ~1e-10).
    torchmetrics' own reduction also averages the reflect-padded border and reads lower on small images
    (about 0.005 on 96 px). Tag: ``ssim@apdm``.

    Returns:
        ``(N,)`` float32 in ``[-1, 1]``, 1 for identical images.
    """
    from torchmetrics.functional.image import structural_similarity_index_measure

    check_pair(clean, protected)
    h, w = clean.shape[-2:]
    if min(h, w) < 11:
        raise MetricUnavailable(f"SSIM needs images of at least 11 px (the Gaussian window), got {h}x{w}")
    _, full = structural_similarity_index_measure(
        protected.detach().double(), clean.detach().double(), gaussian_kernel=True, sigma=1.5, kernel_size=11,
        data_range=1.0, reduction="none", return_full_image=True)
    return full[..., 5:-5, 5:-5].mean(dim=(1, 2, 3)).float().cpu()


def ms_ssim_scales(height: int, width: int, kernel_size: int = 11, max_scales: int = 5) -> int:
    """Number of MS-SSIM scales torchmetrics can use for an image of this size (0 if even 2 do not fit).

    torchmetrics requires ``side >= 2**scales`` and ``side // (scales - 1)**2 > kernel_size - 1``, and its reflect
    padding needs the coarsest level to be wider than half the window: with the default 11-px window 5 scales
    need sides of at least 176 px, 4 scales 99 px, 3 scales 44 px, 2 scales 12 px.
    """
    side = min(height, width)
    for s in range(max_scales, 1, -1):
        if (side >= 2 ** s and side // max(1, (s - 1) ** 2) > kernel_size - 1
                and side // 2 ** (s - 1) > (kernel_size - 1) // 2):
            return s
    return 0


def ms_ssim(clean: torch.Tensor, protected: torch.Tensor, scales: int | None = None,
            min_scales: int = 3) -> torch.Tensor:
    """Per-image multi-scale SSIM (torchmetrics, Gaussian 11x11, σ=1.5, ReLU-normalised contrast terms).

    The standard 5-scale MS-SSIM needs images of at least 176 px (torchmetrics' limit, 11-px window). On
    smaller images ``scales=None`` uses the largest number of scales that fits (:func:`ms_ssim_scales`), with
    the first ``scales`` standard weights renormalised to sum to 1, so values stay on the same 0-1 scale; such
    results must be tagged with the number of scales (``ms_ssim@torchmetrics-s3``) because they differ from
    5-scale values.

    Args:
        clean, protected: ``(N, 3, H, W)`` float in ``[0, 1]``.
        scales: number of scales (1-5); ``None`` = 5 if the images are large enough, else as many as fit.
        min_scales: fewest scales accepted when choosing automatically.

    Returns:
        ``(N,)`` float32 in ``[0, 1]``, 1 for identical images.

    Raises:
        MetricUnavailable: the images are too small for ``min_scales`` (or for the requested ``scales``).
    """
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure

    check_pair(clean, protected)
    h, w = clean.shape[-2:]
    fit = ms_ssim_scales(h, w)
    if scales is None:
        scales = fit
        if scales < min_scales:
            raise MetricUnavailable(f"MS-SSIM: {h}x{w} images are too small for {min_scales} scales with an "
                                    f"11-px window (fit: {fit}); 5 scales need >= 176 px, 3 scales >= 44 px")
    elif not 1 <= scales <= 5:
        raise ValueError(f"MS-SSIM scales must be in 1..5, got {scales}")
    elif scales > max(fit, 1):
        raise MetricUnavailable(f"MS-SSIM: {h}x{w} images are too small for {scales} scales (at most {fit} fit)")
    betas = torch.tensor(MS_SSIM_BETAS[:scales], dtype=torch.float64)
    betas = tuple((betas / betas.sum()).tolist()) if scales < 5 else MS_SSIM_BETAS
    out = multiscale_structural_similarity_index_measure(
        protected.detach().float(), clean.detach().float(), gaussian_kernel=True, sigma=1.5, kernel_size=11,
        data_range=1.0, betas=betas, normalize="relu", reduction="none")
    return out.float().cpu()


def linf_255(clean: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Per-image L∞ distance in units of 1/255 (a ``8/255`` budget gives values <= 8).

    Returns:
        ``(N,)`` float32 >= 0, 0 for identical images.
    """
    check_pair(clean, protected)
    d = (protected.detach().double() - clean.detach().double()).abs().flatten(1).amax(dim=1)
    return (d * 255.0).float().cpu()


def lpips_model(net: str = "alex"):
    """The ``lpips`` package's LPIPS network (cached, eval mode, frozen), taking images in ``[-1, 1]``.

    Raises:
        MissingDependency: ``lpips`` is not installed.
        MetricUnavailable: the backbone weights cannot be obtained (offline).
    """
    lp = optional_import("lpips", "lpips", "the LPIPS metric")
    if net not in _LPIPS_CACHE:
        try:
            model = lp.LPIPS(net=net, verbose=False)
        except Exception as exc:  # URLError / RuntimeError when torchvision weights cannot be downloaded
            raise MetricUnavailable(f"LPIPS({net}) could not load its torchvision backbone weights "
                                    f"({type(exc).__name__}: {exc})") from exc
        _LPIPS_CACHE[net] = model.eval().requires_grad_(False)
    return _LPIPS_CACHE[net]


def lpips(clean: torch.Tensor, protected: torch.Tensor, net: str = "alex") -> torch.Tensor:
    """Per-image LPIPS distance (the ``lpips`` package, inputs mapped to ``[-1, 1]``).

    Needs the ``lpips`` extra (it pulls torchvision) and the torchvision backbone weights (downloaded on first
    use; the linear heads ship with the package). Without either this raises, so the record says unavailable.

    Returns:
        ``(N,)`` float32 >= 0, lower = more similar.

    Raises:
        MissingDependency: ``lpips`` is not installed.
        MetricUnavailable: the backbone weights cannot be obtained (offline).
    """
    check_pair(clean, protected)
    model = lpips_model(net)
    with torch.no_grad():
        out = model(clean.detach().float().cpu() * 2 - 1, protected.detach().float().cpu() * 2 - 1)
    return out.flatten().float()


def _psnr_summary(values: torch.Tensor) -> dict:
    """The ``psnr@torchmetrics`` record of per-image PSNR values (see :func:`psnr_record`)."""
    finite = values[torch.isfinite(values)]
    n_identical = int(values.numel() - finite.numel())
    if values.numel() == 0:
        return unavailable("psnr", "torchmetrics", "no image pairs", True, 0)
    if finite.numel() == 0:
        return metric_record("psnr", "torchmetrics", None, True, int(values.numel()), std=None,
                             n_identical=n_identical, identical=True)
    return summarize("psnr", "torchmetrics", finite, True, n_identical=n_identical)


def psnr_record(clean: torch.Tensor, protected: torch.Tensor) -> dict:
    """The ``psnr@torchmetrics`` record: the mean over the pairs that differ, and ``n_identical``, the pairs that
    do not (their PSNR is infinite). One unchanged photo (a method that skipped it) made the mean infinite, hiding
    every other photo's PSNR, and wrote a bare ``Infinity`` that strict JSON parsers reject. Every pair identical:
    ``value`` None, ``identical`` True."""
    return _psnr_summary(psnr(clean, protected))


def fidelity_records(clean: torch.Tensor, protected: torch.Tensor, with_lpips: bool = True) -> list[dict]:
    """All imperceptibility records for one clean/protected pair of batches.

    Returns:
        records (see :mod:`apdm.evaluation.metrics`): ``psnr``, ``ssim``, ``ms_ssim`` (tag carries the number of
        scales when < 5; unavailable on tiny images), ``linf_255`` (with ``max`` over images), ``lpips``
        (usually unavailable offline).
    """
    check_pair(clean, protected)
    return fidelity_records_pairs([(clean, protected)], with_lpips=with_lpips)


def fidelity_records_pairs(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]], with_lpips: bool = True,
                           lpips_off: str = "disabled (with_lpips=False)") -> list[dict]:
    """:func:`fidelity_records` for pairs of batches that may differ in size from one pair to the next (photos
    measured at their own resolution, ``apdm evaluate``): per-image values are computed pair by pair, so only
    one pair is held at a time (``pairs`` may be a generator loading them), and summarised together.

    Args:
        pairs: ``(clean, protected)`` batches, each ``(N, 3, H, W)`` float in ``[0, 1]``, the two of a pair of
            one shape.
        with_lpips: compute LPIPS; otherwise its record is unavailable with reason ``lpips_off``.

    Returns:
        the records of :func:`fidelity_records`. MS-SSIM gives one record per number of scales that the pairs'
        sizes allow (``ms_ssim@torchmetrics`` for the pairs of >= 176 px, ``ms_ssim@torchmetrics-s3`` for
        smaller ones, ...: values with different scales are different metrics); SSIM leaves out pairs too small
        for its window (counted in ``n_too_small``).
    """
    psnr_v, linf_v, ssim_v, lpips_v = [], [], [], []
    ssim_small, ssim_reason = 0, ""
    ms: dict[int, list[torch.Tensor]] = {}   # scales -> values
    ms_fail: dict[int, list] = {}             # scales -> [pairs, reason] where MS-SSIM cannot run
    lpips_reason = None if with_lpips else lpips_off
    for clean, protected in pairs:
        check_pair(clean, protected)
        n = int(clean.shape[0])
        psnr_v.append(psnr(clean, protected))
        linf_v.append(linf_255(clean, protected))
        try:
            ssim_v.append(ssim(clean, protected))
        except MetricUnavailable as exc:
            ssim_small, ssim_reason = ssim_small + n, str(exc)
        s = ms_ssim_scales(*clean.shape[-2:])
        try:
            value = ms_ssim(clean, protected)
        except MetricUnavailable as exc:
            fail = ms_fail.setdefault(s, [0, ""])
            fail[0], fail[1] = fail[0] + n, str(exc)
        else:
            ms.setdefault(s, []).append(value)
        if lpips_reason is None:
            try:
                lpips_v.append(lpips(clean, protected))
            except (MetricUnavailable, MissingDependency) as exc:
                lpips_reason = str(exc)
                LOG.info("lpips@lpips-alex unavailable: %s", exc)
        del clean, protected  # before the next pair loads: one pair in memory at a time

    def cat(values: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(values) if values else torch.zeros(0)

    recs = [_psnr_summary(cat(psnr_v))]
    if ssim_v:
        recs.append(summarize("ssim", "apdm", cat(ssim_v), True,
                              **({"n_too_small": ssim_small, "note": ssim_reason} if ssim_small else {})))
    else:
        recs.append(unavailable("ssim", "apdm", ssim_reason or "no image pairs", True))
    for s in sorted(set(ms) | set(ms_fail), reverse=True):
        tag = "torchmetrics" if s == 5 else f"torchmetrics-s{s}"
        if ms.get(s):
            recs.append(summarize("ms_ssim", tag, cat(ms[s]), True, scales=s))
        else:
            recs.append(unavailable("ms_ssim", tag, ms_fail[s][1], True, scales=s,
                                    **({"n_too_small": ms_fail[s][0]} if ms else {})))
    if not ms and not ms_fail:
        recs.append(unavailable("ms_ssim", "torchmetrics", "no image pairs", True))
    linf = cat(linf_v)
    rec = summarize("linf_255", "apdm", linf, False)
    rec["max"] = float(linf.max()) if linf.numel() else None
    recs.append(rec)
    if lpips_reason is not None:
        recs.append(unavailable("lpips", "lpips-alex", lpips_reason, False))
    else:
        recs.append(summarize("lpips", "lpips-alex", cat(lpips_v), False))
    return recs
