"""Audited defects of the benchmarks (apdm/bench): numbers, JSON and options.

The bench runs here replace the evaluation attack (:func:`apdm.bench.jobs.attack`, a toy DreamBooth of minutes) by a
cheap stand-in whose value depends on the images it is given, and run one subject with one sample and one worker;
everything else (the protections, 8-bit rounding, fidelity numbers, bookkeeping, JSON writing) is the bench's own.
"""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch


def _fake_attack(model_spec, state, train_images, references, per_cfg, prompt, sample, keep_images=0,
                 identity=None, subject_class="person"):
    value = round(float(train_images.float().mean()) + (per_cfg.seed % 1000) * 1e-3, 6)
    out = {"ism": value, "fdfr": 0.5, "images": None, "seconds": 0.0, "seconds_train": 0.0, "peak_rss_mb": 0.0}
    if identity is not None:
        out["attr_match"] = 0.25
    return out


@pytest.fixture
def cheap_attacks(monkeypatch):
    import apdm.bench.jobs as J

    monkeypatch.setattr(J, "attack", _fake_attack)


#: one subject, one sample, one in-process worker, AdvDM with one step: the cheapest protect-images run
SMALL = ["subjects=1", "samples=1", "workers=1", "methods=advdm", "advdm_steps=1"]


def _strict_json(text: str):
    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


# ------------------------------------------------------------------------------------ 1. 8-bit rounding and budget
def test_eight_bit_photos_keep_a_fractional_budget(cheap_attacks):
    """At 1.6/255 the published 8-bit photos may move a grey level by at most 1 (the quantizer of apdm
    protect-images' files; 12.75/255 likewise allows 12); rounding to the nearest level gave 2 wherever the
    protection reached the edge (two AdvDM steps of 1/255 do)."""
    from apdm.bench.protect_images import bench_protect_images

    res = bench_protect_images(True, [*SMALL, "advdm_steps=2", "budget=1.6/255", "robust_methods=none"])
    assert res["eight_bit"] is True
    assert res["linf255_advdm"] == 1.0  # the protection reaches the edge, and the files stay inside it


def test_eight_bit_photos_unchanged_at_whole_budgets():
    """At a whole k/255 budget (every documented run) the photos are the nearest 8-bit levels, as before the
    quantizer: bit for bit, budget edges and half-level ties (rounded half to even) included; at a fractional budget
    only the levels past floor(255 · budget) move."""
    from apdm.bench.protect_images import eight_bit_photos
    from apdm.protect_images.budget import parse_budget

    g = torch.Generator().manual_seed(0)
    clean = torch.randint(0, 256, (4, 3, 16, 16), generator=g).float() / 255
    for k in (8, 16, 32):
        budget = parse_budget(f"{k}/255")
        delta = (torch.rand(clean.shape, generator=g) * 2 - 1) * budget
        delta[0, 0], delta[0, 1] = budget, -budget  # the edges of the ball
        delta[1, 0] = 2.5 / 255  # half-level ties: round half to even, as (x * 255).round()
        prot = (clean + delta).clamp(0, 1)
        assert torch.equal(eight_bit_photos(prot, clean, budget), (prot * 255).round() / 255)
    budget = parse_budget("6.6/255")
    prot = (clean + budget).clamp(0, 1)
    got = eight_bit_photos(prot, clean, budget)
    assert float(((got - clean).abs() * 255).round().max()) == 6.0
    assert torch.equal(got[clean > 0.5], (clean[clean > 0.5] * 255 + 6).clamp(max=255).round() / 255)


# ------------------------------------------------------------------------------------------- 2. purifiers=diffpure
def test_purifier_named_like_a_robustness_attack_is_refused(cheap_attacks):
    """purifiers=diffpure wrote into ism_db_{m}_diffpure, the key of the built-in DiffPure (strength 0.2), so one
    key averaged two strengths; it is refused, saying what the rows already hold and how to get another strength."""
    from apdm.bench.protect_images import bench_protect_images

    for spec in ("diffpure", "diffpure:strength=0.4", "gridpure;diffpure"):
        with pytest.raises(ValueError, match=r"DiffPure at strength 0\.2.*diffpure:strength=") as err:
            bench_protect_images(True, [*SMALL, "budget=0", "robust_methods=advdm", f"purifiers={spec}"])
        assert "ism_db_<m>_diffpure" in str(err.value) and "apdm evaluate" in str(err.value)


