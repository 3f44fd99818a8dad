"""Audit of ``apdm protect-images`` and ``apdm train-perturber`` (2026-12-07): a resumed run skips an unreadable
photo as a fresh one does, the output folder may be the input folder with a suffix, contradictory metadata options
are refused, a copy added since gets its own output, a refused ρ training leaves the earlier record alone and the
training time adds up over sessions, a ρ trained for another model or budget is named, and a grey photo stays
grey. All on the tiny model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import noise_photo as _noise
from helpers import protect_images_cfg as _cfg
from PIL import Image

from apdm.config import ModelConfig, TrainPerturberRunConfig
from apdm.protect_images import run as runner

BUDGET_LEVELS = 8


def _names(entries, key="input") -> list[str]:
    return [Path(e[key]).name for e in entries]


# ============================================================================ 1. an unreadable photo on resume
def test_a_resumed_run_skips_an_unreadable_photo_as_a_fresh_run_does(tmp_path, monkeypatch):
    """b.png turns unreadable (permission denied: simulated for root too, where chmod 000 does not stop reading)
    after a first run: the resumed run reports it and protects the rest. Before, hashing it for the resume ended
    the run with PermissionError."""
    from apdm.core import images

    src, out = tmp_path / "photos", tmp_path / "out"
    src.mkdir()
    for i, name in enumerate(("a.png", "b.png", "c.png")):
        _noise(src / name, seed=i)
    runner.run(_cfg(src, out))
    _noise(src / "d.png", seed=3)
    bad = src / "b.png"
    real_hash, real_load = runner.file_sha256, images.load_image

    def denied(path):
        if Path(path) == bad:
            raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(runner, "file_sha256", lambda p: denied(p) or real_hash(p))
    monkeypatch.setattr(images, "load_image", lambda p: (
        (_ for _ in ()).throw(images.ImageLoadError(p, "permission denied")) if Path(p) == bad else real_load(p)))
    m = runner.run(_cfg(src, out))
    assert [(Path(e["input"]).name, e["error"]) for e in m["failed"]] == [("b.png", "permission denied")]
    assert m["num_resumed"] == 2 and m["complete"]
    assert {"a.png", "c.png", "d.png"} <= set(_names(m["images"], "output"))


# ============================================================================ 2. output folder = input folder
def test_the_output_folder_may_be_the_input_folder_with_a_suffix(tmp_path):
    """``--input photos --output photos suffix=_protected`` (as the guide says) writes the protected copies beside
    the photos, and a rerun leaves its own outputs out of the inputs (before: "every input file is inside the
    output folder"). Without a suffix it is refused, saying how to do it."""
    src = tmp_path / "photos"
    src.mkdir()
    _noise(src / "a.png")
    _noise(src / "b.jpg", seed=1)
    m = runner.run(_cfg(src, src, suffix="_protected"))
    assert _names(m["images"]) == ["a.png", "b.jpg"]
    assert _names(m["images"], "output") == ["a_protected.png", "b_protected.png"]
    _noise(src / "c.png", seed=2)
    again = runner.run(_cfg(src, src, suffix="_protected"))
    assert again["num_resumed"] == 2 and again["num_protected"] == 3 and not again["failed"]
    assert sorted(p.name for p in src.iterdir()) == ["a.png", "a_protected.png", "b.jpg", "b_protected.png",
                                                      "c.png", "c_protected.png", "manifest.json"]
    for e in again["images"]:
        orig = np.asarray(Image.open(e["input"]).convert("RGB")).astype(np.int16)
        assert np.abs(np.asarray(Image.open(e["output"])).astype(np.int16) - orig).max() <= BUDGET_LEVELS
    with pytest.raises(ValueError, match=r"inside the output folder .*; choose another --output, or pass a suffix "
                                         r"\(e\.g\. suffix=_protected\)"):
        runner.run(_cfg(src, src, resume=False))


# ============================================================================ 3. keep_exif + strip_metadata
def test_keep_exif_with_strip_metadata_is_refused(tmp_path):
    """strip_metadata wins in the saved file, so the manifest's "EXIF kept" was wrong: the pair is refused, both
    keys named, before any model loads."""
    src = tmp_path / "photos"
    src.mkdir()
    _noise(src / "a.png")
    cfg = _cfg(src, tmp_path / "out", keep_exif=True, strip_metadata=True)
    cfg.model = ModelConfig(path=str(tmp_path / "no-such-model"), device="cpu")
    with pytest.raises(ValueError, match=r"keep_exif=true and strip_metadata=true contradict each other"):
        runner.run(cfg)
    assert not (tmp_path / "out").exists()


# ============================================================================ 4. train-perturber's records
def _identities(root: Path, names=("id-a", "id-b")) -> Path:
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (64, 64), (60 * k % 256, 30 * i, 200)).save(root / name / f"{i}.png")
    return root


