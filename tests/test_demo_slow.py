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
