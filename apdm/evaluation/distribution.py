"""Set-level distribution metrics: FID and KID (torchmetrics) on any feature extractor.

torchmetrics' default Inception (``feature=2048``) downloads its weights through torch-fidelity, which is
impossible offline; apdm therefore always passes the features explicitly:

- ``extractor`` is any ``nn.Module`` (or callable) mapping images ``(B, 3, H, W)`` float ``[0, 1]`` to features
  ``(B, D)`` - e.g. the toy world's ``FeatureExtractor`` (tag ``fid@toy-features``), or
  :func:`inception_extractor` built from a local weights file (tag ``fid@inception``, needs torch-fidelity);
- or ``extractor=None`` and the inputs are already features ``(N, D)`` (e.g. precomputed COCO reference
  features, as APDM does).

The features are then fed to torchmetrics' ``FrechetInceptionDistance`` / ``KernelInceptionDistance`` through a
pass-through module, so the statistics are exactly torchmetrics'. FID is badly biased and noisy on small sets
(< 50 images per side): it is computed, but flagged ``reliable: False`` and a warning is logged; prefer KID there.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
from torch import nn

from apdm.evaluation.metrics import MetricUnavailable, measure, nonfinite_count
from apdm.utils import LOG, optional_import

#: FID below this many images per set is flagged unreliable.
FID_MIN_RELIABLE = 50


class _PassThrough(nn.Module):
    """Hands precomputed features to torchmetrics unchanged (``num_features`` avoids its dummy forward)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = int(num_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def extract_features(images: torch.Tensor, extractor: Callable | None, batch_size: int = 64) -> torch.Tensor:
    """Features ``(N, D)`` float64 on CPU.

    Args:
        images: ``(N, 3, H, W)`` float ``[0, 1]`` when ``extractor`` is given; already features ``(N, D)`` when
            ``extractor`` is ``None``.
        extractor: module/callable ``(B, 3, H, W) -> (B, D)``, run under ``no_grad`` in batches; an
            ``nn.Module`` is put in eval mode for the call and its mode restored after.
        batch_size: images per forward pass.

    Raises:
        MetricUnavailable: images were given without an extractor (no offline default feature network), or the
            images (features) contain NaN/inf: an extractor that quantises (Inception) would turn them into
            finite features of nothing.
    """
    bad = nonfinite_count(images)
    if bad:
        raise MetricUnavailable(f"{bad} of {images.shape[0]} {'images' if extractor is not None else 'feature vectors'} "
                                "contain NaN/inf (e.g. the samples of a diverged personalization)")
    if extractor is None:
        if images.dim() != 2:
            raise MetricUnavailable(
                "no feature extractor given: torchmetrics' default Inception (feature=2048) downloads its weights "
                "via torch-fidelity, which is not possible offline; pass extractor= (e.g. the toy world's "
                "FeatureExtractor, or inception_extractor(path) with local weights) or precomputed (N, D) features")
        return images.detach().double().cpu()
    if images.dim() != 4:
        raise ValueError(f"expected images (N, 3, H, W) for the extractor, got shape {tuple(images.shape)}")
    was = extractor.training if isinstance(extractor, nn.Module) else None
    if was is not None:
        extractor.eval()
    dev = next(iter(extractor.parameters()), torch.empty(0)).device if isinstance(extractor, nn.Module) else None
    outs = []
    try:
        with torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                x = images[i:i + batch_size]
                if dev is not None:
                    x = x.to(dev)
                outs.append(extractor(x).flatten(1).double().cpu())
    finally:
        if was is not None:
            extractor.train(was)
    return torch.cat(outs) if outs else torch.empty(0, 0, dtype=torch.float64)


def fid(real: torch.Tensor, fake: torch.Tensor, extractor: Callable | None = None, batch_size: int = 64) -> float:
    """Fréchet distance between the Gaussian fits of two feature sets (torchmetrics ``FrechetInceptionDistance``).

    ``||mu_r - mu_f||^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))`` with unbiased (N-1) covariances.

    Args:
        real: reference images ``(N, 3, H, W)`` in ``[0, 1]`` (or features ``(N, D)`` when ``extractor=None``).
        fake: generated images (or features), same convention.
        extractor: feature network, see :func:`extract_features`.
        batch_size: images per forward pass.

    Returns:
        FID (float >= 0 up to numerical error; lower = more similar). Logs a warning below
        :data:`FID_MIN_RELIABLE` images per set.

    Raises:
        MetricUnavailable: no extractor for images, fewer than 2 items in a set, or NaN/inf features.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    fr = extract_features(real, extractor, batch_size)
    ff = extract_features(fake, extractor, batch_size)
    _check_sets(fr, ff, 2, "FID")
    if min(len(fr), len(ff)) < FID_MIN_RELIABLE:
        LOG.warning("FID on %d real / %d generated items is unreliable (< %d); prefer KID for small sets",
                    len(fr), len(ff), FID_MIN_RELIABLE)
    metric = FrechetInceptionDistance(feature=_PassThrough(fr.shape[1]), reset_real_features=True)
    metric.update(fr, real=True)
    metric.update(ff, real=False)
    return float(metric.compute())


def kid(real: torch.Tensor, fake: torch.Tensor, extractor: Callable | None = None, subsets: int = 100,
        subset_size: int = 1000, degree: int = 3, gamma: float | None = None, coef: float = 1.0, seed: int = 0,
        batch_size: int = 64) -> tuple[float, float]:
    """Kernel Inception Distance (torchmetrics ``KernelInceptionDistance``): unbiased MMD² with the polynomial
    kernel ``k(x, y) = (gamma x·y + coef)^degree`` (``gamma = 1/D`` by default), averaged over random subsets.

    ``subset_size`` is reduced to ``min(subset_size, N_real, N_fake)`` so small sets work; with
    ``subset_size == N_real == N_fake`` every subset is the whole set and the value is the plain unbiased MMD².
    Subsets are drawn from a private generator seeded with ``seed`` (the global RNG is not touched).

    Args:
        real, fake: images ``(N, 3, H, W)`` in ``[0, 1]`` (or features ``(N, D)`` when ``extractor=None``).
        extractor: feature network, see :func:`extract_features`.
        subsets: number of random subsets.
        subset_size: requested subset size (capped as above).
        degree, gamma, coef: polynomial kernel.
        seed: subset sampling seed.

    Returns:
        ``(mean, std)`` over subsets (lower = more similar; can be slightly negative: it is unbiased).

    Raises:
        MetricUnavailable: no extractor for images, fewer than 2 items in a set, or NaN/inf features.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    fr = extract_features(real, extractor, batch_size)
    ff = extract_features(fake, extractor, batch_size)
    _check_sets(fr, ff, 2, "KID")
    size = kid_subset_size(len(fr), len(ff), subset_size)
    with warnings.catch_warnings():  # "will save all extracted features in buffer": expected, features are small
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_PassThrough(fr.shape[1]), subsets=subsets, subset_size=size,
                                         degree=degree, gamma=gamma, coef=coef, reset_real_features=True)
    metric.update(fr, real=True)
    metric.update(ff, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def kid_subset_size(n_real: int, n_fake: int, requested: int = 1000) -> int:
    """The subset size KID actually uses: ``min(requested, n_real, n_fake)``."""
    return int(min(requested, n_real, n_fake))


def _check_sets(fr: torch.Tensor, ff: torch.Tensor, minimum: int, what: str) -> None:
    """Refuse feature sets ``(N, D)`` that FID/KID cannot measure: too few items, different ``D``, or NaN/inf in
    either (images that are NaN, as a diverged personalization samples, give NaN features; torchmetrics' statistics
    on them are NaN at best, and FID's matrix square root crashed the process in MKL)."""
    if fr.shape[0] < minimum or ff.shape[0] < minimum:
        raise MetricUnavailable(f"{what} needs at least {minimum} items per set, got {fr.shape[0]} real / "
                                f"{ff.shape[0]} generated")
    if fr.shape[1] != ff.shape[1]:
        raise ValueError(f"{what}: feature sizes differ ({fr.shape[1]} vs {ff.shape[1]})")
    for feats, side in ((fr, "real"), (ff, "generated")):
        bad = nonfinite_count(feats)
        if bad:
            raise MetricUnavailable(f"{what}: the features of {bad} of {feats.shape[0]} {side} items contain NaN/inf "
                                    f"(non-finite images, e.g. the samples of a diverged personalization)")


def inception_extractor(weights_path: str, feature: int = 2048) -> nn.Module:
    """torchmetrics' FID Inception-v3 (torch-fidelity port) with weights from a LOCAL file, as an extractor.

    The returned module maps ``(B, 3, H, W)`` float ``[0, 1]`` to ``(B, feature)`` (it quantises to uint8 and
    resizes to 299 internally, exactly as torchmetrics' default FID). Tag results ``fid@inception``.

    Args:
        weights_path: path of ``pt_inception-2015-12-05-6726825d.pth`` (torch-fidelity's FID Inception weights).
        feature: 64, 192, 768 or 2048.

    Raises:
        MissingDependency: torch-fidelity is not installed (it pulls torchvision).
        MetricUnavailable: the weights file cannot be loaded.
    """
    optional_import("torch_fidelity", "fid", "FID with Inception weights")
    from torchmetrics.image.fid import NoTrainInceptionV3

    try:
        net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(feature)],
                                 feature_extractor_weights_path=str(weights_path))
    except Exception as exc:
        raise MetricUnavailable(f"could not load Inception weights from {weights_path} "
                                f"({type(exc).__name__}: {exc})") from exc

    class _Inception(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = net
            self.num_features = feature

        def forward(self, x):
            return self.net((x.clamp(0, 1) * 255).round().to(torch.uint8)).reshape(x.shape[0], -1)

    return _Inception().eval()


def distribution_records(real: torch.Tensor, fake: torch.Tensor, extractor: Callable | None, impl: str,
                         kid_subsets: int = 100, kid_max_subset_size: int = 1000, seed: int = 0) -> list[dict]:
    """FID and KID records (``fid@impl``, ``kid@impl``) for one reference/generated pair of sets.

    The FID record carries ``reliable`` (>= :data:`FID_MIN_RELIABLE` items per set), ``n_real``; KID carries
    ``std``, ``subset_size`` and ``subsets``; ``std`` is ``None`` (with a ``note``) when both sets are no larger
    than the subset size, so that every subset is the whole set. ``n`` is the number of generated items.
    """
    n_real, n_fake = int(real.shape[0]), int(fake.shape[0])
    # features once, shared by both metrics
    try:
        fr = extract_features(real, extractor)
        ff = extract_features(fake, extractor)
    except MetricUnavailable as exc:
        return [measure("fid", impl, False, _raise, exc, n=n_fake),
                measure("kid", impl, False, _raise, exc, n=n_fake)]
    reliable = min(n_real, n_fake) >= FID_MIN_RELIABLE
    size = kid_subset_size(n_real, n_fake, kid_max_subset_size)
    kid_rec = measure("kid", impl, False, kid, fr, ff, subsets=kid_subsets, subset_size=kid_max_subset_size,
                      seed=seed, n=n_fake, extra={"n_real": n_real, "subsets": kid_subsets, "subset_size": size})
    if size == n_real == n_fake and kid_rec.get("available", True):
        # every subset is the whole set: the spread over subsets is float noise (~1e-16), not a precision
        kid_rec["std"] = None
        kid_rec["note"] = (f"every subset is the whole set ({size} images): the value is the plain unbiased MMD², "
                           "with no spread over subsets to report")
    return [
        measure("fid", impl, False, fid, fr, ff, n=n_fake,
                extra={"n_real": n_real, "reliable": reliable,
                       **({} if reliable else {"note": f"fewer than {FID_MIN_RELIABLE} images: FID is biased and "
                                                       "noisy, prefer KID"})}),
        kid_rec,
    ]


def _raise(exc: Exception):
    raise exc
