"""Findings of the 2026-12-07 review of the day's diff, each with the behaviour it fixed."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from helpers import noise_photo

from apdm.cli import main

REPO = Path(__file__).resolve().parents[1]


def _photo(path: Path) -> Path:
    return noise_photo(path, 32, 32)


def test_a_folder_protected_by_rho_path_resumes_under_rho_toy(tmp_path, monkeypatch):
    """The toy recipe's ρ became ``rho_path: toy``; a folder protected with the old ``assets/toy/rho`` was refused
    ("differing: rho_path") though the weights are the same. A resume compares the weights' hash."""
    monkeypatch.chdir(REPO)
    src, out = _photo(tmp_path / "a.png"), tmp_path / "out"
    args = ["protect-images", "--method", "ldu", "--model", "toy", "--input", str(src), "--output", str(out),
            "quiet=true"]
    assert main([*args, "--rho", "assets/toy/rho"]) == 0
    _photo(tmp_path / "b.png")
    assert main([*args[:6], str(tmp_path), *args[7:], "--rho", "toy"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["images"]) == 2  # a.png kept (resumed, not refused), b.png added
    other = tmp_path / "rho2"
    other.mkdir()
    for f in (REPO / "assets" / "toy" / "rho").iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    (other / "rho.safetensors").write_bytes((other / "rho.safetensors").read_bytes()[:-4] + b"\0\0\0\0")
    assert main([*args, "--rho", str(other)]) == 1  # other weights: refused as before


def test_a_rho_trained_into_a_folder_named_toy_stays_the_users(tmp_path, monkeypatch):
    from apdm.protect_images.ldu import rho_folder

    monkeypatch.chdir(tmp_path)
    assert rho_folder("toy").name == "rho"  # the toy world's (a build's in the cache, else the shipped one)
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "rho.json").write_text("{}")
    assert rho_folder("toy") == (tmp_path / "toy").absolute()  # was silently the toy world's


def test_sampler_steps_above_the_schedule_say_at_most(tiny_sd):
    from apdm.config import SampleConfig
    from apdm.evaluation.protocol import check_sampler_steps

    with pytest.raises(ValueError, match="takes at most 1000 steps"):  # said "needs more steps; use more+"
        check_sampler_steps(tiny_sd, SampleConfig(sampler="ddpm", num_inference_steps=1001))


def test_bench_json_turns_numpy_and_tensor_non_finite_values_into_null():
    import torch

    from apdm.bench import result_json

    _, text = result_json({"a": np.float32("inf"), "b": torch.tensor(float("nan")), "c": np.float32(1.5)})
    assert json.loads(text) == {"a": None, "b": None, "c": 1.5, "non_finite": {"a": "inf", "b": "nan"}}


def test_a_half_precision_model_loads_and_runs_in_plain_diffusers_without_torch_dtype(tiny_sd, tmp_path):
    """transformers 5 loads a text encoder in the dtype its config records, diffusers the UNet in float32: a model
    saved in fp16 failed at the first step of a plain ``from_pretrained(folder)`` ("mat1 and mat2 ... Half and
    Float"). Its text encoder's config now says float32; the weights stay fp16."""
    import copy

    import torch
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    from apdm.core.models import save_sd

    out = save_sd(copy.deepcopy(tiny_sd), tmp_path / "m", quiet=True, dtype=torch.float16)
    weights = next((out / "text_encoder").glob("*.safetensors"))
    with safe_open(str(weights), framework="pt") as f:
        assert f.get_slice(next(iter(f.keys()))).get_dtype() == "F16"
    pipe = StableDiffusionPipeline.from_pretrained(str(out), safety_checker=None, requires_safety_checker=False)
    assert pipe.text_encoder.dtype == pipe.unet.dtype == torch.float32
    image = pipe("a photo", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3)


def test_whole_numbers_are_base_10_in_recipes_and_mappings_too(tmp_path):
    """``personalization={steps: 010}`` and a recipe's ``steps: 010`` were YAML 1.1's octal 8 (an override's
    ``steps=010`` was 10); ``1:30`` was 90."""
    from apdm.config import ConfigError, PersonalizeRunConfig, load_config

    recipe = tmp_path / "r.yaml"
    recipe.write_text("personalization:\n  steps: 010\n")
    assert load_config(PersonalizeRunConfig, recipe).personalization.steps == 10
    assert load_config(PersonalizeRunConfig, None, ["personalization={steps: 010}"]).personalization.steps == 10
    recipe.write_text("resolution: 1:30\n")
    with pytest.raises(ConfigError, match="resolution"):
        load_config(PersonalizeRunConfig, recipe)
