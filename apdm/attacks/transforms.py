"""Model-free robustness transforms ("purification" attacks an image owner's protection must survive).

Every transform maps images ``(N, 3, H, W)`` float32 in ``[0, 1]`` to a tensor of the same shape, dtype and
device, in ``[0, 1]``. The robustness suite of the field: JPEG q = 75/50/25, Gaussian blur k = 7, resize x1/4 and
back, center crop and back, horizontal flip, Gaussian noise.

:data:`TRANSFORMS` maps suite names to ready callables; :func:`parse_attack` turns a user string such as
``"jpeg:quality=60"`` or ``"blur:kernel_size=5,sigma=2"`` into a callable. Purifiers that need the diffusion model
(:data:`MODEL_ATTACKS`: DiffPure, GrIDPure, IMPRESS, Noisy Upscaling, each in its own module) are not in this dict:
:func:`parse_model_attack` resolves them to ``(function, kwargs)`` and the caller passes the model;
:func:`check_attack` validates either kind of spec before a long run starts.
"""

from __future__ import annotations

import functools
import inspect
import io
import math
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F

from apdm.utils import parse_bool


def _check(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"expected images (N, 3, H, W) float in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"expected a float image tensor in [0, 1], got dtype {images.dtype}")


def identity(images: torch.Tensor) -> torch.Tensor:
    """No attack (the ``"none"`` entry): returns a clamped copy."""
    _check(images)
    return images.clamp(0, 1).clone()


def jpeg(images: torch.Tensor, quality: int = 75) -> torch.Tensor:
    """JPEG compression round trip through PIL (per image, 4:2:0 chroma subsampling as PIL's default).

    Args:
        images: ``(N, 3, H, W)`` float ``[0, 1]``; quantised to uint8 before encoding.
        quality: JPEG quality 1-100 (lower = stronger).

    Returns:
        ``(N, 3, H, W)`` same dtype/device, values on the 1/255 grid in ``[0, 1]``.
    """
    import numpy as np
    from PIL import Image

    _check(images)
    quality = int(quality)
    if not 1 <= quality <= 100:
        raise ValueError(f"jpeg quality must be in 1..100, got {quality}")
    if len(images) == 0:  # an empty batch stays one, as with every other transform
        return images.detach().clone()
    arr = images.detach().float().cpu().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="JPEG", quality=quality)
        buf.seek(0)
        with Image.open(buf) as im:
            out.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()))
    x = torch.stack(out).permute(0, 3, 1, 2).float().div_(255.0)
    return x.to(device=images.device, dtype=images.dtype)


