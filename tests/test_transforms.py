"""Robustness transforms: shape/dtype/range contracts, reference behaviour, and parse_attack errors."""

from __future__ import annotations

import pytest
import torch

from apdm.attacks import transforms as T


@pytest.fixture(scope="module")
def photo():
    """A natural image (scikit-image's astronaut, 128x128 crop around the face), (1,3,128,128) in [0,1]."""
    skd = pytest.importorskip("skimage.data")
    img = torch.from_numpy(skd.astronaut()).permute(2, 0, 1).float().div(255)[None]
    return img[..., 60:188, 150:278].contiguous()


def test_suite_names_and_contract(rand_images):
    for key in ("jpeg75", "jpeg50", "jpeg25", "blur", "resize", "crop", "flip", "none"):
        assert key in T.TRANSFORMS
    x = rand_images[:2, :, :48, :40].contiguous()  # non-square on purpose
    for name, fn in T.TRANSFORMS.items():
        y = fn(x)
        assert y.shape == x.shape, name
        assert y.dtype == x.dtype, name
        assert y.device == x.device, name
        assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0, name
        assert y.data_ptr() != x.data_ptr(), name  # never aliases the input
    assert torch.equal(T.TRANSFORMS["none"](x), x)
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        T.jpeg(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="float"):
        T.hflip(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))


def test_jpeg_quality_ordering(photo):
    errs = {q: float((T.jpeg(photo, q) - photo).pow(2).mean()) for q in (25, 50, 75, 95)}
    assert errs[25] > errs[50] > errs[75] > errs[95] > 0
    y = T.jpeg(photo, 75)
    assert torch.allclose(y * 255, (y * 255).round(), atol=1e-4)  # decoded values lie on the 1/255 grid
    assert torch.equal(T.TRANSFORMS["jpeg50"](photo), T.jpeg(photo, 50))


def test_blur_constant_reference_and_strength(photo):
    const = torch.full((2, 3, 20, 24), 0.37)
    assert torch.allclose(T.gaussian_blur(const), const, atol=1e-6)
    assert T.default_sigma(7) == pytest.approx(1.4)
    # variance (sharpness) drops monotonically with sigma
    hp = [float((T.gaussian_blur(photo, 7, s) - photo).abs().mean()) for s in (0.5, 1.0, 2.0)]
    assert hp[0] < hp[1] < hp[2]
    assert torch.allclose(T.gaussian_blur(photo, 7, 1e-300), photo)  # a vanishing sigma: no blur (was NaN)
    # same as OpenCV's GaussianBlur with sigma 1.4 (BORDER_REFLECT_101 == torch 'reflect'); OpenCV's sigma=0
    # for k=7 uses a fixed binomial-like table instead of the formula, torchvision uses the formula like us
    cv2 = pytest.importorskip("cv2")
    arr = photo[0].permute(1, 2, 0).numpy()
    ref = torch.from_numpy(cv2.GaussianBlur(arr, (7, 7), 1.4, borderType=cv2.BORDER_REFLECT_101)).permute(2, 0, 1)
    assert torch.allclose(T.gaussian_blur(photo)[0], ref, atol=1e-5)


def test_resize_and_crop(photo):
    assert torch.allclose(T.resize_down_up(photo, 1.0), photo.clamp(0, 1), atol=1e-5)
    e = {f: float((T.resize_down_up(photo, f) - photo).abs().mean()) for f in (0.25, 0.5, 0.75)}
    assert e[0.25] > e[0.5] > e[0.75] > 0
    const = torch.full((1, 3, 32, 32), 0.6)
    assert torch.allclose(T.resize_down_up(const, 0.25), const, atol=1e-5)
    assert torch.allclose(T.center_crop(photo, 1.0), photo)
    # a white centre square covering the middle half fills (almost) the whole image after crop(0.5)
    img = torch.zeros(1, 3, 64, 64)
    img[..., 16:48, 16:48] = 1.0
    out = T.center_crop(img, 0.5)
    assert out.shape == img.shape and float(out.mean()) > 0.97
    with pytest.raises(ValueError, match="fraction"):
        T.center_crop(img, 0.0)


def test_flip_and_noise(photo):
    assert torch.equal(T.hflip(T.hflip(photo)), photo)
    assert torch.equal(T.hflip(photo)[..., 0], photo[..., -1])
    gray = torch.full((2, 3, 64, 64), 0.5)
    a = T.gaussian_noise(gray, 0.05, seed=3)
    b = T.gaussian_noise(gray, 0.05, seed=3)
    c = T.gaussian_noise(gray, 0.05, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float((a - gray).std()) == pytest.approx(0.05, rel=0.05)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(T.gaussian_noise(gray, 0.05, generator=g), a)
    assert torch.equal(T.gaussian_noise(gray, 0.0, seed=0), gray)
    assert float(T.gaussian_noise(photo, 0.5, seed=0).min()) >= 0.0


def test_parse_attack_forms(photo):
    assert torch.equal(T.parse_attack("jpeg:quality=60")(photo), T.jpeg(photo, 60))
    assert torch.equal(T.parse_attack("blur:kernel_size=5")(photo), T.gaussian_blur(photo, 5))
    assert torch.equal(T.parse_attack("blur:kernel_size=5, sigma=2")(photo), T.gaussian_blur(photo, 5, 2.0))
    assert torch.equal(T.parse_attack("resize:factor=0.5")(photo), T.resize_down_up(photo, 0.5))
    assert torch.equal(T.parse_attack("noise:std=0.1,seed=2")(photo), T.gaussian_noise(photo, 0.1, seed=2))
    assert torch.equal(T.parse_attack("JPEG25")(photo), T.jpeg(photo, 25))
    assert torch.equal(T.parse_attack("jpeg")(photo), T.jpeg(photo))  # base name alone: defaults
    f = T.parse_attack(" crop:fraction=0.7 ")
    assert f.spec == "crop:fraction=0.7" and f.name == "crop"
    assert torch.equal(f(photo), T.center_crop(photo, 0.7))


@pytest.mark.parametrize("spec, message", [
    ("jpg", r"unknown attack 'jpg'.*jpeg75"),
    ("jpeg:q=5", r"no parameter 'q' \(parameters: quality\)"),
    ("jpeg:quality=abc", "not an integer"),
    ("jpeg:quality=60.5", "not an integer"),
    ("jpeg:quality=0", r"quality must be in 1\.\.100"),
    ("blur:kernel_size=4", "odd"),
    ("blur:sigma=nan", "not a number"),
    ("resize:factor=2", r"factor must be in \(0, 1\]"),
    ("jpeg:quality", "expected key=value"),
    ("jpeg:quality=50,quality=60", "given twice"),
    ("jpeg50:quality=3", "preset.*'jpeg:quality=3'"),
    ("flip:p=1", r"no parameter 'p' \(parameters: none\)"),
    ("diffpure", "needs the diffusion model"),
    ("", "non-empty"),
])
def test_parse_attack_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        T.parse_attack(spec)
