"""Evaluation metrics against reference implementations and closed forms.

References: scikit-image (PSNR/SSIM), scipy ``sqrtm`` (FID), a direct unbiased MMD² (KID), hand formulas (ISM,
FDFR, SDS, all-pairs cosine), the ``brisque`` pip package (BRISQUE), a transformers ``CLIPModel.forward``
(CLIP-IQA, CLIP-T) with tiny random models built from configs.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apdm.evaluation import distribution as D
from apdm.evaluation import fidelity as FI
from apdm.evaluation import identity as I
from apdm.evaluation import iqa
from apdm.evaluation.metrics import (MetricUnavailable, measure, metric_record, summarize, to_uint8,
                                     unavailable)
from apdm.utils import MissingDependency


def _has(module: str) -> bool:
    """Installed? (find_spec: no import side effects at collection time)"""
    import importlib.util

    return importlib.util.find_spec(module) is not None


@pytest.fixture(scope="module")
def astronaut():
    """scikit-image's astronaut (512x512, ships with scikit-image), (1,3,512,512) in [0,1]."""
    skd = pytest.importorskip("skimage.data")
    return torch.from_numpy(skd.astronaut()).permute(2, 0, 1).float().div(255)[None]


@pytest.fixture(scope="module")
def photos(astronaut):
    """Two natural 96x96 crops (face and rocket/flag area)."""
    return torch.cat([astronaut[..., 60:156, 170:266], astronaut[..., 300:396, 20:116]]).contiguous()


def _noisy(x, std, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g)).clamp(0, 1)


# ------------------------------------------------------------------------------------------ records
def test_record_format_and_measure():
    r = metric_record("psnr", "torchmetrics", torch.tensor(31.5), True, 4, std=np.float64(0.5))
    assert r == {"metric": "psnr@torchmetrics", "name": "psnr", "impl": "torchmetrics", "value": 31.5,
                 "higher_is_better": True, "n": 4, "available": True, "std": 0.5}
    u = unavailable("fid", "inception", "weights are downloaded", False)
    assert u["value"] is None and u["available"] is False and u["reason"] == "weights are downloaded"
    assert u["metric"] == "fid@inception"
    json.dumps([r, u])  # plain JSON

    s = summarize("x", "y", torch.tensor([1.0, 2.0, 3.0]), True)
    assert s["value"] == pytest.approx(2.0) and s["std"] == pytest.approx(1.0) and s["n"] == 3

    def missing():
        raise MissingDependency("install apdm[faces]")

    def too_small():
        raise MetricUnavailable("images too small")

    assert measure("ism", "dlib-resnet", True, missing)["reason"] == "install apdm[faces]"
    assert measure("ms_ssim", "tm", True, too_small)["available"] is False
    assert measure("kid", "t", False, lambda: (0.25, 0.125), n=7) == metric_record("kid", "t", 0.25, False, 7,
                                                                                   std=0.125)
    with pytest.raises(ZeroDivisionError):  # real bugs are not turned into "unavailable"
        measure("bad", "x", True, lambda: 1 / 0)