def default_sigma(kernel_size: int) -> float:
    """torchvision's (and OpenCV's ``getGaussianKernel``) default Gaussian σ for a kernel size:
    ``0.3 * ((k - 1) * 0.5 - 1) + 0.8`` (1.4 for k = 7).

    Note that OpenCV's ``GaussianBlur(sigma=0)`` with k <= 7 uses a fixed table instead of this formula, so it
    differs from ``gaussian_blur(k=7)`` by ~1e-3; with ``sigma=1.4`` given explicitly they agree.
    """
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def gaussian_blur(images: torch.Tensor, kernel_size: int = 7, sigma: float | None = None) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding (pure torch).

    Args:
        images: ``(N, 3, H, W)`` float ``[0, 1]``.
        kernel_size: odd positive window size.
        sigma: standard deviation in pixels; ``None`` = :func:`default_sigma` (OpenCV/torchvision convention).

    Returns:
        Same shape/dtype/device; a constant image stays the same constant.
    """
    _check(images)
    kernel_size = int(kernel_size)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"blur kernel_size must be a positive odd integer, got {kernel_size}")
    sigma = default_sigma(kernel_size) if sigma is None else float(sigma)
    if sigma <= 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    if kernel_size == 1:
        return images.clamp(0, 1).clone()
    half = kernel_size // 2
    x = torch.arange(kernel_size, dtype=torch.float64) - half
    k = torch.exp(-0.5 * (x / sigma) ** 2)  # (x/σ)², not x²/σ²: a tiny σ gives a delta, not 0/0
    k = (k / k.sum()).to(images.dtype).to(images.device)
    n, c, h, w = images.shape
    # reflect padding needs pad < size; fall back to replicate on tiny images
    mode = "reflect" if half < min(h, w) else "replicate"
    y = F.pad(images.reshape(n * c, 1, h, w), (half, half, half, half), mode=mode)
    y = F.conv2d(y, k.view(1, 1, 1, -1))
    y = F.conv2d(y, k.view(1, 1, -1, 1))
    return y.reshape(n, c, h, w).clamp(0, 1)


def resize_down_up(images: torch.Tensor, factor: float = 0.25) -> torch.Tensor:
    """Downscale by ``factor`` (bicubic, antialiased) and back up to the original size (bicubic).

    Args:
        images: ``(N, 3, H, W)`` float ``[0, 1]``.
        factor: scale in ``(0, 1]`` (0.25 = the field's x1/4).

    Returns:
        Same shape/dtype/device, clamped to ``[0, 1]``.
    """
    _check(images)
    factor = float(factor)
    if not 0 < factor <= 1:
        raise ValueError(f"resize factor must be in (0, 1], got {factor}")
    h, w = images.shape[-2:]
    small = (max(1, round(h * factor)), max(1, round(w * factor)))
    x = F.interpolate(images, size=small, mode="bicubic", align_corners=False, antialias=True)
    x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False)
    return x.clamp(0, 1)


def center_crop(images: torch.Tensor, fraction: float = 0.8) -> torch.Tensor:
    """Keep the central ``fraction`` of each side, then resize back to the original size (bicubic).

    Args:
        images: ``(N, 3, H, W)`` float ``[0, 1]``.
        fraction: kept fraction of height and width, in ``(0, 1]``.

    Returns:
        Same shape/dtype/device, clamped to ``[0, 1]``.
    """
    _check(images)
    fraction = float(fraction)
    if not 0 < fraction <= 1:
        raise ValueError(f"crop fraction must be in (0, 1], got {fraction}")
    h, w = images.shape[-2:]
    ch, cw = max(1, round(h * fraction)), max(1, round(w * fraction))
    top, left = (h - ch) // 2, (w - cw) // 2
    x = images[..., top:top + ch, left:left + cw]
    if (ch, cw) == (h, w):
        return x.clamp(0, 1).clone()
    return F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False).clamp(0, 1)


def hflip(images: torch.Tensor) -> torch.Tensor:
    """Horizontal flip (mirror left-right)."""
    _check(images)
    return images.flip(-1).clamp(0, 1)


def gaussian_noise(images: torch.Tensor, std: float = 0.05, generator: torch.Generator | None = None,
                   seed: int | None = None) -> torch.Tensor:
    """Add i.i.d. Gaussian noise of standard deviation ``std`` (on the ``[0, 1]`` scale) and clip.

    Args:
        images: ``(N, 3, H, W)`` float ``[0, 1]``.
        std: noise standard deviation (0.05 and 0.1 are the field's "Gaussian noising" settings).
        generator: torch generator on the images' device (takes precedence over ``seed``).
        seed: when no generator is given, draw from a fresh generator seeded with it (reproducible);
            ``None`` uses the global RNG.

    Returns:
        Same shape/dtype/device, clipped to ``[0, 1]``.
    """
    _check(images)
    std = float(std)
    if std < 0:
        raise ValueError(f"noise std must be >= 0, got {std}")
    if generator is None and seed is not None:
        generator = torch.Generator(device=images.device).manual_seed(int(seed))
    noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    return (images + std * noise).clamp(0, 1)


#: Base transforms by name, with their parameters (used by :func:`parse_attack`).
BASE = {
    "none": identity,
    "jpeg": jpeg,
    "blur": gaussian_blur,
    "resize": resize_down_up,
    "crop": center_crop,
    "flip": hflip,
    "noise": gaussian_noise,
}

#: The robustness suite: name -> callable ``images -> images``.
TRANSFORMS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "none": identity,
    "jpeg75": functools.partial(jpeg, quality=75),
    "jpeg50": functools.partial(jpeg, quality=50),
    "jpeg25": functools.partial(jpeg, quality=25),
    "blur": functools.partial(gaussian_blur, kernel_size=7),
    "resize": functools.partial(resize_down_up, factor=0.25),
    "crop": functools.partial(center_crop, fraction=0.8),
    "flip": hflip,
    "noise": functools.partial(gaussian_noise, std=0.05, seed=0),
}

#: Attacks that need the diffusion model: name -> module (the function has the module's last name). Resolved by
#: :func:`parse_model_attack`, never by :func:`parse_attack`.
MODEL_ATTACKS = {
    "diffpure": "apdm.attacks.diffpure",   # SDEdit/DiffPure regeneration at one noise level
    "gridpure": "apdm.attacks.gridpure",   # small DiffPure steps on a patch grid, iterated (GrIDPure)
    "impress": "apdm.attacks.impress",     # make the image consistent with the VAE (IMPRESS)
    "noisy_upscale": "apdm.attacks.noisy_upscale",  # Gaussian noise, then a x4 diffusion upscaler (Hönig et al.)
}
#: parameters of model attacks the caller supplies
_MODEL_NOT_PARAMS = {"images", "sd", "seed", "quiet"}

_NOT_PARAMS = {"images", "generator"}


def _convert(name: str, key: str, value: str, default):
    """Parse ``value`` to the type of the parameter's default (int, float, or int/None for ``seed``)."""
    try:
        if isinstance(default, str):
            return value
        if isinstance(default, bool):
            return parse_bool(value)
        if isinstance(default, int) or (default is None and key in ("seed", "kernel_size", "quality")):
            f = float(value)
            if not f.is_integer():
                raise ValueError
            return int(f)
        f = float(value)
        if not math.isfinite(f):
            raise ValueError
        return f
    except ValueError:
        kind = ("true or false" if isinstance(default, bool) else
                "an integer" if isinstance(default, int) or key == "seed" else "a number")
        raise ValueError(f"attack '{name}': parameter {key}={value!r} is not {kind}") from None


def parse_attack(spec: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A transform from a user string.

    Accepted forms: a :data:`TRANSFORMS` name (``"jpeg50"``, ``"blur"``, ``"none"``), or ``base:key=value,...``
    with a :data:`BASE` name and that function's parameters, e.g. ``"jpeg:quality=60"``,
    ``"blur:kernel_size=5,sigma=1.5"``, ``"resize:factor=0.5"``, ``"crop:fraction=0.7"``,
    ``"noise:std=0.1,seed=3"``. ``"jpeg"`` alone uses the function defaults.

    Returns:
        a callable ``images -> images`` with attributes ``spec`` (the input, stripped) and ``name``.

    Raises:
        ValueError: unknown name or parameter, malformed ``key=value``, value of the wrong type or out of range
            (values are checked by calling the transform on a tiny image).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"attack spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    name, _, params = spec.partition(":")
    name = name.strip().lower()
    if name in MODEL_ATTACKS:
        raise ValueError(f"attack '{name}' needs the diffusion model: it is provided by apdm.attacks.{name} and "
                         f"resolved by parse_model_attack, not by parse_attack")
    if not params.strip() and name in TRANSFORMS and ":" not in spec:
        fn = TRANSFORMS[name]
    else:
        if name in TRANSFORMS and name not in BASE:
            base_name = next(b for b in BASE if name.startswith(b))
            raise ValueError(f"attack '{name}' is a preset and takes no parameters; use the base form, e.g. "
                             f"'{base_name}:{params.strip() or 'key=value'}'")
        if name not in BASE:
            raise ValueError(f"unknown attack '{name}'. Known: {', '.join(sorted(set(TRANSFORMS) | set(BASE)))} "
                             f"(parameterised form: one of {', '.join(BASE)} followed by ':key=value,...'), and "
                             f"model attacks {', '.join(MODEL_ATTACKS)} (name:key=value,...)")
        base = BASE[name]
        sig = inspect.signature(base)
        allowed = {k: p.default for k, p in sig.parameters.items() if k not in _NOT_PARAMS}
        kwargs = _parse_params(spec, name, params, allowed)
        fn = functools.partial(base, **kwargs) if kwargs else base
        try:  # validate values now rather than in the middle of an evaluation run
            fn(torch.full((1, 3, 8, 8), 0.5))
        except ValueError as exc:
            raise ValueError(f"attack '{spec}': {exc}") from None
    out = functools.partial(fn)
    out.spec = spec
    out.name = name
    return out


_KEY = re.compile(r"\s*[A-Za-z_]\w*\s*=")


def _split_params(params: str, text: set) -> list[str]:
    """``key=value,...`` split at its commas, except that a piece which does not start with ``key=`` continues the
    value of the text parameter (one of ``text``) before it: ``prompt=a photo of a person, smiling`` is one item. A
    comma followed by ``word=`` always starts a new parameter, and a number's stray piece stays an error."""
    items: list[str] = []
    for piece in params.split(","):
        if items and piece.strip() and not _KEY.match(piece) and items[-1].partition("=")[0].strip() in text:
            items[-1] += "," + piece
        else:
            items.append(piece)
    return items


def _parse_params(spec: str, name: str, params: str, allowed: dict) -> dict:
    """``key=value,...`` -> kwargs typed like the defaults in ``allowed`` (parameter -> default); a text
    parameter's value may hold commas (see :func:`_split_params`)."""
    kwargs = {}
    text = {k for k, v in allowed.items() if isinstance(v, str)}
    for item in filter(None, (s.strip() for s in _split_params(params, text))):
        key, eq, value = item.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key or not value:
            raise ValueError(f"attack '{spec}': expected key=value, got {item!r}")
        if key not in allowed:
            opts = ", ".join(allowed) or "none"
            raise ValueError(f"attack '{name}' has no parameter '{key}' (parameters: {opts})")
        if key in kwargs:
            raise ValueError(f"attack '{spec}': parameter '{key}' given twice")
        kwargs[key] = _convert(name, key, value, allowed[key])
    return kwargs


def parse_model_attack(spec: str) -> tuple[Callable, dict]:
    """A model attack from a user string: ``(function, kwargs)``; call ``function(images, sd, seed=..., **kwargs)``.

    Forms: ``"diffpure"``, ``"diffpure:strength=0.1"``, ``"gridpure:rounds=10,gamma=0.2"``,
    ``"impress:steps=500,radius=0.0627"``. Parameters are the function's keyword arguments except ``images``,
    ``sd``, ``seed`` and ``quiet``, typed like their defaults (a ``k/255`` value is accepted for a float). A text
    value may hold commas (``gridpure:prompt=a photo of a person, smiling,rounds=2``) but no ``, word=``.

    Raises:
        ValueError: not a model attack, unknown or malformed parameter, value of the wrong type.
    """
    import importlib

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"attack spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    name, _, params = spec.partition(":")
    name = name.strip().lower()
    if name not in MODEL_ATTACKS:
        raise ValueError(f"'{name}' is not a model attack (model attacks: {', '.join(MODEL_ATTACKS)})")
    fn = getattr(importlib.import_module(MODEL_ATTACKS[name]), name)
    allowed = {k: p.default for k, p in inspect.signature(fn).parameters.items() if k not in _MODEL_NOT_PARAMS}
    params = _fractions(params, {k for k, v in allowed.items() if isinstance(v, float)},
                        {k for k, v in allowed.items() if isinstance(v, str)})
    return fn, _parse_params(spec, name, params, allowed)


def _fractions(params: str, floats: set, text: set = frozenset()) -> str:
    """Rewrite ``key=a/b`` values of the float parameters ``floats`` as decimals (so ``radius=16/255`` reads as a
    budget is written everywhere; a path such as ``upscaler=models/x4`` is left alone). Items are split as
    :func:`_parse_params` splits them (``text``: the text parameters, whose values may hold commas)."""
    out = []
    for item in _split_params(params, text):
        key, eq, value = item.partition("=")
        num, slash, den = value.strip().partition("/")
        if eq and slash and key.strip() in floats:
            try:
                value = repr(float(num) / float(den))
            except (ValueError, ZeroDivisionError):
                pass
        out.append(f"{key}{eq}{value}")
    return ",".join(out)


def check_attack(spec: str, loadable: bool = False) -> str:
    """Validate an attack spec (model-free or model attack) without running it; returns the stripped spec.

    ``loadable=True`` also refuses a spec whose extra model cannot be loaded here (a model attack module's
    ``check_loadable``: Noisy Upscaling's hub upscaler that is not in the Hugging Face cache while
    ``HF_HUB_OFFLINE`` is set). A run checks that; a recipe's spec is valid without it.

    Raises:
        ValueError: as :func:`parse_attack` / :func:`parse_model_attack`, or a value the attack refuses.
        apdm.utils.MissingDependency: the spec needs an optional package that is not installed
            (``impress:tie=lpips`` without the ``lpips`` extra).
    """
    import importlib

    from apdm.utils import MissingDependency

    name = spec.strip().partition(":")[0].strip().lower() if isinstance(spec, str) else ""
    if name in MODEL_ATTACKS:
        fn, kwargs = parse_model_attack(spec)
        check = getattr(importlib.import_module(MODEL_ATTACKS[name]), "check_loadable", None) if loadable else None
        try:  # every model attack checks its values (and optional packages) first and returns at once on zero
            fn(torch.zeros(0, 3, 8, 8), None, **kwargs)  # images, before any model loads
            if check is not None:
                check(**kwargs)
        except ValueError as exc:
            raise ValueError(f"attack '{spec.strip()}': {exc}") from None
        except MissingDependency as exc:
            raise MissingDependency(f"attack '{spec.strip()}': {exc}") from exc
    else:
        parse_attack(spec)
    return spec.strip()
