"""Review fixes (2026-12-07): an output folder nested inside an input folder is never read as input, even with a
``suffix`` (only an output folder that IS an input folder is relaxed); evaluate keys a cell on the settings an
attack runs with (its spec merged with its function's defaults), so a changed default is not served from a stale
cell; noisy_upscale finds a cached hub upscaler as the SD loader finds a cached model (``local_folder``)."""

from __future__ import annotations

import functools
import inspect
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apdm.core.images import list_images, split_spec
from apdm.protect_images import run as runner


def _noise(path, seed=0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(path)
    return path


def _kept(base, spec: str, out, suffix: str, recursive: bool = False) -> list[str]:
    """The inputs ``spec`` lists that protect-images reads (relative to ``base``)."""
    s = split_spec(spec)
    paths = runner._inputs_outside_outputs(list_images(s, recursive=recursive), Path(out), suffix, "png", s)
    return sorted(Path(p).relative_to(base).as_posix() for p in paths)


# ============================================================================ 1. output folder inside an input folder
def test_an_output_folder_that_is_the_input_folder_leaves_out_only_this_commands_outputs(tmp_path):
    src = tmp_path / "photos"
    for i, name in enumerate(("a.png", "b.png", "a_protected.png", "a_protected-1.png", "c.png")):
        _noise(src / name, seed=i)
    (src / "manifest.json").write_text(json.dumps({"images": [{"input": str(src / "x.png"),
                                                               "output": str(src / "c.png")}]}))
    photos = ["photos/a.png", "photos/b.png"]  # c.png is listed in the manifest as an output
    assert _kept(tmp_path, str(src), src, "_protected") == photos
    assert _kept(tmp_path, f"{src}/*.png", src, "_protected") == photos  # a glob's folder is the input folder
    assert _kept(tmp_path, str(src / "b.png"), src, "_protected") == ["photos/b.png"]  # so is a named file's


def test_an_output_folder_nested_in_an_input_folder_is_never_read_as_input_even_with_a_suffix(tmp_path):
    """Input ``photos/`` (recursive, or a glob reaching into photos/out) with output ``photos/out`` and a suffix:
    every file in photos/out is left out, not only the ones named like this command's outputs (the files of an
    earlier suffix-less run were read as photos to protect)."""
    src, out = tmp_path / "photos", tmp_path / "photos" / "out"
    _noise(src / "a.png")
    _noise(src / "sub" / "b.png", seed=1)
    _noise(out / "a.png", seed=2)  # an earlier run without a suffix
    _noise(out / "a_protected.png", seed=3)
    _noise(out / "sub" / "b.png", seed=4)
    photos = ["photos/a.png", "photos/sub/b.png"]
    assert _kept(tmp_path, str(src), out, "_protected", recursive=True) == photos
    assert _kept(tmp_path, f"{src}/**/*.png", out, "_protected", recursive=True) == photos
    assert _kept(tmp_path, f"{src}/*/*.png", out, "_protected") == ["photos/sub/b.png"]
    assert _kept(tmp_path, f"{src}/*/*.png", out, "") == ["photos/sub/b.png"]  # as without a suffix
    # naming the output folder itself as the input makes it the input folder: its own photos are read
    assert _kept(tmp_path, str(out), out, "_protected") == ["photos/out/a.png"]
    only = tmp_path / "only"
    _noise(only / "out" / "x.png")
    with pytest.raises(ValueError, match=r"inside the output folder .*which lies inside an input folder"):
        _kept(tmp_path, str(only), only / "out", "_protected", recursive=True)


def test_an_output_folder_above_the_input_folder_with_a_suffix_reads_the_photos(tmp_path, monkeypatch):
    """The nesting rule is for an output folder strictly below an input folder: one above it (input photos/prot,
    output photos; or the working folder) holds the inputs and, with a suffix, leaves out only this command's
    outputs, as before (the first version of the rule refused these with a message about nesting). And a ``~``
    after a comma in an input list is expanded."""
    src = tmp_path / "photos"
    _noise(src / "prot" / "c.png")
    _noise(src / "c_p.png", seed=1)
    assert _kept(tmp_path, str(src / "prot"), src, "_p", recursive=True) == ["photos/prot/c.png"]
    assert _kept(tmp_path, str(src / "prot" / "c.png"), tmp_path, "_p") == ["photos/prot/c.png"]
    with pytest.raises(ValueError, match="every input file is inside the output folder .*pass a suffix"):
        _kept(tmp_path, str(src / "prot"), src, "")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _kept(tmp_path, f"{src / 'prot'}, ~/photos/c_p.png", tmp_path / "elsewhere", "") == [
        "photos/c_p.png", "photos/prot/c.png"]


def test_a_recursive_run_into_a_nested_output_folder_with_a_suffix_protects_only_the_photos(tmp_path):
    from apdm.config import ModelConfig, ProtectImagesRunConfig

    src, out = tmp_path / "photos", tmp_path / "photos" / "out"
    _noise(src / "a.png")
    _noise(out / "a.png", seed=2)  # an earlier suffix-less run's output
    cfg = ProtectImagesRunConfig(input=str(src), output_dir=str(out), model=ModelConfig(path="tiny", device="cpu"),
                                 method="advdm", steps=1, quiet=True, recursive=True, suffix="_protected")
    m = runner.run(cfg)
    assert [Path(e["input"]) for e in m["images"]] == [src / "a.png"]
    assert [Path(e["output"]).name for e in m["images"]] == ["a_protected.png"]


# ================================================================== 2. evaluate's cell key and attack defaults
def _with_default(fn, **defaults):
    """``fn`` with other defaults in its signature (what parse_model_attack / parse_attack read)."""
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    wrapper.__signature__ = sig.replace(parameters=[p.replace(default=defaults.get(p.name, p.default))
                                                    for p in sig.parameters.values()])
    return wrapper


def _key(attack: str) -> str:
    from apdm.evaluation.run import _attack_parts, _cell_key

    return _cell_key("al", "all_protected", *_attack_parts(attack), "lora", {"fp": 1}, {"steps": 1})


def test_a_model_attacks_cell_key_follows_its_defaults(monkeypatch):
    from apdm.attacks import impress as I

    spec = "impress:steps=3000,radius=16/255"
    before = _key(spec)
    assert _key(spec) == before  # same spec, same defaults: the same cell
    assert _key("impress:steps=300") != before
    monkeypatch.setattr(I, "impress", _with_default(I.impress, lr=0.01))
    assert _key(spec) != before  # a changed default: a new cell, not the stale one


def test_a_noisy_upscale_cell_key_follows_the_upscalers_files(tmp_path):
    """The upscaler was keyed by its path: rebuilding it (apdm toy upscaler) served the old cells. Its files key the
    cell now; the same files elsewhere in time (a copy, a touch) keep the key."""
    import os

    up = tmp_path / "x4"
    (up / "unet").mkdir(parents=True)
    (up / "model_index.json").write_text("{}")
    (up / "unet" / "w.safetensors").write_bytes(b"one")
    spec = f"noisy_upscale:upscaler={up}"
    before = _key(spec)
    os.utime(up / "unet" / "w.safetensors", ns=(1, 1))
    assert _key(spec) == before
    (up / "unet" / "w.safetensors").write_bytes(b"two")  # rebuilt
    assert _key(spec) != before
    assert _key("noisy_upscale:upscaler=tiny") == _key("noisy_upscale:upscaler=tiny")


def test_a_model_free_attacks_cell_key_follows_its_defaults_and_none_keys_as_before(monkeypatch):
    from apdm.attacks import transforms as T
    from apdm.evaluation.run import _cell_key

    assert _key("none") == _cell_key("al", "all_protected", "none", "lora", {"fp": 1}, {"steps": 1})
    before = _key("blur:kernel_size=5")
    assert _key("blur:kernel_size=5") == before
    monkeypatch.setitem(T.BASE, "blur", _with_default(T.gaussian_blur, sigma=2.0))
    assert _key("blur:kernel_size=5") != before
    jpeg = _key("jpeg")
    monkeypatch.setitem(T.BASE, "jpeg", _with_default(T.jpeg, quality=60))
    assert _key("jpeg") != jpeg


def test_a_resumed_evaluate_recomputes_a_model_attack_cell_whose_defaults_changed(tmp_path, monkeypatch):
    from apdm.attacks import impress as I
    from apdm.cli import main

    clean = tmp_path / "clean"
    for i in range(2):
        _noise(clean / f"{i}.png", seed=i)
    out = tmp_path / "eval"
    args = ["evaluate", "model.path=tiny", "model.device=cpu", f"output_dir={out}", "quiet=true",
            "scenarios=[all_clean]", "attacks=[impress:steps=1]", "class_prompt_baseline=false",
            "personalizations=[{method: lora, steps: 1, learning_rate: 0.001, with_prior_preservation: false}]",
            "sample.num_images_per_prompt=1", "sample.num_inference_steps=1", "sample.prompts=[a photo of sks person]",
            "metrics.brisque=false", f"subjects=[{{name: al, clean_data: {clean}}}]"]

    def cached() -> set:
        recs = json.loads((out / "results.json").read_text())["records"]
        return {r.get("cached", False) for r in recs if r.get("attack") == "impress:steps=1"}

    assert main(args) == 0 and cached() == {False}
    assert main(args) == 0 and cached() == {True}
    monkeypatch.setattr(I, "impress", _with_default(I.impress, lr=0.01))
    assert main(args) == 0 and cached() == {False}


# ====================================================================== 3. noisy_upscale reads the hub cache
def test_noisy_upscale_reads_a_cached_hub_upscaler_through_local_folder(tmp_path, monkeypatch):
    from apdm.attacks import noisy_upscale as N
    from apdm.core import models

    assert not hasattr(N, "_hub_index")
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "model_index.json").write_text(json.dumps({"max_noise_level": 280}))
    seen = []
    monkeypatch.setattr(models, "local_folder", lambda p, *a: seen.append(p) or (snap if p == "someone/x4" else None))
    monkeypatch.setattr(N, "_hub_offline", lambda: True)
    assert N.max_noise_level("someone/x4") == 280
    N.check_loadable("someone/x4")
    with pytest.raises(ValueError, match="not in the Hugging Face cache"):
        N.check_loadable("someone/other")
    assert N.max_noise_level("someone/other") is None
    assert "someone/x4" in seen and "someone/other" in seen
