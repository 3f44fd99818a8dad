"""Model purification attacks (DiffPure, GrIDPure, IMPRESS) and how evaluate resolves them, on the tiny SD."""

from __future__ import annotations

import pytest
import torch

from apdm.attacks import transforms as T
from apdm.attacks.diffpure import diffpure
from apdm.attacks.gridpure import grid_boxes, gridpure
from apdm.attacks.impress import consistency_error, impress


def test_parse_model_attack_types_fractions_and_defaults():
    fn, kw = T.parse_model_attack(" impress:steps=5, radius=16/255,tie=none ")
    assert fn is impress and kw == {"steps": 5, "radius": pytest.approx(16 / 255), "tie": "none"}
    fn, kw = T.parse_model_attack("gridpure:rounds=3,gamma=0.25,prompt=a photo of a person")
    assert fn is gridpure and kw == {"rounds": 3, "gamma": 0.25, "prompt": "a photo of a person"}
    fn, kw = T.parse_model_attack("DiffPure")
    assert fn.__name__ == "diffpure" and kw == {}


@pytest.mark.parametrize("spec, message", [
    ("impress:foo=1", r"no parameter 'foo' \(parameters: steps, lr, radius"),
    ("impress:steps=1.5", "not an integer"),
    ("impress:steps=-1", "steps must be >= 0"),
    ("impress:radius=0", "nothing keeps the result near the input"),
    ("impress:tie=ssim", "tie must be 'none' or 'lpips'"),
    ("impress:seed=3", "no parameter 'seed'"),  # the harness passes the seed
    ("gridpure:rounds=x", "not an integer"),
    ("gridpure:gamma=1", r"gamma must be in \[0, 1\)"),
    ("diffpure:strength=0", r"strength must be in \(0, 1\]"),
    ("diffpure:strength", "expected key=value"),
    ("impres", "unknown attack 'impres'.*model attacks diffpure, gridpure, impress"),
    ("diffpure:num_inference_steps=2000", "num_inference_steps must be at most 1000"),  # was: after the model
    ("gridpure:num_inference_steps=1001", "num_inference_steps must be at most 1000"),
    ("gridpure:blend=input", "blend must be round or photo"),
])
def test_check_attack_refuses_bad_specs_before_any_model_is_loaded(spec, message):
    with pytest.raises(ValueError, match=message):
        T.check_attack(spec)


def test_check_attack_accepts_both_kinds():
    assert T.check_attack(" jpeg:quality=60 ") == "jpeg:quality=60"
    assert T.check_attack("gridpure:rounds=2") == "gridpure:rounds=2"
    with pytest.raises(ValueError, match="needs the diffusion model"):
        T.parse_attack("impress")


def test_consistency_error_is_the_vae_round_trip_mse(tiny_sd, rand_images):
    x = rand_images[:2]
    with torch.no_grad():
        z = tiny_sd.vae.encode(x * 2 - 1).latent_dist.mean
        recon = ((tiny_sd.vae.decode(z).sample + 1) / 2).clamp(0, 1)
        expected = (recon - x).pow(2).mean(dim=(1, 2, 3))
        got = consistency_error(tiny_sd.vae, x)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_impress_lowers_the_inconsistency_within_its_box(tiny_sd, rand_images):
    x = rand_images[:3]
    vae_before = {k: v.clone() for k, v in tiny_sd.vae.state_dict().items()}
    radius = 8 / 255
    out = impress(x, tiny_sd, steps=15, lr=0.01, radius=radius, batch_size=2)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1
    assert (out - x).abs().max() <= radius + 1e-6
    assert (out - x).abs().max() > radius / 2  # it moved
    with torch.no_grad():
        before, after = consistency_error(tiny_sd.vae, x), consistency_error(tiny_sd.vae, out)
    assert (after < 0.9 * before).all(), (before, after)
    for k, v in tiny_sd.vae.state_dict().items():  # the attacker's VAE is used, never trained
        assert torch.equal(v, vae_before[k])
    assert not any(p.requires_grad for p in tiny_sd.vae.parameters())


def test_impress_on_an_odd_size_keeps_the_box_at_the_original_size(tiny_sd):
    x = torch.rand(1, 3, 50, 70, generator=torch.Generator().manual_seed(4))
    radius = 6 / 255
    out = impress(x, tiny_sd, steps=5, radius=radius)
    assert out.shape == x.shape
    assert (out - x).abs().max() <= radius + 1e-6 and (out - x).abs().max() > 0


