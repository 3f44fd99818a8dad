"""Budget parsing/printing, L∞ projection, and the exact 8-bit guarantee on saved files."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from apdm.core.images import load_image, save_image, to_model_resolution
from apdm.protect_images.budget import (
    apply_delta_to_original,
    budget_levels,
    budget_report,
    format_budget,
    parse_budget,
    project_linf,
    quantize_with_budget,
    to_uint8,
)

ODD_SIZES = [(17, 33), (101, 64), (3, 200)]


# ----------------------------------------------------------------------------- parse / format
@pytest.mark.parametrize("text,expected", [
    ("8/255", 8 / 255), (" 8 / 255 ", 8 / 255), ("6.4/255", 6.4 / 255), ("8", 8 / 255), (8, 8 / 255),
    ("0.0314", 0.0314), (0.0314, 0.0314), (12.75, 12.75 / 255), ("16/256", 16 / 256), ("0", 0.0), (0, 0.0),
    ("255/255", 1.0), ("1e-2", 0.01), (np.float32(0.05), 0.05),
])
def test_parse_budget_accepts(text, expected):
    assert parse_budget(text) == pytest.approx(expected, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("bad", ["-8/255", "-0.01", "300", "256/255", "8/0", "eight", "", "8/255/2", "nan",
                                 "inf", 1, "1", True, None, [8]])
def test_parse_budget_rejects(bad):
    with pytest.raises(ValueError):
        parse_budget(bad)


def test_parse_budget_error_names_the_input():
    with pytest.raises(ValueError, match="eight"):
        parse_budget("eight")


@pytest.mark.parametrize("x,text", [(8 / 255, "8/255"), (6.4 / 255, "6.4/255"), (0.0314, "8.01/255"),
                                    (16 / 255, "16/255"), (0.0, "0/255"), (1.0, "255/255"), (12.75 / 255, "12.75/255")])
def test_format_budget(x, text):
    assert format_budget(x) == text


def test_format_parse_round_trip():
    rng = np.random.default_rng(0)
    for x in np.concatenate([rng.uniform(0, 1, 200), np.arange(0, 33) / 255]):
        y = parse_budget(format_budget(float(x)))
        assert abs(y - x) <= 0.005 / 255 + 1e-12
    for k in range(0, 256):  # whole levels survive exactly
        assert format_budget(parse_budget(f"{k}/255")) == f"{k}/255"


def test_budget_levels():
    assert budget_levels(8 / 255) == 8
    assert budget_levels(6.4 / 255) == 6
    assert budget_levels(0.05 * 127.5 / 255) == 6  # Anti-DreamBooth's 0.05 on [-1,1]
    assert [budget_levels(k / 255) for k in range(256)] == list(range(256))


# ----------------------------------------------------------------------------- projection
def test_project_linf_matches_reference():
    g = torch.Generator().manual_seed(0)
    clean = torch.rand(3, 3, 17, 33, generator=g)
    x = clean + (torch.rand(clean.shape, generator=g) - 0.5) * 0.5
    b = 8 / 255
    out = project_linf(x, clean, b)
    ref = np.clip(np.clip(x.numpy(), clean.numpy() - b, clean.numpy() + b), 0, 1)
    np.testing.assert_allclose(out.numpy(), ref, atol=1e-7)
    assert float((out - clean).abs().max()) <= b + 1e-6
    assert out.min() >= 0 and out.max() <= 1
    inside = ((x - clean).abs() < b - 1e-6) & (x > 0) & (x < 1)
    assert torch.equal(out[inside], x[inside])  # points inside the ball are untouched


def test_project_linf_per_image_budget_and_gradient():
    g = torch.Generator().manual_seed(1)
    clean = torch.rand(2, 3, 8, 8, generator=g)
    x = (clean + torch.randn(clean.shape, generator=g)).requires_grad_(True)
    budgets = torch.tensor([2 / 255, 16 / 255]).view(2, 1, 1, 1)
    out = project_linf(x, clean, budgets)
    d = (out - clean).abs().flatten(1).max(1).values
    assert d[0] <= 2 / 255 + 1e-6 and d[1] <= 16 / 255 + 1e-6 and d[1] > 2 / 255
    out.sum().backward()
    assert x.grad is not None and set(x.grad.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError):
        project_linf(x, clean, -0.1)


# ----------------------------------------------------------------------------- 8-bit guarantee
def test_quantize_with_budget_matches_integer_reference():
    g = torch.Generator().manual_seed(2)
    orig = torch.randint(0, 256, (3, 17, 33), generator=g, dtype=torch.uint8)
    prot = torch.rand(3, 17, 33, generator=g)  # far outside the ball: heavy clipping
    for b in (8 / 255, 6.4 / 255, 0.0314, 0.0):
        q = quantize_with_budget(prot, orig, b)
        k = math.floor(255 * b + 1e-6)
        o = orig.numpy().astype(np.int64)
        ref = np.clip(np.clip(np.floor(prot.numpy().astype(np.float64) * 255 + 0.5), o - k, o + k), 0, 255)
        assert q.dtype == torch.uint8
        np.testing.assert_array_equal(q.numpy(), ref.astype(np.uint8))
        assert int((q.int() - orig.int()).abs().max()) == k  # the random image reaches the bound


def test_quantize_keeps_the_budget_against_a_16bit_original():
    """A 16-bit original lies between 8-bit levels: each saved level must be within the budget of the 16-bit value
    itself, ``q ∈ [ceil(255·(o − b)), floor(255·(o + b))]``, the nearest level when that is empty. Before, the
    bound was taken around the original rounded to 8 bits, up to half a level more (8.49/255 on a flat 16-bit gray
    photo at budget 8/255)."""
    g = torch.Generator().manual_seed(4)
    values = torch.randint(0, 65536, (3, 17, 33), generator=g)
    values[0, :4] = 25826  # a flat patch at 100.49 grey levels, the audit's photo
    orig = (values.double() / 65535).float()  # as load_image reads it
    prot = torch.rand(3, 17, 33, generator=g)  # far outside the ball: heavy clipping
    o = values.numpy() / 257.0  # the original in grey levels, exactly
    for b in (8 / 255, 6.4 / 255, 0.0314, 0.3 / 255, 0.0):
        q = quantize_with_budget(prot, orig, b).numpy().astype(np.int64)
        lo = np.clip(np.ceil(o - 255 * b - 1e-6), 0, 255)
        hi = np.clip(np.floor(o + 255 * b + 1e-6), 0, 255)
        empty = lo > hi  # no level within the budget (b under half a level): the nearest one
        lo, hi = np.where(empty, np.floor(o + 0.5), lo), np.where(empty, np.floor(o + 0.5), hi)
        ref = np.clip(np.floor(prot.numpy().astype(np.float64) * 255 + 0.5), lo, hi)
        np.testing.assert_array_equal(q, ref.astype(np.int64))
        assert (np.abs(q - o)[~empty] <= 255 * b + 1e-4).all()
        assert empty.any() == (b < 0.5 / 255)
        if b >= 1 / 255:  # the random protected image reaches the bound
            assert np.abs(q - o).max() > 255 * b - 1
    flat = torch.full((3, 4, 4), 25826 / 65535)
    up = quantize_with_budget(torch.ones(3, 4, 4), flat, 8 / 255)
    down = quantize_with_budget(torch.zeros(3, 4, 4), flat, 8 / 255)
    assert (up == 108).all() and (down == 93).all()  # 100.49 ± 8 -> [92.49, 108.49]: 93..108, not 92..108


def test_to_uint8_rounds_half_up_and_rejects_nan():
    x = torch.tensor([0.0, 0.5 / 255, 1.49 / 255, 1.5 / 255, 254.6 / 255, 1.2, -0.3])
    assert to_uint8(x).tolist() == [0, 1, 1, 2, 255, 255, 0]
    assert torch.equal(to_uint8(torch.arange(256, dtype=torch.float32) / 255), torch.arange(256).to(torch.uint8))
    with pytest.raises(ValueError):
        to_uint8(torch.tensor([float("nan")]))


@pytest.mark.parametrize("hw", ODD_SIZES)
@pytest.mark.parametrize("budget", [8 / 255, 6.4 / 255, 0.0314, 16 / 255])
def test_guarantee_holds_on_saved_png(tmp_path, hw, budget):
    """Random odd-size photo, random model-resolution delta (3x the budget): the reloaded PNG is within budget."""
    g = torch.Generator().manual_seed(hw[0] * 1000 + hw[1])
    h, w = hw
    orig_u8 = torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)
    orig_u8[:, : h // 2 + 1, : w // 3 + 1] = 0  # saturated regions exercise the [0,1] clip
    orig_u8[:, h // 2:, w // 3:] = 255
    orig = orig_u8.float() / 255
    s = 32
    clean_model = to_model_resolution(orig, s)
    assert clean_model.shape == (3, s, s)
    delta = (torch.rand(3, s, s, generator=g) * 2 - 1) * 3 * budget
    protected = apply_delta_to_original(orig, delta, budget)
    assert protected.shape == (3, h, w) and protected.dtype == torch.float32
    path = save_image(protected, tmp_path / "p.png")
    back = np.asarray(Image.open(path).convert("RGB")).astype(np.int64).transpose(2, 0, 1)
    diff = np.abs(back - orig_u8.numpy().astype(np.int64))
    k = math.floor(255 * budget + 1e-6)
    assert diff.max() <= k
    assert diff.max() == k  # the perturbation is really there, not zeroed by the guard
    # the saved file is exactly the quantized float result (no extra rounding on save)
    np.testing.assert_array_equal(back, np.floor(protected.numpy().astype(np.float64) * 255 + 0.5).astype(np.int64))
    # and load_image reads back the same values
    np.testing.assert_array_equal(to_uint8(load_image(path).pixels).numpy(), back.astype(np.uint8))


def test_apply_delta_follows_the_delta_direction():
    """A constant model-resolution delta becomes the same constant at full resolution (bicubic keeps constants)."""
    orig = torch.full((3, 37, 19), 128 / 255)
    delta = torch.full((3, 16, 16), 4 / 255)
    delta[1] = -4 / 255
    out = apply_delta_to_original(orig, delta, 8 / 255)
    u = to_uint8(out).int() - to_uint8(orig).int()
    assert (u[0] == 4).all() and (u[1] == -4).all() and (u[2] == 4).all()
    unq = apply_delta_to_original(orig, delta, 2 / 255, quantize=False)
    assert float((unq - orig).abs().max()) == pytest.approx(2 / 255, abs=1e-6)


def test_budget_report_against_formulas():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    g = torch.Generator().manual_seed(3)
    orig = torch.randint(0, 256, (3, 40, 48), generator=g, dtype=torch.uint8)
    prot = quantize_with_budget(orig.float() / 255 + (torch.rand(3, 40, 48, generator=g) - 0.5) * 0.1,
                                orig, 8 / 255)
    rep = budget_report(orig, prot, budget=8 / 255)
    a, b = orig.numpy().astype(np.float64) / 255, prot.numpy().astype(np.float64) / 255
    assert rep["linf_255@apdm"] == 8 and isinstance(rep["linf_255@apdm"], int)
    assert rep["psnr@apdm"] == pytest.approx(10 * np.log10(1 / np.mean((a - b) ** 2)), abs=1e-3)
    assert rep["psnr@apdm"] == pytest.approx(peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-3)
    ref_ssim = structural_similarity(a, b, data_range=1.0, channel_axis=0, gaussian_weights=True, sigma=1.5,
                                     use_sample_covariance=False)
    assert rep["ssim@skimage"] == pytest.approx(ref_ssim, abs=1e-5)
    assert rep["within_budget"] is True and rep["budget_255"] == pytest.approx(8.0)
    assert budget_report(orig, prot, budget=4 / 255)["within_budget"] is False
    same = budget_report(orig.float() / 255, orig)
    assert same["linf_255@apdm"] == 0 and same["psnr@apdm"] is None
    assert same["ssim@skimage"] == pytest.approx(1.0, abs=1e-6)
    tiny = budget_report(torch.rand(3, 3, 200), torch.rand(3, 3, 200))
    assert tiny["ssim@skimage"] is None and tiny["psnr@apdm"] > 0
    with pytest.raises(ValueError):
        budget_report(torch.rand(3, 8, 8), torch.rand(3, 8, 9))


def test_banded_ssim_equals_whole_image_ssim():
    from skimage.metrics import structural_similarity

    from apdm.protect_images.budget import SSIM_KW, _ssim_banded

    rng = np.random.default_rng(4)
    a = rng.random((3, 97, 41)).astype(np.float32)
    b = np.clip(a + 0.05 * rng.standard_normal(a.shape).astype(np.float32), 0, 1)
    whole = structural_similarity(a.astype(np.float64), b.astype(np.float64), channel_axis=0, **SSIM_KW)
    for rows in (1, 7, 16, 40, 500):
        assert _ssim_banded(a, b, band_rows=rows) == pytest.approx(whole, abs=1e-5)
