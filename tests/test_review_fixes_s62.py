"""Fixes of the 2026-12-07 (second) session, each with the behaviour it fixed."""
from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
from helpers import noise_photo

from apdm.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_a_rho_in_a_folder_named_toy_is_resolved_once_a_run(tmp_path, monkeypatch, apdm_log):
    """``--rho toy`` with a ρ in ./toy resolved the folder three times (checked, loaded, hashed), so its warning
    was logged three times; it is resolved once and said once, and the run still uses ./toy's ρ."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "toy").mkdir()
    for f in (REPO / "assets" / "toy" / "rho").iterdir():
        (tmp_path / "toy" / f.name).write_bytes(f.read_bytes())
    src = noise_photo(tmp_path / "a.png", 32, 32)
    assert main(["protect-images", "--method", "ldu", "--rho", "toy", "--model", "toy", "--input", str(src),
                 "--output", str(tmp_path / "out"), "quiet=true"]) == 0
    assert apdm_log().count("it holds a ρ") == 1
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["settings"]["rho_path"] == "toy"  # the path as given is what the manifest records


def test_a_noisy_upscale_cell_computed_before_the_noise_fix_is_not_reused(monkeypatch):
    """Fixing what Noisy Upscaling computes (its upscaler's noise no longer repeats the pixel noise) must not serve
    the cells ``apdm evaluate`` cached with the old attack: the module's CELL_VERSION keys the cell."""
    from apdm.attacks import noisy_upscale as nu
    from apdm.evaluation.run import _attack_parts, _cell_key

    def key():
        return _cell_key("al", "all_protected", *_attack_parts("noisy_upscale:upscaler=tiny"), "db", {"fp": 1})

    now = key()
    assert _attack_parts("noisy_upscale:upscaler=tiny")[1]["attack_settings"]["cell_version"] == nu.CELL_VERSION
    monkeypatch.delattr(nu, "CELL_VERSION")  # the attack as it was keyed before the fix
    assert key() != now


def test_the_model_card_says_what_the_unet_was_fine_tuned_with():
    """The card said "APDM (DPO loss + Learning-to-Protect)" for the naive baseline and for inner_steps=0 too,
    while its own settings block showed otherwise."""
    from apdm.config import ProtectModelRunConfig
    from apdm.protect_model.run import model_card

    cfg = ProtectModelRunConfig()
    assert "APDM (DPO loss + Learning-to-Protect)" in model_card(cfg, [], 1.0)
    cfg.protect.loss = "naive"
    card = model_card(cfg, [], 1.0)
    assert "DPO loss + Learning-to-Protect" not in card and "the naive loss" in card
    cfg.protect.loss, cfg.protect.inner_steps = "dpo", 0
    card = model_card(cfg, [], 1.0)
    assert "without Learning-to-Protect (inner_steps=0)" in card and "DPO loss + Learning-to-Protect" not in card


def test_jpeg_on_an_empty_batch_gives_an_empty_batch():
    import torch

    from apdm.attacks.transforms import jpeg

    out = jpeg(torch.zeros(0, 3, 8, 8), quality=75)  # was: RuntimeError: stack expects a non-empty TensorList
    assert out.shape == (0, 3, 8, 8)


def test_every_sd15_recipe_loads_the_paper_fp32_weights():
    """sd15-apdm-dog.yaml said "same settings as the person recipe" but had no model.dtype: fp32, so on a GPU it
    loaded φ and the frozen parts in bf16 (model.dtype=auto)."""
    from apdm.config import ProtectModelRunConfig, load_config

    for name in ("sd15-apdm-person", "sd15-apdm-dog"):
        assert load_config(ProtectModelRunConfig, REPO / "recipes" / f"{name}.yaml", []).model.dtype == "fp32", name


def test_protect_model_checks_a_token_attackers_identifier_in_the_subjects_prompts(tmp_path):
    """The new identifier check of a token-learning attacker (TI, Custom Diffusion) looked at
    personalization.instance_prompt only, refusing a run whose subjects carry their own prompts with the identifier;
    protect-model checks each subject's prompt, the one the attacker trains with."""
    from helpers import tiny_protect_model_args

    from apdm.config import PersonalizationConfig, ProtectConfig
    from apdm.protect_model.l2p import check_protect_config

    per = PersonalizationConfig(method="ti", identifier="zwx")  # its instance_prompt is "a photo of sks person"
    check_protect_config(per, ProtectConfig(), instance_prompts={"subjects[0].instance_prompt": "a photo of zwx man"})
    import pytest

    with pytest.raises(ValueError, match=r"subjects\[0\].instance_prompt='a photo of sks man'"):
        check_protect_config(per, ProtectConfig(), instance_prompts={"subjects[0].instance_prompt": "a photo of sks man"})
    args = [a for a in tiny_protect_model_args(tmp_path) if not a.startswith("subjects=")]
    subject = f"subjects=[{{instance_data: {tmp_path / 'subject'}, instance_prompt: a photo of zwx person}}]"
    assert main(["protect-model", *args, subject, "personalization.method=ti", "personalization.identifier=zwx",
                 "protect.outer_steps=1"]) == 0


def test_a_run_that_cannot_start_keeps_the_last_runs_results(tmp_path):
    """The stale-results cleanup ran before the model loaded: a misspelt model path (a run that never started) or
    only resume=false deleted the last finished run's results.json and report.html."""
    import yaml
    from helpers import clean_and_protected_folders, tiny_evaluate_args

    _args = functools.partial(tiny_evaluate_args, images=2)

    clean, _ = clean_and_protected_folders(tmp_path)
    out = tmp_path / "eval"
    subj = f"[{{name: al, clean_data: {clean}}}]"
    assert main(_args(out, subj, "label=runA")) == 0
    assert main([*_args(out, subj, "label=runB"), f"model.path={tmp_path / 'no-such-model'}"]) == 1
    assert (out / "results.json").is_file() and (out / "report.html").is_file()
    assert yaml.safe_load((out / "config.yaml").read_text())["label"] == "runA"  # still the results' own
    assert main([*_args(out, subj, "label=runA"), "resume=false"]) == 0
    assert json.loads((out / "results.json").read_text())["label"] == "runA"


def test_attacker_mix_attackers_are_checked_before_any_work():
    import pytest

    from apdm.config import PersonalizationConfig, ProtectConfig
    from apdm.protect_model.l2p import check_protect_config

    per = PersonalizationConfig()
    with pytest.raises(ValueError, match=r"protect.attacker_mix\[0\].adam_beta1=1.5"):
        check_protect_config(per, ProtectConfig(attacker_mix=[{"method": "lora", "adam_beta1": 1.5}]))
    with pytest.raises(ValueError, match=r"subjects\[0\].instance_prompt='a photo of zwx person'"):
        check_protect_config(per, ProtectConfig(attacker_mix=[{"method": "ti"}]),
                             instance_prompts={"subjects[0].instance_prompt": "a photo of zwx person"})


def test_check_size_takes_every_multiple_of_the_vae_factor_where_the_unet_runs_at_one_cell():
    """An SD-like UNet (no group of one channel) runs down to a one-cell latent; check_size refused sides below
    8 * 2**downsamplings for it, saying the model takes sides "from 64 up"."""
    from types import SimpleNamespace

    import pytest

    from apdm.personalization.run import check_size

    def sd(channels, groups=32):
        unet = SimpleNamespace(config=SimpleNamespace(block_out_channels=channels, norm_num_groups=groups))
        return SimpleNamespace(vae_scale_factor=8, unet=unet, resolution=512)

    for side in (8, 16, 56, 512):
        check_size(sd((320, 640, 1280, 1280)), side)
    with pytest.raises(ValueError, match="multiples of 8"):
        check_size(sd((320, 640, 1280, 1280)), 60)
    with pytest.raises(ValueError, match="from 24 up"):
        check_size(sd((32, 64)), 16)  # the tiny model's layout: a 1x1 map in a one-channel group fails


def test_a_users_photo_named_like_an_output_is_never_written_over(tmp_path):
    """--output = the input folder with suffix=_p, and the folder already holds the user's own a_p.png (no manifest
    lists it): it was left out as an output by its name, and a.jpg's protected copy was written over it."""
    import hashlib

    from helpers import protect_images_cfg

    from apdm.protect_images import run as runner

    noise_photo(tmp_path / "a.jpg", seed=1)
    mine = noise_photo(tmp_path / "a_p.png", seed=2)
    before = hashlib.sha256(mine.read_bytes()).hexdigest()
    manifest = runner.run(protect_images_cfg(tmp_path, tmp_path, suffix="_p"))
    assert hashlib.sha256(mine.read_bytes()).hexdigest() == before
    assert [e["file"] for e in manifest["images"]] == ["a_p-2.png"]
    again = runner.run(protect_images_cfg(tmp_path, tmp_path, suffix="_p"))  # resumes: its own output is known
    assert [e["file"] for e in again["images"]] == ["a_p-2.png"] and hashlib.sha256(mine.read_bytes()).hexdigest() \
        == before


def test_evaluate_pairs_through_the_manifest_of_a_protected_folder_given_with_a_tilde(tmp_path, monkeypatch):
    """protected_data=~/out found no manifest.json (the ~ was not expanded there, only when listing the files), so
    the photos were paired by sorted names: a.jpg's and a.png's outputs swapped, without a word."""
    from helpers import protect_images_cfg

    from apdm.evaluation.run import protected_pairs
    from apdm.protect_images import run as runner

    monkeypatch.setenv("HOME", str(tmp_path))
    src = tmp_path / "photos"
    src.mkdir()
    a_jpg, a_png = noise_photo(src / "a.jpg", seed=1), noise_photo(src / "a.png", seed=2)
    runner.run(protect_images_cfg(src, tmp_path / "out"))
    pairs = protected_pairs([a_jpg, a_png], "~/out")
    assert pairs is not None
    made = {Path(e["input"]).name: e["file"] for e in json.loads((tmp_path / "out" / "manifest.json").read_text())[
        "images"]}
    assert [p.name for p in pairs] == [made["a.jpg"], made["a.png"]]


def _png16(path: Path, arr: np.ndarray, trns: bytes) -> Path:
    """A 16-bit PNG (grey for (H,W), RGB for (H,W,3) uint16) with a tRNS chunk, written byte by byte."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    h, w = arr.shape[:2]
    raw = b"".join(b"\0" + arr[r].astype(">u2").tobytes() for r in range(h))
    head = struct.pack(">IIBBBBB", w, h, 16, 0 if arr.ndim == 2 else 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head) + chunk(b"tRNS", trns)
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def test_a_16_bit_pngs_transparent_colour_stays_transparent(tmp_path):
    """16-bit PNGs without an alpha channel whose tRNS names one transparent grey level or colour came out opaque
    (grey: the 16-bit branch returned no alpha; RGB: Pillow compared the 16-bit key with 8-bit pixels)."""
    import struct

    from apdm.core.images import load_image

    grey = np.full((8, 10), 40000, np.uint16)
    grey[:4] = 1234
    rgb = np.full((8, 10, 3), 40000, np.uint16)
    rgb[:4] = (1234, 2345, 3456)
    for path in (_png16(tmp_path / "g.png", grey, struct.pack(">H", 1234)),
                 _png16(tmp_path / "c.png", rgb, struct.pack(">HHH", 1234, 2345, 3456))):
        im = load_image(path)
        assert im.bit_depth == 16 and im.alpha is not None, path.name
        alpha = np.asarray(im.alpha).reshape(8, 10)
        assert (alpha[:4] == 0).all() and (alpha[4:] == 1).all(), path.name


def _ldu_kw():
    from apdm.config import PersonalizationConfig

    per = PersonalizationConfig(method="dreambooth", learning_rate=1e-4, steps=2, batch_size=1,
                                with_prior_preservation=False)
    return {"budget": 8 / 255, "batch_size": 2, "personalization": per, "anchor_steps": 2, "denoise_steps": 1,
            "seed": 5, "quiet": True}


def test_a_rho_checkpoint_past_steps_or_truncated_is_refused_before_the_anchors_train(tiny_sd, tmp_path, monkeypatch):
    """A ρ-training checkpoint past ``steps`` or with a truncated state.safetensors was refused only after every
    anchor had been trained again (hours of DreamBooth on SD), though the docs say it is checked before."""
    import pytest
    import torch

    from apdm.protect_images import ldu
    from apdm.protect_model.l2p import CheckpointError

    g = torch.Generator().manual_seed(4)
    ids = {"a": torch.rand(2, 3, 64, 64, generator=g), "b": torch.rand(2, 3, 64, 64, generator=g)}
    ckpt = tmp_path / "ckpt"
    ldu.train_perturber(tiny_sd, ids, steps=4, checkpoint_dir=ckpt, checkpoint_every=2, stop_after=2, **_ldu_kw())

    def no_anchors(*a, **k):
        raise AssertionError("the anchors trained before the checkpoint was checked")

    monkeypatch.setattr(ldu, "train_anchors", no_anchors)
    with pytest.raises(CheckpointError, match="past steps=1"):
        ldu.train_perturber(tiny_sd, ids, steps=1, checkpoint_dir=ckpt, **_ldu_kw())
    (ckpt / "rho" / "state.safetensors").write_bytes(b"xx")
    with pytest.raises(CheckpointError, match="cannot be read"):
        ldu.train_perturber(tiny_sd, ids, steps=4, checkpoint_dir=ckpt, **_ldu_kw())


def test_one_identity_trains_without_shuffling_and_says_so(tiny_sd, apdm_log):
    import torch

    from apdm.protect_images import ldu

    ids = {"solo": torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))}
    rho = ldu.train_perturber(tiny_sd, ids, steps=1, shuffle_prob=0.5, **{**_ldu_kw(), "anchor_steps": 1})
    assert rho.training_info["shuffle_prob"] == 0.0  # recorded 0.5 though no step could shuffle
    assert "needs two identities" in apdm_log()


def test_a_rho_for_other_latent_channels_is_refused_by_name(tiny_sd):
    import pytest
    import torch

    from apdm.protect_images import ldu

    with pytest.raises(ValueError, match="8-channel latents"):  # was a raw conv error at the first photo
        ldu.check_rho_fits(ldu.build_rho(channels=8), tiny_sd, 8 / 255)
    rho = ldu.build_rho(channels=tiny_sd.unet.config.in_channels)
    with pytest.raises(ValueError, match="multiples of 8"):  # was: "The size of tensor a (61) must match ..."
        ldu.apply(tiny_sd, rho, torch.rand(1, 3, 70, 61), 8 / 255)


def test_train_perturber_data_messages(tmp_path, apdm_log, monkeypatch):
    """data= naming a file said "data folder not found"; a folder of loose photos said only "found none with
    photos"; data=~/faces was not expanded."""
    import pytest

    from apdm.config import TrainPerturberRunConfig
    from apdm.protect_images.run import train

    noise_photo(tmp_path / "0.png", 64, 64)

    with pytest.raises(FileNotFoundError, match="is a file, not a folder"):
        train(TrainPerturberRunConfig(data=str(tmp_path / "0.png"), output_dir=str(tmp_path / "o")))
    with pytest.raises(ValueError, match="1 photo.s. directly in it are not read"):
        train(TrainPerturberRunConfig(data=str(tmp_path), output_dir=str(tmp_path / "o")))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ValueError, match="directly in it"):  # ~ expanded: the folder is found
        train(TrainPerturberRunConfig(data="~", output_dir=str(tmp_path / "o")))


