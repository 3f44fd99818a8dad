"""Robust image I/O: listing, loading odd files, orientation, colour modes, safe saving, grids."""

from __future__ import annotations

import hashlib
import io
import logging
import math
import struct
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, ImageCms

from apdm.core.images import (
    ImageLoadError,
    images_to_grid,
    list_images,
    load_image,
    load_images,
    output_metadata,
    perturbation_to_original,
    pil_to_tensor,
    protect_output_path,
    resize_center_crop,
    save_grid,
    save_image,
    split_spec,
    tensor_to_pil,
    to_model_resolution,
)
from apdm.protect_images.budget import apply_delta_to_original, budget_report, to_uint8

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def _upright_quadrants(h: int = 40, w: int = 64) -> Image.Image:
    """An upright test picture: red top-left, green top-right, blue bottom-left, white bottom-right."""
    a = np.zeros((h, w, 3), np.uint8)
    a[: h // 2, : w // 2], a[: h // 2, w // 2:] = RED, GREEN
    a[h // 2:, : w // 2], a[h // 2:, w // 2:] = BLUE, WHITE
    return Image.fromarray(a, "RGB")


def _quadrant_means(pixels: torch.Tensor) -> list[tuple[int, ...]]:
    x = (pixels.numpy() * 255).transpose(1, 2, 0)
    h, w = x.shape[:2]
    qs = [x[: h // 2 - 2, : w // 2 - 2], x[: h // 2 - 2, w // 2 + 2:], x[h // 2 + 2:, : w // 2 - 2],
          x[h // 2 + 2:, w // 2 + 2:]]
    return [tuple(int(round(v)) for v in q.reshape(-1, 3).mean(0)) for q in qs]


def _close(c1, c2, tol=12):
    return all(abs(a - b) <= tol for a, b in zip(c1, c2))


@pytest.fixture
def messy_folder(tmp_path):
    """A folder as users have them: good photos in many modes plus broken files."""
    d = tmp_path / "photos"
    d.mkdir()
    rng = np.random.default_rng(0)
    # corrupt: a PNG of noise cut in the middle of its image data
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    (d / "a_corrupt.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    # grayscale PNG
    gray = rng.integers(0, 256, (21, 35), dtype=np.uint8)
    Image.fromarray(gray, "L").save(d / "b_gray.png")
    # CMYK JPEG, pure red in CMYK terms
    Image.new("CMYK", (30, 18), (0, 255, 255, 0)).save(d / "c_cmyk.jpg", quality=95)
    # EXIF-rotated JPEG: stored rotated 90° CCW with orientation 6 (display = rotate 90° CW), plus GPS + camera
    up = _upright_quadrants(40, 64)
    ex = Image.Exif()
    ex[ExifTags.Base.Orientation] = 6
    ex[ExifTags.Base.Make] = "TestCam"
    gps = ex.get_ifd(ExifTags.IFD.GPSInfo)
    gps[1], gps[2] = "N", (52.0, 31.0, 12.0)
    up.rotate(90, expand=True).save(d / "d_rotated.jpg", quality=95, subsampling=0, exif=ex.tobytes())
    # RGBA PNG with a non-trivial alpha and colour hidden under transparent pixels
    rgba = rng.integers(0, 256, (19, 27, 4), dtype=np.uint8)
    rgba[..., 3] = np.linspace(0, 255, 27).astype(np.uint8)[None, :]
    Image.fromarray(rgba, "RGBA").save(d / "e_rgba.png")
    # RGB PNG with an sRGB ICC profile
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(d / "f_icc.png", icc_profile=icc)
    # 16-bit grayscale PNG
    g16 = (np.arange(12 * 10).reshape(12, 10) * 500).astype(np.uint16)
    Image.fromarray(g16).save(d / "g_gray16.png")
    # palette PNG with a transparent index
    pal = Image.fromarray(rng.integers(0, 4, (9, 11), dtype=np.uint8), "P")
    pal.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 9, 9, 9] + [0] * (256 * 3 - 12))
    pal.save(d / "h_palette.png", transparency=3)
    # not an image, an empty file, a hidden file, a non-image extension
    (d / "i_text.jpg").write_text("this is not a jpeg")
    (d / "j_empty.png").write_bytes(b"")
    Image.new("RGB", (4, 4)).save(d / ".hidden.png")
    (d / "notes.txt").write_text("hello")
    data = {"gray": gray, "rgba": rgba, "icc": icc, "g16": g16, "upright": up}
    return d, data


def _hashes(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


@contextmanager
def apdm_messages(level=logging.INFO):
    """The apdm logger's messages at ``level`` and above while the block runs, as a list of strings (a handler on
    the logger itself: main() stops it propagating, so caplog may not see them)."""
    from apdm.utils import LOG

    records: list = []
    catch = logging.Handler(level)
    catch.emit = records.append
    old = LOG.level
    LOG.addHandler(catch)
    LOG.setLevel(min(level, old or logging.WARNING))
    messages: list[str] = []
    try:
        yield messages
    finally:
        LOG.removeHandler(catch)
        LOG.setLevel(old)
        messages += [r.getMessage() for r in records]


def write_png16(path, values: np.ndarray, exif: bytes | None = None) -> Path:
    """A 16-bit PNG written by the specification, not by Pillow (which cannot write 16-bit colour): ``values``
    ``(H, W, C)`` uint16 with C = 2 (grey and alpha), 3 (RGB) or 4 (RGBA); row ``y`` uses filter ``y % 5`` (None,
    Sub, Up, Average, Paeth), so a decoder's unfiltering with 4, 6 or 8 bytes per pixel is exercised; ``exif`` goes
    in an eXIf chunk."""
    h, w, c = values.shape
    raw = values.astype(">u2").view(np.uint8).reshape(h, w * c * 2).astype(np.int64)
    bpp = 2 * c
    prev = np.zeros(w * c * 2, np.int64)
    rows = []
    for y in range(h):
        cur = raw[y]
        left = np.concatenate([np.zeros(bpp, np.int64), cur[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int64), prev[:-bpp]])
        p = left + prev - upleft
        pa, pb, pc = np.abs(p - left), np.abs(p - prev), np.abs(p - upleft)
        paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prev, upleft))
        pred = [np.zeros_like(cur), left, prev, (left + prev) // 2, paeth][y % 5]
        rows.append(bytes([y % 5]) + ((cur - pred) % 256).astype(np.uint8).tobytes())
        prev = cur

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 16, {2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + (chunk(b"eXIf", exif) if exif else b"")
                           + chunk(b"IDAT", zlib.compress(b"".join(rows))) + chunk(b"IEND", b""))
    return Path(path)


# ----------------------------------------------------------------------------- listing
def test_list_images_folder_file_glob_and_errors(messy_folder, tmp_path):
    d, _ = messy_folder
    names = [p.name for p in list_images(d)]
    assert names == ["a_corrupt.png", "b_gray.png", "c_cmyk.jpg", "d_rotated.jpg", "e_rgba.png", "f_icc.png",
                     "g_gray16.png", "h_palette.png", "i_text.jpg", "j_empty.png"]
    assert [p.name for p in list_images(str(d / "*.jpg"))] == ["c_cmyk.jpg", "d_rotated.jpg", "i_text.jpg"]
    assert [p.name for p in list_images([d / "notes.txt", d / "b_gray.png", d / "b_gray.png"])] == [
        "notes.txt", "b_gray.png"]  # explicit files as given, duplicates removed
    sub = d / "sub"
    sub.mkdir()
    Image.new("RGB", (4, 4)).save(sub / "deep.png")
    assert "deep.png" not in [p.name for p in list_images(d)]
    assert "deep.png" in [p.name for p in list_images(d, recursive=True)]
    with pytest.raises(FileNotFoundError, match="nope"):
        list_images(tmp_path / "nope")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        list_images(empty)


def test_split_spec_keeps_paths_with_commas_and_drops_empty_entries(tmp_path, monkeypatch):
    """``--input "mine.png,"`` protected every photo of the current folder (the empty entry was Path("") = ".");
    a file or folder whose name holds a comma was split apart."""
    monkeypatch.chdir(tmp_path)
    for name in ("mine.png", "other.png", "x,y.png"):
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "co,mma").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "co,mma" / "in.png")
    with apdm_messages(logging.WARNING) as log:
        assert split_spec("mine.png,") == ["mine.png"]
    assert log == ["input 'mine.png,': ignoring 1 empty entry (a comma at an end or two commas in a row)"]
    assert [p.name for p in list_images(split_spec("mine.png,"))] == ["mine.png"]
    assert split_spec("mine.png,, other.png") == ["mine.png", " other.png"]
    assert split_spec("x,y.png") == "x,y.png"  # an existing path is taken whole
    assert split_spec("co,mma/in.png,mine.png") == ["co,mma/in.png", "mine.png"]
    assert split_spec("co,mma,x,y.png") == ["co,mma", "x,y.png"]
    assert split_spec("a.png,b.png") == ["a.png", "b.png"]  # nothing exists: split at every comma
    assert split_spec("one.png") == "one.png"
    assert split_spec(" , ") == []
    with pytest.raises(FileNotFoundError, match="no input given"):
        list_images(split_spec(","))
    with pytest.raises(FileNotFoundError, match="an input path is empty"):
        list_images(["mine.png", ""])  # never the current folder


def test_list_images_drops_a_link_to_a_listed_file(tmp_path):
    """A symbolic link to a photo already listed is the same photo: listed once (the first path), with an info log.
    Before, duplicates were compared by absolute path and protect-images keyed them by real path, so the link and
    its target made one manifest entry twice."""
    d = tmp_path / "sl"
    d.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (4, 4)).save(d / name)
    (d / "link.png").symlink_to("a.png")
    with apdm_messages() as log:
        listed = list_images(d)
        assert [p.name for p in list_images([d / "b.png", d / "link.png", d / "a.png"])] == ["b.png", "link.png"]
    assert [p.name for p in listed] == ["a.png", "b.png"]
    assert any("leaving out" in m and "link.png" in m and "a.png" in m for m in log)


# ----------------------------------------------------------------------------- loading
def test_16bit_colour_is_read_at_full_depth(tmp_path):
    """16-bit RGB and RGBA PNGs (every row filter) and TIFFs (either byte order, raw or zlib) give the stored 16-bit
    values, ``bit_depth`` 16. Pillow reads them as 8-bit RGB keeping the high byte, which moved a value by up to
    255/65535 (≈ 1 grey level) from the original the budget is measured against."""
    tifffile = pytest.importorskip("tifffile")  # a dependency of scikit-image
    g = np.random.default_rng(3)
    rgb = g.integers(0, 65536, (11, 13, 3), dtype=np.uint16)
    rgba = g.integers(0, 65536, (7, 9, 4), dtype=np.uint16)
    files = {"rgb.png": (write_png16(tmp_path / "rgb.png", rgb), rgb),
             "rgba.png": (write_png16(tmp_path / "rgba.png", rgba), rgba)}
    for name, kw in {"le.tif": {}, "be.tif": {"byteorder": ">"}, "zip.tif": {"compression": "zlib"}}.items():
        tifffile.imwrite(tmp_path / name, rgb, photometric="rgb", **kw)
        files[name] = (tmp_path / name, rgb)
    tifffile.imwrite(tmp_path / "rgba.tif", rgba, photometric="rgb", extrasamples=["unassalpha"])
    files["rgba.tif"] = (tmp_path / "rgba.tif", rgba)
    for name, (path, values) in files.items():
        im = load_image(path)
        assert im.bit_depth == 16 and im.pixels.shape == (3, *values.shape[:2]), name
        np.testing.assert_array_equal(np.round(im.pixels.double().numpy() * 65535).astype(np.int64),
                                      values[..., :3].transpose(2, 0, 1).astype(np.int64), err_msg=name)
        if values.shape[2] == 4:  # alpha as 8 bits, as it is saved
            np.testing.assert_array_equal(to_uint8(im.alpha[0]).numpy(), (values[..., 3] >> 8).astype(np.uint8))
    # the EXIF orientation turns the low bytes with the high ones
    ex = Image.Exif()
    ex[ExifTags.Base.Orientation] = 6  # display = stored turned 90° clockwise
    rot = load_image(write_png16(tmp_path / "rot.png", rgb, exif=ex.tobytes()))
    assert rot.size == (13, 11) and rot.bit_depth == 16
    np.testing.assert_array_equal(np.round(rot.pixels.double().numpy() * 65535).astype(np.int64),
                                  np.rot90(rgb, k=-1).transpose(2, 0, 1).astype(np.int64))
    Image.fromarray(rgb[..., 0]).save(tmp_path / "g.png")
    gray = load_image(tmp_path / "g.png")
    assert gray.bit_depth == 16 and gray.mode == "I;16"
    Image.new("RGB", (3, 3)).save(tmp_path / "eight.png")
    assert load_image(tmp_path / "eight.png").bit_depth == 8
    # 16-bit grey with alpha: Pillow has no way to its low bytes; read at 8 bits, and said so
    with apdm_messages(logging.WARNING) as log:
        la = load_image(write_png16(tmp_path / "la.png", rgba[..., 2:]))
    assert la.bit_depth == 8 and (to_uint8(la.pixels[0]).numpy() == rgba[..., 2] >> 8).all()
    assert log == [(f"{tmp_path / 'la.png'}: a 16-bit LA image is read at 8 bits (its high bytes); the budget is "
                    "measured against the 8-bit values read")]


def test_phone_and_camera_formats(tmp_path, caplog):
    """HEIC (iPhone; through pillow-heif, a test dependency) and AVIF photos are listed and load upright at their
    size; camera RAW files are not read, and a folder holding some says so instead of skipping them silently."""
    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    g = np.random.default_rng(0)
    arr = np.zeros((30, 40, 3), np.uint8)
    arr[:, :20] = (200, 30, 30)                                   # red left half, blue right half
    arr[:, 20:] = (30, 30, 200)
    arr = np.clip(arr.astype(int) + g.integers(-5, 6, arr.shape), 0, 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "IMG_0001.HEIC", quality=95)
    Image.fromarray(arr).save(tmp_path / "b.avif", quality=95)
    (tmp_path / "IMG_0002.CR2").write_bytes(b"II*\x00 raw sensor data")
    with caplog.at_level("WARNING", logger="apdm"):
        listed = list_images(tmp_path)
    assert [q.name for q in listed] == ["IMG_0001.HEIC", "b.avif"]
    assert "ignoring 1 camera RAW file(s)" in caplog.text and "IMG_0002.CR2" in caplog.text
    for q in listed:
        im = load_image(q)
        assert im.size == (30, 40) and im.pixels.shape == (3, 30, 40)
        left, right = im.pixels[:, :, :18].mean((1, 2)), im.pixels[:, :, 22:].mean((1, 2))
        assert left[0] > 0.7 > left[2] and right[2] > 0.7 > right[0], q.name  # the colours, not transposed


def test_heic_without_pillow_heif_is_a_clear_error(tmp_path):
    """Without pillow-heif a HEIC photo is reported with the install hint, not as 'not an image'."""
    import subprocess
    import sys

    pillow_heif = pytest.importorskip("pillow_heif")
    pillow_heif.register_heif_opener()
    Image.new("RGB", (16, 16), (10, 200, 10)).save(tmp_path / "a.heic")
    code = ("import sys; sys.modules['pillow_heif'] = None\n"
            "from apdm.core.images import ImageLoadError, load_image\n"
            f"try:\n    load_image({str(tmp_path / 'a.heic')!r})\n"
            "except ImageLoadError as e:\n    print('ERROR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "ERROR" in out and "a.heic" in out and "HEIC/HEIF photo" in out and "apdm[heif]" in out


def test_load_gray_cmyk_rgba_palette_and_16bit(messy_folder):
    d, data = messy_folder
    g = load_image(d / "b_gray.png")
    assert g.pixels.shape == (3, 21, 35) and g.pixels.dtype == torch.float32 and g.mode == "L" and g.alpha is None
    for c in range(3):
        np.testing.assert_array_equal(to_uint8(g.pixels[c]).numpy(), data["gray"])

    c = load_image(d / "c_cmyk.jpg")
    assert c.mode == "CMYK" and c.pixels.shape == (3, 18, 30) and c.icc_profile is None
    assert _close(tuple(int(v) for v in (c.pixels.mean((1, 2)) * 255).round()), RED, tol=6)

    a = load_image(d / "e_rgba.png")
    assert a.alpha is not None and a.alpha.shape == (1, 19, 27)
    np.testing.assert_array_equal(to_uint8(a.alpha[0]).numpy(), data["rgba"][..., 3])
    # colour is NOT composited: even fully transparent pixels keep their stored RGB
    np.testing.assert_array_equal(to_uint8(a.pixels).numpy().transpose(1, 2, 0), data["rgba"][..., :3])

    f = load_image(d / "f_icc.png")
    assert f.icc_profile == data["icc"]

    g16 = load_image(d / "g_gray16.png")
    assert g16.pixels.shape == (3, 12, 10)
    np.testing.assert_allclose(g16.pixels[0].numpy(), data["g16"] / 65535.0, atol=1e-6)

    p = load_image(d / "h_palette.png")
    assert p.alpha is not None and p.pixels.shape == (3, 9, 11)
    idx = np.asarray(Image.open(d / "h_palette.png"))
    assert (p.alpha[0].numpy()[idx == 3] == 0).all() and (p.alpha[0].numpy()[idx != 3] == 1).all()
    assert torch.allclose(p.pixels[:, idx == 0], torch.tensor([1.0, 0.0, 0.0])[:, None])


def test_exif_orientation_applied_and_reset(messy_folder):
    d, _ = messy_folder
    raw = Image.open(d / "d_rotated.jpg")
    assert raw.size == (40, 64)  # stored W=40, H=64 (sideways)
    r = load_image(d / "d_rotated.jpg")
    assert r.size == (40, 64) and r.pixels.shape == (3, 40, 64)  # upright: H=40, W=64
    tl, tr, bl, br = _quadrant_means(r.pixels)
    assert _close(tl, RED) and _close(tr, GREEN) and _close(bl, BLUE) and _close(br, WHITE)
    ex = Image.Exif()
    ex.load(r.exif)
    assert ex.get(ExifTags.Base.Orientation, 1) == 1 and ex.get(ExifTags.Base.Make) == "TestCam"


def test_animated_and_multi_page_files_are_refused_still_ones_load(tmp_path):
    """An animated GIF / PNG / WebP / AVIF or a multi-page TIFF is a clear error (its first frame alone would be
    protected into a still PNG, dropping the rest); the same formats with one frame load, a still GIF is listed with
    the photos, and a JPEG with an embedded preview (MPO) gives its primary image."""
    g = np.random.default_rng(3)
    frames = [Image.fromarray(g.integers(0, 256, (20, 24, 3), dtype=np.uint8)) for _ in range(3)]
    for ext in ("gif", "png", "webp", "avif", "tiff"):
        frames[0].save(tmp_path / f"anim.{ext}", save_all=True, append_images=frames[1:])
        with pytest.raises(ImageLoadError, match=r"(animated|multi-page) .*\(3 frames\): apdm protects") as e:
            load_image(tmp_path / f"anim.{ext}")
        assert f"anim.{ext}" in str(e.value)
        frames[1].save(tmp_path / f"still.{ext}", **({"lossless": True} if ext == "webp" else {}))
        still = load_image(tmp_path / f"still.{ext}")
        assert still.size == (20, 24)
        if ext not in ("gif", "avif"):  # GIF quantizes to a palette, AVIF is lossy; the others store these pixels
            assert torch.equal((still.pixels * 255).round().byte().permute(1, 2, 0),
                               torch.from_numpy(np.array(frames[1])))
    assert "still.gif" in [q.name for q in list_images(tmp_path)]
    main_image, preview = (Image.new("RGB", (24, 20), c) for c in ((200, 40, 40), (40, 40, 200)))
    main_image.save(tmp_path / "camera.jpg", format="MPO", save_all=True, append_images=[preview], quality=95)
    with Image.open(tmp_path / "camera.jpg") as im:
        assert im.format == "MPO" and im.n_frames == 2  # the file is what a camera writes
    primary = load_image(tmp_path / "camera.jpg").pixels.mean((1, 2)) * 255
    assert (primary - torch.tensor([200.0, 40.0, 40.0])).abs().max() < 4  # the red primary, not the blue preview


def test_multi_image_heif_gives_its_primary_image(tmp_path):
    """A HEIF holding several images (a phone's burst or depth companion) is read as its *primary* image, also when
    the primary is not the first one stored: the photo the phone shows, at its own size."""
    pillow_heif = pytest.importorskip("pillow_heif")
    light = Image.new("RGB", (24, 20), (210, 200, 190))
    dark = Image.new("RGB", (16, 12), (30, 40, 50))
    for primary, (want_size, want_rgb) in ((0, ((20, 24), (210, 200, 190))), (1, ((12, 16), (30, 40, 50)))):
        heif = pillow_heif.from_pillow(light)
        heif.add_from_pillow(dark)
        heif.save(tmp_path / f"burst{primary}.heic", quality=95, primary_index=primary)
        assert len(pillow_heif.open_heif(tmp_path / f"burst{primary}.heic")) == 2
        im = load_image(tmp_path / f"burst{primary}.heic")
        assert im.size == want_size
        assert (im.pixels.mean((1, 2)) * 255 - torch.tensor(want_rgb, dtype=torch.float32)).abs().max() < 6


def test_load_errors_name_the_file_and_reason(messy_folder, tmp_path):
    d, _ = messy_folder
    cases = {"a_corrupt.png": "corrupt", "i_text.jpg": "not an image", "j_empty.png": "empty",
             "missing.png": "not found"}
    for name, reason in cases.items():
        with pytest.raises(ImageLoadError) as info:
            load_image(d / name)
        assert name in str(info.value) and reason in info.value.reason
    with pytest.raises(ImageLoadError, match="too large"):
        import apdm.core.images as I

        old = I.MAX_PIXELS
        I.MAX_PIXELS = 100
        try:
            load_image(d / "b_gray.png")
        finally:
            I.MAX_PIXELS = old


def test_load_images_reports_bad_files_and_loads_the_rest(messy_folder):
    d, _ = messy_folder
    before = _hashes(d)
    images, ok, errors = load_images(list_images(d), size=24)
    assert images.shape == (7, 3, 24, 24) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert [p.name for p in ok] == ["b_gray.png", "c_cmyk.jpg", "d_rotated.jpg", "e_rgba.png", "f_icc.png",
                                    "g_gray16.png", "h_palette.png"]
    by_name = {Path(e["path"]).name: e["error"] for e in errors}
    assert set(by_name) == {"a_corrupt.png", "i_text.jpg", "j_empty.png"}
    assert "corrupt" in by_name["a_corrupt.png"] and "empty" in by_name["j_empty.png"]
    assert _hashes(d) == before
    # size=None: the first image sets the size, different sizes are reported
    same, ok2, err2 = load_images([d / "b_gray.png", d / "c_cmyk.jpg"])
    assert same.shape == (1, 3, 21, 35) and len(err2) == 1 and "differs" in err2[0]["error"]
    none, ok3, err3 = load_images([d / "a_corrupt.png"], size=8)
    assert none.shape == (0, 3, 8, 8) and ok3 == [] and len(err3) == 1


# ----------------------------------------------------------------------------- resolution mapping
def test_resolution_mapping_shapes_and_constants():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 101, 64, generator=g)
    m = to_model_resolution(x, 32)
    assert m.shape == (3, 32, 32) and m.min() >= 0 and m.max() <= 1
    assert to_model_resolution(torch.rand(2, 3, 17, 33, generator=g), 16).shape == (2, 3, 16, 16)
    assert to_model_resolution(m, 32) is m  # no resampling at the model size
    # a model-resolution constant perturbation maps to the same constant everywhere (every pixel covered)
    delta = torch.full((3, 32, 32), 3 / 255)
    up = perturbation_to_original(delta, (101, 64))
    assert up.shape == (3, 101, 64) and torch.allclose(up, torch.full_like(up, 3 / 255), atol=1e-6)
    # a left/right split stays left/right after upsampling (no transposition / crop)
    delta = torch.zeros(3, 32, 32)
    delta[..., :16] = 1.0
    up = perturbation_to_original(delta, (17, 333))
    assert (up[..., :150] > 0.99).all() and (up[..., 183:] < 0.01).all()
    # DreamBooth-style crop keeps aspect: a wide image keeps its centre
    wide = torch.zeros(3, 20, 60)
    wide[..., 20:40] = 1.0
    c = resize_center_crop(wide, 20)
    assert c.shape == (3, 20, 20) and float(c.mean()) > 0.95


# ----------------------------------------------------------------------------- saving
def test_protect_folder_end_to_end_never_touches_inputs(messy_folder, tmp_path):
    """The protect-images flow on a messy folder: bad files reported, good ones saved in budget, inputs intact."""
    d, data = messy_folder
    before = _hashes(d)
    out = tmp_path / "out"
    budget = 8 / 255
    inputs = list_images(d)
    taken = {str(p.resolve()) for p in inputs}
    report, made = [], {}
    g = torch.Generator().manual_seed(5)
    for p in inputs:
        try:
            img = load_image(p)
        except ImageLoadError as exc:
            report.append({"path": str(p), "error": exc.reason})
            continue
        clean = to_model_resolution(img.pixels, 16)
        delta = (torch.rand(clean.shape, generator=g) * 2 - 1) * budget
        prot = apply_delta_to_original(img.pixels, delta, budget)
        dest = protect_output_path(p, out, fmt="png", taken=taken)
        save_image(prot, dest, alpha=img.alpha, source=p, **output_metadata(img))
        made[p.name] = (dest, img, budget_report(img.pixels, prot, budget))
    assert {Path(r["path"]).name for r in report} == {"a_corrupt.png", "i_text.jpg", "j_empty.png"}
    assert _hashes(d) == before  # inputs byte-identical
    assert sorted(q.name for q in out.iterdir()) == ["b_gray.png", "c_cmyk.png", "d_rotated.png", "e_rgba.png",
                                                     "f_icc.png", "g_gray16.png", "h_palette.png"]
    for name, (dest, img, rep) in made.items():
        saved = Image.open(dest)
        assert saved.size == (img.size[1], img.size[0]), name  # full original resolution, upright
        assert saved.mode == ("RGBA" if img.alpha is not None else "RGB"), name
        back = to_uint8(pil_to_tensor(saved)).int()
        assert int((back - to_uint8(img.pixels).int()).abs().max()) <= 8, name
        assert rep["within_budget"] and rep["linf_255@apdm"] <= 8
        assert "exif" not in saved.info and not saved.getexif(), name  # EXIF (GPS!) stripped by default
    assert Image.open(made["f_icc.png"][0]).info.get("icc_profile") == data["icc"]  # ICC kept
    np.testing.assert_array_equal(np.asarray(Image.open(made["e_rgba.png"][0]))[..., 3], data["rgba"][..., 3])
    rot = load_image(made["d_rotated.jpg"][0])  # saved upright, not rotated twice
    tl, tr, bl, br = _quadrant_means(rot.pixels)
    assert _close(tl, RED, 20) and _close(tr, GREEN, 20) and _close(bl, BLUE, 20) and _close(br, WHITE, 20)


def test_never_overwrite_inputs_in_same_folder(tmp_path):
    a = tmp_path / "a.png"
    b_jpg, b_png = tmp_path / "b.jpg", tmp_path / "b.png"
    for p in (a, b_jpg, b_png):
        Image.new("RGB", (5, 5), (10, 20, 30)).save(p)
    before = _hashes(tmp_path)
    taken = {str(p.resolve()) for p in (a, b_jpg, b_png)}
    with pytest.raises(ValueError, match="overwrite"):
        protect_output_path(a, tmp_path, fmt="png", taken=taken)
    dest = protect_output_path(b_jpg, tmp_path, fmt="png", taken=taken)
    assert dest.name == "b-2.png"  # b.png is an input
    assert protect_output_path(a, tmp_path, suffix="_protected", taken=taken).name == "a_protected.png"
    assert protect_output_path(a, tmp_path, fmt="jpeg").name == "a.jpg"
    x = torch.rand(3, 5, 5)
    with pytest.raises(ValueError, match="refusing"):
        save_image(x, a, source=a)
    with pytest.raises(ValueError, match="refusing"):
        save_image(x, tmp_path / "." / "a.png", source=str(a))
    assert _hashes(tmp_path) == before
    save_image(x, dest, source=b_jpg)
    assert dest.exists() and not list(tmp_path.glob(".*.tmp"))  # atomic write left no temp file


def test_save_image_quantization_formats_and_metadata(tmp_path):
    x = torch.tensor([0.0, 0.5 / 255, 1.49 / 255, 1.51 / 255, 1.0]).view(1, 1, 5).expand(3, 2, 5).contiguous()
    p = save_image(x, tmp_path / "q.png")
    assert np.asarray(Image.open(p))[0, :, 0].tolist() == [0, 1, 1, 2, 255]  # round to nearest (half up)
    u8 = torch.randint(0, 256, (3, 7, 9), dtype=torch.uint8)
    np.testing.assert_array_equal(np.asarray(Image.open(save_image(u8, tmp_path / "u.png"))).transpose(2, 0, 1),
                                  u8.numpy())
    j = save_image(torch.rand(3, 16, 16), tmp_path / "x.jpeg", quality=90)
    assert Image.open(j).format == "JPEG"
    with pytest.raises(ValueError):
        save_image(x, tmp_path / "bad.png", format="jpeg")
    with pytest.raises(ValueError):
        save_image(x, tmp_path / "bad.gif")
    ex = Image.Exif()
    ex[ExifTags.Base.Make] = "TestCam"
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    kept = Image.open(save_image(x, tmp_path / "m.png", icc_profile=icc, exif=ex.tobytes()))
    assert kept.info.get("icc_profile") == icc and kept.getexif().get(ExifTags.Base.Make) == "TestCam"
    stripped = Image.open(save_image(x, tmp_path / "s.png", icc_profile=icc, exif=ex.tobytes(),
                                     strip_metadata=True))
    assert "icc_profile" not in stripped.info and not stripped.getexif()


def test_keep_exif_option_writes_upright_orientation(messy_folder, tmp_path):
    d, _ = messy_folder
    img = load_image(d / "d_rotated.jpg")
    assert output_metadata(img)["exif"] is None
    assert output_metadata(img, strip_metadata=True) == {"icc_profile": None, "exif": None}
    p = save_image(img.pixels, tmp_path / "k.png", **output_metadata(img, keep_exif=True))
    again = load_image(p)
    assert again.size == img.size  # orientation 1 on disk: no second rotation
    assert Image.open(p).getexif().get(ExifTags.Base.Make) == "TestCam"


# ----------------------------------------------------------------------------- pil/tensor, grids
def test_pil_tensor_round_trip():
    a = np.random.default_rng(1).integers(0, 256, (6, 9, 3), dtype=np.uint8)
    t = pil_to_tensor(Image.fromarray(a))
    assert t.shape == (3, 6, 9) and t.dtype == torch.float32
    np.testing.assert_array_equal(np.asarray(tensor_to_pil(t)), a)
    np.testing.assert_array_equal(np.asarray(tensor_to_pil(t[None])), a)
    rgba = tensor_to_pil(t, alpha=torch.full((1, 6, 9), 0.5))
    assert rgba.mode == "RGBA" and np.asarray(rgba)[..., 3].tolist()[0][0] == 128
    with pytest.raises(ValueError):
        tensor_to_pil(torch.rand(4, 6, 9))


def test_grid_shape_and_placement(tmp_path):
    n, h, w = 5, 4, 6
    imgs = torch.stack([torch.full((3, h, w), i / 10) for i in range(n)])
    grid = images_to_grid(imgs, nrow=3, padding=2, pad_value=1.0)
    assert grid.size == (3 * (w + 2) + 2, 2 * (h + 2) + 2)
    a = np.asarray(grid)
    for i in range(n):
        r, c = divmod(i, 3)
        top, left = 2 + r * (h + 2), 2 + c * (w + 2)
        assert (a[top:top + h, left:left + w] == math.floor(i / 10 * 255 + 0.5)).all()  # half up
    assert (a[0] == 255).all() and (a[-1, -(w + 2):] == 255).all()  # border and the empty last cell are padding
    assert images_to_grid(imgs, nrow=8).size == (5 * (w + 2) + 2, h + 4)
    p = save_grid(imgs, tmp_path / "grid.png", nrow=2)
    assert Image.open(p).size == (2 * (w + 2) + 2, 3 * (h + 2) + 2)
    with pytest.raises(ValueError):
        images_to_grid(torch.zeros(0, 3, 4, 4))


def test_atomic_outputs_get_umask_permissions_not_tempfile_0600(tmp_path):
    import os

    from safetensors.torch import save_file

    from apdm.utils import atomic_dir, atomic_write_text

    old = os.umask(0o022)
    try:
        f = atomic_write_text(tmp_path / "a.json", "{}")
        with atomic_dir(tmp_path / "model") as d:
            (d / "x").write_text("1")
            (d / "unet").mkdir()  # safetensors writes its files 0600: a served model was unreadable to others
            save_file({"w": torch.zeros(2)}, str(d / "unet" / "w.safetensors"))
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "model").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "model" / "unet" / "w.safetensors").stat().st_mode & 0o777 == 0o644


def test_names_with_brackets_are_paths_not_globs(tmp_path):
    """'Trip [2024]/' and 'photo[1].png' were taken as globs ([...] a character class) and reported not found."""
    from PIL import Image

    from apdm.core.images import list_images

    trip = tmp_path / "Trip [2024]"
    trip.mkdir()
    Image.new("RGB", (8, 8)).save(trip / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "photo[1].png")
    assert list_images(str(trip)) == [trip / "a.png"]
    assert list_images(str(tmp_path / "photo[1].png")) == [tmp_path / "photo[1].png"]
    assert list_images(str(tmp_path / "photo?1?.png")) == [tmp_path / "photo[1].png"]  # a glob is still one
