"""Tests of the toy-world instruments (apdm.toy.instruments): tiny quick training, scoring, save/load, KID."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from apdm.toy import draw as D
from apdm.toy import instruments as I


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_instruments")
    torch.manual_seed(0)
    # one thread: on a shared 2-core machine two threads can be many times slower (oversubscription)
    inst, report = I.train_instruments(out, seed=0, quick=True, num_threads=1, quiet=True)
    return inst, report, out


@pytest.fixture(scope="module")
def heldout_photos():
    held = D.split()["heldout"]
    imgs, ids, _ = D.render_dataset("person", held[:6], 4, seed=99)
    return D.to_tensor(imgs), ids, held[:6]


def test_quick_training_beats_chance_on_heldout_identities(trained):
    _, report, _ = trained
    for cls in D.CLASSES:
        r = report[f"encoder_{cls}"]
        assert r["verification_auc@toy-id"] > 0.75, r
        assert r["same_cos@toy-id"] > r["diff_cos@toy-id"] + 0.3, r
        assert r["ism_auc@toy-id"] > 0.75, r
    # attribute heads beat chance (mean 1/n_values: 0.26 person, 0.34 dog)
    assert report["encoder_person"]["attr_match@toy-attr"] > 0.38
    assert report["encoder_dog"]["attr_match@toy-attr"] > 0.47
    det = report["detector"]
    assert det["accuracy@toy-det"] > 0.8, det
    # the losses went down
    for key in ("encoder_training", "detector_training"):
        assert report[key]["final_loss"] < report[key]["first_loss"]


def test_save_load_round_trip_gives_identical_outputs(trained, heldout_photos):
    inst, report, out = trained
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted([I.CONFIG_NAME, I.DETECTOR_FILE, I.ENCODER_FILE])
    assert not any(p.suffix in (".pt", ".pth", ".bin", ".pkl") for p in out.iterdir())
    cfg = json.loads((out / I.CONFIG_NAME).read_text())
    assert cfg["report"]["detector"]["accuracy@toy-det"] == report["detector"]["accuracy@toy-det"]
    loaded = I.load_instruments(out)
    x, _, _ = heldout_photos
    assert torch.equal(I.embed(inst.encoder, x), I.embed(loaded.encoder, x))
    assert torch.equal(I.detector_scores(inst.detector, x), I.detector_scores(loaded.detector, x))
    assert torch.equal(loaded.features(x), inst.features(x))
    with pytest.raises(FileNotFoundError):
        I.load_instruments(out / "missing")
    # the fingerprint the benchmarks record follows the weights: same files, same print; a new detector, a new one
    assert I.load_instruments(out).config["fingerprint"] == loaded.config["fingerprint"]
    other = out.parent / (out.name + "_changed")
    with torch.no_grad():
        bias = inst.detector.head.bias.clone()
        inst.detector.head.bias.add_(0.1)
        I.save_instruments(inst, other)
        inst.detector.head.bias.copy_(bias)
    assert I.load_instruments(other).config["fingerprint"] != loaded.config["fingerprint"]


def test_identity_similarity_matches_reference_formula_and_separates_subjects(trained, heldout_photos):
    inst, _, _ = trained
    x, ids, held = heldout_photos
    refs, gen_same, gen_other = x[ids == held[0]][:3], x[ids == held[0]][3:], x[ids == held[1]]
    sim = I.identity_similarity(inst.encoder, torch.cat([gen_same, gen_other]), refs)
    assert sim.shape == (1 + 4,) and sim.dtype == torch.float32
    # reference formula: cosine with the mean (not re-normalised) reference embedding
    z = F.normalize(inst.encoder.eval()(torch.cat([gen_same, gen_other, refs])), dim=1)
    mean_ref = z[5:].mean(0)
    expected = (z[:5] @ mean_ref) / mean_ref.norm()
    assert torch.allclose(sim, expected, atol=1e-5)
    # embeddings are unit norm; the subject's own photo is closer than another identity's photos
    assert torch.allclose(I.embed(inst.encoder, x).norm(dim=1), torch.ones(len(x)), atol=1e-5)
    assert float(sim[0]) > float(sim[1:].max()) - 0.05


def test_attribute_match_and_predictions(trained, heldout_photos):
    inst, _, _ = trained
    x, ids, held = heldout_photos
    subject = D.identity_from_index("person", held[0])
    m = I.attribute_match(inst.encoder, x, subject)
    assert m.shape == (len(x),) and float(m.min()) >= 0 and float(m.max()) <= 1
    n_attr = len(D.ATTRIBUTES["person"])
    assert torch.allclose(m * n_attr, torch.round(m * n_attr), atol=1e-5)  # multiples of 1/n_attr
    own, other = m[torch.from_numpy(ids == held[0])].mean(), m[torch.from_numpy(ids != held[0])].mean()
    assert float(own) > float(other)
    preds = I.predict_attributes(inst.encoder, x[:4], "person")
    manual = torch.tensor([np.mean([p[k] == subject[k] for k in D.ATTRIBUTES["person"]]) for p in preds])
    assert torch.allclose(manual.float(), m[:4])


def test_detector_scores_separate_subjects_from_negatives(trained):
    inst, _, _ = trained
    held = D.split()["heldout"]
    pos, _, _ = D.render_dataset("person", held[:30], 1, seed=5)
    neg, _ = D.render_negatives(30, seed=5)
    s_pos = I.detector_scores(inst.detector, D.to_tensor(pos), "person")
    s_neg = I.detector_scores(inst.detector, D.to_tensor(neg), "person")
    assert s_pos.shape == (30,) and float(s_pos.min()) >= 0 and float(s_pos.max()) <= 1
    assert float(s_pos.mean()) > float(s_neg.mean()) + 0.4
    assert I.roc_auc(s_pos.numpy(), s_neg.numpy()) > 0.85


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_feature_extractor_works_with_torchmetrics_kid_and_fid(trained):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    inst, _, _ = trained
    fx = inst.features
    assert isinstance(fx.num_features, int) and fx.num_features == 192
    real, _, _ = D.render_dataset("person", range(60), 1, seed=1)
    same, _, _ = D.render_dataset("person", range(60, 120), 1, seed=2)
    bad, _ = D.render_negatives(60, seed=3, kinds=("blur_tint", "warp", "blobs"))
    r, s, b = D.to_tensor(real), D.to_tensor(same), D.to_tensor(bad)
    # uint8 [0,255] and float [0,1] inputs give the same features; other sizes are resized
    assert torch.allclose(fx(torch.from_numpy(real[:4]).permute(0, 3, 1, 2)), fx(r[:4]), atol=1e-5)
    assert fx(F.interpolate(r[:2], size=96, mode="bilinear")).shape == (2, 192)
    fx.train()
    assert not fx.training and not fx.encoder.training

    def kid(fake):
        m = KernelInceptionDistance(feature=fx, subset_size=30, subsets=10, normalize=True)
        m.update(r, real=True)
        m.update(fake, real=False)
        return float(m.compute()[0])

    assert kid(b) > kid(s) + 0.05
    fid = FrechetInceptionDistance(feature=fx, normalize=True)
    fid.update(r, real=True)
    fid.update(b, real=False)
    assert float(fid.compute()) > 0


def test_roc_auc_matches_pairwise_definition():
    rng = np.random.default_rng(0)
    pos, neg = rng.normal(1, 1, 40).round(1), rng.normal(0, 1, 50).round(1)  # ties included
    brute = np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])
    assert I.roc_auc(pos, neg) == pytest.approx(brute)
    assert I.roc_auc([2, 3], [0, 1]) == 1.0 and I.roc_auc([0], [1]) == 0.0


def test_supcon_prefers_grouped_embeddings():
    labels = torch.tensor([0, 0, 1, 1])
    good = F.normalize(torch.tensor([[1.0, 0.1], [1.0, -0.1], [-1.0, 0.1], [-1.0, -0.1]]), dim=1)
    bad = good[[0, 2, 1, 3]]
    assert float(I._supcon(good, labels, 0.1)) < float(I._supcon(bad, labels, 0.1))


def test_degrade_blurs_and_is_deterministic():
    x = D.to_tensor(D.render_dataset("dog", [0], 2)[0])
    a, b = I.degrade(x, 1.0, 0.03, seed=1), I.degrade(x, 1.0, 0.03, seed=1)
    assert torch.equal(a, b) and a.shape == x.shape
    assert float(a.min()) >= 0 and float(a.max()) <= 1
    edges = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean()  # noqa: E731
    assert float(edges(I.degrade(x, 1.5, 0.0))) < float(edges(x))


ASSETS = Path(__file__).resolve().parents[1] / "assets" / "toy" / "instruments"


@pytest.mark.skipif(not (ASSETS / I.CONFIG_NAME).is_file(), reason="shipped toy instruments not present")
def test_shipped_instruments_load_and_work():
    inst = I.load_instruments(ASSETS)
    size = sum(p.stat().st_size for p in ASSETS.iterdir())
    assert size < 3 * 1024 * 1024
    rep = inst.config["report"]
    assert rep["encoder_person"]["verification_auc@toy-id"] >= 0.95
    assert rep["detector"]["accuracy@toy-det"] >= 0.9
    held = D.split()["heldout"]
    x = D.to_tensor(D.render_dataset("person", held[-8:], 2, seed=7)[0])
    assert float(I.detector_scores(inst.detector, x, "person").min()) > 0.5
    sim = I.identity_similarity(inst.encoder, x[::2], x[1::2][:1])
    assert float(sim[0]) > 0.8 and float(sim[1:].mean()) < 0.5
    subject = D.identity_from_index("person", held[-8])
    assert float(I.attribute_match(inst.encoder, x[:2], subject).mean()) >= 0.7


def test_detector_learns_from_vae_round_trips(tiny_sd):
    """The round trip matches decode(encode(x)); with every batch replaced by a random VAE's (near-constant)
    reconstructions the detector cannot learn, so the VAE path is really used; the report gains *_vae rates."""
    from apdm.core.diffusion import decode_latents, encode_images

    vae = tiny_sd.vae
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = decode_latents(vae, encode_images(vae, x))
    r = I.vae_round_trip(vae, x, batch_size=2)
    assert r.shape == x.shape and torch.allclose(r, ref, atol=1e-4)
    kw = dict(per_class=60, negatives=120, epochs=4, batch=32, lr=4e-3, quiet=True)
    held = {c: D.split()["heldout"][:30] for c in D.CLASSES}
    accs = {}
    for frac in (0.0, 1.0):
        det, info = I.train_detector(vae=vae, vae_fraction=frac, **kw)
        assert info["vae_round_trip_fraction"] == frac
        rep = I.evaluate_detector(det, held, negatives=60, vae=vae)
        assert 0.0 <= rep["detect_rate_person_vae@toy-det"] <= 1.0
        accs[frac] = rep["accuracy@toy-det"]
    assert accs[0.0] > accs[1.0] + 0.15, accs
