"""Toy-world audit: a kill between a stage's save and its record, exports of the other class, an upscaler resumed
under other settings, a half-built cache, pickles and atomic saves in the build, the bench's judge guard and the
`toy build` command's errors."""

import json
import logging

import pytest
import torch

from apdm.toy import model as toy_model
from apdm.toy import world
from apdm.toy.model import ToyModelConfig, ToyTrainConfig

MARKER = "build_stage.json"  # toy_model.STAGE_MARKER, written with a stage's model until the stage is recorded
SMALL = ToyModelConfig(vae_channels=[16, 16], unet_channels=[32, 64], attention_head_dim=8, text_hidden=32,
                       text_layers=1, text_heads=2)


def _tiny_build(out, **kw):
    stage1 = ToyTrainConfig(num_identities=3, images_per_identity=2, vae_steps=2, vae_batch=4, unet_steps=3,
                            unet_batch=4, warmup=1)
    stage2 = ToyTrainConfig(num_identities=3, images_per_identity=2, unet_steps=2, unet_batch=4, warmup=1,
                            unet_lr=2e-4, seed=1)
    args = {"model": SMALL, "train": stage1, "more_stages": [stage2], "output_dir": str(out),
            "skip_instruments": True, "quiet": True}
    args.update(kw)
    return world.ToyBuildConfig(**args)


def _weights(folder, part="unet"):
    from safetensors.torch import load_file

    return load_file(str(folder / "model" / part / "diffusion_pytorch_model.safetensors"))


class _Stop(Exception):
    """Raised where a test stops the code it runs."""


def test_a_build_killed_after_a_stage_is_saved_does_not_train_it_again(tmp_path, monkeypatch):
    """Killed after pretrain() saved a stage but before build_state.json recorded it, a rerun used to train that
    stage again on its own output (stage 1 + 2 + 2, reported as 1 + 2); now the stage is recorded from the
    marker saved with the model, and the result equals an uninterrupted build."""
    world.build(_tiny_build(tmp_path / "ref"))
    ref = _weights(tmp_path / "ref")
    assert not (tmp_path / "ref" / "model" / MARKER).exists()
    real, calls = toy_model.pretrain, []

    def killed_after(stage_no):
        def f(out_dir, mcfg, tcfg, fp16=True, **kw):
            calls.append(tcfg.init_from)
            report = real(out_dir, mcfg, tcfg, fp16, **kw)
            if len(calls) == stage_no:
                raise KeyboardInterrupt  # the stage is saved; build() has not recorded it yet
            return report
        return f

    for stage_no in (1, 2):
        out = tmp_path / f"k{stage_no}"
        monkeypatch.setattr(toy_model, "pretrain", killed_after(stage_no))
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            world.build(_tiny_build(out))
        assert len(json.loads((out / "build_state.json").read_text())["done"]) == stage_no - 1
        monkeypatch.setattr(toy_model, "pretrain", killed_after(0))
        calls.clear()
        report = world.build(_tiny_build(out))
        assert calls == ([str(out / "model")] if stage_no == 1 else [])  # the saved stage is not trained again
        assert len(report["model_stages"]) == 2 and report["model_stages"][stage_no - 1]["unet_loss_final"] > 0
        assert not (out / "model" / MARKER).exists() and not toy_model.work_dir(out / "model").exists()
        got = _weights(out)
        for k in ref:
            torch.testing.assert_close(got[k], ref[k], atol=0, rtol=0, msg=k)


def test_the_build_saves_its_vae_atomically(tmp_path, monkeypatch):
    """A kill while the trained VAE was written to the work folder left config.json without weights, and the
    rerun failed on it."""
    from diffusers import AutoencoderKL

    real = AutoencoderKL.save_pretrained

    def config_then_kill(self, save_directory, **kw):
        self.save_config(save_directory)  # diffusers writes config.json first
        raise KeyboardInterrupt

    monkeypatch.setattr(AutoencoderKL, "save_pretrained", config_then_kill)
    with pytest.raises(KeyboardInterrupt):
        world.build(_tiny_build(tmp_path / "a", more_stages=[]))
    assert not (toy_model.work_dir(tmp_path / "a" / "model") / "vae").exists()  # nothing half written
    monkeypatch.setattr(AutoencoderKL, "save_pretrained", real)
    assert len(world.build(_tiny_build(tmp_path / "a", more_stages=[]))["model_stages"]) == 1


