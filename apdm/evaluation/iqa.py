"""No-reference image quality: BRISQUE, CLIP-IQA, LIQE.

All functions take images ``(N, 3, H, W)`` float32 in ``[0, 1]`` and return ``(N,)`` float32 on CPU.

**BRISQUE** (Mittal et al., 2012; higher = worse quality = stronger protection). Two implementations:

- ``brisque@apdm`` (:func:`brisque`): our own numpy feature extraction - MSCN coefficients with a 7x7 Gaussian
  (σ = 7/6), asymmetric generalised Gaussian (AGGD) moment-matching fits of the MSCN map and its four pairwise
  products, 18 features per scale at full and half (bicubic) resolution = 36 features - followed by the
  pretrained ε-SVR (RBF) and min/max scaling shipped inside the ``brisque`` pip package (read from its files,
  the package is not imported). The feature conventions follow the pip package (zero-padded local filtering,
  C = 1/255 on [0, 1] gray, AGGD fit for the MSCN map), so both agree closely but not exactly: within 0.0025
  BRISQUE on three 64x64 noise images, 0.077 on a 128x96 colour ramp, where MSCN values of ~1e-16 land on either
  side of the AGGD fit's left/right split in the two float orders (``python docs/results/checks/brisque_gradient.py``).
- ``brisque@pip-brisque`` (:func:`brisque_pip`): the ``brisque`` package itself (``BRISQUE(url=False).score``),
  the implementation Anti-DreamBooth and APDM report, with its numpy-2 crash in ``scale_features`` patched on
  the instance.

Both quantise to uint8 first, as images read from disk are.

**CLIP-IQA** (Wang et al., 2023; higher = better quality): :func:`clip_iqa` computes the antonym-prompt score
with any transformers ``CLIPModel`` loaded from a local path: ``softmax(100 * [cos(img, "Good photo."),
cos(img, "Bad photo.")])[0]`` (the torchmetrics/piq formulation; tag e.g. ``clip_iqa@clip-vit-b32``).
:func:`clipiqa_pyiqa` and :func:`liqe_pyiqa` wrap pyiqa (extra ``iqa``, pulls torchvision, downloads weights):
they raise :class:`MetricUnavailable` with the reason when pyiqa or its weights are missing.
"""

from __future__ import annotations

import importlib.util
import math
import pickle
from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from apdm.evaluation.metrics import MetricUnavailable, check_images, summarize, to_uint8, unavailable
from apdm.utils import optional_import

# ---------------------------------------------------------------------------------------- BRISQUE
#: rgb2gray weights (ITU-R BT.709 luma, as scikit-image's ``rgb2gray``, which the brisque package uses).
GRAY_WEIGHTS = (0.2125, 0.7154, 0.0721)
_MSCN_C = 1.0 / 255.0

_CACHE: dict = {}  # loaded scorers (pip-brisque instance, pyiqa metrics)


