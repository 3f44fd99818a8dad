"""apdm personalize audit (session 63): a failed rerun left a config.yaml of other weights, a rerun with another
method left the old method's weights for plain diffusers to find, a missing photo folder was found only after the
model loaded, and the random-weight default model trained without a warning."""

import json
from pathlib import Path

import pytest

from apdm.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _args(out, method, steps=1):
    return ["personalize", "--config", str(ROOT / "recipes/tiny-lora.yaml"), f"output_dir={out}",
            f"personalization.method={method}", f"personalization.steps={steps}", "sample.num_images_per_prompt=1",
            "sample.num_inference_steps=2", "quiet=true"]


def test_reruns_keep_one_methods_weights_and_its_config(tmp_path, monkeypatch, apdm_log):
    out = tmp_path / "out"
    assert main(_args(out, "lora")) == 0
    assert (out / "lora").is_dir()
    assert "random-weight pipeline" in apdm_log()  # model.path=tiny: said, as the other commands say it
    assert main(_args(out, "ti")) == 0
    assert (out / "ti" / "learned_embeds.safetensors").is_file()
    assert not (out / "lora").exists()  # plain diffusers found the old LoRA beside a TI config
    assert "method: ti" in (out / "config.yaml").read_text()
    import apdm.core.models as M

    monkeypatch.setattr(M, "load_sd", lambda *a, **k: pytest.fail("the model loaded before the photos were checked"))
    assert main([*_args(out, "dreambooth"), f"instance_data={tmp_path / 'nope'}"]) != 0
    assert "method: ti" in (out / "config.yaml").read_text()  # still the config of the weights beside it
    assert json.loads((out / "personalization.json").read_text())["method"] == "ti"