def test_lora_targets_and_evaluate_resolution_are_checked_once_the_model_loads(tmp_path, tiny_sd, apdm_log):
    """lora_target_modules naming no module failed in peft only when the adapters were added (after the class
    images); evaluate's resolution=12 failed in torch at the first step. Both are refused by name right after the
    model loads, in personalize, evaluate and protect-model."""
    import pytest
    from helpers import clean_and_protected_folders, tiny_evaluate_args, tiny_protect_model_args

    _args = functools.partial(tiny_evaluate_args, images=2)

    from apdm.config import PersonalizationConfig
    from apdm.personalization.simulator import check_lora_targets

    check_lora_targets(tiny_sd.unet, PersonalizationConfig(method="lora"))  # the default targets exist
    check_lora_targets(tiny_sd.unet, PersonalizationConfig(method="dreambooth", lora_target_modules=["to_x"]))
    with pytest.raises(ValueError, match=r"personalization.lora_target_modules=\['to_q', 'to_x'\]: to_x names no"):
        check_lora_targets(tiny_sd.unet, PersonalizationConfig(method="lora", lora_target_modules=["to_q", "to_x"]))
    clean, _ = clean_and_protected_folders(tmp_path)
    subj = f"[{{name: al, clean_data: {clean}}}]"
    out = tmp_path / "eval"
    bad = "personalizations=[{method: lora, steps: 1, lora_target_modules: [to_x]}]"
    assert main([*_args(out, subj), bad]) == 1
    assert "personalizations[0].lora_target_modules=['to_x']: to_x names no module" in apdm_log()
    assert main([*_args(out, subj), "resolution=12"]) == 1
    assert "resolution=12: this model takes image sides that are multiples of 8" in apdm_log()
    assert not list((out / "cells").glob("*.json"))
    args = tiny_protect_model_args(tmp_path)
    assert main(["protect-model", *args, "protect.attacker_mix=[{method: lora, lora_target_modules: [to_x]}]"]) == 1
    assert "protect.attacker_mix[0].lora_target_modules=['to_x']: to_x names no module" in apdm_log()
    assert not (tmp_path / "cls").exists()  # refused before the class images