def _gaussian_1d(kernel_size: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    x = np.arange(kernel_size, dtype=np.float64) - kernel_size // 2
    k = np.exp(-x ** 2 / (2 * sigma ** 2))
    return k / k.sum()


def mscn(gray: np.ndarray, kernel_size: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    """Mean-subtracted contrast-normalised coefficients ``(I - mu) / (sd + 1/255)`` of a gray image in ``[0, 1]``.

    ``mu`` and ``sd`` are local Gaussian-weighted mean and standard deviation (zero padding at the borders,
    ``sd = sqrt(|E[I²] - mu²|)``).

    Args:
        gray: ``(H, W)`` float64 in ``[0, 1]``.

    Returns:
        ``(H, W)`` float64.
    """
    from scipy.ndimage import correlate1d

    k = _gaussian_1d(kernel_size, sigma)

    def blur(a):
        return correlate1d(correlate1d(a, k, axis=0, mode="constant", cval=0.0), k, axis=1, mode="constant",
                           cval=0.0)

    mu = blur(gray)
    sd = np.sqrt(np.abs(blur(gray * gray) - mu * mu))
    return (gray - mu) / (sd + _MSCN_C)


def _rho(alpha):
    from scipy.special import gamma

    return gamma(2 / alpha) ** 2 / (gamma(1 / alpha) * gamma(3 / alpha))


def aggd_fit(x: np.ndarray) -> tuple[float, float, float, float]:
    """Moment-matching fit of an asymmetric generalised Gaussian (Lasmar et al., 2009).

    Args:
        x: samples (any shape).

    Returns:
        ``(alpha, mean, sigma_left, sigma_right)``: shape, mean ``(βr - βl) Γ(2/α)/Γ(1/α)``, and the left/right
        scale parameters ``sqrt(E[x² | x < 0])``, ``sqrt(E[x² | x >= 0])``. NaNs when the data are degenerate
        (all values on one side of 0, or all zero).
    """
    from scipy.optimize import brentq
    from scipy.special import gamma

    x = np.asarray(x, dtype=np.float64).ravel()
    left, right = x[x < 0], x[x >= 0]
    if left.size == 0 or right.size == 0 or not np.any(x):
        return (math.nan,) * 4
    sl, sr = math.sqrt(np.mean(left ** 2)), math.sqrt(np.mean(right ** 2))
    if sr == 0:
        return (math.nan,) * 4
    g = sl / sr
    r_hat = np.mean(np.abs(x)) ** 2 / np.mean(x ** 2)
    big_r = r_hat * (g ** 3 + 1) * (g + 1) / (g ** 2 + 1) ** 2
    lo, hi = 0.03, 30.0  # rho is increasing in alpha: rho(0.03) ~ 1e-12, rho(30) ~ 0.74
    f_lo, f_hi = _rho(lo) - big_r, _rho(hi) - big_r
    if f_lo >= 0:
        alpha = lo
    elif f_hi <= 0:
        alpha = hi
    else:
        alpha = brentq(lambda a: _rho(a) - big_r, lo, hi, xtol=1e-14, rtol=1e-13, maxiter=200)
    mean = (sr - sl) * math.sqrt(gamma(1 / alpha) / gamma(3 / alpha)) * gamma(2 / alpha) / gamma(1 / alpha)
    return float(alpha), float(mean), sl, sr


def _scale_features(gray: np.ndarray) -> list[float]:
    m = mscn(gray)
    a, _, sl, sr = aggd_fit(m)
    feats = [a, (sl ** 2 + sr ** 2) / 2]
    pairs = (m[:, :-1] * m[:, 1:],            # horizontal neighbour
             m[:-1, :] * m[1:, :],            # vertical
             m[:-1, :-1] * m[1:, 1:],         # main diagonal
             m[1:, :-1] * m[:-1, 1:])         # secondary diagonal
    for p in pairs:
        a, mean, sl, sr = aggd_fit(p)
        feats += [a, mean, sl ** 2, sr ** 2]
    return feats


def brisque_features(images: torch.Tensor, quantize: bool = True) -> torch.Tensor:
    """The 36 BRISQUE features per image (18 at full resolution, 18 at half resolution).

    Per scale: MSCN ``[alpha, sigma²]``, then for the horizontal, vertical, main- and secondary-diagonal products
    ``[alpha, mean, sigma_left², sigma_right²]``. The half-resolution gray image is a bicubic (a = -0.75,
    no antialiasing) x0.5 resize, identical to OpenCV's ``INTER_CUBIC`` (including its output size).

    Args:
        images: ``(N, 3, H, W)`` float ``[0, 1]``.
        quantize: round to uint8 levels first (as images read from files; matches the pip package's input).

    Returns:
        ``(N, 36)`` float64; NaN rows for flat images, where BRISQUE is undefined.
    """
    check_images(images)
    x = images.detach().double().cpu().clamp(0, 1)
    if quantize:
        x = (x * 255).round() / 255
    w = torch.tensor(GRAY_WEIGHTS, dtype=torch.float64).view(1, 3, 1, 1)
    gray = (x * w).sum(dim=1, keepdim=True)  # (N, 1, H, W)
    # OpenCV's output size is round-half-even(side / 2); torch floors. Replicate-padding one row/column where
    # they differ reproduces OpenCV exactly (both clamp out-of-range taps to the border pixel).
    h, w = gray.shape[-2:]
    ph, pw = int(round(h / 2) > h // 2), int(round(w / 2) > w // 2)
    g = F.pad(gray, (0, pw, 0, ph), mode="replicate") if ph or pw else gray
    half = F.interpolate(g, scale_factor=0.5, mode="bicubic", align_corners=False)
    out = [_scale_features(g[0].numpy()) + _scale_features(h[0].numpy()) for g, h in zip(gray, half)]
    return torch.tensor(out, dtype=torch.float64).reshape(len(out), 36)


def _brisque_model_dir() -> Path:
    spec = importlib.util.find_spec("brisque")
    if spec is None or not spec.submodule_search_locations:
        raise MetricUnavailable("BRISQUE needs the pretrained SVM shipped in the 'brisque' package: "
                                "pip install 'apdm[metrics]'")
    d = Path(list(spec.submodule_search_locations)[0]) / "models"
    if not (d / "svm.txt").is_file() or not (d / "normalize.pickle").is_file():
        raise MetricUnavailable(f"the 'brisque' package has no models/svm.txt + normalize.pickle under {d}")
    return d


class _NoGlobals(pickle.Unpickler):
    """Loads plain containers (dict/list/float) only; any class or function reference is refused."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a BRISQUE parameter file")


@lru_cache(maxsize=4)
def load_brisque_model(model_dir: str | None = None) -> dict:
    """Parse the BRISQUE ε-SVR (libsvm text format) and the feature min/max scaling.

    Args:
        model_dir: folder holding ``svm.txt`` and ``normalize.pickle``; ``None`` = the installed ``brisque``
            package's ``models/`` (the pickle is read with an unpickler that refuses all classes).

    Returns:
        dict with ``sv`` (S, 36), ``coef`` (S,), ``rho``, ``gamma``, ``min`` (36,), ``max`` (36,), all numpy.
    """
    d = Path(model_dir) if model_dir is not None else _brisque_model_dir()
    header, svs, coefs = {}, [], []
    with open(d / "svm.txt", encoding="utf-8") as f:
        lines = iter(f.read().splitlines())
        for line in lines:
            if line.strip() == "SV":
                break
            key, *vals = line.split()
            header[key] = vals
        for line in lines:
            if not line.strip():
                continue
            coef, *pairs = line.split()
            v = np.zeros(36)
            for p in pairs:
                i, val = p.split(":")
                v[int(i) - 1] = float(val)
            coefs.append(float(coef))
            svs.append(v)
    if header.get("svm_type", [""])[0] != "epsilon_svr" or header.get("kernel_type", [""])[0] != "rbf":
        raise MetricUnavailable(f"unexpected BRISQUE SVM in {d}: {header.get('svm_type')} "
                                f"{header.get('kernel_type')} (expected epsilon_svr rbf)")
    with open(d / "normalize.pickle", "rb") as f:
        norm = _NoGlobals(f).load()
    return {"sv": np.stack(svs), "coef": np.asarray(coefs), "rho": float(header["rho"][0]),
            "gamma": float(header["gamma"][0]), "min": np.asarray(norm["min_"], dtype=np.float64),
            "max": np.asarray(norm["max_"], dtype=np.float64)}


def brisque_from_features(features: torch.Tensor, model: dict | None = None) -> torch.Tensor:
    """SVR prediction from BRISQUE features: scale each feature to ``[-1, 1]`` with the model's min/max, then
    ``sum_i coef_i exp(-gamma ||x - sv_i||²) - rho``.

    Args:
        features: ``(N, 36)``.
        model: :func:`load_brisque_model` output; ``None`` loads the installed package's model.

    Returns:
        ``(N,)`` float32 (typically 0-100, can fall outside; NaN where the features are NaN).
    """
    model = model or load_brisque_model()
    f = features.detach().double().cpu().numpy()
    x = -1 + 2.0 * (f - model["min"]) / (model["max"] - model["min"])
    d2 = ((x[:, None, :] - model["sv"][None]) ** 2).sum(-1)
    pred = np.exp(-model["gamma"] * d2) @ model["coef"] - model["rho"]
    return torch.from_numpy(pred).float()


def brisque(images: torch.Tensor, model_dir: str | None = None) -> torch.Tensor:
    """BRISQUE score per image, our implementation (tag ``brisque@apdm``). Higher = worse quality.

    Args:
        images: ``(N, 3, H, W)`` float ``[0, 1]``, at least 16 px per side.
        model_dir: SVM folder; ``None`` = the installed ``brisque`` package's (extra ``metrics``).

    Returns:
        ``(N,)`` float32; NaN for flat images.

    Raises:
        MetricUnavailable: no SVM model available (``brisque`` package not installed and no ``model_dir``).
    """
    check_images(images)
    if min(images.shape[-2:]) < 16:
        raise MetricUnavailable(f"BRISQUE needs images of at least 16 px, got {tuple(images.shape[-2:])}")
    model = load_brisque_model(model_dir)
    return brisque_from_features(brisque_features(images), model)


def brisque_pip(images: torch.Tensor) -> torch.Tensor:
    """BRISQUE score per image from the ``brisque`` pip package (tag ``brisque@pip-brisque``).

    Images are passed as uint8 ``(H, W, 3)`` arrays, as the field does with files read from disk. The package's
    ``scale_features`` crashes under numpy 2 (it calls ``float`` on 1-element arrays); this wrapper patches that
    method on its own instance only, converting each feature to a scalar first.

    Returns:
        ``(N,)`` float32.

    Raises:
        MissingDependency: the package (or OpenCV, which it imports) is missing.
    """
    check_images(images)
    mod = optional_import("brisque", "metrics", "pip-brisque scores")
    if "pip_brisque" not in _CACHE:
        scorer = mod.BRISQUE(url=False)
        original = scorer.scale_features
        scorer.scale_features = lambda feats: original([float(np.ravel(v)[0]) for v in feats])
        _CACHE["pip_brisque"] = scorer
    scorer = _CACHE["pip_brisque"]
    return torch.tensor([float(scorer.score(img)) for img in to_uint8(images)], dtype=torch.float32)


def brisque_record(images: torch.Tensor, impl: str = "apdm") -> dict:
    """BRISQUE record (``brisque@apdm`` or ``brisque@pip-brisque``), averaged over images where it is defined.

    Extra fields: ``n_undefined`` (flat images), ``std``.
    """
    fn = {"apdm": brisque, "pip-brisque": brisque_pip}[impl]
    try:
        v = fn(images)
    except (MetricUnavailable, ImportError) as exc:
        return unavailable("brisque", impl, str(exc), False)
    ok = torch.isfinite(v)
    if not bool(ok.any()):
        return unavailable("brisque", impl, f"BRISQUE is undefined on all {v.numel()} images (flat images)", False,
                           0, n_undefined=int(v.numel()))
    return summarize("brisque", impl, v[ok], False, n_undefined=int((~ok).sum()))


# -------------------------------------------------------------------------------------- CLIP-IQA
def clip_iqa(model, tokenizer, images: torch.Tensor, prompts: Sequence[str] = ("Good photo.", "Bad photo."),
             logit_scale: float = 100.0, size: int | None = None, batch_size: int = 32) -> torch.Tensor:
    """CLIP-IQA with antonym prompts on a transformers ``CLIPModel`` (loaded from a local path).

    ``p = softmax(logit_scale * [cos(img, prompts[0]), cos(img, prompts[1])])[0]`` per image, with CLIP
    preprocessing (shorter side to the model's image size, bicubic; center crop; CLIP mean/std).

    Args:
        model, tokenizer: ``CLIPModel`` and ``CLIPTokenizer`` (see ``identity.load_clip``).
        images: ``(N, 3, H, W)`` float ``[0, 1]``.
        prompts: (positive, negative) prompt pair.
        logit_scale: fixed temperature (100, as CLIP-IQA; not the model's learned scale).

    Returns:
        ``(N,)`` float32 in ``[0, 1]``; higher = better quality.
    """
    from apdm.evaluation.identity import clip_image_embeddings, clip_text_embeddings

    if len(prompts) != 2:
        raise ValueError(f"clip_iqa needs a (positive, negative) prompt pair, got {len(prompts)} prompts")
    img = F.normalize(clip_image_embeddings(model, images, size=size, batch_size=batch_size).double(), dim=1)
    txt = F.normalize(clip_text_embeddings(model, tokenizer, list(prompts)).double(), dim=1)
    return torch.softmax(logit_scale * img @ txt.T, dim=1)[:, 0].float()


# ----------------------------------------------------------------------------------------- pyiqa
def _pyiqa(images: torch.Tensor, metric: str, device: str = "cpu") -> torch.Tensor:
    check_images(images)
    pyiqa = optional_import("pyiqa", "iqa", f"pyiqa's {metric}")
    key = ("pyiqa", metric, device)
    if key not in _CACHE:
        try:
            _CACHE[key] = pyiqa.create_metric(metric, device=device, as_loss=False)
        except Exception as exc:  # URLError / connection errors: weights are downloaded on first use
            raise MetricUnavailable(f"pyiqa could not build '{metric}' (its weights are downloaded on first use; "
                                    f"{type(exc).__name__}: {exc})") from exc
    with torch.no_grad():
        out = _CACHE[key](images.detach().float().clamp(0, 1).to(device))
    return torch.as_tensor(out).flatten().float().cpu()


def clipiqa_pyiqa(images: torch.Tensor, device: str = "cpu") -> torch.Tensor:
    """pyiqa ``clipiqa`` (tag ``clip_iqa@pyiqa``); higher = better quality. Needs extra ``iqa`` + weights."""
    return _pyiqa(images, "clipiqa", device)


def liqe_pyiqa(images: torch.Tensor, variant: str = "liqe_mix", device: str = "cpu") -> torch.Tensor:
    """pyiqa LIQE (tag ``liqe@pyiqa-liqe_mix``; ``liqe`` is a KonIQ-retrained model with different numbers).

    Returns:
        ``(N,)`` float32 in ``[1, 5]``; higher = better quality. Needs extra ``iqa`` + weights.
    """
    if variant not in ("liqe_mix", "liqe"):
        raise ValueError(f"LIQE variant must be 'liqe_mix' or 'liqe', got '{variant}'")
    return _pyiqa(images, variant, device)
