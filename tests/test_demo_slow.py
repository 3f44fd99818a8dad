"""End-to-end runs on the committed toy world (minutes; run with `pytest -m slow`)."""

import json

import pytest

pytestmark = pytest.mark.slow


def test_demo_quick_writes_report(tmp_path):
    from apdm.demo import run_demo

    report = run_demo(str(tmp_path / "demo"), quick=True)
    assert report.is_file()
    recs = json.loads((tmp_path / "demo" / "results.json").read_text())["records"]
    labels = {r["label"] for r in recs}
    assert "unprotected" in labels and "apdm model" in labels
    ism = {(r["label"], r["personalization"]): r["value"] for r in recs if r["metric"] == "ism@toy-id"}
    # the instrument sees personalization: DreamBooth on clean photos beats the class prompt by a wide margin
    assert ism[("unprotected", "dreambooth")] > ism[("unprotected", "none (class prompt)")] + 0.3


def test_bench_toy_world_quick_keys(tmp_path):
    from apdm.cli import main

    out = tmp_path / "toy.json"
    assert main(["bench", "toy-world", "--quick", "--out", str(out), "subjects=1", "methods=dreambooth"]) == 0
    res = json.loads(out.read_text())
    for key in ("detector_pass_rate_class_prompt", "identity_verification_auc", "ism_class_prompt",
                "ism_dreambooth", "seconds_total", "peak_rss_mb"):
        assert key in res
    assert res["ism_dreambooth"] > res["ism_class_prompt"]


def test_bench_protect_images_quick_keys_and_grids(tmp_path):
    from apdm.cli import main

    out = tmp_path / "pi.json"
    assert main(["bench", "protect-images", "--quick", "--out", str(out), "methods=ldu,advdm", "advdm_steps=5",
                 "robust_methods=ldu", "samples=2", f"grid={tmp_path / 'grids'}", "clean_references=true",
                 "purifiers=impress:steps=3;gridpure:rounds=1"]) == 0
    res = json.loads(out.read_text())
    for m in ("ldu", "advdm"):
        assert res[f"linf255_{m}"] <= 8 and res[f"psnr_{m}"] > 25 and f"ism_db_{m}" in res
        assert 0 <= res[f"fdfr_db_{m}"] <= 1
    assert {"ism_db_ldu_jpeg75", "ism_db_ldu_blur", "ism_db_ldu_diffpure", "ism_db_ldu_one_clean"} <= set(res)
    assert "ism_db_advdm_jpeg75" not in res  # robustness attacks only for robust_methods
    for name in ("jpeg75", "blur", "diffpure"):  # and on the clean photos, as the reference
        assert -1 <= res[f"ism_db_clean_{name}"] <= 1 and 0 <= res[f"fdfr_db_clean_{name}"] <= 1
    assert "ism_db_clean_one_clean" not in res
    assert "fdfr_db_ldu_jpeg75" in res and "fdfr_db_clean" in res
    # model purifiers: for the clean photos and the robust method, with the purified photos' PSNR to the clean ones
    for m in ("clean", "ldu"):
        for p in ("impress", "gridpure"):
            assert 0 <= res[f"fdfr_db_{m}_{p}"] <= 1 and -1 <= res[f"ism_db_{m}_{p}"] <= 1
    assert res["psnr_clean_clean_impress"] > 25 > res["psnr_clean_clean_gridpure"]  # 3 steps move a photo little
    assert "ism_db_advdm_impress" not in res and res["purifiers"] == ["impress:steps=3", "gridpure:rounds=1"]
    for name in ("protected.png", "perturbation.png", "dreambooth.png"):
        assert (tmp_path / "grids" / name).is_file()


def test_bench_protect_images_attack_seeds_and_identifier(tmp_path):
    """attack_seeds=2 identifier=zwx: every DreamBooth attack runs twice under "zwx"; each key is the mean of its
    runs, which are listed with their standard error, and the two runs of the clean attack differ (another attacker
    and sampling seed)."""
    from apdm.cli import main

    out = tmp_path / "pi.json"
    assert main(["bench", "protect-images", "--quick", "--out", str(out), "methods=ldu", "robust_methods=none",
                 "samples=2", "attack_seeds=2", "identifier=zwx"]) == 0
    res = json.loads(out.read_text())
    assert res["identifier"] == "zwx" and res["attack_seeds"] == 2
    assert "ism_db_clean_jpeg75" not in res and not res["clean_references"]  # no robust method: no references
    for key in ("ism_db_clean", "ism_db_ldu", "fdfr_db_clean"):
        runs = res[f"{key}_runs"]
        assert len(runs) == 2 and res[key] == pytest.approx(sum(runs) / 2, abs=1e-4)
        assert res[f"{key}_se"] == pytest.approx(abs(runs[0] - runs[1]) / 2, abs=1e-4)  # sd/√2 with sd = |a−b|/√2
    assert res["ism_db_clean_runs"][0] != res["ism_db_clean_runs"][1]