def test_to_uint8_rounds_and_checks():
    x = torch.tensor([0.0, 0.5, 1.0, 1.2]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    u = to_uint8(x)
    assert u.dtype == np.uint8 and u.shape == (1, 2, 2, 3)
    assert u[0, :, :, 0].ravel().tolist() == [0, 128, 255, 255]
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        to_uint8(torch.rand(3, 4, 4))


# ---------------------------------------------------------------------------------------- fidelity
def test_psnr_ssim_match_skimage(photos):
    skm = pytest.importorskip("skimage.metrics")
    prot = _noisy(photos, 0.03)
    p, s = FI.psnr(photos, prot), FI.ssim(photos, prot)
    for i in range(len(photos)):
        a, b = photos[i].double().numpy(), prot[i].double().numpy()
        assert float(p[i]) == pytest.approx(skm.peak_signal_noise_ratio(a, b, data_range=1.0), abs=1e-3)
        ref = skm.structural_similarity(a, b, channel_axis=0, data_range=1.0, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False)
        assert float(s[i]) == pytest.approx(ref, abs=1e-6)


def test_identical_images_give_ideal_values(photos):
    assert torch.isinf(FI.psnr(photos, photos)).all()
    assert torch.allclose(FI.ssim(photos, photos), torch.ones(2), atol=1e-5)
    assert torch.allclose(FI.ms_ssim(photos, photos), torch.ones(2), atol=1e-5)
    assert torch.equal(FI.linf_255(photos, photos), torch.zeros(2))


def test_fidelity_monotone_in_perturbation(astronaut):
    clean = astronaut[..., 100:276, 150:326].contiguous()  # 176 px: the smallest size for 5-scale MS-SSIM
    assert FI.ms_ssim_scales(176, 176) == 5
    vals = {k: [] for k in ("psnr", "ssim", "ms_ssim", "linf")}
    for std in (0.01, 0.03, 0.1):
        prot = _noisy(clean, std)
        vals["psnr"].append(float(FI.psnr(clean, prot)))
        vals["ssim"].append(float(FI.ssim(clean, prot)))
        vals["ms_ssim"].append(float(FI.ms_ssim(clean, prot)))
        vals["linf"].append(float(FI.linf_255(clean, prot)))
    for k in ("psnr", "ssim", "ms_ssim"):
        assert vals[k][0] > vals[k][1] > vals[k][2], (k, vals[k])
    assert vals["linf"][0] < vals["linf"][1] < vals["linf"][2]


def test_linf_255_exact():
    x = torch.full((2, 3, 8, 8), 0.5)
    y = x.clone()
    y[0, 1, 2, 3] += 8 / 255
    y[1, 0, 0, 0] -= 3 / 255
    assert FI.linf_255(x, y).tolist() == pytest.approx([8.0, 3.0], abs=1e-4)
    with pytest.raises(ValueError, match="differ in shape"):
        FI.linf_255(x, y[:, :, :4])


def test_ms_ssim_small_images(photos):
    small = photos[..., :64, :64].contiguous()
    assert [FI.ms_ssim_scales(s, s) for s in (11, 12, 43, 44, 98, 99, 175, 176)] == [0, 2, 2, 3, 3, 4, 4, 5]
    v = FI.ms_ssim(small, _noisy(small, 0.05))  # 3 scales with renormalised weights
    assert ((v > 0) & (v < 1)).all()
    with pytest.raises(MetricUnavailable, match="too small"):
        FI.ms_ssim(small[..., :30, :30], small[..., :30, :30])
    with pytest.raises(MetricUnavailable, match="at most 3"):
        FI.ms_ssim(small, small, scales=5)
    recs = {r["name"]: r for r in FI.fidelity_records(small, _noisy(small, 0.05))}
    assert recs["ms_ssim"]["metric"] == "ms_ssim@torchmetrics-s3" and recs["ms_ssim"]["scales"] == 3
    tiny = {r["name"]: r for r in FI.fidelity_records(small[..., :20, :20], small[..., :20, :20])}
    assert tiny["ms_ssim"]["available"] is False and "too small" in tiny["ms_ssim"]["reason"]
    assert tiny["psnr"]["available"] and tiny["linf_255"]["max"] == 0.0


@pytest.mark.skipif(_has("lpips"), reason="lpips installed: the unavailable path is not reachable")
def test_lpips_reported_unavailable_without_extra(photos):
    rec = {r["name"]: r for r in FI.fidelity_records(photos, photos)}["lpips"]
    assert rec["available"] is False and rec["value"] is None and "apdm[lpips]" in rec["reason"]


# ---------------------------------------------------------------------------------------- identity
def test_ism_hand_formula():
    g = torch.Generator().manual_seed(0)
    gen, ref = torch.randn(5, 16, generator=g), torch.randn(3, 16, generator=g) * torch.tensor([[1.0], [5.0], [0.2]])
    ref_n = ref / ref.norm(dim=1, keepdim=True)
    center = ref_n.mean(0)
    expect = torch.stack([gen[i] @ center / (gen[i].norm() * center.norm()) for i in range(5)])
    assert torch.allclose(I.ism(gen, ref), expect, atol=1e-5)
    raw = I.ism(gen, ref, normalize_refs=False)
    assert torch.allclose(raw, F.cosine_similarity(gen, ref.mean(0, keepdim=True)), atol=1e-5)
    assert not torch.allclose(raw, expect, atol=1e-3)  # the convention matters with unequal norms
    same = torch.randn(1, 16, generator=g)
    assert torch.allclose(I.ism(same * 3, same.repeat(4, 1)), torch.ones(1), atol=1e-6)
    with pytest.raises(MetricUnavailable, match="no reference"):
        I.ism(gen, torch.empty(0, 16))


def test_fdfr_sds():
    probs = torch.tensor([0.9, 0.2, 0.6, 0.0])
    assert I.fdfr(probs).tolist() == [0.0, 1.0, 0.0, 1.0]
    assert I.fdfr(probs, threshold=0.7).mean().item() == pytest.approx(0.75)
    assert I.sds(probs).mean().item() == pytest.approx(0.425)
    flags = torch.tensor([True, False, True])
    assert I.fdfr(flags).mean().item() == pytest.approx(1 / 3)
    assert I.sds(flags).tolist() == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("k,n", [(57, 64), (0, 32), (32, 32), (463, 512), (1, 3)])
def test_wilson_interval_matches_scipy(k, n):
    from scipy import stats

    from apdm.evaluation.identity import wilson_interval

    ci = stats.binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-6)
    with pytest.raises(ValueError, match="successes"):
        wilson_interval(5, 4)


