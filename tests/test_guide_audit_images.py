"""What docs/protect_images_guide.md promises, walked through as a user: a refused resume names the old and new
value of each setting (a budget as k/255), a run that protects no photo fails, the toy ρ is ``rho_path=toy`` from
any folder (a missing ρ folder "does not exist"), and the closing summary gives the lowest SSIM."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from helpers import noise_photo as _noise
from helpers import protect_images_cfg as _cfg

from apdm.cli import main
from apdm.protect_images import run as runner

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.path=tiny", "model.device=cpu", "steps=1", "quiet=true"]


def _last(log: str) -> str:
    return log.split(" | ")[-1]


def test_a_refused_resume_shows_each_setting_before_and_now(tmp_path):
    """A folder protected at 8/255, resumed with ``--budget 0.0314`` (8.007/255): the message said only "differing:
    budget". It now gives both values as k/255, and every other differing setting (a nested one by its dotted key)."""
    src = tmp_path / "photos"
    src.mkdir()
    _noise(src / "a.png")
    out = tmp_path / "out"
    runner.run(_cfg(src, out, budget="8/255"))
    with pytest.raises(ValueError, match=r"\(differing: budget\): budget 8/255 before, 8\.007/255 now\. "):
        runner.run(_cfg(src, out, budget="0.0314"))
    with pytest.raises(ValueError) as many:
        runner.run(_cfg(src, out, budget="6/255", steps=2, method="aspl"))
    text = str(many.value)
    assert "(differing: budget, method, personalization, steps): budget 8/255 before, 6/255 now" in text and "; steps 1 before, 2 now." in text
    assert "method advdm before, aspl now" in text and "personalization not set before, set now" in text
    assert runner.setting_changes({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}}) == ["a.c 2 before, 3 now"]


def test_a_run_that_protects_no_photo_fails(tmp_path, apdm_info_log):
    """Every input skipped (a camera RAW file named, a PostScript file called .jpg): the run said "protected 0
    image(s) ... 1 skipped" and exited 0. It now ends with a line saying no photo was protected and exits 1, the
    manifest still listing the skipped files; some protected and some skipped, or all protected before, is 0."""
    src = tmp_path / "photos"
    src.mkdir()
    (src / "IMG_1.CR2").write_bytes(b"II*\x00" + bytes(range(256)) * 8)
    (src / "photo.jpg").write_bytes(b"%!PS-Adobe-3.0\n")
    out = tmp_path / "out"
    common = ["protect-images", "--method", "advdm", "--output", str(out), *TINY]
    assert main(common + ["--input", f"{src / 'IMG_1.CR2'},{src / 'photo.jpg'}"]) == 1
    last = _last(apdm_info_log())
    assert "no photo protected: all 2 input file(s) were skipped" in last and "IMG_1.CR2" in last
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_failed"] == 2 and not manifest["images"]
    _noise(src / "good.png")
    assert main(common + ["--input", str(src)]) == 0  # one protected, photo.jpg skipped
    assert "protected 1 image(s)" in _last(apdm_info_log())
    assert main(common + ["--input", str(src)]) == 0  # resumed: good.png is already there
    assert "(1 already there, 1 skipped)" in _last(apdm_info_log())
    with pytest.raises(runner.NothingProtected) as exc:
        runner.run(_cfg(src / "photo.jpg", tmp_path / "out2"))
    assert exc.value.manifest["num_failed"] == 1


def test_the_toy_rho_is_found_from_any_folder(tmp_path, monkeypatch, apdm_log):
    """``--rho toy`` was refused (no such folder) while ``model.path=toy`` works anywhere; ``--rho /nonexistent``
    said "expected rho.json and rho.safetensors". ``toy`` is now the shipped toy ρ from any folder, and a missing
    folder is said not to exist, before the model loads; --help says where the toy ρ is."""
    monkeypatch.chdir(tmp_path)
    src = _noise(tmp_path / "a.png", 32, 32)
    shipped = REPO / "assets" / "toy" / "rho" / "rho.safetensors"
    assert main(["protect-images", "--method", "ldu", "--rho", "toy", "--model", "toy", "--input", str(src),
                 "--output", str(tmp_path / "out"), "quiet=true"]) == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["rho_sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert manifest["images"][0]["linf_255@apdm"] <= 8

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the ρ folder was checked")

    monkeypatch.setattr("apdm.core.models.load_sd", no_model)
    with pytest.raises(FileNotFoundError, match="nonexistent does not exist"):
        runner.run(_cfg(src, tmp_path / "o2", method="ldu", steps=0, rho_path=str(tmp_path / "nonexistent")))
    assert main(["protect-images", "--method", "ldu", "--rho", str(tmp_path / "nonexistent"), "--input", str(src),
                 "--output", str(tmp_path / "o3"), "quiet=true"]) == 1
    assert "does not exist" in apdm_log()
    from apdm.cli import SHORTCUTS

    assert "toy is the toy world's, shipped in assets/toy/rho" in SHORTCUTS["--rho"][1]


def test_the_toy_recipe_runs_outside_the_repository(tmp_path, monkeypatch):
    """recipes/toy-protect-images.yaml named ``rho_path: assets/toy/rho``, which only the repository root finds."""
    monkeypatch.chdir(tmp_path)
    src = _noise(tmp_path / "a.png", 32, 32)
    assert main(["protect-images", "--config", str(REPO / "recipes" / "toy-protect-images.yaml"), "--input", str(src),
                 "--output", str(tmp_path / "out"), "quiet=true"]) == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["num_protected"] == 1


def test_the_closing_summary_gives_the_lowest_ssim(tmp_path, apdm_info_log):
    """The guide says the summary printed at the end includes the lowest SSIM; it printed PSNR and L∞ only."""
    src = tmp_path / "photos"
    src.mkdir()
    _noise(src / "a.png")
    _noise(src / "b.png", seed=1)
    m = runner.run(_cfg(src, tmp_path / "out"))
    assert f"SSIM {m['summary']['ssim_min@skimage']} lowest" in apdm_info_log()
