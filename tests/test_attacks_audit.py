"""Audit fixes in apdm.attacks: checks that come before a run, IMPRESS's published setting, Noisy Upscaling's
batch invariance, specs whose text values hold commas, and the docstrings that described the code wrongly."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math

import pytest
import torch

from apdm.attacks import transforms as T
from apdm.utils import MissingDependency

needs_no_lpips = pytest.mark.skipif(importlib.util.find_spec("lpips") is not None,
                                    reason="lpips is installed: tie=lpips is then valid")


# ------------------------------------------------------------------ 1. impress:tie=lpips without the lpips extra
@needs_no_lpips
def test_check_attack_refuses_impress_tie_lpips_without_the_extra():
    with pytest.raises(MissingDependency, match=r"tie=lpips.*pip install 'apdm\[lpips\]'"):
        T.check_attack("impress:tie=lpips")
    T.check_attack("impress:tie=none")  # the default path needs nothing


def test_cli_reports_a_missing_dependency_in_one_line_and_exits_2(monkeypatch, tmp_path, apdm_log):
    from apdm.cli import main
    from apdm.evaluation import run

    def fails(cfg):
        raise MissingDependency("'lpips' is needed for X. Install it with: pip install 'apdm[lpips]'")

    monkeypatch.setattr(run, "run", fails)
    assert main(["evaluate", f"output_dir={tmp_path / 'out'}"]) == 2
    text = apdm_log()
    assert text.startswith("evaluate failed: ") and "apdm[lpips]" in text and "\n" not in text and " | " not in text
    with pytest.raises(MissingDependency):  # --debug shows the traceback, as for the other failures
        main(["evaluate", f"output_dir={tmp_path / 'out'}", "--debug"])


@needs_no_lpips
def test_evaluate_stops_on_impress_tie_lpips_before_any_cell(tmp_path, apdm_log):
    from helpers import clean_and_protected_folders

    from apdm.cli import main

    clean, prot = clean_and_protected_folders(tmp_path)
    out = tmp_path / "eval"
    rc = main(["evaluate", "model.path=tiny", "model.device=cpu", f"output_dir={out}", "quiet=true",
               f"subjects=[{{name: s1, clean_data: {clean}, protected_data: {prot}}}]", "scenarios=[all_perturbed]",
               "attacks=[none, 'impress:tie=lpips']",
               "personalizations=[{method: lora, steps: 1, with_prior_preservation: false}]"])
    assert rc == 2 and "apdm[lpips]" in apdm_log()
    assert not list(out.glob("cells/*.json"))


# ------------------------------------------------------------------ 2. noisy_upscale's noise_level, checked early
def _index(folder, **config):
    folder.mkdir(parents=True)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionUpscalePipeline", **config}))
    return folder


def test_check_attack_refuses_a_noise_level_above_a_local_upscalers_max(tmp_path):
    with pytest.raises(ValueError, match="noise_level 400 exceeds the upscaler's max_noise_level 350"):
        T.check_attack("noisy_upscale:noise_level=400,upscaler=tiny")
    T.check_attack("noisy_upscale:noise_level=350,upscaler=tiny")
    low = _index(tmp_path / "low", max_noise_level=200)   # max_noise_level lives in the pipeline's model_index.json
    with pytest.raises(ValueError, match="max_noise_level 200"):
        T.check_attack(f"noisy_upscale:upscaler={low},noise_level=201")
    T.check_attack(f"noisy_upscale:upscaler={low},noise_level=200")
    silent = _index(tmp_path / "silent")                     # not written: the pipeline's default, 350
    with pytest.raises(ValueError, match="max_noise_level 350"):
        T.check_attack(f"noisy_upscale:upscaler={silent},noise_level=351")


def _hub(monkeypatch, tmp_path, offline: bool):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir(exist_ok=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1" if offline else "0")
    return cache


def test_check_attack_reads_a_cached_hub_upscaler_and_refuses_an_uncached_one_offline(monkeypatch, tmp_path):
    cache = _hub(monkeypatch, tmp_path, offline=True)
    repo = cache / "models--someone--x4"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    _index(repo / "snapshots" / "abc123", max_noise_level=300)
    with pytest.raises(ValueError, match="max_noise_level 300"):
        T.check_attack("noisy_upscale:upscaler=someone/x4,noise_level=320")
    T.check_attack("noisy_upscale:upscaler=someone/x4,noise_level=300")
    for spec in ("noisy_upscale", "noisy_upscale:upscaler=someone/other,sigma=0.05"):  # not cached, offline:
        assert T.check_attack(spec) == spec  # a valid spec (a recipe names the hub id) ...
        with pytest.raises(ValueError, match="not in the Hugging Face cache.*must be a local folder"):
            T.check_attack(spec, loadable=True)  # ... that a run here refuses now, not when the model should load
    assert T.check_attack("noisy_upscale:upscaler=someone/x4,noise_level=300", loadable=True)  # cached
    assert T.check_attack("noisy_upscale:upscaler=tiny", loadable=True)
    assert T.check_attack("impress:steps=2", loadable=True)  # attacks that load nothing more


def test_check_attack_knows_the_published_upscalers_max_online(monkeypatch, tmp_path):
    _hub(monkeypatch, tmp_path, offline=False)
    with pytest.raises(ValueError, match="max_noise_level 350"):
        T.check_attack("noisy_upscale:noise_level=400")
    assert T.check_attack("noisy_upscale:noise_level=350") == "noisy_upscale:noise_level=350"
    T.check_attack("noisy_upscale:upscaler=someone/unknown,noise_level=400")  # unknown until it loads


# ------------------------------------------------------------------ 3. IMPRESS's published setting in apdm's units
def test_impress_defaults_are_the_published_setting_on_0_1_pixels():
    from apdm.attacks import impress as I

    d = {k: p.default for k, p in inspect.signature(I.impress).parameters.items()}
    # the published code: pixels on [-1, 1], Adam(lr=0.01, eps=1e-5), cosine down to 1e-5, loss = MSE + 0.1·hinge.
    # A [0, 1] pixel is half a [-1, 1] one: lr, floor and eps halve; the [-1, 1] MSE is 4x the [0, 1] one, so the
    # hinge's weight relative to apdm's MSE is 0.1 / 4.
    assert d["lr"] == pytest.approx(0.01 / 2) and d["lr_min"] == pytest.approx(1e-5 / 2)
    assert d["tie_weight"] == pytest.approx(0.1 / 4)
    assert d["adam_eps"] == pytest.approx(1e-5 / 2)
    assert d["lpips_bound"] == 0.1 and d["steps"] == 3000


def test_impress_anneals_its_learning_rate_as_the_published_cosine_schedule(monkeypatch, tiny_sd, rand_images):
    from apdm.attacks.impress import impress

    seen = []
    step = torch.optim.Adam.step

    def record(self, *a, **k):
        seen.append((self.param_groups[0]["lr"], self.param_groups[0]["eps"]))
        return step(self, *a, **k)

    monkeypatch.setattr(torch.optim.Adam, "step", record)
    impress(rand_images[:1, :, :16, :16], tiny_sd, steps=5, radius=8 / 255)
    monkeypatch.undo()
    # what the published code's CosineAnnealingLR(T_max=steps, eta_min) gives, stepped after every Adam step
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([p], lr=0.005)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 5, eta_min=5e-6)
    expected = []
    for _ in range(5):
        expected.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert [lr for lr, _ in seen] == pytest.approx(expected, rel=1e-9)
    assert seen[0][0] == pytest.approx(0.005) and seen[-1][0] < 0.005 * (1 + math.cos(math.pi * 4 / 5)) / 2 + 1e-5
    assert all(eps == pytest.approx(5e-6) for _, eps in seen)
    with pytest.raises(ValueError, match="lr_min must be in"):
        T.check_attack("impress:lr=0.001,lr_min=0.01")


# ------------------------------------------------------------------ 4 and 6. docstrings that described the code wrongly
def test_gridpure_doc_says_the_default_blend_is_with_the_rounds_input():
    from apdm.attacks import gridpure as G

    assert inspect.signature(G.gridpure).parameters["blend"].default == "round"
    doc = " ".join(G.__doc__.split())
    assert "γ·x₀`` with ``x₀`` the attack's input" not in doc
    assert "the round's own input (``blend=\"round\"``, the default" in doc


def test_diffpure_doc_gives_the_ddim_grid_level_it_uses(tiny_sd):
    from apdm.attacks import diffpure as P
    from apdm.core import diffusion as D

    doc = " ".join(P.__doc__.split())
    assert "t* = 181" in doc and "``t* = strength·T``" not in doc
    grid = D.ddim_timesteps(tiny_sd.noise_scheduler, 50)  # SD's leading spacing, steps_offset 1
    assert int(grid[50 - D.img2img_steps(0.2, 50)]) == 181


# ------------------------------------------------------------------ 5. Noisy Upscaling does not depend on batch_size
def test_noisy_upscale_does_not_depend_on_batch_size():
    from apdm.attacks.noisy_upscale import noisy_upscale

    x = torch.rand(5, 3, 16, 12, generator=torch.Generator().manual_seed(0))
    kw = {"upscaler": "tiny", "num_inference_steps": 2, "seed": 3}
    one = noisy_upscale(x, None, batch_size=1, **kw)
    four = noisy_upscale(x, None, batch_size=4, **kw)
    torch.testing.assert_close(one, four, atol=1e-5, rtol=0)
    # (a batch holding every photo draws what one batch drew before: tests/test_noisy_upscale.py's _by_hand)
    guided = {**kw, "prompt": "a photo", "guidance_scale": 3.0}
    torch.testing.assert_close(noisy_upscale(x, None, batch_size=2, **guided),
                               noisy_upscale(x, None, batch_size=5, **guided), atol=1e-5, rtol=0)


# ------------------------------------------------------------------ 7. a text value may hold commas
def test_a_prompt_with_a_comma_parses_whole():
    spec = "gridpure:prompt=a photo of a person, smiling"
    assert T.parse_model_attack(spec)[1] == {"prompt": "a photo of a person, smiling"}
    assert T.check_attack(spec) == spec
    _, kw = T.parse_model_attack("gridpure:rounds=2, prompt=a, b,c ,gamma=0.2")
    assert kw == {"rounds": 2, "prompt": "a, b,c", "gamma": 0.2}
    _, kw = T.parse_model_attack("impress:radius=16/255,tie=none, steps=3")
    assert kw == {"radius": pytest.approx(16 / 255), "tie": "none", "steps": 3}
    _, kw = T.parse_model_attack("noisy_upscale:prompt=a dog, on grass,sigma=26/255")
    assert kw == {"prompt": "a dog, on grass", "sigma": pytest.approx(26 / 255)}


@pytest.mark.parametrize("spec, kwargs", [
    ("gridpure:rounds=3,gamma=0.25,prompt=a photo of a person", {"rounds": 3, "gamma": 0.25,
                                                                 "prompt": "a photo of a person"}),
    (" impress:steps=5, radius=16/255,tie=none ", {"steps": 5, "radius": pytest.approx(16 / 255), "tie": "none"}),
    ("diffpure:strength=0.1,", {"strength": 0.1}),
    ("diffpure:prompt=,strength=0.1", None),
])
def test_existing_model_specs_parse_as_before(spec, kwargs):
    if kwargs is None:
        with pytest.raises(ValueError, match="expected key=value"):
            T.parse_model_attack(spec)
    else:
        assert T.parse_model_attack(spec)[1] == kwargs


@pytest.mark.parametrize("spec, message", [
    ("blur:kernel_size=5,sigma", "expected key=value, got 'sigma'"),  # a number's stray piece is still an error
    ("diffpure:strength=0.1,smiling", "expected key=value, got 'smiling'"),
    ("gridpure:prompt=a, style=oil", "has no parameter 'style'"),      # ', word=' always starts a parameter
])
def test_stray_pieces_are_still_refused(spec, message):
    with pytest.raises(ValueError, match=message):
        T.check_attack(spec)
    assert T.check_attack("jpeg:quality=60,") == "jpeg:quality=60,"