def test_identity_records_with_callables(photos):
    proj = torch.randn(3 * 96 * 96, 8, generator=torch.Generator().manual_seed(0))

    def embed(images):  # any embedding callable plugs in (here a fixed random projection)
        return images.flatten(1) @ proj

    def embed_some(images):  # a backend that "finds a face" only in bright images
        found = images.mean(dim=(1, 2, 3)) > 0.2
        return embed(images[found]), found

    gen = torch.cat([photos, torch.zeros(1, 3, 96, 96)])
    recs = {r["name"]: r for r in I.identity_records(gen, photos, embed_some, lambda x: x.mean((1, 2, 3)) > 0.2,
                                                     "proj", "bright")}
    expect = I.ism(embed(photos), embed(photos)).mean().item()
    assert recs["ism"]["value"] == pytest.approx(expect, abs=1e-5)
    assert recs["ism"]["metric"] == "ism@proj" and recs["ism"]["n"] == 2 and recs["ism"]["n_no_face"] == 1
    assert recs["fdfr"]["value"] == pytest.approx(1 / 3) and recs["sds"]["value"] == pytest.approx(2 / 3)
    assert recs["fdfr"]["metric"] == "fdfr@bright"
    none = I.identity_records(torch.zeros(2, 3, 96, 96), photos, embed_some, None, "proj")
    assert none[0]["available"] is False and "no face" in none[0]["reason"]
    # an embedder that embeds every image (the toy world's) takes the detector's verdict: the dark image, which the
    # detector rejects, does not enter ISM (before: it did, and ISM was the mean over all three)
    recs = {r["name"]: r for r in I.identity_records(gen, photos, embed, lambda x: x.mean((1, 2, 3)) > 0.2,
                                                     "proj", "bright")}
    every = I.ism(embed(gen), embed(photos))
    assert recs["ism"]["value"] == pytest.approx(every[:2].mean().item(), abs=1e-5)
    assert recs["ism"]["n"] == 2 and recs["ism"]["n_no_face"] == 1 and recs["ism"]["faces_from"] == "bright"
    assert recs["ism"]["value_all_images"] == pytest.approx(every.mean().item(), abs=1e-5)
    assert abs(every[2].item() - every[:2].mean().item()) > 1e-3  # the two conventions differ here
    alone = {r["name"]: r for r in I.identity_records(gen, photos, embed, None, "proj")}  # no detector: every image
    assert alone["ism"]["value"] == pytest.approx(every.mean().item(), abs=1e-5) and alone["ism"]["n"] == 3


