"""apdm evaluate, audited: fidelity on the files as they are, metric backends that fail to load, what a cell's cache
key holds, the attacked-photos grid of a cached cell, empty reference folders, and the LPIPS switch. Each run uses
the tiny random-weight pipeline with one LoRA step and one sampling step (a few seconds)."""

import hashlib
import json
import sys

import numpy as np
import pytest
import torch
from helpers import tiny_evaluate_args
from PIL import Image

from apdm.cli import main

_args = tiny_evaluate_args  # one sample per prompt


def _records(out) -> list[dict]:
    return json.loads((out / "results.json").read_text())["records"]


def _sign_pattern_photos(tmp_path, n: int = 2, side: int = 128, step: int = 12):
    """``n`` smooth ``side``-px clean photos and protected copies with a ±``step``/255 sign pattern (larger than the
    tiny model's 64 px); returns the folders and the uint8 arrays."""
    clean, prot = tmp_path / "clean", tmp_path / "prot"
    clean.mkdir()
    prot.mkdir()
    g = torch.Generator().manual_seed(1)
    arrays = []
    for i in range(n):
        x = torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8, generator=g), size=side, mode="bicubic")
        xc = (x.clamp(0, 1)[0] * 255).round().byte().permute(1, 2, 0).numpy()
        noise = np.where(np.random.default_rng(i).random(xc.shape) < 0.5, -step, step)
        xp = np.clip(xc.astype(int) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(xc).save(clean / f"{i}.png")
        Image.fromarray(xp).save(prot / f"{i}.png")
        arrays.append((xc, xp))
    return clean, prot, arrays


# ------------------------------------------------------------------------------ 1. fidelity on the files
def test_fidelity_is_measured_on_the_files_not_the_model_resolution_copies(tmp_path):
    """A 12/255 sign pattern on 128-px photos reads 12/255 and the files' PSNR (before: the photos were resized to
    the tiny model's 64 px first, which changed the pattern: 14.1/255 at most and PSNR 7.8 dB too high here; 9.3/255
    and +13.2 dB on 256-px photos)."""
    from apdm.evaluation import fidelity as FI

    clean, prot, arrays = _sign_pattern_photos(tmp_path)
    out = tmp_path / "eval"
    assert main(_args(out, f"[{{name: al, clean_data: {clean}, protected_data: {prot}}}]")) == 0
    fid = {r["name"]: r for r in _records(out) if r["scenario"] == "-"}
    c = torch.stack([torch.from_numpy(a).permute(2, 0, 1).float() / 255 for a, _ in arrays])
    p = torch.stack([torch.from_numpy(b).permute(2, 0, 1).float() / 255 for _, b in arrays])
    assert fid["linf_255"]["max"] == pytest.approx(12, abs=0.01)
    assert fid["psnr"]["value"] == pytest.approx(float(FI.psnr(c, p).mean()), abs=1e-3)
    assert fid["ssim"]["value"] == pytest.approx(float(FI.ssim(c, p).mean()), abs=1e-4)
    assert fid["psnr"]["sizes"] == {"128x128": 2} and fid["psnr"]["n_resized"] == 0
    assert fid["ms_ssim"]["metric"] == "ms_ssim@torchmetrics-s4"  # 128 px: 4 scales (at 64 px: 3)
    # 6. LPIPS is off unless asked for, and says so
    assert fid["lpips"]["available"] is False and "metrics.lpips=false" in fid["lpips"]["reason"]


def test_a_pair_of_two_sizes_is_measured_at_model_resolution_and_counted(tmp_path):
    """A clean photo and a protected file of another size are not silently resized: that pair is measured on the
    model-resolution copies, counted in n_resized and named in the note; the other pairs keep their own size. Pairs
    of different sizes give one MS-SSIM record per number of scales."""
    from apdm.evaluation import fidelity as FI
    from apdm.evaluation.run import file_fidelity_records

    clean, prot, arrays = _sign_pattern_photos(tmp_path, n=3)
    Image.fromarray(arrays[1][1]).resize((100, 100)).save(prot / "1.png")       # another size: model resolution
    Image.fromarray(arrays[2][0]).resize((200, 200)).save(clean / "2.png")      # both 200 px: its own size
    Image.fromarray(arrays[2][1]).resize((200, 200)).save(prot / "2.png")
    model_c, model_p = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    paths_c, paths_p = sorted(clean.iterdir()), sorted(prot.iterdir())
    recs = {r["metric"]: r for r in file_fidelity_records(paths_c, paths_p, model_c, model_p, False, "s")}
    psnr = recs["psnr@torchmetrics"]
    assert psnr["n_resized"] == 1 and "1.png" in psnr["note"]
    assert psnr["sizes"] == {"128x128": 1, "64x64": 1, "200x200": 1}
    c0 = torch.from_numpy(arrays[0][0]).permute(2, 0, 1)[None].float() / 255
    p0 = torch.from_numpy(arrays[0][1]).permute(2, 0, 1)[None].float() / 255
    from apdm.core.images import load_image

    c2, p2 = load_image(paths_c[2]).pixels[None], load_image(paths_p[2]).pixels[None]
    expected = torch.cat([FI.psnr(c0, p0), FI.psnr(model_c[1:2], model_p[1:2]), FI.psnr(c2, p2)]).mean()
    assert psnr["value"] == pytest.approx(float(expected), abs=1e-3)
    assert [recs[f"ms_ssim@torchmetrics{t}"]["n"] for t in ("", "-s4", "-s3")] == [1, 1, 1]  # 200, 128, 64 px


# --------------------------------------------------------------- 2. backends that do not load, loaded once
def test_bad_dino_clip_and_inception_paths_give_unavailable_records(tmp_path, monkeypatch):
    """A DINO/CLIP folder that does not load, or Inception features without torch-fidelity or weights, made evaluate
    fail after the model had loaded; now those metrics are unavailable records naming the setting, the run finishes
    with the others, and each model is loaded once per run (before: once per subject)."""
    from helpers import clean_and_protected_folders

    from apdm.evaluation import identity as ID

    calls = []
    load_vit = ID.load_vit
    monkeypatch.setattr(ID, "load_vit", lambda path, *a, **k: calls.append(path) or load_vit(path, *a, **k))
    clean, prot = clean_and_protected_folders(tmp_path)
    out = tmp_path / "eval"
    dino, clip = tmp_path / "no-dino", tmp_path / "no-clip"
    subjects = f"[{{name: a, clean_data: {clean}, protected_data: {prot}}}, {{name: b, clean_data: {clean}}}]"
    assert main(_args(out, subjects, f"metrics.dino_path={dino}", f"metrics.clip_path={clip}", "metrics.clip_iqa=true",
                      f"metrics.features=inception:{tmp_path / 'none.pth'}")) == 0
    assert calls == [str(dino)]
    recs = [r for r in _records(out) if r["scenario"] == "all_clean"]
    assert {r["subject"] for r in recs} == {"a", "b"}
    by = {}
    for r in recs:
        by.setdefault(r["name"], []).append(r)
    for name, path in (("dino", dino), ("clip_i", clip), ("clip_t", clip), ("clip_iqa", clip)):
        assert len(by[name]) == 2, name
        assert all(not r["available"] and str(path) in r["reason"] for r in by[name]), by[name]
        assert all(r["impl"] == path.name for r in by[name])
    for name in ("fid", "kid"):
        assert all(not r["available"] and "metrics.features=inception:" in r["reason"] for r in by[name])
    assert any(r["name"] == "psnr" and r["available"] for r in _records(out))  # the other metrics ran


# ------------------------------------------------------------------------ 3. what a cell's cache key holds
def test_fidelity_settings_reuse_cached_cells_and_scoring_settings_do_not(tmp_path, monkeypatch):
    """metrics.fidelity and metrics.lpips change only the clean-vs-protected records, so toggling them reruns no
    personalization (before: every cell was computed again); a setting that scores the cells still does."""
    from helpers import clean_and_protected_folders

    import apdm.evaluation.protocol as P

    runs = []
    personalize = P.personalize_and_sample
    monkeypatch.setattr(P, "personalize_and_sample", lambda *a, **k: runs.append(1) or personalize(*a, **k))
    clean, prot = clean_and_protected_folders(tmp_path)
    out = tmp_path / "eval"
    args = _args(out, f"[{{name: al, clean_data: {clean}, protected_data: {prot}}}]",
                 "scenarios=[all_clean, all_perturbed]")
    assert main(args) == 0
    assert len(runs) == 2
    cells = set((out / "cells").glob("*.json"))
    assert main(args + ["metrics.fidelity=false"]) == 0
    recs = _records(out)
    assert len(runs) == 2 and set((out / "cells").glob("*.json")) == cells
    assert all(r.get("cached") for r in recs) and not any(r["scenario"] == "-" for r in recs)
    # 6. LPIPS asked for without the package: reported unavailable naming the extra (cells still reused)
    monkeypatch.setitem(sys.modules, "lpips", None)
    assert main(args + ["metrics.lpips=true"]) == 0
    assert len(runs) == 2
    lp = next(r for r in _records(out) if r["name"] == "lpips")
    assert lp["available"] is False and "apdm[lpips]" in lp["reason"]
    assert main(args + ["metrics.brisque=true"]) == 0  # scores every cell: computed again
    assert len(runs) == 4 and len(set((out / "cells").glob("*.json")) - cells) == 2


# ------------------------------------------------------------------ 4. the attacked grid of a cached cell
def test_a_cached_cell_shows_the_attacked_photos_of_its_own_run(tmp_path):
    """P1, then P2, then P1 again: the third run answers from P1's cached cell and must show P1's attacked photos,
    not P2's (before: the grid's file name had no photo fingerprint, so P2's run overwrote it)."""
    from test_cli import report_images

    clean, p1 = _sign_pattern_photos(tmp_path, n=2, side=32, step=6)[:2]
    p2 = tmp_path / "p2"
    p2.mkdir()
    for f in sorted(clean.iterdir()):
        Image.fromarray(255 - np.asarray(Image.open(f))).save(p2 / f.name)
    out = tmp_path / "eval"

    def attacked_grid(protected) -> bytes:
        assert main(_args(out, f"[{{name: al, clean_data: {clean}, protected_data: {protected}}}]",
                          "scenarios=[all_perturbed]", "attacks=['jpeg:quality=75']")) == 0
        grids = [s for s in report_images((out / "report.html").read_text()) if "attacked-" in s]
        assert len(grids) == 1
        return hashlib.sha256((out / grids[0]).read_bytes()).digest()

    first = attacked_grid(p1)
    assert attacked_grid(p2) != first
    assert attacked_grid(p1) == first
    assert all(r.get("cached") for r in _records(out) if r["scenario"] != "-")


# ------------------------------------------------------------------------- 5. empty references, empty ISM
def test_reference_folder_without_a_loadable_image_is_named(tmp_path):
    from helpers import clean_and_protected_folders

    clean, _ = clean_and_protected_folders(tmp_path)
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "r.png").write_bytes(b"not a png")
    args = _args(tmp_path / "eval", f"[{{name: al, clean_data: {clean}, reference_data: {refs}}}]", "--debug")
    with pytest.raises(ValueError, match=r"subject 'al': no usable reference images in .*refs \(r.png: not an image"):
        main(args)


