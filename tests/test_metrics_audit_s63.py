"""Metrics audit (session 63): NaN protected pixels were counted as identical pairs by PSNR (and gave a bare NaN
L-inf max that breaks strict JSON); a hub cache snapshot's metric tag was its commit hash."""

import pytest
import torch


def test_nan_pixels_are_refused_not_counted_as_identical():
    from apdm.evaluation.fidelity import fidelity_records, linf_255

    g = torch.Generator().manual_seed(0)
    clean = torch.rand(2, 3, 32, 32, generator=g)
    prot = clean.clone()
    prot[1] = float("nan")
    with pytest.raises(ValueError, match="1 of 2 protected images hold NaN/inf pixels"):
        fidelity_records(clean, prot)
    with pytest.raises(ValueError, match="NaN/inf"):
        linf_255(clean, prot)
    recs = fidelity_records(clean, (clean + 0.01).clamp(0, 1))  # guard: finite pairs are scored
    assert next(r for r in recs if r["metric"].startswith("psnr"))["value"] > 30


def test_a_hub_cache_snapshot_is_tagged_by_its_model(tmp_path, monkeypatch):
    from apdm.evaluation.run import model_tag

    snap = tmp_path / "models--facebook--dino-vits16" / "snapshots" / "d9a1fd8c"
    snap.mkdir(parents=True)
    assert model_tag(str(snap)) == "dino-vits16"  # was d9a1fd8c
    assert model_tag(str(tmp_path / "models" / "dinov2-small") + "/") == "dinov2-small"
    monkeypatch.chdir(snap)
    assert model_tag(".") == "dino-vits16"  # was "."