def test_mean_pairwise_cosine_is_all_pairs_mean():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 6, generator=g), torch.randn(3, 6, generator=g)
    allpairs = np.mean([[F.cosine_similarity(x, y, dim=0).item() for y in b] for x in a])
    assert I.mean_pairwise_cosine(a, b).mean().item() == pytest.approx(allpairs, abs=1e-6)


@pytest.mark.skipif(not (_has("dlib") and _has("face_recognition_models")), reason="extra 'faces' not installed")
def test_dlib_backend_on_real_face(astronaut):
    face = astronaut[..., :256, 64:320].contiguous()  # the astronaut's face, ~90 px
    noise = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    assert I.dlib_face_detect(torch.cat([face, noise])).tolist() == [True, False]
    emb, found = I.dlib_face_embed(torch.cat([face, face.flip(-1), noise]))
    assert found.tolist() == [True, True, False] and emb.shape == (2, 128)
    assert float((emb[0] - emb[1]).norm()) < 0.6  # dlib's same-person threshold
    recs = {r["name"]: r for r in I.identity_records(torch.cat([face.flip(-1), noise]), face, I.dlib_face_embed,
                                                     I.dlib_face_detect, "dlib-resnet", "dlib-hog")}
    assert recs["ism"]["value"] > 0.9 and recs["ism"]["n_no_face"] == 1
    assert recs["fdfr"]["value"] == pytest.approx(0.5)


@pytest.mark.skipif(not _has("cv2"), reason="opencv-python-headless<5 not installed")
def test_haar_backend_on_real_face(astronaut):
    face = astronaut[..., :256, 64:320].contiguous()
    noise = torch.rand(1, 3, 256, 256, generator=torch.Generator().manual_seed(0))
    assert I.haar_face_detect(torch.cat([face, noise])).tolist() == [True, False]


@pytest.mark.skipif(_has("facenet_pytorch"), reason="facenet-pytorch installed")
def test_mtcnn_reported_unavailable(photos):
    recs = I.identity_records(photos, photos, None, I.mtcnn_face_detect, detect_impl="mtcnn")
    assert [r["metric"] for r in recs] == ["fdfr@mtcnn", "sds@mtcnn"]
    assert all(r["available"] is False and "facenet_pytorch" in r["reason"] for r in recs)


# ------------------------------------------------------------------------------ DINO / CLIP models
@pytest.fixture(scope="module")
def tiny_clip():
    from transformers import CLIPConfig, CLIPModel

    from apdm.core.tokenizer import build_tokenizer

    tok = build_tokenizer()
    torch.manual_seed(0)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=77, **ids),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    return CLIPModel(cfg).eval(), tok


@pytest.fixture(scope="module")
def tiny_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                    image_size=32, patch_size=8)
    return ViTModel(cfg, add_pooling_layer=False).eval()


def _clip_forward_cosines(model, tok, images, texts):
    """Cosine matrix (N, T) from CLIPModel.forward: logits_per_image / exp(logit_scale)."""
    px = I.preprocess(images, 32, 32, I.CLIP_MEAN, I.CLIP_STD)
    t = tok(texts, padding="max_length", max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=t["input_ids"], attention_mask=t["attention_mask"], pixel_values=px)
        return out.logits_per_image / model.logit_scale.exp()