def test_an_unreadable_keep_set_is_refused_before_the_class_images(tmp_path, apdm_log):
    """encoder_trap.keep_images holding only unreadable files was refused after the class images and x⁺ were
    generated (minutes on SD); it is read before them, as the held-back photos are."""
    from helpers import tiny_protect_model_args

    bad = tmp_path / "keep"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not a png")
    args = tiny_protect_model_args(tmp_path)
    assert main(["protect-model", *args, "encoder_trap.steps=1", f"encoder_trap.keep_images={bad}"]) == 1
    assert "no usable images" in apdm_log()
    assert not (tmp_path / "cls").exists()


def test_a_trap_alone_card_does_not_speak_of_dpo_pairs():
    from apdm.config import ProtectModelRunConfig
    from apdm.protect_model.run import model_card

    cfg = ProtectModelRunConfig()
    cfg.encoder_trap.steps, cfg.protect.outer_steps = 1, 0
    trap = [{"step": 0, "loss_trap": 0.5, "loss_preserve": 0.1}]
    card = model_card(cfg, [], 1.0, trap_history=trap)
    assert "the DPO pairs' x⁺" not in card and "the base model's generic images of the class prompt" in card
    cfg.protect.outer_steps = 2
    assert "the DPO pairs' x⁺" in model_card(cfg, [], 1.0, trap_history=trap)


