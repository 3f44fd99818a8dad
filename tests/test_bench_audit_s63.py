"""Bench audit (session 63): save_protected= checked only after the protection, model.* recipe keys accepted and
ignored, linf255 rounded to a whole level, --out dir/ written as a file, and baselines / saved protections of a
model that differs only in its VAE or text encoder accepted."""

from __future__ import annotations

import json

import pytest
import torch


def test_save_protected_naming_a_folder_is_refused_before_the_protection(tmp_path, monkeypatch):
    import apdm.bench.jobs as J
    from apdm.bench.protect_model import bench_protect_model

    def never(*a, **k):
        raise AssertionError("the protection ran before save_protected= was checked")

    monkeypatch.setattr(J, "executor", never)  # the protection and the attacks run in it
    monkeypatch.setattr(J, "attack", never)
    with pytest.raises(ValueError, match=f"save_protected={tmp_path} is a folder"):
        bench_protect_model(True, [f"save_protected={tmp_path}", "outer_steps=1", "no_naive=true"])


@pytest.mark.parametrize("key", ["model.path=/does/not/exist", "model.dtype=fp16", "sample.seed=3"])
def test_recipe_keys_the_bench_does_not_use_are_refused(key, monkeypatch):
    """model.path= was accepted, listed under recipe_overrides, and ignored (the bench's model is model=)."""
    import apdm.bench.jobs as J
    from apdm.bench.protect_model import bench_protect_model

    monkeypatch.setattr(J, "executor", lambda *a, **k: pytest.fail("the bench ran"))  # (fails fast, not minutes)

    with pytest.raises(ValueError, match=r"takes only protect\.\*, personalization\.\*, encoder_trap\.\*"):
        bench_protect_model(True, [key])


def test_out_ending_in_a_slash_is_a_folder(tmp_path):
    from apdm.bench import check_out

    with pytest.raises(ValueError, match="is a folder; give a file name such as"):
        check_out(str(tmp_path / "newdir") + "/")
    assert not (tmp_path / "newdir").exists()
    with pytest.raises(ValueError, match="^save_protected=.* is a folder"):
        check_out(str(tmp_path), "save_protected=")
    check_out(str(tmp_path / "newdir" / "r.json"))  # a file in a folder to be made is fine


def test_linf255_is_not_rounded_to_a_whole_level(monkeypatch):
    """budget=1.6/255 with float photos: the bench said 2.0 (a budget violation to the reader), the tag's
    linf_255 says 1.6."""
    import apdm.bench.jobs as J
    from apdm.bench.protect_images import bench_protect_images

    monkeypatch.setattr(J, "attack", lambda *a, **k: {"ism": 0.5, "fdfr": 0.5, "images": None, "seconds": 0.0,
                                                      "seconds_train": 0.0, "peak_rss_mb": 0.0})
    res = bench_protect_images(True, ["subjects=1", "samples=1", "workers=1", "methods=advdm", "advdm_steps=2",
                                      "budget=1.6/255", "eight_bit=false", "robust_methods=none"])
    assert res["linf255_advdm"] == pytest.approx(1.6, abs=1e-3)


def test_baselines_and_saved_protections_of_another_vae_are_refused(tmp_path):
    """The fingerprint reads the UNet only: a model whose VAE alone differs (an encoder trap run alone) took another
    model's unprotected numbers; the weights digest is compared where both files have it."""
    from apdm.bench.protect_model import BASELINE_KEYS, load_baseline, load_protected, save_protected

    res = {"model_fingerprint": "abc", "model_weights_digest": "d1", "instruments_fingerprint": "def",
           "subject_protected": 1, "subject_other": 7, "samples_per_prompt": 8, "attack_overrides": [],
           "other_identifier": "sks", "identifier": "sks", "attack_seeds": 1, "attack_photos": "same",
           "protect_photos": 4}
    f = tmp_path / "base.json"
    f.write_text(json.dumps(dict(res, **{k: 0.5 for k in BASELINE_KEYS})))
    assert load_baseline(str(f), res)["ism_db_unprotected"] == 0.5
    with pytest.raises(ValueError, match="model_weights_digest='d1', this run has 'd2'"):
        load_baseline(str(f), dict(res, model_weights_digest="d2"))
    old = dict(res, **{k: 0.5 for k in BASELINE_KEYS})
    del old["model_weights_digest"]  # written before the digest was recorded: the fingerprint alone decides
    f.write_text(json.dumps(old))
    assert load_baseline(str(f), dict(res, model_weights_digest="d2"))["ism_db_unprotected"] == 0.5
    w = tmp_path / "w.safetensors"
    save_protected(str(w), {"a": torch.zeros(2)}, res)
    assert load_protected(str(w), res)["info"]["model_weights_digest"] == "d1"
    with pytest.raises(ValueError, match="protected with model_weights_digest='d1', this run has 'd2'"):
        load_protected(str(w), dict(res, model_weights_digest="d2"))


def test_the_bench_records_a_digest_that_sees_the_vae(tiny_sd):
    """Guard: weights_digest (recorded as model_weights_digest) changes with the VAE, the fingerprint does not."""
    import copy

    other = copy.copy(tiny_sd)
    other.vae = copy.deepcopy(tiny_sd.vae)
    with torch.no_grad():
        next(other.vae.parameters()).mul_(0.5)
    assert other.fingerprint() == tiny_sd.fingerprint()
    assert other.weights_digest() != tiny_sd.weights_digest()