def test_clip_iqa_formula(tiny_clip, photos):
    model, tok = tiny_clip
    images = torch.cat([photos, _noisy(photos, 0.3)])
    cos = _clip_forward_cosines(model, tok, images, ["Good photo.", "Bad photo."])
    for scale in (1.0, 100.0):
        expect = torch.softmax(scale * cos, dim=1)[:, 0]
        assert torch.allclose(iqa.clip_iqa(model, tok, images, logit_scale=scale), expect, atol=1e-5)
    p = iqa.clip_iqa(model, tok, images, logit_scale=1.0)
    q = iqa.clip_iqa(model, tok, images, prompts=("Bad photo.", "Good photo."), logit_scale=1.0)
    assert torch.allclose(p + q, torch.ones_like(p), atol=1e-6) and ((p > 0) & (p < 1)).all()


def test_clip_t_and_clip_i(tiny_clip, photos):
    model, tok = tiny_clip
    prompts = ["a photo of a person", "a dog in the snow"]
    cos = _clip_forward_cosines(model, tok, photos, prompts)
    assert torch.allclose(I.clip_t(model, tok, photos, prompts), cos.diagonal(), atol=1e-5)
    assert torch.allclose(I.clip_t(model, tok, photos, prompts[0]), cos[:, 0], atol=1e-5)
    assert torch.allclose(I.clip_i(model, photos[:1], photos[:1]), torch.ones(1), atol=1e-5)
    emb = I.clip_image_embeddings(model, photos)
    assert torch.allclose(I.clip_i(model, photos, photos), I.mean_pairwise_cosine(emb, emb), atol=1e-6)
    with pytest.raises(ValueError, match="2 images but 3 prompts"):
        I.clip_t(model, tok, photos, prompts + ["x"])


def test_dino_all_pairs(tiny_vit, photos):
    gen = torch.cat([photos, _noisy(photos, 0.2)])
    d = I.dino(tiny_vit, gen, photos)
    assert d.shape == (4,)
    assert torch.allclose(I.dino(tiny_vit, photos[:1], photos[:1]), torch.ones(1), atol=1e-5)
    size, resize = 32, round(32 * 256 / 224)
    with torch.no_grad():
        feats = tiny_vit(pixel_values=I.preprocess(gen, size, resize)).last_hidden_state[:, 0]
        refs = tiny_vit(pixel_values=I.preprocess(photos, size, resize)).last_hidden_state[:, 0]
    allpairs = torch.stack([torch.stack([F.cosine_similarity(a, b, dim=0) for b in refs]).mean() for a in feats])
    assert torch.allclose(d, allpairs, atol=1e-5)


def test_preprocess_geometry():
    x = torch.zeros(1, 3, 40, 80)
    x[..., :, 20:60] = 1.0  # bright central square region
    out = I.preprocess(x, 32, 32, mean=(0, 0, 0), std=(1, 1, 1))
    assert out.shape == (1, 3, 32, 32)
    assert float(out.min()) > 0.95  # center crop of the resized image keeps only the bright middle
    y = torch.rand(2, 3, 32, 32)
    assert torch.allclose(I.preprocess(y, 32, 32, (0.5,) * 3, (0.5,) * 3), (y - 0.5) / 0.5)


