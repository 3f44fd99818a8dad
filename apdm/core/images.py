"""Robust image input/output: listing, loading any photo, model-resolution mapping, safe saving, grids.

Tensors follow the house convention: float32, channels first, values in ``[0, 1]``; one image is ``(3, H, W)``,
a batch ``(N, 3, H, W)``. No torchvision.

Loading (:func:`load_image`). The EXIF orientation is applied first (``PIL.ImageOps.exif_transpose``), so ``H, W``
are the upright size. Colour modes: RGB as is; L / 1 / P / YCbCr are converted to RGB (grey replicated);
16-bit grey (``I;16``, ``I``) is scaled by 1/65535, and so is 16-bit RGB/RGBA (PNG, TIFF), which Pillow reads as
8-bit keeping each value's high byte: the file is decoded a second time for the low bytes (``bit_depth`` says what
was read; 16-bit grey with alpha stays at 8 bits, with a warning); float (``F``) is clipped to ``[0, 1]``; CMYK
goes through the embedded ICC profile to sRGB when there is one (littleCMS), else PIL's naive formula. Alpha (RGBA,
LA, PA, palette or grey transparency) is kept *separately* as ``(1, H, W)`` and never composited: the RGB values are the
stored colour values. Multi-frame files: an animated GIF, PNG, WebP or AVIF and a multi-page TIFF are refused
(protecting their first frame into a still PNG would silently drop the rest); a JPEG carrying a preview (MPO, as
many cameras and phones write) and a HEIF with several images give their primary image. Files over
:data:`MAX_PIXELS` are refused. HEIC/HEIF photos
are read when the optional ``pillow-heif`` is installed (else reported with the install hint); AVIF by Pillow
itself; camera RAW files are not read (:data:`RAW_EXTENSIONS`, and a DNG under another name), nor files of any
format outside :data:`PHOTO_FORMATS` (Pillow's other plugins never see them), nor 16-bit TIFFs in planar
(per-channel) pixel order, which Pillow decodes wrongly.

Resolution policy (:func:`model_shape`, :func:`to_model_resolution`, :func:`perturbation_to_original`). Protection
runs on the WHOLE image resized (bicubic, antialiased) to the model's resolution ``s``: with the ``aspect`` policy
(default) the short side becomes ``s`` and the long side keeps the aspect ratio, rounded to a side the model takes
(aspect capped at 2:1); with ``squeeze`` the image becomes ``s×s``. The perturbation ``δ = protected − clean`` is
computed there, resized back to the original ``H×W`` (bicubic) and added to the full-resolution original, which is
then projected onto the budget ball and quantized with :func:`apdm.protect_images.budget.apply_delta_to_original`.
Every original pixel is covered and the L∞ budget holds exactly on the saved 8-bit PNG file, against the original at
the precision it was read (16 bits included). Keeping the aspect ratio
matters because an attacker resizes a photo isotropically (DreamBooth: short side to ``s``, center crop): a
perturbation optimized on a squeezed copy reaches them stretched (docs/protect_images.md, "Non-square photos").
Training/evaluation sets use :func:`load_images` instead, which resizes the short side to ``s`` and center-crops (the
DreamBooth convention).

Saving and metadata (:func:`save_image`, :func:`output_metadata`). PNG by default (lossless, so the perturbation
survives); JPEG only on request (:data:`JPEG_WARNING`). 8-bit quantization rounds half up. Writes are atomic and
never land on an input file (:func:`protect_output_path`, ``source=``). Metadata policy for protected photos:
the ICC colour profile is kept when it describes RGB data (the pixels are unchanged colour-wise); EXIF is
stripped by default because photos worth protecting often carry GPS position, camera serial numbers and
timestamps; ``keep_exif=True`` copies it (orientation reset to 1, since the pixels are stored upright; GPS kept
too); ``strip_metadata=True`` drops the ICC profile as well. Other chunks (XMP, text, IPTC) are never copied.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import math
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from apdm.utils import LOG, atomic_write_bytes, progress

#: File extensions recognised when listing folders and globs (lower case, with the dot). HEIC/HEIF (phone photos)
#: are read through the optional ``pillow-heif`` (``pip install "apdm[heif]"``); without it they are reported, not
#: skipped silently.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".heic", ".heif", ".avif")
#: formats whose extra frames are content (animation, pages), so a file with more than one is refused
MULTI_FRAME_REFUSED = ("GIF", "PNG", "WEBP", "AVIF", "TIFF")
#: Camera RAW files: not read (export them to JPEG/PNG/TIFF); a folder holding some says so once when listed, and
#: :func:`load_image` refuses one given by name (Pillow would read a DNG's small preview as a TIFF).
RAW_EXTENSIONS = (".dng", ".cr2", ".cr3", ".nef", ".arw", ".raf", ".orf", ".rw2")
#: The formats (as Pillow names them) :func:`load_image` opens: photo formats only, so that a file of another kind,
#: whatever its name, never reaches Pillow's other plugins (EPS runs Ghostscript). MPO comes through JPEG's opener;
#: HEIF is there once pillow-heif registers it, AVIF when Pillow (or a plugin) reads it.
PHOTO_FORMATS = ("JPEG", "MPO", "PNG", "WEBP", "TIFF", "BMP", "GIF", "AVIF", "HEIF")
_DNG_VERSION = 50706  # TIFF tag of a DNG (camera RAW) file
_PLANAR_CONFIGURATION, _BITS_PER_SAMPLE, _SAMPLES_PER_PIXEL = 284, 258, 277
#: ISO-BMFF brands of HEIF still images (bytes 8-12 of the file, after ``ftyp``).
_HEIF_BRANDS = (b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1")
_HEIF_STATE: list[bool] = []  # [whether pillow-heif's opener is registered], filled on first use
#: Largest image accepted, in pixels (about 100 megapixels); bigger files are reported, not loaded.
MAX_PIXELS = 100_000_000
#: Output formats :func:`save_image` writes, with their file extension.
FORMATS = {"png": ".png", "jpeg": ".jpg"}
#: Printed when the user asks for JPEG output.
JPEG_WARNING = ("JPEG output re-compresses the protected pixels and weakens the protection (JPEG compression is "
                "one of the standard purification attacks), and the saved files may change the photos by more than "
                "the budget (manifest.json measures each file as written); prefer PNG unless you need JPEG files")

_EXIF_ORIENTATION = 0x0112


class ImageLoadError(Exception):
    """An input file could not be loaded as an image; ``str(err)`` names the file and the problem."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


