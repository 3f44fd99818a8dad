"""Defects a walkthrough of docs/protect_model_guide.md found in protect-model, evaluate and personalize: a sampler
step count the sampler cannot run (pndm below 4 steps), the encoder trap alone (protect.outer_steps=0) reported as
an APDM run, a missing extra found after minutes of image generation, a misspelt photo folder not named by its key.
"""

import sys

import pytest

from apdm.config import EvaluateRunConfig, PersonalizeRunConfig, ProtectModelRunConfig, SampleConfig, load_config


def _no_model(monkeypatch):
    """Make loading the model fail loudly: a check that must come before any work is then seen to."""
    import apdm.core.models as M

    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(M, "load_sd", refuse)


def _photos(tmp_path, n=2):
    from PIL import Image

    folder = tmp_path / "subject"
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", (64, 64), (40 * i, 120, 200)).save(folder / f"{i}.png")
    return folder


# ------------------------------------------------------------------ 1. pndm needs 4+ steps without skip_prk_steps
def test_check_sampler_steps_asks_the_models_scheduler():
    import dataclasses

    from diffusers import DDPMScheduler, PNDMScheduler

    from apdm.core.models import tiny_sd
    from apdm.evaluation.protocol import check_sampler_steps

    sd = tiny_sd()  # its scheduler config does not set skip_prk_steps: pndm fails below 4 steps in diffusers
    for n in (1, 2, 3):
        with pytest.raises(ValueError, match=rf"sample.num_inference_steps={n}: the pndm sampler needs at least 4 "
                                             r"steps .*use 4\+ or sample.sampler=ddim"):
            check_sampler_steps(sd, SampleConfig(sampler="pndm", num_inference_steps=n))
    check_sampler_steps(sd, SampleConfig(sampler="pndm", num_inference_steps=4))
    for sampler in ("ddim", "ddpm", "dpmsolver", "euler"):  # any count >= 1 works for these
        check_sampler_steps(sd, SampleConfig(sampler=sampler, num_inference_steps=1))
    # SD 1.5's scheduler config skips the PRK steps: its 2-step pndm sampling works and stays allowed
    sd15 = PNDMScheduler(skip_prk_steps=True, steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085,
                         beta_end=0.012, set_alpha_to_one=False)
    skipping = dataclasses.replace(sd, noise_scheduler=DDPMScheduler.from_config(sd15.config))
    check_sampler_steps(skipping, SampleConfig(sampler="pndm", num_inference_steps=2))


def test_personalize_refuses_pndm_with_2_steps_before_training(tmp_path, monkeypatch):
    from apdm.personalization import simulator as S
    from apdm.personalization.run import run

    def no_training(*a, **k):
        raise AssertionError("trained before the sampler check")

    monkeypatch.setattr(S, "class_images_for", no_training)
    monkeypatch.setattr(S, "train", no_training)
    cfg = load_config(PersonalizeRunConfig, None, [
        "model.path=tiny", "model.device=cpu", f"instance_data={_photos(tmp_path)}", f"output_dir={tmp_path / 'o'}",
        "quiet=true", "personalization.method=lora", "personalization.steps=1",
        "personalization.with_prior_preservation=false", "sample.sampler=pndm", "sample.num_inference_steps=2"])
    with pytest.raises(ValueError, match=r"sample.num_inference_steps=2: the pndm sampler needs at least 4 steps"):
        run(cfg)
    assert not (tmp_path / "o" / "samples").exists()


def test_evaluate_refuses_pndm_with_3_steps_before_any_cell(tmp_path, monkeypatch):
    from helpers import clean_and_protected_folders

    import apdm.evaluation.protocol as P
    from apdm.evaluation.run import run

    def no_cell(*a, **k):
        raise AssertionError("a cell ran before the sampler check")

    monkeypatch.setattr(P, "personalize_and_sample", no_cell)
    clean, prot = clean_and_protected_folders(tmp_path)
    cfg = load_config(EvaluateRunConfig, None, [
        "model.path=tiny", "model.device=cpu", f"output_dir={tmp_path / 'e'}", "quiet=true",
        f"subjects=[{{name: s1, clean_data: {clean}, protected_data: {prot}}}]", "scenarios=[all_perturbed]",
        "personalizations=[{method: lora, steps: 1, with_prior_preservation: false}]",
        "sample.sampler=pndm", "sample.num_inference_steps=3"])
    with pytest.raises(ValueError, match=r"sample.num_inference_steps=3: the pndm sampler needs at least 4 steps"):
        run(cfg)
    assert not list((tmp_path / "e").glob("cells/*.json"))