def test_ism_with_no_reference_embedding_is_an_unavailable_record_with_a_detector_too():
    """An embedder without a face mask takes the detector's verdict; with no reference image its ISM raised
    (before) instead of being reported unavailable as it is without a detector."""
    from apdm.evaluation import identity as ID

    def embed(x):
        return torch.nn.functional.normalize(x.mean(dim=(2, 3)), dim=1)

    def detect(x):
        return torch.ones(x.shape[0])

    for det in (detect, None):
        recs = {r["name"]: r for r in ID.identity_records(torch.rand(2, 3, 16, 16), torch.rand(0, 3, 16, 16), embed,
                                                          det, "e", "d")}
        assert recs["ism"]["available"] is False and "no reference embedding" in recs["ism"]["reason"]
    assert recs.keys() == {"ism"}


def test_a_personalizations_prompts_that_the_subjects_replace_are_named(tmp_path, apdm_log):
    """sd15-evaluate-apdm.yaml set class_prompt 'a photo of person' in its personalization entry; the attacker took
    the subject's class prompt ('a photo of a person') and said nothing."""
    from helpers import clean_and_protected_folders

    clean, _ = clean_and_protected_folders(tmp_path)
    args = _args(tmp_path / "eval", f"[{{name: al, clean_data: {clean}}}]", "metrics.features=nope")
    args = [a if not a.startswith("personalizations=") else
            "personalizations=[{method: lora, steps: 1, class_prompt: a photo of person}, {method: ti, steps: 1}]"
            for a in args]
    assert main(args) != 0  # (the misspelt feature backend stops the run before any model loads)
    said = apdm_log()
    assert "personalizations[0]: class_prompt='a photo of person' not used: the attacker takes each subject's" in said
    assert "personalizations[1]" not in said