def test_output_dir_a_file_or_with_a_tilde_is_handled_before_any_work(tmp_path, monkeypatch, apdm_log):
    """output_dir naming a file failed with a bare '[Errno 17] File exists' (protect-images and train-perturber after
    the model loaded); a recipe's output_dir: ~/out made a folder named ~ in the current folder."""
    import pytest

    from apdm.config import ConfigError, ProtectImagesRunConfig, apply_override

    (tmp_path / "afile").write_text("x")
    src = noise_photo(tmp_path / "a.png", 32, 32)

    def no_model(*a, **k):
        raise AssertionError("the model loaded before output_dir was checked")

    monkeypatch.setattr("apdm.core.models.load_sd", no_model)
    for cmd in (["protect-images", "--method", "advdm", "--model", "tiny", "--input", str(src), "--output",
                 str(tmp_path / "afile")],
                ["train-perturber", "model.path=tiny", f"data={tmp_path}", f"output_dir={tmp_path / 'afile'}"]):
        assert main(cmd) == 1
        assert "afile is a file, not a folder" in apdm_log()
    monkeypatch.undo()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "pm.yaml"
    recipe.write_text("output_dir: ~/from_recipe\n")
    assert main(["personalize", "--config", str(recipe), "model.path=tiny", "model.device=cpu", f"instance_data={src}",
                 "personalization.steps=1", "personalization.with_prior_preservation=false", "quiet=true",
                 "sample.num_images_per_prompt=1", "sample.num_inference_steps=1"]) == 0
    assert (tmp_path / "home" / "from_recipe" / "summary.json").is_file() and not (tmp_path / "~").exists()
    with pytest.raises(ConfigError, match="'seed' must be between"):  # was torch's "Overflow when unpacking long long"
        apply_override(ProtectImagesRunConfig(), "seed=18446744073709551616")
    apply_override(ProtectImagesRunConfig(), "seed=18446744073709551615")