def _train_cfg(data, out, **kw) -> TrainPerturberRunConfig:
    base = {"model": ModelConfig(path="tiny", device="cpu"), "steps": 2, "batch_size": 1, "denoise_steps": 1,
            "anchor_steps": 1, "checkpoint_every": 1, "quiet": True}
    return TrainPerturberRunConfig(data=str(data), output_dir=str(out), **{**base, **kw})


def _interrupted(monkeypatch, cfg) -> None:
    """Run ``cfg`` until its first checkpoint is written, then stop as a Ctrl-C would."""
    from helpers import stop_after_first_checkpoint

    from apdm.protect_model import l2p

    stop_after_first_checkpoint(monkeypatch, runner.train, cfg, saver=(l2p, "save_checkpoint"))


def test_a_refused_training_leaves_the_earlier_rhos_train_config(tmp_path, monkeypatch):
    """A ρ trained at 8/255; then a training at 6/255 interrupted, and one at 4/255 refused by its checkpoint:
    train_config.yaml still describes the ρ beside it (before, it was rewritten before training with settings that
    never trained), and rho.json records the base model's fingerprint."""
    from apdm.core.models import load_sd

    data, out = _identities(tmp_path / "data"), tmp_path / "rho"
    runner.train(_train_cfg(data, out, budget="8/255"))
    assert "budget: 8/255" in (out / "train_config.yaml").read_text()
    weights = (out / "rho.safetensors").read_bytes()
    _interrupted(monkeypatch, _train_cfg(data, out, budget="6/255"))
    assert "budget: 8/255" in (out / "train_config.yaml").read_text()
    with pytest.raises(ValueError, match="a checkpoint of another ρ training"):
        runner.train(_train_cfg(data, out, budget="4/255"))
    assert "budget: 8/255" in (out / "train_config.yaml").read_text()
    assert (out / "rho.safetensors").read_bytes() == weights
    training = json.loads((out / "rho.json").read_text())["training"]
    assert training["base_model_fingerprint"] == load_sd("tiny", "cpu").fingerprint()


def test_the_training_time_adds_up_over_resumed_sessions(tmp_path, monkeypatch):
    """A training killed after its first checkpoint and resumed: train_log.json's seconds count the first session
    (recorded in the checkpoint) too, as its history does (before: the last session's only). A checkpoint written
    before the time was recorded resumes, and the log says the earlier time is left out."""
    data = _identities(tmp_path / "data")
    for name, recorded in (("rho", 1000.0), ("old", None)):
        out = tmp_path / name
        cfg = _train_cfg(data, out)
        _interrupted(monkeypatch, cfg)
        progress = out / "checkpoint" / "rho" / "progress.json"
        meta = json.loads(progress.read_text())
        assert 0 < meta["extra"]["seconds"] < 1000
        if recorded is None:
            del meta["extra"]["seconds"]
        else:
            meta["extra"]["seconds"] = recorded  # as if the first session had taken that long
        progress.write_text(json.dumps(meta))
        log = json.loads(json.dumps(runner.train(cfg)))
        assert log == json.loads((out / "train_log.json").read_text()) and len(log["history"]) == 2
        if recorded is None:
            assert log["seconds"] == log["seconds_this_session"] < 1000
            assert "leaves out the earlier sessions' time" in log["seconds_note"]
        else:
            assert 1000 < log["seconds"] == pytest.approx(1000 + log["seconds_this_session"], abs=0.11)
            assert "seconds_note" not in log


# ============================================================================ 5. a copy added since
def test_a_copy_added_since_gets_its_own_output(tmp_path):
    """0copy.png (a.png's bytes, sorting first) added after a run: a.png keeps its output and the copy gets its
    own. Before, the copy took over a.png's output and a.png was protected again as a-2.png."""
    src, out = tmp_path / "photos", tmp_path / "out"
    src.mkdir()
    _noise(src / "a.png")
    _noise(src / "b.png", seed=1)
    runner.run(_cfg(src, out))
    kept = (out / "a.png").read_bytes()
    shutil.copy(src / "a.png", src / "0copy.png")
    m = runner.run(_cfg(src, out))
    assert {Path(e["input"]).name: Path(e["output"]).name for e in m["images"]} == {
        "0copy.png": "0copy.png", "a.png": "a.png", "b.png": "b.png"}
    assert m["num_resumed"] == 2 and (out / "a.png").read_bytes() == kept
    assert sorted(p.name for p in out.iterdir()) == ["0copy.png", "a.png", "b.png", "manifest.json"]


