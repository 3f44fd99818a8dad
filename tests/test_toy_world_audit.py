"""Findings of the 2026-12-07 audit of the toy world's commands, each with the behaviour it fixed."""
import dataclasses
import json
import re

import pytest

from apdm.toy import world


def test_export_refuses_to_replace_a_subject_folder_it_did_not_write(tmp_path):
    mine = tmp_path / "heldout-0001" / "train" / "mine.png"
    mine.parent.mkdir(parents=True)
    mine.write_bytes(b"x")
    with pytest.raises(ValueError, match="no subject.json: it was not written by apdm toy export"):
        world.export(tmp_path, subjects=1, num_images=1, num_references=1)
    assert mine.read_bytes() == b"x"  # was deleted: the folder was replaced by the export's


@pytest.mark.parametrize("key, stage", [("unet_steps", "train"), ("vae_steps", "train"),
                                        ("images_per_identity", "more_stages[0]"), ("unet_batch", "train")])
def test_build_refuses_empty_training_loops_before_any_work(tmp_path, key, stage):
    """``unet_steps=0`` crashed (ZeroDivisionError) after the drawing and the VAE stage."""
    from apdm.toy.model import ToyTrainConfig

    cfg = world.ToyBuildConfig(output_dir=str(tmp_path / "b"), more_stages=[ToyTrainConfig(unet_steps=5)])
    if stage == "train":
        cfg.train = dataclasses.replace(cfg.train, **{key: 0})
    else:
        cfg.more_stages = [dataclasses.replace(cfg.more_stages[0], **{key: 0})]
    with pytest.raises(ValueError, match=re.escape(f"{stage}.{key} must be a whole number >= 1, got 0")):
        world.build(cfg)
    assert not (tmp_path / "b").exists()


def test_a_build_with_other_settings_discards_the_old_instruments(tmp_path, monkeypatch):
    """A rebuild into the same cache kept the earlier build's instruments (trained on the earlier VAE)."""
    import apdm.toy.model as M

    root = tmp_path / "toy"
    (root / "instruments").mkdir(parents=True)
    (root / "instruments" / "detector.safetensors").write_bytes(b"old")
    (root / "build_state.json").write_text(json.dumps({"settings": {"other": 1}, "done": []}))
    seen = {}

    def stop(*args, **kwargs):  # the first stage starts: record what the cache holds then, and stop
        seen["instruments"] = (root / "instruments").exists()
        raise KeyboardInterrupt

    monkeypatch.setattr(M, "pretrain", stop)
    with pytest.raises(KeyboardInterrupt):
        world.build(world.ToyBuildConfig(output_dir=str(root)))
    assert seen == {"instruments": False}


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_toy_sample_refuses_a_guidance_it_cannot_use_before_loading(tmp_path, capsys, value):
    """``--guidance nan`` sampled, then failed on NaN pixels without naming the option."""
    from apdm.cli import main

    assert main(["toy", "sample", "--prompt", "a", "--model", "tiny", "--guidance", value,
                 "--out", str(tmp_path / "g.png")]) == 2
    assert "--guidance must be a finite number >= 0" in capsys.readouterr().err