# --------------------------------------------------------------------------------- 3. infinite PSNR, strict JSON
def test_unchanged_photos_give_a_finite_psnr_and_strict_json(cheap_attacks, tmp_path):
    """budget=0 leaves every photo unchanged: the PSNR of each is infinite. The JSON said "psnr_advdm": Infinity
    (not JSON); now the PSNR is the mean over the photos that changed (None: none did) with the count of unchanged
    ones, as the fidelity records, and the bench writes strict JSON."""
    from apdm.bench import run_benchmark

    out = tmp_path / "r.json"
    assert run_benchmark("protect-images", str(out), True, [*SMALL, "budget=0", "robust_methods=none",
                                                           "quiet=true"]) == 0
    res = _strict_json(out.read_text())
    assert res["psnr_advdm"] is None and res["psnr_advdm_n_identical"] == 4
    assert res["linf255_advdm"] == 0.0 and res["ssim_advdm"] == 1.0
    assert "non_finite" not in res


def test_bench_json_never_holds_infinity_or_nan():
    """Whatever a benchmark returns, the written JSON is strict: non-finite numbers become null and are named."""
    from apdm.bench import result_json

    result, text = result_json({"a": float("inf"), "b": [1.0, float("nan")], "c": {"d": -float("inf")}, "e": 2})
    assert _strict_json(text) == result
    assert result["a"] is None and result["b"] == [1.0, None] and result["c"] == {"d": None} and result["e"] == 2
    assert result["non_finite"] == {"a": "inf", "b[1]": "nan", "c.d": "-inf"}
    assert "non_finite" not in result_json({"a": 1.5})[0]


def test_psnr_summary_of_several_subjects_leaves_unchanged_subjects_out():
    from apdm.bench.protect_images import summarize

    out = summarize({"psnr_x": [40.0, None, 42.0], "psnr_x_n_identical": [0, 4, 1]}, {}, 1)
    assert out["psnr_x"] == 41.0 and out["psnr_x_subjects"] == [40.0, None, 42.0]
    assert out["psnr_x_n_identical"] == 5 and out["psnr_x_n_identical_subjects"] == [0, 4, 1]
    assert summarize({"psnr_x": [None]}, {}, 1)["psnr_x"] is None


# ------------------------------------------------------------------ 4. --quick without ldu; 5. linf255's tag
def test_quick_run_without_ldu_runs_and_tags_linf(cheap_attacks):
    """--quick methods=advdm was refused (the robust_methods default named ldu, not selected); the robustness
    attacks now default to none there. metric_impl names linf255's implementation."""
    from apdm.bench.protect_images import bench_protect_images

    res = bench_protect_images(True, [*SMALL, "budget=0"])
    assert res["robust_methods"] == [] and "ism_db_advdm" in res and "ism_db_advdm_jpeg75" not in res
    assert res["metric_impl"]["linf255"] == "linf_255@apdm"


# -------------------------------------------------------------------------------------- 5. metric_impl elsewhere
def test_toy_world_tags_the_verification_auc(cheap_attacks):
    from apdm.bench.toy_world import bench_toy_world

    res = bench_toy_world(True, ["subjects=1", "samples=1", "workers=1", "methods=dreambooth"])
    assert res["metric_impl"]["identity_verification_auc"] == "verification_auc@toy-id"


def test_trap_keys_are_tagged_as_trap_report_names_them(tiny_sd):
    from apdm.bench.protect_model import _trap_changes
    from apdm.protect_model.encoder_trap import trap_report

    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    moved = copy.deepcopy(tiny_sd.vae)
    with torch.no_grad():
        moved.encoder.conv_in.weight.mul_(1.5)
    impl: dict = {}
    flat = _trap_changes(tiny_sd, moved, {"x": x}, metric_impl=impl)
    tags = trap_report(tiny_sd.vae, moved, {"x": x})["x"]["metric_impl"]
    assert impl == {"trap_latent_change": tags["latent_change"], "trap_recon_psnr_drop": tags["recon_psnr"],
                    "trap_decode_change_psnr": tags["decode_change_psnr"]}
    assert impl["trap_latent_change"] == "latent_change@apdm" and impl["trap_recon_psnr_drop"] == "psnr@torchmetrics"
    assert {k.rsplit("_", 1)[0] for k in flat} == set(impl)  # every trap key family is tagged