@dataclasses.dataclass
class LoadedImage:
    """One loaded photo.

    Attributes:
        pixels: ``(3, H, W)`` float32 in ``[0, 1]``, RGB, upright (EXIF orientation applied). For 8-bit sources
            ``round(255 * pixels)`` recovers the stored values exactly.
        alpha: ``(1, H, W)`` float32 in ``[0, 1]`` or ``None``; never composited into ``pixels``.
        mode: the file's original PIL mode (``"RGB"``, ``"L"``, ``"CMYK"``, ``"I;16"``, ``"RGBA"``, ``"P"``, …).
        format: the file's format as PIL names it (``"JPEG"``, ``"PNG"``, …).
        icc_profile: the embedded ICC profile if it describes RGB data (else ``None``: CMYK and grey profiles
            do not fit the RGB output; CMYK is converted to sRGB on load).
        exif: EXIF as bytes with the orientation reset to 1, or ``None``.
        path: the file.
        size: ``(H, W)`` after orientation, i.e. ``pixels.shape[1:]``.
        bit_depth: bits per colour value that ``pixels`` holds from the file: 8 for most photos (palette and
            bilevel ones too), 16 for 16-bit PNG/TIFF (grey, RGB or RGBA; ``round(65535 * pixels)`` recovers the
            stored values), 32 for floating-point TIFF.
    """

    pixels: torch.Tensor
    alpha: torch.Tensor | None
    mode: str
    format: str | None
    icc_profile: bytes | None
    exif: bytes | None
    path: Path
    size: tuple[int, int]
    bit_depth: int = 8


# ============================================================================ listing
def _is_image_name(p: Path) -> bool:
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def _spec_exists(text: str) -> bool:
    return bool(text.strip()) and os.path.exists(os.path.expanduser(text.strip()))


def split_spec(spec: str) -> str | list[str]:
    """A command's image argument as :func:`list_images` takes it: ``"a.png,b.png"`` (comma-separated files, folders
    or globs, the form every ``*_data`` / ``--input`` option accepts) -> a list; anything else unchanged.

    A path that itself contains a comma is kept whole: the whole argument when it names an existing file or folder
    (``"photos/x,y.png"``), else each run of pieces whose joined text exists (``"co,mma/x.png,b.png"`` ->
    ``["co,mma/x.png", "b.png"]``). Empty entries (a comma at an end, two in a row) are dropped with a warning: an
    empty path would mean the current folder (``"mine.png,"`` protected every photo there). Only empty entries:
    ``[]``, which :func:`list_images` refuses.
    """
    if "," not in spec or _spec_exists(spec):
        return spec
    pieces = spec.split(",")
    out: list[str] = []
    i = 0
    while i < len(pieces):
        end = i + 1
        if pieces[i].strip() and not _spec_exists(pieces[i]):  # the longest run of pieces naming one path
            end = next((k for k in range(len(pieces), i + 1, -1) if _spec_exists(",".join(pieces[i:k]))), end)
        out.append(",".join(pieces[i:end]))
        i = end
    kept = [e for e in out if e.strip()]
    if len(kept) < len(out):
        LOG.warning("input '%s': ignoring %d empty entr%s (a comma at an end or two commas in a row)", spec,
                    len(out) - len(kept), "y" if len(out) - len(kept) == 1 else "ies")
    return kept


