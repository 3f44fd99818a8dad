"""``apdm protect-images`` end to end on the tiny model: the manifest measures the files as written (JPEG, 16-bit
originals), every option is checked before the model loads, resuming settles (links, damaged outputs, settings
written another way), and photos too small to carry a perturbation are reported."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from helpers import noise_photo as _noise
from helpers import protect_images_cfg as _cfg
from PIL import Image

from apdm.config import ModelConfig, PersonalizationConfig, ProtectImagesRunConfig
from apdm.protect_images import run as runner

BUDGET_LEVELS = 8


def _saved_levels(path) -> np.ndarray:
    """The output file as written, decoded by Pillow: (3, H, W) grey levels."""
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float64).transpose(2, 0, 1)


# ============================================================================ the manifest tells the truth
def test_jpeg_manifest_measures_the_saved_file(tmp_path):
    """format=jpeg: PSNR, L∞ and within_budget are those of the JPEG file against the original (quality 50 moves
    random photos by far more than 8/255). Before, they described the pixels before JPEG encoding (1/255, within
    budget) while the file was 163/255 away."""
    src = tmp_path / "photos"
    src.mkdir()
    _noise(src / "a.png", 40, 48)
    m = runner.run(_cfg(src, tmp_path / "out", format="JPEG", jpeg_quality=50))
    (e,) = m["images"]
    assert e["output"].endswith(".jpg") and m["format"] == "jpeg"
    orig = np.asarray(Image.open(src / "a.png")).astype(np.float64).transpose(2, 0, 1)
    diff = np.abs(_saved_levels(e["output"]) - orig)
    assert e["linf_255@apdm"] == int(diff.max()) > 50
    assert e["psnr@apdm"] == pytest.approx(10 * np.log10(255.0 ** 2 / np.mean(diff ** 2)), abs=1e-3)
    assert e["within_budget"] is False and m["summary"]["all_within_budget"] is False


def test_16bit_photos_keep_the_budget_against_their_own_values(tmp_path):
    """A flat 16-bit gray PNG between two 8-bit levels and a 16-bit RGB PNG: every saved value is within 8/255 of
    the 16-bit original, and the manifest measures against it (bit_depth 16). Before, the bound was set around the
    8-bit rounding (a gray photo came out 8.49/255 away) and a 16-bit RGB PNG was read as its high bytes (the file
    8.60/255 from the original while the manifest said within budget)."""
    from test_images import write_png16

    src = tmp_path / "photos"
    src.mkdir()
    gray = np.full((24, 24), 25826, np.uint16)  # 100.49 grey levels
    Image.fromarray(gray).save(src / "gray16.png")
    rgb = np.random.default_rng(1).integers(0, 65536, (20, 24, 3), dtype=np.uint16)
    rgb[:10] = 25855  # a flat band at 100.6 grey levels
    write_png16(src / "rgb16.png", rgb)
    m = runner.run(_cfg(src, tmp_path / "out", steps=3, pgd_alpha=0.05))
    truth = {"gray16.png": np.repeat(gray[None], 3, 0), "rgb16.png": rgb.transpose(2, 0, 1)}
    for e in m["images"]:
        name = Path(e["input"]).name
        diff = np.abs(_saved_levels(e["output"]) - truth[name] / 257.0)
        assert diff.max() <= BUDGET_LEVELS + 1e-4, name
        assert diff.max() > 4, name  # the perturbation is there
        assert e["linf_255@apdm"] == pytest.approx(diff.max(), abs=1e-3), name
        assert e["within_budget"] and e["bit_depth"] == 16, name
    assert m["summary"]["all_within_budget"]


def test_too_small_photos_are_reported_unchanged(tmp_path, apdm_info_log):
    """A 1x1 or 2x3 photo receives the perturbation averaged down to one or six pixels, which rounds to nothing:
    the manifest and the log say so (before: saved unchanged without a word)."""
    src = tmp_path / "small"
    src.mkdir()
    _noise(src / "one.png", 1, 1)
    _noise(src / "two.png", 2, 3, seed=1)
    _noise(src / "wide.png", 16, 40, seed=2)
    m = runner.run(_cfg(src, tmp_path / "out"))
    by_name = {Path(e["input"]).name: e for e in m["images"]}
    assert "too small a photo to carry one" in by_name["one.png"]["unchanged"]
    assert "photo's 2x3 px" in by_name["two.png"]["unchanged"]
    assert "unchanged" not in by_name["wide.png"] and m["summary"]["num_unchanged"] == 2
    log = apdm_info_log()
    assert "one.png: saved unchanged" in log and "two.png: saved unchanged" in log
    assert "2 of them saved unchanged (see their 'unchanged' note)" in log


# ============================================================================ options checked first
@pytest.mark.parametrize("override,message", [
    ({"format": "webp"}, "format=webp: choose png (lossless, the default) or jpeg (jpg)"),
    ({"eot": ["blurr"]}, "eot=[blurr]: unknown transform 'blurr'; choose from flip, blur, resize, jpeg, blur+flip"),
    ({"steps": -3}, "steps=-3: must be a whole number >= 0 (0 = the method's default)"),
    ({"pgd_alpha": -0.05}, "pgd_alpha=-0.05: must be a number from 0 to 1"),
    ({"pgd_alpha": float("nan")}, "pgd_alpha=nan: must be a number from 0 to 1"),
    ({"jpeg_quality": 0}, "jpeg_quality=0: must be a whole number from 1 to 100"),
    ({"jpeg_quality": 1000}, "jpeg_quality=1000: must be a whole number from 1 to 100"),
    ({"jpeg_quality": -5}, "jpeg_quality=-5: must be a whole number from 1 to 100"),
    ({"suffix": "/../../escaped"}, ("suffix='/../../escaped': a suffix is appended to each output's name and must "
                                    "not contain a path separator or '..'")),
    ({"suffix": "_a/b"}, "must not contain a path separator"),
    ({"method": "ldu", "rho_path": "rho", "eot": ["jpeg"], "steps": 3},
     "method ldu does not use steps=3, eot=[jpeg]: its network ρ makes the perturbation in one forward pass"),
    ({"method": "ldu", "rho_path": "rho", "steps": 0, "pgd_alpha": 0.01},
     "method ldu does not use pgd_alpha=0.01: its network ρ"),
])
def test_options_are_refused_before_the_model_loads(tmp_path, override, message):
    """Each refused with its key before any model loads (the model path does not even exist) and before the output
    folder is made. Before: webp failed after the first protection, a mistyped EOT after the model load, steps=-3
    exited 0 with unprotected copies, a negative pgd_alpha reversed the attack, any JPEG quality was taken, a suffix
    wrote outside the output folder, and LDU ignored steps/pgd_alpha/eot while the manifest recorded them."""
    src = tmp_path / "photos"
    src.mkdir()
    _noise(src / "a.png")
    cfg = _cfg(src, tmp_path / "out", **override)
    cfg.model = ModelConfig(path=str(tmp_path / "no-such-model"), device="cpu")
    with pytest.raises(ValueError) as info:
        runner.run(cfg)
    assert message in str(info.value)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("**/escaped*"))


def test_options_a_method_ignores_are_named(tmp_path, apdm_info_log):
    """AdvDM trains no surrogate: a personalization setting is said to be ignored (and, below, not recorded)."""
    src = tmp_path / "photos"
    src.mkdir()
    _noise(src / "a.png")
    personalization = dataclasses.replace(ProtectImagesRunConfig().personalization, steps=5)
    runner.run(_cfg(src, tmp_path / "out", personalization=personalization, pid_loss="mean"))
    log = apdm_info_log()
    assert ("method advdm does not use pid_loss=mean, personalization.steps=5: ignored, and left out of the "
            "settings a resumed run must match") in log


# ============================================================================ resuming settles
def test_input_list_with_a_trailing_comma_protects_only_the_named_photo(tmp_path, monkeypatch):
    """``--input "mine.png,"`` in a folder of other photos: only mine.png (before: every photo of the folder)."""
    folder = tmp_path / "cwd"
    folder.mkdir()
    for i, name in enumerate(("mine.png", "private1.png", "private2.png")):
        _noise(folder / name, seed=i)
    monkeypatch.chdir(folder)
    m = runner.run(_cfg("mine.png,", tmp_path / "out"))
    assert [Path(e["input"]).name for e in m["images"]] == ["mine.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["manifest.json", "mine.png"]


def test_a_link_in_the_input_folder_is_one_photo_and_reruns_settle(tmp_path):
    """``link.png -> a.png`` beside a.png: one entry per file, and a second run resumes everything. Before, the
    manifest listed a.png's entry twice and none for the link, and every rerun protected one file again."""
    src = tmp_path / "sl"
    src.mkdir()
    _noise(src / "a.png")
    _noise(src / "b.png", seed=1)
    (src / "link.png").symlink_to("a.png")
    first = runner.run(_cfg(src, tmp_path / "out"))
    assert [Path(e["input"]).name for e in first["images"]] == ["a.png", "b.png"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.png", "b.png", "manifest.json"]
    again = runner.run(_cfg(src, tmp_path / "out"))
    assert again["num_resumed"] == 2 and again["num_protected"] == 2
    assert [e["input"] for e in again["images"]] == [e["input"] for e in first["images"]]


def test_damaged_outputs_are_protected_again(tmp_path):
    """A resumed run keeps only outputs that are whole: an emptied, a cut-short and a deleted output are protected
    again (before, the empty and cut files were kept as done)."""
    src = tmp_path / "photos"
    src.mkdir()
    for i in range(4):
        _noise(src / f"p{i}.png", seed=i)
    out = tmp_path / "out"
    runner.run(_cfg(src, out))
    (out / "p0.png").write_bytes(b"")
    cut = (out / "p1.png").read_bytes()
    (out / "p1.png").write_bytes(cut[: len(cut) // 2])
    (out / "p2.png").unlink()
    again = runner.run(_cfg(src, out))
    assert again["num_resumed"] == 1 and again["num_protected"] == 4
    for e in again["images"]:
        orig = np.asarray(Image.open(e["input"])).astype(np.float64).transpose(2, 0, 1)
        assert np.abs(_saved_levels(e["output"]) - orig).max() <= BUDGET_LEVELS
    assert runner.run(_cfg(src, out))["num_resumed"] == 4


def test_resume_compares_settings_as_they_act(tmp_path):
    """--budget 8/255 then --budget 8, format=png then PNG, and a personalization AdvDM never uses: the same outputs,
    so the run resumes (before: "written with other settings (differing: budget)", and likewise for the others). A
    manifest written before the settings were normalised (the budget as typed, the format as typed, personalization,
    jpeg_quality and rho_path recorded for every method) resumes too; another budget is still refused."""
    src = tmp_path / "photos"
    src.mkdir()
    _noise(src / "a.png")
    _noise(src / "b.png", seed=1)
    out = tmp_path / "out"
    first = runner.run(_cfg(src, out, budget="8/255"))
    settings = first["settings"]
    assert settings["budget"] == "8/255" and "personalization" not in settings and "jpeg_quality" not in settings
    same = runner.run(_cfg(src, out, budget="8", format="PNG", personalization=PersonalizationConfig(steps=5)))
    assert same["num_resumed"] == 2
    assert runner.run(_cfg(src, out, budget="0.0313725490196"))["num_resumed"] == 2

    manifest = json.loads((out / "manifest.json").read_text())
    manifest["settings"].update(budget="8", format="PNG", jpeg_quality=95, rho_path="",
                                personalization=dataclasses.asdict(ProtectImagesRunConfig().personalization))
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert runner.run(_cfg(src, out))["num_resumed"] == 2
    with pytest.raises(ValueError, match=r"written with other settings \(differing: budget\)"):
        runner.run(_cfg(src, out, budget="6/255"))
    with pytest.raises(ValueError, match=r"differing: format, jpeg_quality"):
        runner.run(_cfg(src, out, format="jpg"))


def test_the_commands_surrogate_is_the_published_one():
    """The docs promise ASPL/FSMG/MetaCloak/SimAC's published surrogate (Anti-DreamBooth: lr 5e-7, 1000 steps, text
    encoder, 200 class images); the command used lr 5e-6, 800 steps and 50 class images."""
    from apdm.protect_images.baselines import antidreambooth_personalization

    assert ProtectImagesRunConfig().personalization == antidreambooth_personalization()
    per = ProtectImagesRunConfig().personalization  # the published values (reference notes, Anti-DreamBooth [C])
    assert (per.method, per.learning_rate, per.steps, per.train_text_encoder, per.batch_size, per.num_class_images,
            per.with_prior_preservation, per.prior_loss_weight) == ("dreambooth", 5e-7, 1000, True, 1, 200, True, 1.0)


def test_train_perturber_refuses_an_unknown_augmentation_as_protect_images_does():
    """train-perturber's eot= (the training augmentations) is checked before any model loads, with protect-images'
    own check and message."""
    from apdm.config import TrainPerturberRunConfig
    from apdm.protect_images.run import check_train_config

    with pytest.raises(ValueError, match=r"^eot=\[spin\]: unknown transform 'spin'; choose from flip, blur"):
        check_train_config(TrainPerturberRunConfig(data="photos", eot=["spin"]))
    assert check_train_config(TrainPerturberRunConfig(data="photos", eot=["blur+flip"])) == pytest.approx(10 / 255)