def test_local_model_loading(tiny_vit, tiny_clip, tmp_path):
    tiny_vit.save_pretrained(tmp_path / "vit")
    v = I.load_vit(tmp_path / "vit")
    x = torch.rand(1, 3, 32, 32)
    assert torch.allclose(I.vit_cls_embeddings(v, x), I.vit_cls_embeddings(tiny_vit, x), atol=1e-6)
    model, tok = tiny_clip
    model.save_pretrained(tmp_path / "clip")
    tok.save_pretrained(tmp_path / "clip")
    m2, t2 = I.load_clip(tmp_path / "clip")
    assert torch.allclose(I.clip_t(m2, t2, x, "a photo"), I.clip_t(model, tok, x, "a photo"), atol=1e-6)
    with pytest.raises(MetricUnavailable, match="local path"):
        I.load_vit(tmp_path / "missing")
    # through evaluate: each tag names the model folder that produced it (two backbones never share one), and with
    # no path the CLIP metrics are reported unavailable rather than left out
    from apdm.config import EvaluateRunConfig
    from apdm.evaluation.run import _backends, score_generations

    cfg = EvaluateRunConfig()
    cfg.metrics.brisque = False
    cfg.metrics.clip_iqa = True
    cfg.metrics.dino_path, cfg.metrics.clip_path = str(tmp_path / "vit"), str(tmp_path / "clip") + "/"
    gen, ref = torch.rand(2, 3, 32, 32), torch.rand(2, 3, 32, 32)
    recs = score_generations(gen, ref, cfg, _backends(cfg, "person"), "a photo")
    assert sorted(r["metric"] for r in recs) == ["clip_i@clip", "clip_iqa@clip", "clip_t@clip", "dino@vit"]
    assert all(r["available"] for r in recs)
    cfg = EvaluateRunConfig()
    cfg.metrics.brisque = False
    recs = score_generations(gen, ref, cfg, _backends(cfg, "person"), "a photo")
    assert {r["name"]: r["available"] for r in recs} == {"dino": False, "clip_i": False, "clip_t": False}
    assert all("not set" in r["reason"] for r in recs)


# --------------------------------------------------------------------------------------------- IQA
@pytest.fixture(scope="module")
def brisque_images(astronaut):
    g = torch.Generator().manual_seed(0)
    return [astronaut[..., :128, :128], astronaut[..., 100:165, 200:263],  # odd sizes exercise the x0.5 resize
            astronaut[..., 300:381, 300:380], torch.rand(1, 3, 96, 96, generator=g)]


@pytest.mark.skipif(not _has("brisque"), reason="the brisque package (extra 'metrics') is not installed")
def test_brisque_matches_pip_package(brisque_images):
    for x in brisque_images:
        x = x.contiguous()
        ours, pkg = iqa.brisque(x), iqa.brisque_pip(x)
        assert float(ours) == pytest.approx(float(pkg), abs=1e-2), tuple(x.shape)
    rec = iqa.brisque_record(torch.cat([brisque_images[0], brisque_images[0]]), "pip-brisque")
    assert rec["metric"] == "brisque@pip-brisque" and rec["n"] == 2


@pytest.mark.skipif(not _has("brisque"), reason="the brisque package (extra 'metrics') is not installed")
def test_brisque_worse_with_noise(astronaut):
    clean = astronaut[..., 40:168, 150:278].contiguous()
    # BRISQUE is not monotone for very mild noise (it can *lower* the score of a slightly soft photo), so the
    # levels start at a visible 0.05
    scores = [float(iqa.brisque(_noisy(clean, s))) for s in (0.0, 0.05, 0.1, 0.2, 0.3)]
    assert scores[0] < scores[2] and scores[1] < scores[2] < scores[3] < scores[4], scores
    assert float(iqa.brisque(torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1)))) > 80
    flat = iqa.brisque_record(torch.full((2, 3, 32, 32), 0.5))
    assert flat["available"] is False and "flat" in flat["reason"]


def test_brisque_features_shape_and_aggd_fit():
    feats = iqa.brisque_features(torch.rand(2, 3, 40, 41))
    assert feats.shape == (2, 36) and torch.isfinite(feats).all()
    rng = np.random.default_rng(0)
    a, mean, sl, sr = iqa.aggd_fit(rng.standard_normal(200_000))  # Gaussian: alpha=2, symmetric, sigma=1
    assert a == pytest.approx(2.0, abs=0.05) and abs(mean) < 0.02
    assert sl == pytest.approx(1.0, abs=0.02) and sr == pytest.approx(1.0, abs=0.02)
    a, *_ = iqa.aggd_fit(rng.laplace(size=200_000))  # Laplace: alpha=1
    assert a == pytest.approx(1.0, abs=0.05)
    assert np.isnan(iqa.aggd_fit(np.zeros(10))[0])