# ------------------------------------------------------------------------------------------- 6. repeated methods
def test_repeated_methods_are_refused(cheap_attacks):
    """methods=advdm,advdm ran everything twice and doubled the per-subject lists (toy-world likewise)."""
    from apdm.bench.protect_images import bench_protect_images
    from apdm.bench.toy_world import bench_toy_world

    with pytest.raises(ValueError, match="methods: advdm given more than once"):
        bench_protect_images(True, [*SMALL, "budget=0", "robust_methods=none", "methods=advdm,advdm"])
    with pytest.raises(ValueError, match="robust_methods: advdm given more than once"):
        bench_protect_images(True, [*SMALL, "budget=0", "robust_methods=advdm,advdm"])
    with pytest.raises(ValueError, match="methods: dreambooth given more than once"):
        bench_toy_world(True, ["subjects=1", "samples=1", "workers=1", "methods=dreambooth,dreambooth"])


# ------------------------------------------------------------------------------------ 7. personalize-steps' JSON
def test_personalize_steps_records_dtype_and_steps():
    from apdm.bench.personalize import bench_personalize_steps

    res = bench_personalize_steps(True, ["steps=1", "device=cpu", "resolution=32"])
    assert res["dtype"] == "float32" and res["steps"] == 1


# ------------------------------------------------------------------------------- 8. step time by a difference
def test_step_by_difference_is_a_median_and_never_a_free_step():
    """Each side is timed ``repeats`` times (median); a longer run that was not slower gives None (was 0.0 s, so a
    projection counted every step as free) and the projection is unavailable, with a note."""
    from apdm.bench import speed

    calls: list[int] = []

    def not_slower(steps):  # the setup dominates and the step is lost in noise: more steps even ran faster
        calls.append(steps)
        time.sleep(0.02 if steps == 1 else 0.005)

    one, step, _ = speed._step_by_difference(not_slower, torch.device("cpu"), 3)
    assert step is None and one >= 0.02
    assert calls == [1] * 4 + [4] * 4  # a warm-up and 3 timed runs each

    def slower(steps):
        time.sleep(0.01 * steps)

    one, step, _ = speed._step_by_difference(slower, torch.device("cpu"), 2)
    assert step == pytest.approx(0.01, abs=0.008)
    out: dict = {}
    speed._record(out, "per_step_x", None, None, 0.0123)
    assert out["seconds_per_step_x"] is None and "unavailable" in out["note_per_step_x"]
    assert speed._projected([1.0, None], 4) is None and speed._projected([1.0, 3.0], 4) == 1.0


def test_attack_scores_fdfr_for_the_subjects_own_class(monkeypatch):
    """A dog subject's samples were scored by the detector as persons (every well-drawn dog "failed")."""
    from types import SimpleNamespace

    import apdm.bench.jobs as J
    import apdm.evaluation.protocol as P
    from apdm.toy.world import heldout_subjects

    dog = heldout_subjects(1, cls="dog", num_images=4, num_references=4)[0]
    monkeypatch.setattr(J, "model", lambda spec, state=None: SimpleNamespace(device=torch.device("cpu")))
    monkeypatch.setattr(P, "personalize_and_sample",  # the personalization stands aside: its "samples" are the photos
                        lambda sd, images, cfg, prompts, sample: {"images": {prompts[0]: images}, "seconds_train": 0.0})
    as_dog = J.attack(("toy", "cpu"), None, dog.images, dog.references, None, "a photo of zwx dog", None,
                      subject_class="dog")
    as_person = J.attack(("toy", "cpu"), None, dog.images, dog.references, None, "a photo of zwx dog", None)
    assert as_dog["fdfr"] <= 0.25 and as_person["fdfr"] >= 0.75
