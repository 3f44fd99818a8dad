"""`apdm toy build` checks the model.* and train.* settings before the drawing: a size the architecture cannot take
or a learning rate of zero used to fail (or train nothing) only after minutes of drawing, or silently made a model
whose decoded images were smaller than the drawings."""

import pytest

from apdm.cli import main
from apdm.toy import model as toy_model
from apdm.toy import world
from apdm.toy.model import ToyModelConfig, ToyTrainConfig

SMALL = {"vae_channels": [16, 16], "unet_channels": [32, 64], "attention_head_dim": 8, "text_hidden": 32,
         "text_layers": 1, "text_heads": 2}


def _cfg(tmp_path, model=None, train=None, stage2=None):
    stage1 = {"num_identities": 3, "images_per_identity": 2, "vae_steps": 2, "vae_batch": 4, "unet_steps": 3,
              "unet_batch": 4, "warmup": 1}
    return world.ToyBuildConfig(model=ToyModelConfig(**{**SMALL, **(model or {})}),
                                train=ToyTrainConfig(**{**stage1, **(train or {})}),
                                more_stages=[ToyTrainConfig(**{**stage1, "seed": 1, **(stage2 or {})})],
                                output_dir=str(tmp_path / "out"), skip_instruments=True, quiet=True)


@pytest.fixture
def no_drawing(monkeypatch):
    def drawn(*a, **k):
        raise AssertionError("the settings were not checked before the drawing")
    monkeypatch.setattr(world, "pretraining_set", drawn)


@pytest.mark.parametrize("model, train, stage2, says", [
    ({"image_size": 31}, None, None, "model.image_size=31 must be a multiple of 2"),
    ({"text_heads": 3}, None, None, "the toy model settings (model.*) make no working model"),
    ({"vae_channels": [15, 32]}, None, None, "the toy model settings (model.*) make no working model"),
    ({"unet_channels": []}, None, None, "model.unet_channels must be a non-empty list"),
    ({"max_text_length": 3}, None, None, "model.max_text_length=3"),
    (None, {"unet_lr": 0.0}, None, "train.unet_lr must be a number > 0"),
    (None, {"caption_dropout": 1.5}, None, "train.caption_dropout is a probability"),
    (None, {"vae_kl_weight": -1.0}, None, "train.vae_kl_weight must be a number >= 0"),
    (None, None, {"ema_decay": 1.0}, "more_stages[0].ema_decay must be in [0, 1)"),
    (None, None, {"warmup": -5}, "more_stages[0].warmup must be a whole number >= 0"),
])
def test_bad_toy_settings_are_refused_before_the_drawing(tmp_path, no_drawing, model, train, stage2, says):
    with pytest.raises(ValueError) as e:
        world.build(_cfg(tmp_path, model, train, stage2))
    assert says in str(e.value)
    assert not (tmp_path / "out").exists()  # nothing written either


def test_the_cli_says_it_without_a_traceback(tmp_path, no_drawing, capsys):
    rc = main(["toy", "build", f"output_dir={tmp_path / 'out'}", "skip_instruments=true", "model.image_size=30"])
    assert rc != 0
    err = capsys.readouterr().err
    assert "model.image_size=30 must be a multiple of 4" in err and "Traceback" not in err


def test_working_settings_pass_the_check(tmp_path):
    """Guard: the committed model's settings and the tests' small ones pass (the check builds them)."""
    toy_model.check_model_config(ToyModelConfig())
    toy_model.check_model_config(ToyModelConfig(**SMALL))
    toy_model.check_train_config(ToyTrainConfig())


def test_a_negative_guidance_scale_is_refused_before_any_work(tmp_path, apdm_log):
    """sample.guidance_scale=-3 (and personalization.class_guidance_scale) were accepted: every sample, or every
    class image, was steered away from its prompt without a word."""
    import functools

    from helpers import clean_and_protected_folders, tiny_evaluate_args

    from apdm.config import PersonalizationConfig, SampleConfig
    from apdm.core.diffusion import check_sample
    from apdm.personalization.simulator import check_personalization

    check_sample(SampleConfig(guidance_scale=0.0))  # 0 (unconditional) and 1 (no guidance) are allowed
    check_sample(SampleConfig(guidance_scale=1))
    for bad in (-3.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="sample.guidance_scale=.*must be a number >= 0"):
            check_sample(SampleConfig(guidance_scale=bad))
    with pytest.raises(ValueError, match=r"personalization.class_guidance_scale=-1.0: must be a number >= 0"):
        check_personalization(PersonalizationConfig(class_guidance_scale=-1.0))
    clean, _ = clean_and_protected_folders(tmp_path)
    out = tmp_path / "eval"
    args = functools.partial(tiny_evaluate_args, images=2)(out, f"[{{name: al, clean_data: {clean}}}]")
    assert main([*args, "sample.guidance_scale=-2"]) == 1
    said = apdm_log()
    assert "sample.guidance_scale=-2" in said and "must be a number >= 0" in said
    assert not (out / "cells").exists() or not list((out / "cells").glob("*.json"))