def test_brisque_model_loader_refuses_code(tmp_path):
    (tmp_path / "svm.txt").write_text("svm_type epsilon_svr\nkernel_type rbf\ngamma 0.5\nrho 1\nSV\n2 1:0.5\n")
    with open(tmp_path / "normalize.pickle", "wb") as f:
        pickle.dump({"min_": [0.0] * 36, "max_": [1.0] * 36}, f)
    m = iqa.load_brisque_model(str(tmp_path))
    x = torch.zeros(1, 36)
    x[0, 0] = 0.75  # scaled: -1 + 2 * 0.75 = 0.5 == the support vector's first entry; others scale to -1
    expect = 2 * np.exp(-0.5 * 35) - 1
    assert float(iqa.brisque_from_features(x, m)) == pytest.approx(expect, abs=1e-6)
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "svm.txt").write_text((tmp_path / "svm.txt").read_text())
    with open(evil / "normalize.pickle", "wb") as f:
        pickle.dump({"min_": np.zeros(36), "max_": np.ones(36)}, f)  # needs numpy globals -> refused
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        iqa.load_brisque_model(str(evil))


@pytest.mark.skipif(_has("pyiqa"), reason="pyiqa installed")
def test_pyiqa_metrics_reported_unavailable(photos):
    for fn, name, impl in ((iqa.clipiqa_pyiqa, "clipiqa", "pyiqa"), (iqa.liqe_pyiqa, "liqe", "pyiqa-liqe_mix")):
        rec = measure(name, impl, True, fn, photos)
        assert rec["available"] is False and "apdm[iqa]" in rec["reason"]


# ------------------------------------------------------------------------------------ distribution
def _frechet_closed_form(a: np.ndarray, b: np.ndarray) -> float:
    from scipy import linalg

    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean))


def _mmd2_unbiased(x: np.ndarray, y: np.ndarray, degree=3, coef=1.0) -> float:
    d = x.shape[1]
    k = lambda a, b: (a @ b.T / d + coef) ** degree  # noqa: E731
    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (m * (m - 1))
                 - 2 * kxy.mean())


def test_fid_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    real = torch.randn(60, 6, generator=g, dtype=torch.float64)
    fake = torch.randn(55, 6, generator=g, dtype=torch.float64) * 1.5 + 0.3
    assert D.fid(real, fake) == pytest.approx(_frechet_closed_form(real.numpy(), fake.numpy()), rel=1e-6)
    assert abs(D.fid(real, real)) < 1e-6
    closer = torch.randn(55, 6, generator=g, dtype=torch.float64) * 1.1 + 0.1
    assert D.fid(real, closer) < D.fid(real, fake)


def test_fid_with_extractor_and_reliability_flag(caplog):
    g = torch.Generator().manual_seed(1)
    lin = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    real, fake = torch.rand(12, 3, 8, 8, generator=g), torch.rand(10, 3, 8, 8, generator=g) ** 2
    with torch.no_grad():
        fr, ff = lin(real).double(), lin(fake).double()
    with caplog.at_level("WARNING", logger="apdm"):
        v = D.fid(real, fake, extractor=lin)
    assert v == pytest.approx(_frechet_closed_form(fr.numpy(), ff.numpy()), rel=1e-5)
    assert "unreliable" in caplog.text
    recs = {r["name"]: r for r in D.distribution_records(real, fake, lin, "lin", kid_subsets=3)}
    assert recs["fid"]["metric"] == "fid@lin" and recs["fid"]["reliable"] is False and "KID" in recs["fid"]["note"]
    assert recs["fid"]["n"] == 10 and recs["fid"]["n_real"] == 12
    assert recs["kid"]["subset_size"] == 10 and recs["kid"]["available"]
    none = D.distribution_records(real, fake, None, "inception")
    assert all(r["available"] is False and "offline" in r["reason"] for r in none)