def test_evaluate_with_no_cell_to_run_is_refused(tmp_path, apdm_log):
    """attacks=[] (meant as "no purification") skipped every personalization and exited 0 with 0 records."""
    from helpers import clean_and_protected_folders, tiny_evaluate_args

    _args = functools.partial(tiny_evaluate_args, images=2)

    clean, _ = clean_and_protected_folders(tmp_path)
    subj = f"[{{name: al, clean_data: {clean}}}]"
    for key in ("attacks", "scenarios", "personalizations"):
        assert main([*_args(tmp_path / "eval", subj), f"{key}=[]"]) == 1
        assert f"{key}=[] leaves no cell to run" in apdm_log()


def test_toy_out_with_a_tilde_and_a_class_data_dir_that_is_a_file(tmp_path, monkeypatch, apdm_log):
    """`apdm toy export --out "~/x"` (quoted, or from a script) wrote into a folder named ~ here;
    personalization.class_data_dir naming a file failed with "[Errno 20] Not a directory: '<file>/<hash>'"."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["toy", "export", "--out", "~/x", "--subjects", "1", "--images", "1"]) == 0
    assert (tmp_path / "home" / "x").is_dir() and not (tmp_path / "~").exists()
    src = noise_photo(tmp_path / "a.png", 32, 32)
    (tmp_path / "afile").write_text("x")
    assert main(["personalize", "model.path=tiny", "model.device=cpu", f"instance_data={src}", "quiet=true",
                 f"personalization.class_data_dir={tmp_path / 'afile'}", "personalization.steps=1",
                 f"output_dir={tmp_path / 'o'}"]) == 1
    said = apdm_log()
    assert "personalization.class_data_dir=" in said and "is a file, not a folder" in said