def test_a_stage_model_given_as_init_from_is_never_unpickled(tmp_path, monkeypatch):
    """_load_stage (train.init_from, a user-supplied folder) loaded pickled weights (*.bin)."""
    from apdm.toy import draw

    vae, te, tok, unet, sched = toy_model.build_components(SMALL, draw.vocabulary())
    model = toy_model.save_toy_model(vae, te, tok, unet, sched, tmp_path / "model")
    weights = model / "vae" / "diffusion_pytorch_model.safetensors"
    torch.save(_weights(tmp_path, "vae"), model / "vae" / "diffusion_pytorch_model.bin")
    weights.unlink()
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickle was loaded"))
    with pytest.raises(FileNotFoundError, match=r"init_from: .*vae holds no loadable safetensors weights"):
        toy_model._load_stage(model, SMALL)


def test_export_refuses_to_replace_the_other_class(tmp_path, capsys):
    """`toy export --cls dog` into a folder of person subjects replaced heldout-0001 (the person) silently."""
    from PIL import Image

    from apdm.cli import main

    world.export(tmp_path, subjects=1, cls="person", num_images=1, num_references=1)
    subject = tmp_path / "heldout-0001" / "subject.json"
    before = subject.read_text()
    with pytest.raises(ValueError, match=r"heldout-0001/subject.json is a person subject; exporting dog"):
        world.export(tmp_path, subjects=1, cls="dog", num_images=1, num_references=1)
    assert main(["toy", "export", "--out", str(tmp_path), "--subjects", "1", "--cls", "dog", "--images", "1"]) == 2
    assert "is a person subject" in capsys.readouterr().err
    assert subject.read_text() == before
    world.export(tmp_path, subjects=1, cls="person", num_images=1, num_references=1)  # the same class: fine

    # training identities: the class is recorded in each photo (the folder holds nothing but photo folders)
    world.export(tmp_path / "ids", subjects=0, training_identities=1, images_per_training_identity=1)
    photo = next((tmp_path / "ids" / "train-identities").glob("id-*/00.png"))
    with Image.open(photo) as im:
        assert im.getexif()[0x010E].endswith("class: person")
    with pytest.raises(ValueError, match=r"train-identities holds person training identities"):
        world.export(tmp_path / "ids", subjects=0, cls="dog", training_identities=1, images_per_training_identity=1)
    with Image.open(photo) as im:
        assert im.getexif()[0x010E].endswith("class: person")


def test_the_upscaler_starts_over_when_its_checkpoint_is_from_other_settings(tmp_path, monkeypatch, caplog):
    """A killed `apdm toy upscaler` resumed its checkpoint under another seed or learning rate (and logged the new
    ones as its config); the checkpoint now records its settings and a run with others starts over."""
    from helpers import stop_after_first_checkpoint

    from apdm.toy.upscaler import ToyUpscalerConfig, build_upscaler

    monkeypatch.setenv("APDM_CACHE", str(tmp_path / "cache"))
    base = {"out": str(tmp_path / "up"), "steps": 4, "batch": 2, "identities": 1, "images_per_identity": 1,
            "crop": 16, "channels": [8, 16], "checkpoint_every": 2, "quiet": True}
    stop_after_first_checkpoint(monkeypatch, build_upscaler, ToyUpscalerConfig(**base))
    state = json.loads((tmp_path / "up.work" / "state.json").read_text())
    assert state["step"] == 2 and state["settings"]["lr"] == 1e-3 and state["settings"]["seed"] == 0
    with caplog.at_level(logging.INFO, logger="apdm"):
        out = build_upscaler(ToyUpscalerConfig(**base, seed=5, lr=0.5))
    log = json.loads((out / "train_log.json").read_text())
    assert log["steps_run_here"] == 4 and log["config"]["seed"] == 5  # from the start, with the new settings
    assert "from other settings (lr 0.001 -> 0.5, seed 0 -> 5); starting over" in caplog.text

    def no_drawing(*a, **k):
        raise _Stop("the dataset was drawn")

    monkeypatch.setattr(world, "pretraining_set", no_drawing)
    with pytest.raises(ValueError, match="identities must be between 1 and 3686"):
        build_upscaler(ToyUpscalerConfig(**{**base, "identities": 4000}))