def list_images(inputs: str | os.PathLike | Sequence[str | os.PathLike], recursive: bool = False) -> list[Path]:
    """Resolve the user's ``--input`` into a list of image files.

    Args:
        inputs: a folder (its image files, sorted by name, hidden files skipped), a single file (taken as given,
            whatever its extension), a glob (``"photos/*.jpg"``, image extensions only), or a list of these.
        recursive: descend into sub-folders of folders (and let ``**`` in globs match across folders).

    Returns:
        Paths in input order (folders and globs sorted), duplicates removed: one path per file, the first listed,
        so a symbolic link to a file already listed (or a file listed twice) is left out, with an info log.

    Raises:
        FileNotFoundError: a listed path does not exist or is empty (``""`` would mean the current folder), or
            nothing at all was found (the message names the path(s) searched and the accepted extensions).
    """
    entries = [inputs] if isinstance(inputs, (str, os.PathLike)) else list(inputs)
    if not entries:
        raise FileNotFoundError("no input given: pass a folder, an image file or a glob")
    found: list[Path] = []
    for entry in entries:
        text = os.path.expanduser(os.fspath(entry).strip())
        if not text:
            raise FileNotFoundError("an input path is empty: name a folder, an image file or a glob (an empty path "
                                    "would mean the current folder)")
        p = Path(text)
        if any(ch in text for ch in "*?[") and not p.exists():  # "Trip [2024]/" names a folder, not a glob
            found += sorted(q for q in (Path(m) for m in glob.glob(text, recursive=recursive))
                            if q.is_file() and _is_image_name(q))
        elif p.is_dir():
            walker = p.rglob("*") if recursive else p.iterdir()
            files = [q for q in walker if q.is_file() and not any(part.startswith(".")
                                                                  for part in q.relative_to(p).parts)]
            found += sorted((q for q in files if _is_image_name(q)), key=lambda q: q.as_posix())
            raw = sorted(q.name for q in files if q.suffix.lower() in RAW_EXTENSIONS)
            if raw:
                LOG.warning("ignoring %d camera RAW file(s) in %s (%s%s): apdm does not read RAW; export them as "
                            "JPEG, PNG or TIFF to include them", len(raw), p, ", ".join(raw[:3]),
                            ", …" if len(raw) > 3 else "")
        elif p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"input '{text}' does not exist")
    seen: dict[str, Path] = {}
    out = []
    for q in found:
        key = os.path.realpath(q)  # the one file a path names, as protect-images keys its manifest
        if key not in seen:
            seen[key] = q
            out.append(q)
        elif os.path.abspath(q) != os.path.abspath(seen[key]):
            LOG.info("leaving out %s: the same file as %s (a link to it)", q, seen[key])
    if not out:
        where = ", ".join(f"'{os.fspath(e)}'" for e in entries)
        raise FileNotFoundError(f"no image files found in {where} (looked for {' '.join(IMAGE_EXTENSIONS)}"
                                f"{'' if recursive else ', not in sub-folders'})")
    return out


# ============================================================================ loading
def _icc_colorspace(icc: bytes | None) -> bytes | None:
    """The data colour space of an ICC profile (header bytes 16-20: ``b"RGB "``, ``b"GRAY"``, ``b"CMYK"``)."""
    if not icc or len(icc) < 20:
        return None
    return bytes(icc[16:20])


def _cmyk_to_rgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    if icc and _icc_colorspace(icc) == b"CMYK":
        try:
            from PIL import ImageCms

            src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            dst = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(im, src, dst, outputMode="RGB")
        except Exception as exc:  # littleCMS missing or a broken profile: fall back to the naive formula
            LOG.warning("CMYK colour management failed (%s); using PIL's naive CMYK->RGB conversion", exc)
    return im.convert("RGB")


