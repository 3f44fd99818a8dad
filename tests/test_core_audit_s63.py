"""A model saved by save_sd (protect-model's output, the simulator's personalized model) sampled differently from
its source with the euler, dpmsolver and ddpm samplers: the copy's scheduler config wrote out keys the source had
left unset, and a config without clip_sample left DDPM's clipping of the latents on."""

import json

import pytest
import torch

from apdm.core import diffusion as D
from apdm.core.models import load_sd, make_scheduler, save_sd, tiny_sd

SD15 = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
        "trained_betas": None, "clip_sample": False}  # SD 1.5's scheduler_config.json
EULER = {"_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
         "beta_start": 0.00085, "num_train_timesteps": 1000, "prediction_type": "epsilon", "steps_offset": 1,
         "timestep_spacing": "leading", "trained_betas": None}  # no clip_sample, no set_alpha_to_one


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "m"
    save_sd(tiny_sd(seed=0), out, quiet=True)
    return out


def _with_scheduler(base, tmp_path, cfg):
    import shutil

    d = tmp_path / cfg["_class_name"]
    shutil.copytree(base, d)
    (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    index = json.loads((d / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", cfg["_class_name"]]
    (d / "model_index.json").write_text(json.dumps(index))
    return d


@pytest.mark.parametrize("cfg", [SD15, EULER], ids=["sd15-pndm", "euler"])
def test_a_saved_copy_samples_as_its_source(base, tmp_path, cfg):
    src = load_sd(str(_with_scheduler(base, tmp_path, cfg)), device="cpu")
    copy = load_sd(str(save_sd(src, tmp_path / "copy", quiet=True)), device="cpu")
    for sampler in ("ddim", "pndm", "euler", "dpmsolver", "ddpm"):
        a, b = make_scheduler(src.noise_scheduler, sampler), make_scheduler(copy.noise_scheduler, sampler)
        a.set_timesteps(20)
        b.set_timesteps(20)
        assert a.timesteps.tolist() == b.timesteps.tolist(), sampler  # sd15: euler 999, 946, … vs 951, 901, …
        assert not a.config.get("clip_sample", False) and not b.config.get("clip_sample", False), sampler
        if sampler in ("pndm", "ddim"):
            assert a.config.set_alpha_to_one == b.config.set_alpha_to_one, sampler
    x = D.generate(src, ["a photo"], 1, 6, 3.0, seed=0, sampler="euler", quiet=True)
    y = D.generate(copy, ["a photo"], 1, 6, 3.0, seed=0, sampler="euler", quiet=True)
    assert torch.equal(x, y)