def test_a_half_built_cache_never_replaces_the_committed_world(tmp_path, monkeypatch, caplog):
    """toy_root() took the cache as soon as model/model_index.json existed there; now only a finished build
    (every stage recorded done, instruments present), and it says so once."""
    monkeypatch.setenv("APDM_CACHE", str(tmp_path))
    cached = tmp_path / "toy"
    (cached / "model").mkdir(parents=True)
    (cached / "model" / "model_index.json").write_text("{}")
    assert world.toy_root() == world.REPO_ASSETS
    state = {"settings": {"stages": [{}, {}]}, "done": [{}]}
    (cached / "build_state.json").write_text(json.dumps(state))
    assert world.toy_root() == world.REPO_ASSETS  # stage 2 of 2 not done
    state["done"].append({})
    (cached / "build_state.json").write_text(json.dumps(state))
    assert world.toy_root() == world.REPO_ASSETS  # no instruments
    (cached / "instruments").mkdir()
    (cached / "instruments" / "instruments.json").write_text("{}")
    (cached / "instruments" / "encoder.safetensors").write_bytes(b"")
    with caplog.at_level(logging.INFO, logger="apdm"):
        assert world.toy_root() == cached and world.model_path() == cached / "model"
        assert world.instruments_path() == cached / "instruments"
    assert caplog.text.count(f"toy world: using the build in {cached}") == 1


def test_the_protect_model_bench_refuses_its_judge_and_positions_past_the_heldout_list(tmp_path, monkeypatch):
    """The guard against choosing the decoys with the judge missed identity=toy:<the judge's folder> and the
    synthetic photos' screen; a subject position past the 410 held-out identities was an IndexError."""
    from apdm.bench.protect_model import bench_protect_model

    monkeypatch.setenv("APDM_CACHE", str(tmp_path))

    def past_the_guard(*a, **k):
        raise _Stop("past the guard")

    judge = world.instruments_path()
    monkeypatch.setattr(world, "heldout_subjects", past_the_guard)
    for trap in (["encoder_trap.targets=farthest", f"encoder_trap.identity=toy:{judge}"],
                 ["encoder_trap.targets=farthest", f"encoder_trap.identity=toy:{judge.parent}"],
                 ["encoder_trap.synthetic_photos=2", "encoder_trap.identity=toy"]):
        with pytest.raises(ValueError, match="is the identity encoder this bench scores ISM with"):
            bench_protect_model(True, ["encoder_trap.steps=1", "workers=1"] + trap)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "instruments.json").write_text("{}")
    with pytest.raises(_Stop):  # another recognizer passes
        bench_protect_model(True, ["encoder_trap.steps=1", "encoder_trap.targets=farthest", "workers=1",
                                   f"encoder_trap.identity=toy:{tmp_path / 'other'}"])
    with pytest.raises(ValueError, match=r"subjects: the toy world holds 410 held-out subjects \(positions 0 to 409\); "
                                         r"asked for 1 from position 410"):
        bench_protect_model(True, ["subjects=0,410", "workers=1"])


def test_toy_build_errors_are_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    """`apdm toy build` had no error handling (a file as output_dir, a missing train.init_from: tracebacks, the
    latter after drawing the whole dataset), and num_identities above the 3,686 pretraining identities was
    silently capped."""
    from apdm.cli import main

    def no_drawing(*a, **k):
        raise _Stop("the dataset was drawn")

    monkeypatch.setattr(world, "pretraining_set", no_drawing)
    (tmp_path / "afile").write_text("x")
    assert main(["toy", "build", f"output_dir={tmp_path / 'afile'}", "quiet=true"]) == 2
    assert f"apdm toy build: output_dir {tmp_path / 'afile'} is a file, not a folder" in capsys.readouterr().err
    out = tmp_path / "o"
    assert main(["toy", "build", f"output_dir={out}", f"train.init_from={tmp_path / 'nope'}", "quiet=true"]) == 2
    assert f"init_from: {tmp_path / 'nope'} is not a diffusers model folder" in capsys.readouterr().err
    assert main(["toy", "build", f"output_dir={out}", "train.num_identities=4000", "quiet=true"]) == 2
    err = capsys.readouterr().err
    assert ("train.num_identities must be between 1 and 3686 (the toy world's pretraining identities per class: "
            "4096 less the 410 held out), got 4000") in err
    assert not (out / "build_state.json").exists()
    monkeypatch.undo()
    with pytest.raises(ValueError, match="between 1 and 3686"):
        world.pretraining_set(3687, 1)