@pytest.mark.parametrize("h, w", [(64, 64), (48, 80), (8, 9)])
def test_grid_boxes_cover_every_pixel(h, w):
    p, corners = grid_boxes(h, w)
    assert p == min(h, w) // 2
    count = torch.zeros(h, w)
    for y, x in corners:
        assert 0 <= y <= h - p and 0 <= x <= w - p
        count[y:y + p, x:x + p] += 1
    assert count.min() >= 1
    if (h, w) == (64, 64):  # 3 x 3 patches at stride p/2, as GrIDPure's 256 patches at stride 128 on 512 px
        assert len(corners) == 9 and count.max() == 4


def test_grid_boxes_refuses_tiny_images():
    with pytest.raises(ValueError, match="too small"):
        grid_boxes(3, 64)


def test_gridpure_blends_with_its_input_and_is_seeded(tiny_sd, rand_images):
    x = rand_images[:2, :, :48, :]  # non-square: 48 x 64
    plain = gridpure(x, tiny_sd, rounds=1, gamma=0.0, seed=3)
    assert plain.shape == x.shape and plain.min() >= 0 and plain.max() <= 1
    assert (plain - x).abs().mean() > 1e-3  # the random model regenerates the patches
    # one round: out = (1 - γ) · merged + γ · x, and merged does not depend on γ
    g = 0.3
    blended = gridpure(x, tiny_sd, rounds=1, gamma=g, seed=3)
    torch.testing.assert_close(blended, (1 - g) * plain + g * x, rtol=0, atol=1e-5)
    assert torch.equal(gridpure(x, tiny_sd, rounds=1, gamma=0.0, seed=3), plain)
    assert not torch.equal(gridpure(x, tiny_sd, rounds=1, gamma=0.0, seed=4), plain)
    two = gridpure(x, tiny_sd, rounds=2, gamma=0.0, seed=3)
    assert not torch.allclose(two, plain, atol=1e-4)  # the second round works on the first's output
    # round 2 blends with round 1's output (the published attack: the photo's weight falls as γ^r), or with
    # blend=photo with the protected photo every round (apdm's earlier reading, a weaker attacker)
    merged2 = gridpure(blended, tiny_sd, rounds=1, gamma=0.0, seed=3 + 100_003)  # round 2's patches and seed
    torch.testing.assert_close(gridpure(x, tiny_sd, rounds=2, gamma=g, seed=3),
                               (1 - g) * merged2 + g * blended, rtol=0, atol=1e-5)
    torch.testing.assert_close(gridpure(x, tiny_sd, rounds=2, gamma=g, seed=3, blend="photo"),
                               (1 - g) * merged2 + g * x, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="blend must be round or photo"):
        gridpure(x, tiny_sd, rounds=1, blend="input")


def test_evaluate_applies_model_attacks_by_spec(tiny_sd, rand_images):
    from apdm.evaluation.run import apply_attack

    x = rand_images[:2]
    got = apply_attack(x, "impress:steps=3,radius=4/255", tiny_sd, seed=0)
    torch.testing.assert_close(got, impress(x, tiny_sd, steps=3, radius=4 / 255))
    got = apply_attack(x, "gridpure:rounds=1", tiny_sd, seed=5)
    torch.testing.assert_close(got, gridpure(x, tiny_sd, rounds=1, seed=5))
    assert torch.equal(apply_attack(x, "jpeg:quality=60", tiny_sd), T.jpeg(x, 60))
    # noise follows the run's seed unless its spec sets one (before: always seed 0, or the global RNG)
    assert not torch.equal(apply_attack(x, "noise", tiny_sd, seed=1), apply_attack(x, "noise", tiny_sd, seed=2))
    assert torch.equal(apply_attack(x, "noise:std=0.1", None, seed=4), apply_attack(x, "noise:std=0.1", None, seed=4))
    assert torch.equal(apply_attack(x, "noise:std=0.1,seed=7", None, seed=1), T.gaussian_noise(x, 0.1, seed=7))