# ------------------------------------------------------------------ 2. the encoder trap alone is not an APDM run
def test_trap_alone_is_logged_as_the_trap_alone(tmp_path, apdm_info_log):
    from helpers import tiny_protect_model_args

    from apdm.cli import main

    assert main(["protect-model", *tiny_protect_model_args(tmp_path), "protect.outer_steps=0",
                 "encoder_trap.steps=1"]) == 0
    text = apdm_info_log()
    assert "got no protection step" not in text and "set protect.outer_steps to at least" not in text
    assert "APDM: " not in text and "outer x" not in text
    assert "the encoder trap alone (protect.outer_steps=0)" in text
    assert "DPO pairs' x⁺" not in text and "the encoder trap's decoy candidates and kept images" in text
    # with APDM steps the pairs keep their name, and a subject left without a step is still warned of
    (tmp_path / "b").mkdir()
    assert main(["protect-model", *tiny_protect_model_args(tmp_path / "b"), "protect.outer_steps=1",
                 "protect.inner_steps=0", "subjects=[{instance_data: " + str(tmp_path / "subject") + "}, "
                 "{instance_data: " + str(tmp_path / "subject") + ", instance_prompt: a photo of zzk person}]"]) == 0
    text = apdm_info_log()
    assert "APDM: dpo loss, 1 outer x 0 inner steps" in text and "DPO pairs' x⁺" in text
    assert "subject 1 (subject, prompt 'a photo of zzk person') got no protection step" in text


# ------------------------------------------------------------------ 3. a missing extra is found before any work
def test_missing_dlib_is_reported_before_the_model_loads(tmp_path, monkeypatch):
    from helpers import tiny_protect_model_args

    from apdm.protect_model.run import run
    from apdm.utils import MissingDependency

    _no_model(monkeypatch)
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib -> ImportError, as without the faces extra
    cfg = load_config(ProtectModelRunConfig, None, [
        *tiny_protect_model_args(tmp_path), "protect.outer_steps=0", "encoder_trap.steps=1",
        "encoder_trap.targets=farthest", "encoder_trap.identity=dlib"])
    with pytest.raises(MissingDependency, match=r"'dlib' is needed for encoder_trap.identity=dlib.*apdm\[faces\]"):
        run(cfg)
    assert not (tmp_path / "cls").exists()  # no class image, no DPO pair
    # a trap that loads no recognizer (targets=paired) does not need dlib
    from apdm.protect_model.encoder_trap import check_trap_extras

    check_trap_extras(cfg.encoder_trap.__class__(steps=1, targets="paired", identity="dlib"))


def test_missing_bitsandbytes_is_reported_before_the_model_loads(tmp_path, monkeypatch):
    from helpers import tiny_protect_model_args

    from apdm.personalization.run import run as personalize
    from apdm.protect_model.run import run as protect
    from apdm.utils import MissingDependency

    _no_model(monkeypatch)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    cfg = load_config(ProtectModelRunConfig, None, [*tiny_protect_model_args(tmp_path),
                                                    "personalization.optimizer=adamw8bit"])
    with pytest.raises(MissingDependency, match=r"personalization.optimizer=adamw8bit .*apdm\[gpu\]"):
        protect(cfg)
    cfg = load_config(PersonalizeRunConfig, None, [
        "model.path=tiny", f"instance_data={tmp_path / 'subject'}", f"output_dir={tmp_path / 'p'}",
        "personalization.optimizer=adamw8bit"])
    with pytest.raises(MissingDependency, match=r"personalization.optimizer=adamw8bit"):
        personalize(cfg)


# ------------------------------------------------------------------ a misspelt photo folder names its key
def test_misspelt_instance_data_names_its_key_before_the_model_loads(tmp_path, monkeypatch):
    from helpers import tiny_protect_model_args

    from apdm.protect_model.run import load_keep_images, run

    _no_model(monkeypatch)
    args = tiny_protect_model_args(tmp_path)
    cfg = load_config(ProtectModelRunConfig, None, [*args, f"subjects=[{{instance_data: {tmp_path / 'trian'}}}]"])
    with pytest.raises(FileNotFoundError, match=r"^subjects\[0\].instance_data: input '.*trian' does not exist"):
        run(cfg)
    cfg = load_config(ProtectModelRunConfig, None, [
        *args, "protect.outer_steps=0", "encoder_trap.steps=1",
        f"subjects=[{{instance_data: {tmp_path / 'subject'}, check_data: {tmp_path / 'held'}}}]"])
    with pytest.raises(FileNotFoundError, match=r"^subjects\[0\].check_data: input '.*held' does not exist"):
        run(cfg)
    with pytest.raises(FileNotFoundError, match=r"^encoder_trap.keep_images: input '.*kep' does not exist"):
        load_keep_images(str(tmp_path / "kep"), 64)
    assert not (tmp_path / "cls").exists()