def test_kid_matches_direct_mmd_and_adapts_subset_size():
    g = torch.Generator().manual_seed(2)
    real = torch.randn(8, 4, generator=g, dtype=torch.float64)
    fake = torch.randn(8, 4, generator=g, dtype=torch.float64) + 0.5
    mean, std = D.kid(real, fake, subsets=4)  # subset_size 1000 -> 8: every subset is the whole set
    assert mean == pytest.approx(_mmd2_unbiased(real.numpy(), fake.numpy()), rel=1e-6, abs=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)
    assert D.kid_subset_size(8, 20, 1000) == 8
    m1 = D.kid(real, torch.cat([fake, fake + 0.1]), subsets=5, seed=3)
    assert m1 == D.kid(real, torch.cat([fake, fake + 0.1]), subsets=5, seed=3)  # seeded subsets, reproducible
    with pytest.raises(MetricUnavailable, match="at least 2"):
        D.kid(real[:1], fake)


def test_psnr_record_leaves_identical_pairs_out_of_its_mean(photos):
    """One unchanged photo made the subject's PSNR infinite (hiding the others') and wrote a bare ``Infinity`` into
    results.json, which strict JSON parsers reject; now the mean is over the pairs that differ, n_identical beside."""
    import json

    changed = (photos + 16 / 255 * torch.sign(photos - 0.5)).clamp(0, 1)
    mixed = torch.stack([changed[0], photos[1]])
    rec = {r["name"]: r for r in FI.fidelity_records(photos, mixed, with_lpips=False)}["psnr"]
    assert rec["value"] == pytest.approx(float(FI.psnr(photos[:1], changed[:1])[0]), rel=1e-6)
    assert rec["n_identical"] == 1 and rec["n"] == 1
    same = {r["name"]: r for r in FI.fidelity_records(photos, photos, with_lpips=False)}["psnr"]
    assert same["value"] is None and same["identical"] is True and same["n_identical"] == 2
    json.dumps([rec, same], allow_nan=False)  # strict JSON


def test_report_states_what_protection_wants_and_the_records_qualifiers(tmp_path):
    """The report said "lower means better protected" for identity metrics, which read FDFR backwards and said
    nothing of FID/KID/BRISQUE; it showed L∞'s mean (8) where one photo was 16/255 over an 8/255 budget, and an
    unreliable FID as a plain number. Now a row says what protection wants of each metric, L∞ shows its max, an
    unreliable value carries a '*' and its note, an all-identical PSNR reads 'identical'."""
    import html
    import re

    from apdm.config import EvaluateRunConfig
    from apdm.evaluation.metrics import metric_record
    from apdm.evaluation.report import write_report

    cell = {"label": "L", "subject": "s", "scenario": "all_clean", "attack": "none", "personalization": "db",
            "prompt": "p"}
    recs = [{**cell, **metric_record("ism", "toy-id", 0.5, True, 8, n_no_face=3)},
            {**cell, **metric_record("fdfr", "toy-det", 0.25, False, 8)},
            {**cell, **metric_record("fid", "toy-features", 28.2, False, 8, reliable=False, note="fewer than 50")},
            {**cell, "scenario": "-", **metric_record("linf_255", "apdm", 8.0, False, 2, max=16.0)},
            {**cell, "scenario": "-", **metric_record("psnr", "torchmetrics", None, True, 2, identical=True)}]
    page = write_report(tmp_path / "r.html", EvaluateRunConfig(label="L"), recs, []).read_text()
    heads = [html.unescape(re.sub("<[^>]+>", "", c)) for c in re.findall(r"<th>(.*?)</th>", page)]
    wants = dict(zip(heads[6:11], heads[11:16]))  # after label, subject, scenario, attack, personalization, prompt
    assert wants == {"ism@toy-id ↑": "low", "fdfr@toy-det ↓": "high", "fid@toy-features ↓": "high",
                     "linf_255@apdm ↓": "≤ budget", "psnr@torchmetrics ↑": "high"}
    assert "8/255 (max 16/255)" in page and ">28.2*<" in page and "fewer than 50" in page
    assert ">identical<" in page and "n_no_face=3" in page
    assert "lower</em> means better protected" not in page