def _pil_to_arrays(im: Image.Image, icc: bytes | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """PIL image -> (RGB float32 (H,W,3) in [0,1], alpha float32 (H,W) or None). Raises ValueError if unsupported."""
    mode = im.mode
    has_alpha = (mode in ("RGBA", "RGBa", "LA", "La", "PA")
                 or (mode in ("P", "L", "RGB") and "transparency" in im.info))
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        raw = np.asarray(im, dtype=np.float64)
        key = im.info.get("transparency")  # a 16-bit grey PNG's tRNS: the one grey level that is transparent
        alpha = (raw != key).astype(np.float32) if isinstance(key, int) else None
        g = raw / 65535.0
        return np.repeat(np.clip(g, 0, 1)[..., None], 3, axis=2).astype(np.float32), alpha
    if mode == "F":
        g = np.asarray(im, dtype=np.float64)
        return np.repeat(np.clip(g, 0, 1)[..., None], 3, axis=2).astype(np.float32), None
    if mode == "CMYK":
        rgb = _cmyk_to_rgb(im, icc)
        return np.asarray(rgb, dtype=np.float32) / 255.0, None
    try:
        if has_alpha:
            rgba = np.asarray(im if mode == "RGBA" else im.convert("RGBA"), dtype=np.float32) / 255.0
            return np.ascontiguousarray(rgba[..., :3]), np.ascontiguousarray(rgba[..., 3])
        rgb = im if mode == "RGB" else im.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ValueError(f"unsupported colour mode {mode} ({exc})") from exc
    return np.asarray(rgb, dtype=np.float32) / 255.0, None


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """PIL image (any mode :func:`load_image` supports) -> ``(3, H, W)`` float32 in ``[0, 1]``; alpha dropped.

    No EXIF transpose here (use :func:`load_image` for files).
    """
    rgb, _ = _pil_to_arrays(im, im.info.get("icc_profile"))
    return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


#: the other byte order of a 16-bit raw mode (``N``: this machine's), to decode a 16-bit file's low bytes
_OTHER_16 = {"B": "L", "L": "B", "N": "B" if sys.byteorder == "little" else "L"}
_RGB16_RAWMODE = re.compile(r"^(RGB|RGBA|RGBX|RGBa);16([BLN])$")


def _rawmode(tile) -> str:
    args = tile[3]
    return args if isinstance(args, str) else str(args[0]) if args else ""


def _is_rgb16(tiles: list) -> bool:
    """Whether a file's decoder tiles (``im.tile`` before loading) read 16-bit RGB(A) samples into 8-bit RGB(A)."""
    return bool(tiles) and all(_RGB16_RAWMODE.match(_rawmode(t)) for t in tiles)


def _low_bytes(path: Path) -> Image.Image:
    """A 16-bit RGB(A) file (PNG, TIFF), which Pillow reads as 8-bit RGB(A) keeping each value's high byte, decoded
    a second time with the other byte order: each value's low byte, upright (EXIF orientation applied)."""
    with Image.open(path, formats=_photo_formats()) as im:
        tiles = []
        for t in im.tile:
            raw = _rawmode(t)
            swapped = raw[:-1] + _OTHER_16[raw[-1]]
            args = swapped if isinstance(t[3], str) else (swapped, *tuple(t[3])[1:])
            tiles.append(t._replace(args=args) if hasattr(t, "_replace") else (t[0], t[1], t[2], args))
        im.tile = tiles
        im.load()
        return ImageOps.exif_transpose(im)


def _heif_available() -> bool:
    """Register pillow-heif's HEIC/HEIF opener with Pillow once, if it is installed."""
    if not _HEIF_STATE:
        try:
            from pillow_heif import register_heif_opener

            register_heif_opener()
            _HEIF_STATE.append(True)
        except ImportError:
            _HEIF_STATE.append(False)
    return _HEIF_STATE[0]


def _is_heif(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head[4:8] == b"ftyp" and head[8:12] in _HEIF_BRANDS


def _photo_formats() -> list[str]:
    """:data:`PHOTO_FORMATS` that Pillow can open here, in Pillow's own order of trying them."""
    Image.init()
    return [f for f in Image.ID if f in PHOTO_FORMATS and f in Image.OPEN]


def _detected_format(path: Path) -> str | None:
    """The format Pillow would take ``path`` for, judged from its first bytes only (no plugin opens the file)."""
    try:
        with open(path, "rb") as f:
            prefix = f.read(16)
    except OSError:
        return None
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN.get(name, (None, None))[1]
        try:
            hit = accept is not None and accept(prefix) is True
        except Exception:  # noqa: BLE001 (a plugin's check failing on odd bytes: not that format)
            hit = False
        if hit:
            return name
    return None


def _refused_tiff(im: Image.Image) -> str | None:
    """Why a TIFF (or a file Pillow reads as one) is refused: a DNG (camera RAW, whose preview Pillow would read),
    or 16-bit samples in planar order, which Pillow decodes into scrambled pixels (8-bit planar it reads right)."""
    tags = getattr(im, "tag_v2", None)
    if tags is None:
        return None
    if _DNG_VERSION in tags:
        return ("a camera RAW file (DNG): apdm does not read RAW (only its small embedded preview would be read); "
                "export it as JPEG, PNG or TIFF")
    bits = tags.get(_BITS_PER_SAMPLE, 8)
    bits = max(bits) if isinstance(bits, (tuple, list)) and bits else bits
    if tags.get(_PLANAR_CONFIGURATION, 1) == 2 and tags.get(_SAMPLES_PER_PIXEL, 1) > 1 and int(bits) > 8:
        return (f"{int(bits)}-bit TIFF with planar (per-channel) pixel order, which cannot be read correctly; save it "
                "with interleaved pixel order or as PNG")
    return None


def load_image(path: str | os.PathLike) -> LoadedImage:
    """Load one photo robustly (see the module docstring for the colour and orientation policy).

    Args:
        path: the file; its content, not its extension, decides the format.

    Returns:
        :class:`LoadedImage` with ``pixels`` ``(3, H, W)`` float32 in ``[0, 1]``.

    Raises:
        ImageLoadError: missing, empty, not an image, not a photo format (:data:`PHOTO_FORMATS`: a PostScript or
            PDF file is refused unopened, whatever its name), a camera RAW file (:data:`RAW_EXTENSIONS`, or a TIFF
            that is a DNG), a 16-bit TIFF in planar pixel order, unsupported mode, corrupt/truncated data, zero
            size, or more than :data:`MAX_PIXELS` pixels. The message names the file and the problem.
    """
    path = Path(path)
    if not path.exists():
        raise ImageLoadError(path, "file not found")
    if path.is_dir():
        raise ImageLoadError(path, "is a folder, not an image file")
    try:
        nbytes = path.stat().st_size
    except OSError as exc:
        raise ImageLoadError(path, f"cannot read file ({exc})") from exc
    if nbytes == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    if path.suffix.lower() in RAW_EXTENSIONS:
        raise ImageLoadError(path, f"a camera RAW file ({path.suffix}): apdm does not read RAW; export it as JPEG, "
                                   "PNG or TIFF")
    _heif_available()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path, formats=_photo_formats()) as im:
                fmt = im.format
                refused = _refused_tiff(im) if fmt == "TIFF" else None
                if refused:
                    raise ImageLoadError(path, refused)
                w, h = im.size
                if w == 0 or h == 0:
                    raise ImageLoadError(path, f"zero-size image ({w}x{h})")
                if w * h > MAX_PIXELS:
                    raise ImageLoadError(path, f"too large ({w}x{h} = {w * h / 1e6:.1f} MP; the limit is "
                                               f"{MAX_PIXELS / 1e6:.0f} MP): downscale it first")
                frames = getattr(im, "n_frames", 1)
                if frames > 1 and fmt in MULTI_FRAME_REFUSED:
                    kind = "a multi-page TIFF" if fmt == "TIFF" else f"an animated {fmt}"
                    raise ImageLoadError(path, f"{kind} ({frames} frames): apdm protects still photos; save the "
                                               "frames you want protected as separate images")
                tiles = list(getattr(im, "tile", None) or [])
                rgb16 = im.mode in ("RGB", "RGBA") and _is_rgb16(tiles)
                raw16 = [_rawmode(t).split(";")[0] for t in tiles if ";16" in _rawmode(t)]
                other16 = raw16[0] if raw16 and not rgb16 and im.mode != "F" and not im.mode.startswith("I") else None
                try:
                    im.load()
                except Exception as exc:
                    raise ImageLoadError(path, f"corrupt or truncated image data ({type(exc).__name__}: {exc})") \
                        from exc
                mode = im.mode
                icc = im.info.get("icc_profile") or None
                upright = ImageOps.exif_transpose(im)
    except ImageLoadError:
        raise
    except UnidentifiedImageError as exc:
        if _is_heif(path) and not _heif_available():
            raise ImageLoadError(path, "a HEIC/HEIF photo: reading it needs pillow-heif (pip install "
                                       "\"apdm[heif]\"), or export it as JPEG/PNG") from exc
        other = _detected_format(path)
        if other is not None and other not in PHOTO_FORMATS:
            raise ImageLoadError(path, f"not a supported photo format ({other})") from exc
        raise ImageLoadError(path, "not an image, or an unsupported image format") from exc
    except Image.DecompressionBombError as exc:
        raise ImageLoadError(path, f"too large ({exc})") from exc
    except PermissionError as exc:
        raise ImageLoadError(path, f"permission denied ({exc})") from exc
    except Exception as exc:  # decoder errors raised while reading headers or transposing
        raise ImageLoadError(path, f"corrupt or unreadable image ({type(exc).__name__}: {exc})") from exc

    try:
        rgb, alpha = _pil_to_arrays(upright, icc)
    except ValueError as exc:
        raise ImageLoadError(path, str(exc)) from exc
    except Exception as exc:
        raise ImageLoadError(path, f"cannot convert {mode} image to RGB ({type(exc).__name__}: {exc})") from exc
    bit_depth = 16 if mode.startswith("I") else 32 if mode == "F" else 8
    if other16:
        LOG.warning("%s: a 16-bit %s image is read at 8 bits (its high bytes); the budget is measured against the "
                    "8-bit values read", path, other16)
    if rgb16:  # Pillow kept each value's high byte; the low bytes make the full 16-bit values
        try:
            low = _low_bytes(path)
        except (OSError, ValueError, KeyError, SyntaxError) as exc:
            LOG.warning("%s: a 16-bit %s image is read at 8 bits (its high bytes; the low bytes could not be decoded: "
                        "%s); the budget is measured against the 8-bit values read", path, mode, exc)
        else:
            high = np.asarray(upright, dtype=np.uint16)[..., :3]
            full = (high << 8) | np.asarray(low, dtype=np.uint16)[..., :3]
            rgb = (full.astype(np.float64) / 65535.0).astype(np.float32)
            bit_depth = 16
            key = upright.info.get("transparency")  # a 16-bit RGB PNG's tRNS: one 16-bit colour is transparent
            if mode == "RGB" and isinstance(key, tuple) and len(key) == 3:  # (Pillow's 8-bit match never hit it)
                alpha = (~np.all(full == np.asarray(key, dtype=np.uint16), axis=-1)).astype(np.float32)

    exif_bytes = None
    try:
        exif = upright.getexif()
        if _EXIF_ORIENTATION in exif:
            exif[_EXIF_ORIENTATION] = 1
        if len(exif):
            exif_bytes = exif.tobytes()
    except Exception as exc:  # unreadable EXIF never blocks loading; it is simply not carried over
        LOG.debug("%s: EXIF not readable (%s)", path, exc)

    pixels = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))
    alpha_t = torch.from_numpy(alpha)[None] if alpha is not None else None
    keep_icc = icc if _icc_colorspace(icc) == b"RGB " and mode != "CMYK" else None
    return LoadedImage(pixels=pixels, alpha=alpha_t, mode=mode, format=fmt, icc_profile=keep_icc,
                       exif=exif_bytes, path=path, size=(int(pixels.shape[1]), int(pixels.shape[2])),
                       bit_depth=bit_depth)


