"""apdm evaluate, audited (s62): a diverged personalization (NaN samples) is reported, not fatal; the class-prompt
baseline samples at the run's resolution; the toy instruments and local metric models are in the cells' key; an
interrupted run leaves no results of another run beside its config.yaml; cached records say which code computed
them; records and results.json hold no NaN/inf. Each run uses the tiny random-weight pipeline with one LoRA step
and one sampling step (a few seconds)."""

import json
import subprocess
import sys

import pytest
import torch
from helpers import tiny_evaluate_args

from apdm.cli import main


def _args(out, subjects: str, *extra: str) -> list[str]:
    return tiny_evaluate_args(out, subjects, *extra, images=2)


def _strict(text: str):
    """``json.loads`` that refuses NaN/Infinity, as JavaScript's JSON.parse does."""
    def refuse(token):
        raise ValueError(f"not strict JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def _records(out) -> list[dict]:
    return _strict((out / "results.json").read_text())["records"]


@pytest.fixture
def counted_personalizations(monkeypatch):
    """The list of personalize_and_sample calls (one entry per cell computed, not answered from the cache)."""
    import apdm.evaluation.protocol as P

    calls = []
    personalize = P.personalize_and_sample
    monkeypatch.setattr(P, "personalize_and_sample", lambda *a, **k: calls.append(1) or personalize(*a, **k))
    return calls


# ------------------------------------------------------------------------------ F1. a diverged personalization
def test_a_diverged_personalization_is_reported_and_the_other_cells_run(tmp_path, monkeypatch, apdm_log):
    """The first cell's samples are all NaN (a diverged LoRA): its metrics are unavailable records saying why (and the
    last loss), a warning names the cell, its grid is written, and the next cell and results.json follow (before:
    save_grid raised "image contains NaN or inf values", nothing was written and a rerun failed the same way; with
    FID features the process segfaulted in MKL). A rerun answers the diverged cell from its cache."""
    from helpers import clean_and_protected_folders

    import apdm.evaluation.protocol as P

    personalize, calls = P.personalize_and_sample, []

    def diverge_first(*a, **k):
        calls.append(1)
        res = personalize(*a, **k)
        if len(calls) == 1:
            res["images"] = {p: torch.full_like(g, float("nan")) for p, g in res["images"].items()}
            res["loss_last"] = float("nan")
        return res

    monkeypatch.setattr(P, "personalize_and_sample", diverge_first)
    clean, prot = clean_and_protected_folders(tmp_path)
    out = tmp_path / "eval"
    args = _args(out, f"[{{name: al, clean_data: {clean}, protected_data: {prot}}}]",
                 "scenarios=[all_clean, all_perturbed]", "metrics.identity=toy", "metrics.detector=toy",
                 "metrics.features=toy", "metrics.brisque=true")
    assert main(args) == 0
    assert len(calls) == 2
    said = apdm_log()
    assert "cell al/all_clean/none/lora, prompt 'a photo of sks person': 2 of 2 generated images contain NaN/inf" in said
    recs = _records(out)
    bad = [r for r in recs if r["scenario"] == "all_clean" and r["name"] != "seconds"]
    good = [r for r in recs if r["scenario"] == "all_perturbed" and r["name"] != "seconds"]
    names = ["ism", "fdfr", "sds", "fid", "kid", "dino", "clip_i", "clip_t", "brisque"]
    assert [r["name"] for r in bad] == [r["name"] for r in good] == names  # the same records, each unavailable
    assert [r["metric"] for r in bad] == [r["metric"] for r in good]
    assert all(r["available"] is False and r["value"] is None for r in bad)
    for r, g in zip(bad, good):  # DINO/CLIP keep their own reason (not configured here)
        if r["name"] in ("dino", "clip_i", "clip_t"):
            assert r["reason"] == g["reason"] and "not set" in r["reason"], r
        else:
            assert "generated images contain NaN/inf: the personalization diverged (last loss nan" in r["reason"]
    assert all(r["n"] == 2 for r in bad)
    assert any(r["available"] and r["value"] is not None for r in good)
    assert len(list((out / "images").glob("*.png"))) >= 2  # both cells' grids
    assert main(args) == 0  # the rerun reads the diverged cell from its cache
    assert len(calls) == 2
    assert all(r.get("cached") for r in _records(out) if r["scenario"] != "-")


def test_a_class_prompt_baseline_with_nan_samples_is_reported(tmp_path, monkeypatch, apdm_log):
    """A model whose own samples are NaN: the class-prompt baseline's metrics are unavailable records (before: its
    save_grid raised and the run ended there), and so are the cells'."""
    from helpers import clean_and_protected_folders

    import apdm.core.diffusion as D

    generate = D.generate
    monkeypatch.setattr(D, "generate", lambda *a, **k: generate(*a, **k) * float("nan"))
    clean, _ = clean_and_protected_folders(tmp_path)
    out = tmp_path / "eval"
    args = [a for a in _args(out, f"[{{name: al, clean_data: {clean}}}]", "metrics.identity=toy")
            if a != "class_prompt_baseline=false"]
    assert main(args) == 0
    assert "subject 'al', class-prompt baseline" in apdm_log()
    recs = [r for r in _records(out) if r["name"] != "seconds"]
    base = [r for r in recs if r["personalization"] == "none (class prompt)"]
    assert [r["name"] for r in base] == ["ism", "dino", "clip_i", "clip_t"]
    assert all(not r["available"] for r in base)
    assert "not finite" in base[0]["reason"] and "metrics.dino_path not set" in base[1]["reason"]
    cell = [r for r in recs if r["scenario"] == "all_clean"]
    assert cell[0]["name"] == "ism" and "diverged" in cell[0]["reason"] and not any(r["available"] for r in cell)


def test_the_unscored_records_are_those_score_generations_gives():
    """Guard (keeps generation_metrics in step with score_generations): with every optional metric on, the records
    a diverged cell reports unavailable have the names, tags and directions of the records of a finite one."""
    from apdm.config import EvaluateRunConfig
    from apdm.evaluation import run as R

    cfg = EvaluateRunConfig()
    for k, v in {"identity": "toy", "detector": "toy", "features": "toy", "brisque": True}.items():
        setattr(cfg.metrics, k, v)
    backends = R._backends(cfg, "person")
    g = torch.Generator().manual_seed(0)
    scored = R.score_generations(torch.rand(3, 3, 64, 64, generator=g), torch.rand(3, 3, 64, 64, generator=g), cfg,
                                 backends, "a photo of sks person")
    unscored = R.unscored_records(cfg, backends, "NaN", 3)
    assert [(r["metric"], r["higher_is_better"]) for r in unscored] == [(r["metric"], r["higher_is_better"])
                                                                        for r in scored]
    assert all(not r["available"] for r in unscored)
    assert [r["reason"] for r in unscored] == [r["reason"] if r["name"] in ("dino", "clip_i", "clip_t") else "NaN"
                                               for r in scored]  # DINO/CLIP: not set, whatever the images


def test_nan_images_or_features_make_fid_and_kid_unavailable_without_crashing():
    """NaN generated images gave NaN features, and FID's matrix square root killed the process (MKL: "Parameter 3
    was incorrect on entry to DGEBAL", SIGSEGV): now both are unavailable records saying NaN/inf. Run in a
    subprocess, since the failure is a crash."""
    code = """
import json, torch
from apdm.evaluation.distribution import distribution_records, kid
from apdm.evaluation.metrics import MetricUnavailable
feats = lambda x: x.mean(dim=(2, 3))
recs = distribution_records(torch.rand(4, 3, 8, 8), torch.full((3, 3, 8, 8), float("nan")), feats, "t")
recs += distribution_records(torch.rand(4, 3, 8, 8), torch.rand(3, 3, 8, 8),
                             lambda x: feats(x) / (x[:, :1, 0, 0] > 2).float(), "t")  # finite images, inf features
try:
    kid(torch.rand(4, 3), torch.tensor([[1.0, float("inf"), 0.0]] * 3))
    recs.append("kid on inf features gave a number")
except MetricUnavailable as exc:
    recs.append(str(exc))
print(json.dumps(recs))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    *recs, kid_said = json.loads(done.stdout.strip().splitlines()[-1])
    assert [r["metric"] for r in recs] == ["fid@t", "kid@t"] * 2
    assert all(r["available"] is False and r["value"] is None and "NaN/inf" in r["reason"] for r in recs)
    assert "3 of 3 feature vectors contain NaN/inf" in kid_said


# ------------------------------------------------------------------------------ F2. the baseline's resolution
def test_the_class_prompt_baseline_samples_at_the_runs_resolution(tmp_path, monkeypatch):
    """resolution=32 on the 64-px tiny model: the cells sampled at 32 px, the class-prompt baseline at 64 px (no
    height/width given), so its ISM/FID compared 64-px samples with 32-px references."""
    from helpers import clean_and_protected_folders
    from PIL import Image

    import apdm.core.diffusion as D

    shapes, generate = [], D.generate
    monkeypatch.setattr(D, "generate", lambda *a, **k: shapes.append(tuple((g := generate(*a, **k)).shape)) or g)
    clean, _ = clean_and_protected_folders(tmp_path)
    out = tmp_path / "eval"
    args = [a for a in _args(out, f"[{{name: al, clean_data: {clean}}}]", "resolution=32")
            if a != "class_prompt_baseline=false"]
    assert main(args) == 0
    assert shapes and all(s[-2:] == (32, 32) for s in shapes), shapes
    grid = next(f for f in (out / "images").glob("al-class_prompt-*.png"))
    assert Image.open(grid).size[1] < 64  # one row of 32-px samples (plus padding)


# ------------------------------------------------------------------------------ F3. metric models in the key
@pytest.fixture
def own_toy_instruments(tmp_path, monkeypatch):
    """A copy of the toy instruments under ``tmp_path`` that the run loads (the process-wide cache is cleared before
    and after); returns its folder."""
    import shutil

    import apdm.evaluation.run as R
    import apdm.toy.world as W

    folder = tmp_path / "instruments"
    shutil.copytree(W.instruments_path(), folder)
    monkeypatch.setattr(W, "instruments_path", lambda: folder)
    R._toy_instruments.cache_clear()
    yield folder
    R._toy_instruments.cache_clear()


def test_rebuilt_toy_instruments_compute_the_cells_again(tmp_path, own_toy_instruments, counted_personalizations):
    """Rebuilding the instruments (apdm toy build skip_model=true) kept the model, photos and settings, so the rerun
    answered every cell with the old instruments' ISM/FDFR/SDS under the same tag; their fingerprint is now in the
    key."""
    from helpers import clean_and_protected_folders
    from safetensors.torch import load_file, save_file

    import apdm.evaluation.run as R

    clean, _ = clean_and_protected_folders(tmp_path)
    out = tmp_path / "eval"
    args = _args(out, f"[{{name: al, clean_data: {clean}}}]", "metrics.identity=toy")  # ISM over every image
    assert main(args) == 0
    first = {r["metric"]: r["value"] for r in _records(out)}
    assert first["ism@toy-id"] is not None
    assert main(args) == 0 and len(counted_personalizations) == 1  # unchanged instruments: cached
    weights = own_toy_instruments / "encoder.safetensors"
    state = load_file(weights)
    save_file({k: v * 1.5 if v.is_floating_point() and v.numel() > 1 else v for k, v in state.items()}, weights)
    R._toy_instruments.cache_clear()
    assert main(args) == 0
    assert len(counted_personalizations) == 2
    recs = _records(out)
    assert not any(r.get("cached") for r in recs)
    assert {r["metric"]: r["value"] for r in recs}["ism@toy-id"] != first["ism@toy-id"]


def test_a_local_dino_folder_is_keyed_by_its_files(tmp_path, counted_personalizations):
    """metrics.dino_path (like clip_path and inception:PATH) named a folder whose contents were not in the key:
    new weights in the same folder reused the old numbers."""
    from helpers import clean_and_protected_folders

    clean, _ = clean_and_protected_folders(tmp_path)
    dino = tmp_path / "dino"
    dino.mkdir()
    (dino / "config.json").write_text("{}")
    out = tmp_path / "eval"
    args = _args(out, f"[{{name: al, clean_data: {clean}}}]", f"metrics.dino_path={dino}")
    assert main(args) == 0
    assert main(args) == 0 and len(counted_personalizations) == 1
    (dino / "config.json").write_text('{"hidden_size": 8}')
    assert main(args) == 0
    assert len(counted_personalizations) == 2


def test_runs_without_toy_or_local_metric_models_keep_their_keys():
    """Guard (default keys unchanged, so existing caches stay valid): a run whose metrics use neither the toy
    instruments nor a local model adds nothing to its cells' key."""
    from apdm.config import EvaluateRunConfig
    from apdm.evaluation.run import metric_model_files

    cfg = EvaluateRunConfig()
    cfg.metrics.dino_path = "/no/such/dino"  # not on disk: nothing to key (it is reported unavailable)
    assert metric_model_files(cfg) == {}


# ------------------------------------------------------------------------------ F4. what the folder says
def test_an_interrupted_run_leaves_no_results_of_another_run(tmp_path, monkeypatch):
    """Run A finished, then run B (other label and seed) was interrupted in its first cell: config.yaml said B while
    results.json and report.html said A. Now the stale results are removed when B starts; a finished run's folder
    holds its own config.yaml, results.json and report.html. (Guard, as before: an interrupted rerun with the same
    settings keeps the results, which are still its own.)"""
    import yaml
    from helpers import clean_and_protected_folders

    import apdm.evaluation.protocol as P

    clean, _ = clean_and_protected_folders(tmp_path)
    out = tmp_path / "eval"
    subj = f"[{{name: al, clean_data: {clean}}}]"
    run_a = _args(out, subj, "label=runA", "resume=false")
    assert main(run_a) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["label"] == "runA"

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(P, "personalize_and_sample", interrupt)
    assert main(run_a) == 130
    assert _strict((out / "results.json").read_text())["label"] == "runA" and (out / "report.html").is_file()
    assert main(_args(out, subj, "label=runB", "seed=1")) == 130
    said = yaml.safe_load((out / "config.yaml").read_text())
    assert said["label"] == "runB"
    if (out / "results.json").is_file():
        assert _strict((out / "results.json").read_text())["label"] == said["label"]
    assert not (out / "report.html").is_file() or "runA" not in (out / "report.html").read_text()


# ------------------------------------------------------------------------------ F4. provenance of cached records
def test_cached_records_say_which_code_computed_them(tmp_path, monkeypatch):
    """results.json's provenance describes the process that wrote it, while cached records may come from another
    commit; each cell's records now carry computed_by (apdm version and git commit) from the run that computed them."""
    from helpers import clean_and_protected_folders

    import apdm.evaluation.run as R
    from apdm.utils import provenance

    clean, _ = clean_and_protected_folders(tmp_path)
    out = tmp_path / "eval"
    args = _args(out, f"[{{name: al, clean_data: {clean}}}]")
    assert main(args) == 0
    here = provenance()
    first = {"apdm": here["apdm"], "git_commit": here["git_commit"]}
    cell = json.loads(next((out / "cells").glob("*.json")).read_text())
    assert all(r["computed_by"] == first for r in cell)
    monkeypatch.setattr(R, "provenance", lambda: {**here, "git_commit": "0" * 40})
    assert main(args) == 0
    res = _strict((out / "results.json").read_text())
    assert res["provenance"]["git_commit"] == "0" * 40
    cells = [r for r in res["records"] if r["scenario"] != "-"]
    assert cells and all(r["cached"] and r["computed_by"] == first for r in cells)


# ------------------------------------------------------------------------------ hardening: no NaN/inf
def test_records_hold_no_infinity():
    """metric_record and its extras dropped NaN but let ±inf through (a bare Infinity in results.json, which strict
    parsers reject); now every non-finite float is None, and an infinite value says so in the record's note."""
    from apdm.evaluation.metrics import measure, metric_record, summarize

    rec = metric_record("x", "y", float("inf"), True, 1, note="small set", std=float("-inf"),
                        scales=torch.tensor([1.0, float("inf")]), per=[0.5, float("nan")], deep={"a": float("inf")})
    assert rec["value"] is None and rec["std"] is None
    assert rec["scales"] == [1.0, None] and rec["per"] == [0.5, None] and rec["deep"] == {"a": None}
    assert rec["note"].startswith("small set; ") and "inf" in rec["note"]
    assert summarize("x", "y", torch.tensor([1.0, float("inf")]), True)["value"] is None
    assert measure("x", "y", True, lambda: (1.0, float("inf")))["std"] is None
    assert metric_record("x", "y", float("nan"), True, 1).get("note") is None  # NaN: None, as before (PSNR)
    json.dumps(rec, allow_nan=False)


def test_results_json_is_strict_json_whatever_a_record_holds(tmp_path, monkeypatch):
    """A record built without metric_record (a backend's own dict) with inf/NaN: results.json and the cell file were
    written with bare Infinity/NaN; now they are null."""
    from helpers import clean_and_protected_folders

    import apdm.evaluation.run as R

    score = R.score_generations
    raw = {"metric": "odd@raw", "name": "odd", "impl": "raw", "value": float("inf"), "higher_is_better": True, "n": 1,
           "available": True, "std": float("nan")}
    monkeypatch.setattr(R, "score_generations", lambda *a, **k: [*score(*a, **k), dict(raw)])
    clean, _ = clean_and_protected_folders(tmp_path)
    out = tmp_path / "eval"
    assert main(_args(out, f"[{{name: al, clean_data: {clean}}}]")) == 0
    odd = next(r for r in _records(out) if r["name"] == "odd")
    assert odd["value"] is None and odd["std"] is None
    for f in (out / "cells").glob("*.json"):
        _strict(f.read_text())