def test_purification_does_not_depend_on_the_batch_size(tiny_sd, rand_images):
    """DiffPure and GrIDPure draw their noise for the whole set, so regenerating in batches of one gives what one
    batch gives (before: each batch drew its own noise from seed + offset, and image 0 changed by up to 0.9)."""
    x = rand_images[:3]
    whole = diffpure(x, tiny_sd, strength=0.5, num_inference_steps=4, seed=2)
    torch.testing.assert_close(diffpure(x, tiny_sd, strength=0.5, num_inference_steps=4, seed=2, batch_size=1),
                               whole, rtol=0, atol=1e-5)
    assert not torch.allclose(diffpure(x, tiny_sd, strength=0.5, num_inference_steps=4, seed=3), whole, atol=1e-3)
    grid = gridpure(x[:1], tiny_sd, rounds=2, seed=2)
    torch.testing.assert_close(gridpure(x[:1], tiny_sd, rounds=2, seed=2, batch_size=3), grid, rtol=0, atol=1e-5)


def test_evaluate_stops_on_a_misspelt_attack_before_loading_the_model(tmp_path):
    from apdm.config import EvalSubjectConfig, EvaluateRunConfig, ModelConfig
    from apdm.evaluation.run import run

    cfg = EvaluateRunConfig(model=ModelConfig(path=str(tmp_path / "no-such-model")),
                            subjects=[EvalSubjectConfig(clean_data=str(tmp_path))],
                            attacks=["none", "gridpure:round=3"], output_dir=str(tmp_path / "out"))
    with pytest.raises(ValueError, match="no parameter 'round'"):
        run(cfg)
    assert not (tmp_path / "out").exists()


def test_report_plots_attack_strength_written_as_a_fraction():
    from apdm.evaluation.report import _strength, strength_plots

    assert _strength("impress:radius=16/255") == ("impress radius", pytest.approx(16 / 255))
    assert _strength("jpeg:quality=60") == ("jpeg quality", 60.0)
    assert _strength("gridpure:rounds=2,gamma=0.1") is None and _strength("impress:radius=1/0") is None
    recs = [{"attack": f"impress:radius={k}/255", "scenario": "all_perturbed", "personalization": "dreambooth",
             "metric": "ism", "value": v} for k, v in ((4, 0.2), (8, 0.4), (16, 0.6))]
    plots = strength_plots(recs)
    assert len(plots) == 1 and "impress radius" in plots[0]


def test_evaluate_purifies_each_training_set_once_and_shows_it(tmp_path, monkeypatch):
    """Model purifiers take minutes per photo at real size: evaluate runs each (scenario, attack) once for all
    personalizations, and the report shows what the attacker trained on (also after a resumed run)."""
    from helpers import clean_and_protected_folders

    from apdm.cli import main
    from apdm.evaluation import run as R

    clean, prot = clean_and_protected_folders(tmp_path)
    calls = []
    real = R.apply_attack

    def counted(images, spec, sd, seed=0, quiet=True):
        calls.append(spec)
        return real(images, spec, sd, seed=seed, quiet=quiet)

    monkeypatch.setattr(R, "apply_attack", counted)
    out = tmp_path / "eval"
    args = ["evaluate", "model.path=tiny", "model.device=cpu", f"output_dir={out}", "quiet=true",
            f"subjects=[{{name: s1, clean_data: {clean}, protected_data: {prot}}}]",
            "scenarios=[all_clean, all_perturbed]", "attacks=[none, 'impress:steps=2,radius=8/255']",
            ("personalizations=[{method: lora, steps: 1, with_prior_preservation: false}, "
             "{method: lora, steps: 2, with_prior_preservation: false}]"),
            "sample.num_images_per_prompt=1", "sample.num_inference_steps=2", "sample.prompts=[a photo of sks person]",
            "metrics.features=none", "metrics.brisque=false", "class_prompt_baseline=false"]
    assert main(args) == 0
    assert calls == ["impress:steps=2,radius=8/255"] * 2  # two scenarios, not four cells
    grids = sorted(p.name for p in out.glob("images/attacked-*.png"))
    assert len(grids) == 2

    def shown():
        import re

        return sorted(re.findall(r"src='images/(attacked-[^']+)'", (out / "report.html").read_text()))

    assert shown() == grids
    assert main(args) == 0  # resumed: nothing recomputed, the grids still in the report
    assert len(calls) == 2 and shown() == grids