# ============================================================================ resizing
def resize(pixels: torch.Tensor, hw: tuple[int, int], mode: str = "bicubic", clamp: bool = True) -> torch.Tensor:
    """Resize ``(3, H, W)`` or ``(N, 3, H, W)`` to ``hw = (H', W')`` (antialiased when shrinking).

    Args:
        pixels: float tensor.
        hw: target ``(height, width)``.
        mode: ``"bicubic"`` (default), ``"bilinear"``, ``"area"`` or ``"nearest"``.
        clamp: clip to ``[0, 1]`` afterwards (bicubic overshoots); ``False`` for perturbations.

    Returns:
        Same rank as ``pixels``; unchanged (the same tensor) when the size already matches.
    """
    hw = (int(hw[0]), int(hw[1]))
    if tuple(pixels.shape[-2:]) == hw:
        return pixels
    squeeze = pixels.ndim == 3
    x = pixels[None] if squeeze else pixels
    smooth = mode in ("bilinear", "bicubic")
    x = torch.nn.functional.interpolate(x.float(), size=hw, mode=mode, align_corners=False if smooth else None,
                                       antialias=smooth)
    if clamp:
        x = x.clamp(0.0, 1.0)
    return x[0] if squeeze else x


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def model_shape(hw: tuple[int, int], size: int, multiple: int = 8, policy: str = "aspect",
                max_aspect: float = 2.0) -> tuple[int, int]:
    """The ``(h, w)`` a photo of upright size ``hw`` is protected at.

    Args:
        hw: the photo's ``(H, W)``.
        size: the model's resolution ``s`` (its short side).
        multiple: sides must be multiples of this (``SD.size_multiple``: 64 for SD).
        policy: ``"aspect"``: short side ``s``, long side ``s·H/W`` (or ``s·W/H``) rounded to ``multiple``, at most
            ``max_aspect·s``; ``"squeeze"``: ``(s, s)`` whatever the photo.
        max_aspect: cap on long/short side (a panorama is squeezed down to it, which bounds the compute).

    Returns:
        ``(h, w)``; ``(s, s)`` for a square photo under either policy.
    """
    if policy == "squeeze":
        return size, size
    if policy != "aspect":
        raise ValueError(f"unknown resolution policy '{policy}'; choose aspect or squeeze")
    h, w = int(hw[0]), int(hw[1])
    ratio = min(max(h, w) / max(1, min(h, w)), max_aspect)
    long = max(size, round(size * ratio / multiple) * multiple)
    long = min(long, int(size * max_aspect) // multiple * multiple) if long > size else long
    return (long, size) if h > w else (size, long)


def to_model_resolution(pixels: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize the WHOLE image to ``size`` (bicubic, antialiased, clipped to ``[0, 1]``).

    No cropping: every original pixel contributes, so a perturbation computed at this resolution maps back onto the
    full image with :func:`perturbation_to_original`. :func:`model_shape` picks ``size`` for a photo.

    Args:
        pixels: ``(3, H, W)`` or ``(N, 3, H, W)`` float32 in ``[0, 1]``.
        size: ``(h, w)``, or ``s`` for ``s×s``.

    Returns:
        ``(3, h, w)`` or ``(N, 3, h, w)`` float32 in ``[0, 1]``.
    """
    return resize(pixels, _hw(size), "bicubic", clamp=True)


def perturbation_to_original(delta: torch.Tensor, orig_hw: tuple[int, int], mode: str = "bicubic") -> torch.Tensor:
    """Resize a model-resolution perturbation ``(3, h, w)`` to the original ``(3, H, W)`` (no clamping).

    The result may exceed the budget slightly (bicubic overshoot); project afterwards
    (:func:`apdm.protect_images.budget.apply_delta_to_original` does all steps).
    """
    return resize(delta, _hw(orig_hw), mode, clamp=False)


def resize_center_crop(pixels: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Resize so the image covers ``size`` keeping its aspect ratio, then center-crop (DreamBooth-style).

    Args:
        pixels: ``(3, H, W)`` float32 in ``[0, 1]``.
        size: ``s`` or ``(h, w)``.

    Returns:
        ``(3, h, w)`` float32 in ``[0, 1]``; exactly the input when it already has that size.
    """
    th, tw = _hw(size)
    h, w = pixels.shape[-2:]
    if (h, w) == (th, tw):
        return pixels
    scale = max(th / h, tw / w)
    nh, nw = max(th, int(round(h * scale))), max(tw, int(round(w * scale)))
    x = resize(pixels, (nh, nw), "bicubic", clamp=True)
    top, left = (nh - th) // 2, (nw - tw) // 2
    return x[..., top:top + th, left:left + tw].contiguous()


def load_spec(spec: str, size: int | tuple[int, int] | None = None, recursive: bool = False,
              quiet: bool = True) -> tuple[torch.Tensor, list[Path], list[dict]]:
    """A command's image argument (a folder, file or glob, or several comma-separated: :func:`split_spec`) listed
    with :func:`list_images` and loaded with :func:`load_images`; each skipped file is logged with its reason.

    Returns:
        :func:`load_images`'s ``(images, ok_paths, errors)``.
    """
    images, ok, errors = load_images(list_images(split_spec(spec), recursive=recursive), size=size, quiet=quiet)
    for e in errors:
        LOG.warning("skipped %s: %s", e["path"], e["error"])
    return images, ok, errors


def load_images(paths: str | os.PathLike | Sequence[str | os.PathLike], size: int | tuple[int, int] | None = None,
                quiet: bool = True) -> tuple[torch.Tensor, list[Path], list[dict]]:
    """Load a training/evaluation set; bad files are reported, never fatal.

    Args:
        paths: image files (a folder or glob string is expanded with :func:`list_images`).
        size: model resolution: each image is resized (short side) and center-cropped to ``size×size``
            (:func:`resize_center_crop`). ``None`` keeps the original size; then every image must have the
            size of the first good one, others are reported as errors.
        quiet: hide the progress bar.

    Returns:
        ``(images, ok_paths, errors)``: ``images`` ``(N, 3, S, S)`` float32 in ``[0, 1]`` (``N = len(ok_paths)``;
        ``(0, 3, S, S)`` when nothing loaded), and ``errors`` a list of ``{"path": str, "error": reason}``.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = list_images(paths)
    tensors, ok, errors = [], [], []
    for p in progress(list(paths), desc="loading images", disable=quiet):
        try:
            x = load_image(p).pixels
        except ImageLoadError as exc:
            errors.append({"path": str(p), "error": exc.reason})
            continue
        if size is not None:
            x = resize_center_crop(x, size)
        elif tensors and x.shape != tensors[0].shape:
            errors.append({"path": str(p), "error": f"size {x.shape[2]}x{x.shape[1]} differs from the first image "
                                                    f"({tensors[0].shape[2]}x{tensors[0].shape[1]}); pass size="})
            continue
        tensors.append(x)
        ok.append(Path(p))
    if tensors:
        images = torch.stack(tensors).float()
    else:
        h, w = _hw(size) if size is not None else (0, 0)
        images = torch.zeros(0, 3, h, w)
    return images, ok, errors


# ============================================================================ saving
def _as_uint8_hwc(pixels, channels: int) -> np.ndarray:
    """(C,H,W) / (1,C,H,W) float [0,1] or uint8 (torch or numpy) -> uint8 (H,W,C), rounding half up."""
    from apdm.protect_images.budget import to_uint8

    t = torch.as_tensor(pixels)
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim == 2 and channels == 1:
        t = t[None]
    if t.ndim != 3 or t.shape[0] != channels:
        raise ValueError(f"expected a ({channels},H,W) image, got shape {tuple(t.shape)}")
    return np.ascontiguousarray(to_uint8(t).cpu().numpy().transpose(1, 2, 0))


def tensor_to_pil(pixels: torch.Tensor | np.ndarray, alpha: torch.Tensor | np.ndarray | None = None) -> Image.Image:
    """``(3, H, W)`` (or ``(1, 3, H, W)``) float in ``[0, 1]`` or uint8 -> PIL ``RGB`` (``RGBA`` with ``alpha``).

    Floats are quantized by rounding half up (``floor(255·x + 0.5)``) after clipping to ``[0, 1]``.
    """
    rgb = _as_uint8_hwc(pixels, 3)
    if alpha is None:
        return Image.fromarray(rgb, "RGB")
    a = _as_uint8_hwc(alpha, 1)
    if a.shape[:2] != rgb.shape[:2]:
        raise ValueError(f"alpha {a.shape[:2]} and image {rgb.shape[:2]} sizes differ")
    return Image.fromarray(np.concatenate([rgb, a], axis=2), "RGBA")


def _format_of(path: Path, fmt: str | None) -> str:
    by_suffix = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}.get(path.suffix.lower())
    if fmt is None:
        if by_suffix is None:
            raise ValueError(f"cannot tell the format of '{path}' from its extension; pass format='png' or 'jpeg'")
        return by_suffix
    fmt = {"jpg": "jpeg"}.get(fmt.lower(), fmt.lower())
    if fmt not in FORMATS:
        raise ValueError(f"unsupported output format '{fmt}'; choose from {', '.join(FORMATS)}")
    if by_suffix is not None and by_suffix != fmt:
        raise ValueError(f"format '{fmt}' does not match the extension of '{path}'")
    return fmt


def _same_file(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.abspath(a) == os.path.abspath(b)


def save_image(pixels: torch.Tensor | np.ndarray, path: str | os.PathLike, format: str | None = None,
               quality: int = 95, alpha: torch.Tensor | np.ndarray | None = None, icc_profile: bytes | None = None,
               exif: bytes | None = None, strip_metadata: bool = False,
               source: str | os.PathLike | None = None, compress_level: int = 3) -> Path:
    """Write one image atomically (temp file + ``os.replace``), never onto its input.

    Args:
        pixels: ``(3, H, W)`` (or ``(1, 3, H, W)``) float in ``[0, 1]`` (rounded half up to 8 bits) or uint8.
        path: destination; parent folders are created.
        format: ``"png"`` or ``"jpeg"``; ``None`` = from the extension. Must agree with the extension. Only PNG
            is lossless: the exact budget guarantee of ``apdm protect-images`` holds for PNG files, not JPEG.
        quality: JPEG quality (4:4:4 chroma, no subsampling). Ignored for PNG.
        alpha: ``(1, H, W)`` / ``(H, W)`` float in ``[0, 1]`` or uint8; written as RGBA in PNG, dropped (with a
            warning) for JPEG, which has no alpha.
        icc_profile: ICC profile bytes to embed (RGB profiles only).
        exif: EXIF bytes to embed (see :func:`output_metadata` for the policy).
        strip_metadata: drop ``icc_profile`` and ``exif`` whatever was passed.
        source: the input file this image was made from; writing onto it raises.
        compress_level: PNG zlib level 0-9. 3 (default) is ~2.5x faster than Pillow's 6 on a perturbed 12 MP photo
            for ~10% larger files (perturbations compress badly whatever the level).

    Returns:
        The written path.

    Raises:
        ValueError: ``path`` is ``source``, or a format/extension/shape problem.
    """
    path = Path(path)
    if source is not None and _same_file(path, Path(source)):
        raise ValueError(f"refusing to overwrite the input file '{source}'; choose another output path")
    fmt = _format_of(path, format)
    if fmt == "jpeg" and alpha is not None:
        LOG.warning("%s: JPEG has no alpha channel; transparency is dropped", path)
        alpha = None
    im = tensor_to_pil(pixels, alpha)
    kwargs: dict = {}
    if not strip_metadata:
        if icc_profile:
            kwargs["icc_profile"] = icc_profile
        if exif:
            kwargs["exif"] = exif
    if fmt == "jpeg":
        kwargs.update(quality=int(quality), subsampling=0)
    else:
        kwargs.update(compress_level=int(compress_level))
    buf = io.BytesIO()
    im.save(buf, format=fmt.upper(), **kwargs)
    return atomic_write_bytes(path, buf.getvalue())


def output_metadata(image: LoadedImage, keep_exif: bool = False, strip_metadata: bool = False) -> dict:
    """The metadata to write for a protected copy of ``image``: ``{"icc_profile": ..., "exif": ...}``.

    Policy: keep the ICC profile (RGB profiles only), strip EXIF unless ``keep_exif`` (it then includes GPS if the
    original had it; orientation reset to 1), strip everything with ``strip_metadata``. Splat into
    :func:`save_image`: ``save_image(x, path, **output_metadata(img))``.
    """
    if strip_metadata:
        return {"icc_profile": None, "exif": None}
    return {"icc_profile": image.icc_profile, "exif": image.exif if keep_exif else None}


def protect_output_path(input_path: str | os.PathLike, output_dir: str | os.PathLike, suffix: str = "",
                        fmt: str = "png", taken: set[str] | None = None) -> Path:
    """Output file name for a protected copy: ``output_dir / (stem + suffix + ext)``, never an input.

    Args:
        input_path: the original photo.
        output_dir: destination folder.
        suffix: appended to the stem (e.g. ``"_protected"``); ``""`` keeps the name.
        fmt: ``"png"`` or ``"jpeg"`` (extension ``.png`` / ``.jpg``).
        taken: resolved paths (``str(Path.resolve())`` / ``os.path.realpath``) already used in this run; put ALL
            the run's input files in it first. A name in it gets ``-2``, ``-3``… appended (``a.jpg`` and ``a.png``
            would both give ``a.png`` otherwise). The chosen path is added to it.

    Returns:
        The output path (not created).

    Raises:
        ValueError: the output would be the input file itself (same folder, same name and format, no suffix).
    """
    fmt = {"jpg": "jpeg"}.get(fmt.lower(), fmt.lower())
    if fmt not in FORMATS:
        raise ValueError(f"unsupported output format '{fmt}'; choose from {', '.join(FORMATS)}")
    input_path, output_dir = Path(input_path), Path(output_dir)
    stem = input_path.stem + suffix
    candidate = output_dir / f"{stem}{FORMATS[fmt]}"
    if _same_file(candidate, input_path):
        raise ValueError(f"the output '{candidate}' would overwrite the input; use another output folder or a "
                         f"suffix")
    if taken is None:
        return candidate
    n = 1
    while os.path.realpath(candidate) in taken:
        n += 1
        candidate = output_dir / f"{stem}-{n}{FORMATS[fmt]}"
    taken.add(os.path.realpath(candidate))
    return candidate


# ============================================================================ grids
def images_to_grid(images: torch.Tensor | Sequence[torch.Tensor], nrow: int = 8, padding: int = 2,
                   pad_value: float = 1.0) -> Image.Image:
    """Tile images into one PIL ``RGB`` image, ``nrow`` images per row, row-major.

    Args:
        images: ``(N, 3, H, W)`` float in ``[0, 1]`` (or a list of equal-size ``(3, H, W)``).
        nrow: images per row (the last row may be shorter).
        padding: pixels between images and around the border.
        pad_value: padding grey level in ``[0, 1]`` (1 = white).

    Returns:
        PIL image of size ``(cols·(W+p)+p) × (rows·(H+p)+p)`` with ``cols = min(nrow, N)``, ``rows = ⌈N/nrow⌉``.
    """
    x = torch.stack(list(images)) if not isinstance(images, torch.Tensor) else images
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[1] != 3 or x.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (N,3,H,W) batch, got {tuple(x.shape)}")
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    n, _, h, w = x.shape
    cols, rows = min(nrow, n), math.ceil(n / nrow)
    grid = torch.full((3, rows * (h + padding) + padding, cols * (w + padding) + padding), float(pad_value))
    x = x.detach().float().cpu().clamp(0.0, 1.0)
    for i in range(n):
        r, c = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + c * (w + padding)
        grid[:, top:top + h, left:left + w] = x[i]
    return tensor_to_pil(grid)


def save_grid(images: torch.Tensor | Sequence[torch.Tensor], path: str | os.PathLike, nrow: int = 8,
              padding: int = 2, pad_value: float = 1.0) -> Path:
    """:func:`images_to_grid` written atomically as PNG (or JPEG by extension) to ``path``."""
    grid = images_to_grid(images, nrow, padding, pad_value)
    return save_image(torch.from_numpy(np.asarray(grid).transpose(2, 0, 1).copy()), path)


def parse_budget(s: str | float) -> float:
    """Alias of :func:`apdm.protect_images.budget.parse_budget` (``"8/255" -> 0.0314…``)."""
    from apdm.protect_images.budget import parse_budget as _parse

    return _parse(s)


__all__ = ["IMAGE_EXTENSIONS", "MAX_PIXELS", "FORMATS", "JPEG_WARNING", "ImageLoadError", "LoadedImage",
           "list_images", "load_image", "load_images", "pil_to_tensor", "tensor_to_pil", "resize",
           "to_model_resolution", "perturbation_to_original", "resize_center_crop", "save_image",
           "output_metadata", "protect_output_path", "images_to_grid", "save_grid", "parse_budget"]