# ============================================================================ 6. a ρ for another model or budget
def _rho(folder: Path, **training) -> Path:
    from apdm.protect_images import ldu

    rho = ldu.build_rho(4, 8, seed=0)
    rho.sampling = ldu._check_sampling({"denoise_steps": 1})
    rho.training_info = training
    ldu.save_rho(rho, folder)
    return folder


def test_ldu_names_a_rho_trained_for_another_model_or_budget(tmp_path, apdm_log, apdm_info_log):
    """One warning naming both the model (by fingerprint) and the budget ρ was trained for, when they are not the
    run's; none when they are; a ρ saved before the fingerprint was recorded is said to be unchecked for its
    model. Before, any ρ was used without a word."""
    from apdm.core.models import load_sd

    src = tmp_path / "photos"
    src.mkdir()
    _noise(src / "a.png", 16, 16)
    fingerprint = load_sd("tiny", "cpu").fingerprint()
    cases = {"other": {"budget": 6 / 255, "base_model": "sd15", "base_model_fingerprint": "0123456789abcdef"},
             "same": {"budget": 8 / 255, "base_model": "tiny", "base_model_fingerprint": fingerprint},
             "old": {"budget": 8 / 255, "base_model": "toy (an old ρ)"}}
    logs = {}
    for name, training in cases.items():
        rho = _rho(tmp_path / f"rho-{name}", **training)
        runner.run(_cfg(src, tmp_path / f"out-{name}", method="ldu", steps=0, rho_path=str(rho), budget="8/255"))
        logs[name] = (apdm_log(), apdm_info_log())
    warning = logs["other"][0]
    assert warning.count("this ρ was trained") == 1
    assert ("this ρ was trained for another model (sd15, fingerprint 0123456789abcdef; this run's tiny is "
            f"{fingerprint}) and at budget 6/255 (this run's is 8/255)") in warning
    assert "this ρ was trained" not in logs["same"][0] + logs["old"][0]
    assert "records no base-model fingerprint" in logs["old"][1] and "cannot be checked" in logs["old"][1]
    assert "records no base-model fingerprint" not in logs["same"][1]


def test_the_shipped_toy_rho_still_loads_and_names_its_model():
    from apdm.protect_images import ldu

    root = Path(__file__).resolve().parents[1] / "assets" / "toy" / "rho"
    rho = ldu.load_rho(root)
    assert rho.training_info["budget"] == pytest.approx(8 / 255)
    assert len(rho.training_info.get("base_model_fingerprint", "")) == 16
    from apdm.core.models import load_sd

    assert ldu.check_rho_fits(rho, load_sd("toy", "cpu"), 8 / 255) is None  # the committed toy model's: no warning


# ============================================================================ 7. grey photos
def test_a_grey_photo_gets_a_grey_perturbation(tmp_path):
    """A grayscale (L) photo and a black-and-white one stored as RGB: the saved copy has three equal channels
    (the channels' mean perturbation), within the budget and changed. Before, colour noise was added to it."""
    src = tmp_path / "photos"
    src.mkdir()
    _noise(src / "grey.png", 32, 32, mode="L")
    bw = np.random.default_rng(5).integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(np.repeat(bw[..., None], 3, -1)).save(src / "bw_rgb.png")
    _noise(src / "colour.png", 32, 32, seed=6)
    m = runner.run(_cfg(src, tmp_path / "out", steps=3, pgd_alpha=0.05))
    for e in m["images"]:
        saved = np.asarray(Image.open(e["output"]).convert("RGB")).astype(np.int16)
        orig = np.asarray(Image.open(e["input"]).convert("RGB")).astype(np.int16)
        diff = np.abs(saved - orig)
        assert 0 < diff.max() <= BUDGET_LEVELS and e["within_budget"], e["input"]
        grey = (saved[..., 0] == saved[..., 1]).all() and (saved[..., 1] == saved[..., 2]).all()
        assert grey == (Path(e["input"]).name != "colour.png"), e["input"]
