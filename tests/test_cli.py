"""The CLI in-process: help, config errors, and each command end to end on the tiny pipeline."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from apdm.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_help_is_fast_and_lists_commands():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "apdm", "--help"], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 0
    for cmd in ("protect-model", "protect-images", "evaluate", "personalize", "bench", "toy"):
        assert cmd in out.stdout
    heavy = [line for line in out.stderr.splitlines() if line.rstrip().endswith(("| torch", "| diffusers"))]
    assert not heavy, "apdm --help must not import torch/diffusers"


def test_protect_images_help_lists_the_engines_methods_and_warns_about_the_test_model(tmp_path, apdm_log):
    """``--help`` names every method the engine has (kept without importing torch, so checked here against the
    engines' list), and protecting against the random-weight default model says in the log that it protects
    against nothing; the toy model does not."""
    from apdm.cli import PROTECT_METHODS, _parser
    from apdm.core.models import warn_if_untrained
    from apdm.protect_images.baselines import METHODS

    assert set(PROTECT_METHODS) == {"ldu", *METHODS}
    text = _parser()._subparsers._group_actions[0].choices["protect-images"].format_help()
    assert all(m in text for m in PROTECT_METHODS) and "Example: apdm protect-images" in text
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray((torch.rand(16, 16, 3) * 255).byte().numpy()).save(photos / "a.png")
    assert main(["protect-images", "--method", "advdm", "--input", str(photos), "--output", str(tmp_path / "o"),
                 "model.path=tiny", "model.device=cpu", "steps=1", "quiet=true"]) == 0
    text = apdm_log()
    assert "model.path=tiny is a random-weight pipeline" in text and "protect against no real model" in text
    assert warn_if_untrained("random:sd15", "x") and not warn_if_untrained("toy", "x")


def test_config_errors_exit_2(capsys):
    assert main(["personalize", "personalization.stepz=3"]) == 2
    assert "unknown key 'personalization.stepz'" in capsys.readouterr().err
    assert main(["personalize", "--config", "does/not/exist.yaml"]) == 2
    assert main(["personalize", "notakeyvalue"]) == 2


def test_print_config_applies_overrides(capsys):
    assert main(["personalize", "--config", str(ROOT / "recipes/tiny-lora.yaml"), "--print-config",
                 "personalization.steps=7", "output_dir=/tmp/o"]) == 0
    text = capsys.readouterr().out
    assert "steps: 7" in text and "output_dir: /tmp/o" in text and "method: lora" in text


def test_overrides_may_surround_options(capsys):
    # argparse alone rejects key=value written after a later option; they must still apply, in order
    assert main(["personalize", "--config", str(ROOT / "recipes/tiny-lora.yaml"), "personalization.steps=7",
                 "--print-config", "output_dir=/tmp/o", "personalization.steps=9"]) == 0
    text = capsys.readouterr().out
    assert "steps: 9" in text and "output_dir: /tmp/o" in text
    with pytest.raises(SystemExit):
        main(["personalize", "--print-config", "a=b", "--nope"])


def test_bench_unknown_name(capsys):
    assert main(["bench", "nope"]) == 2
    assert "toy-world" in capsys.readouterr().err
    assert main(["bench", "personalize-steps", "stepz=3"]) == 2
    assert "unknown benchmark option 'stepz'" in capsys.readouterr().err


def test_personalize_dreambooth_recipe_end_to_end(tmp_path):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "db"
    rc = main(["personalize", "--config", str(ROOT / "recipes/tiny-dreambooth.yaml"), f"output_dir={out}",
               f"instance_data={ROOT / 'assets/examples/subject'}", "personalization.steps=3", "quiet=true",
               f"personalization.class_data_dir={tmp_path / 'cls'}"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["num_instance_images"] == 4
    assert (out / "samples" / "grid.png").is_file() and len(list((out / "samples").glob("0*_*.png"))) == 4
    pipe = StableDiffusionPipeline.from_pretrained(str(out / "model"))
    from apdm.core.models import tiny_sd

    # the saved UNet is the trained one: it loads, and three DreamBooth steps moved it off the base model
    base = dict(tiny_sd(seed=0).unet.named_parameters())
    assert base.keys() == dict(pipe.unet.named_parameters()).keys()
    assert any(not torch.equal(p, base[n]) for n, p in pipe.unet.named_parameters())
    # again into the same folder with fewer samples: none of the first run's is left beside the new ones
    assert main(["personalize", "--config", str(ROOT / "recipes/tiny-dreambooth.yaml"), f"output_dir={out}",
                 f"instance_data={ROOT / 'assets/examples/subject'}", "personalization.steps=1", "quiet=true",
                 f"personalization.class_data_dir={tmp_path / 'cls'}", "sample.num_images_per_prompt=1"]) == 0
    assert sorted(q.name for q in (out / "samples").glob("*.png")) == ["00_000.png", "01_000.png", "grid.png"]


def test_bad_settings_are_refused_before_any_work(tmp_path, apdm_log):
    """A setting a run could only fail on late (after the training: a sampler typo, zero images per prompt; or a
    method typo after the class images) is refused before the model loads, naming the key: the model path here
    does not exist, so reaching the model would say so instead. An output_dir that is a file is one line too."""
    photos = ROOT / "assets/examples/subject"
    nowhere = [f"model.path={tmp_path / 'no-model'}", "quiet=true", f"output_dir={tmp_path / 'o'}"]
    cases = [(["personalize", f"instance_data={photos}", "sample.sampler=bogus"], "sample.sampler='bogus' is unknown"),
             (["personalize", f"instance_data={photos}", "sample.num_images_per_prompt=0"],
              "sample.num_images_per_prompt must be a whole number >= 1, got 0"),
             (["personalize", f"instance_data={photos}", "sample.batch_size=0"], "sample.batch_size must be"),
             (["personalize", f"instance_data={photos}", "personalization.method=lora_typo"],
              "personalization.method='lora_typo' is unknown; choose one of dreambooth, lora"),
             (["personalize", f"instance_data={photos}", "personalization.optimizer=sgd"],
              "personalization.optimizer='sgd' is unknown"),
             (["personalize", f"instance_data={photos}", "personalization.batch_size=0"],
              "personalization.batch_size must be a whole number >= 1"),
             (["personalize", f"instance_data={photos}", "personalization.learning_rate=0"],
              "personalization.learning_rate must be a positive number"),
             (["personalize", f"instance_data={photos}", "personalization.mixed_precision=fp8"],
              "personalization.mixed_precision='fp8' is unknown"),
             (["evaluate", f"subjects=[{{clean_data: {photos}}}]", "personalizations=[{method: lora}, {lora_rank: 0}]"],
              "personalizations[1].lora_rank must be a whole number >= 1"),
             (["evaluate", f"subjects=[{{clean_data: {photos}}}]", "sample.num_inference_steps=0"],
              "sample.num_inference_steps must be")]
    (tmp_path / "afile").write_text("x")
    cases += [(["personalize", f"instance_data={photos}", f"output_dir={tmp_path / 'afile'}"], "afile is a file"),
              (["evaluate", f"subjects=[{{clean_data: {photos}}}]", "model.path=tiny",
                f"output_dir={tmp_path / 'afile'}"], "afile")]
    for args, said in cases:
        assert main(args[:1] + nowhere + args[1:]) == 1, args
        text = apdm_log()
        assert said in text and "no-model" not in text, (args, text)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").rglob("*.safetensors"))


def test_help_override_examples_apply():
    """The override example each command's --help shows is valid for that command's config."""
    import shlex

    from apdm import config as C
    from apdm.cli import COMMANDS, OVERRIDE_EXAMPLES
    from apdm.toy.upscaler import ToyUpscalerConfig
    from apdm.toy.world import ToyBuildConfig

    classes = {name: getattr(C, cls) for name, (cls, _, _) in COMMANDS.items()}
    classes.update({"toy build": ToyBuildConfig, "toy upscaler": ToyUpscalerConfig})
    assert set(OVERRIDE_EXAMPLES) == set(classes)
    for command, example in OVERRIDE_EXAMPLES.items():
        C.load_config(classes[command], None, shlex.split(example))


def test_personalize_missing_data_is_a_clear_error(tmp_path, apdm_log):
    rc = main(["personalize", "--config", str(ROOT / "recipes/tiny-ti.yaml"), f"output_dir={tmp_path}",
               f"instance_data={tmp_path / 'nothing'}", "quiet=true"])
    assert rc == 1
    assert f"input '{tmp_path / 'nothing'}' does not exist" in apdm_log()
    assert not (tmp_path / "model").exists()


def _make_messy_folder(folder: Path) -> dict:
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    rgb = (torch.rand(37, 51, 3, generator=g) * 255).byte().numpy()
    Image.fromarray(rgb).save(folder / "a_rgb.png")
    Image.fromarray(rgb[..., 0]).save(folder / "b_gray.png")                       # grayscale
    Image.fromarray(rgb).convert("CMYK").save(folder / "c_cmyk.jpg", quality=95)   # CMYK JPEG
    im = Image.fromarray(rgb[:, :40])
    exif = im.getexif()
    exif[0x0112] = 6                                                              # rotate 90° on display
    im.save(folder / "d_exif.jpg", exif=exif, quality=95)
    (folder / "e_corrupt.png").write_bytes((folder / "a_rgb.png").read_bytes()[:60])  # truncated
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_protect_images_messy_folder(tmp_path):
    from apdm.core.images import load_image

    src = tmp_path / "photos"
    before = _make_messy_folder(src)
    out = tmp_path / "protected"
    rc = main(["protect-images", "--method", "advdm", "--budget", "8/255", "--input", str(src), "--output", str(out),
               "model.path=tiny", "model.device=cpu", "steps=2", "quiet=true"])
    assert rc == 0
    after = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    assert after == before  # inputs byte-identical
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_protected"] == 4 and manifest["num_failed"] == 1
    assert "e_corrupt.png" in manifest["failed"][0]["input"] and manifest["failed"][0]["error"]
    assert manifest["budget"] == "8/255"
    for entry in manifest["images"]:
        orig, prot = load_image(entry["input"]), load_image(entry["output"])
        assert prot.size == orig.size  # original resolution (EXIF-rotated one is upright: 40x37)
        diff = (prot.pixels * 255).round() - (orig.pixels * 255).round()
        assert diff.abs().max() <= 8
        assert entry["output"].endswith(".png")
    rotated = next(e for e in manifest["images"] if "d_exif" in e["input"])
    assert rotated["size_hw"] == [40, 37]


def test_protect_images_resumes_after_a_kill(tmp_path, monkeypatch):
    """A run killed after its first group leaves a manifest of what is done; the rerun protects only the rest, in
    the same groups, and writes the same bytes as an uninterrupted run. Other settings in the folder are refused
    (naming them); resume=false protects everything again; a photo edited since is protected again into its file."""
    from apdm.config import ModelConfig, ProtectImagesRunConfig
    from apdm.protect_images import run as runner

    src = tmp_path / "photos"
    src.mkdir()
    g = torch.Generator().manual_seed(5)
    for i, (h, w) in enumerate([(20, 24), (25, 30), (30, 36), (15, 18), (40, 48)]):  # one shape at the model
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()).save(src / f"p{i}.png")
    (src / "p2b_corrupt.png").write_bytes(b"\x89PNG broken")

    def cfg(out, **kw):
        return ProtectImagesRunConfig(model=ModelConfig(path="tiny", device="cpu"), method="advdm", steps=2,
                                      input=str(src), output_dir=str(tmp_path / out), quiet=True,
                                      **{"batch_size": 2, **kw})

    full = runner.run(cfg("full"))
    assert full["complete"] and full["num_protected"] == 5 and full["num_failed"] == 1
    psnrs = [e["psnr@apdm"] for e in full["images"]]
    assert full["summary"]["psnr_min@apdm"] == round(min(psnrs), 2) < full["summary"]["psnr_mean@apdm"]
    assert full["summary"]["psnr_mean@apdm"] == round(sum(psnrs) / 5, 2) and full["summary"]["num"] == 5
    assert full["summary"]["linf_255_max@apdm"] == max(e["linf_255@apdm"] for e in full["images"]) <= 8
    assert full["summary"]["all_within_budget"]

    calls = []
    real_protect = runner.protect_batch

    def killed_on_second_group(sd, images, *args, **kwargs):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_protect(sd, images, *args, **kwargs)

    monkeypatch.setattr(runner, "protect_batch", killed_on_second_group)
    with pytest.raises(KeyboardInterrupt):
        runner.run(cfg("part"))
    partial = json.loads((tmp_path / "part" / "manifest.json").read_text())
    assert not partial["complete"] and [Path(e["input"]).name for e in partial["images"]] == ["p0.png", "p1.png"]
    first = {n: (tmp_path / "part" / n).stat().st_mtime_ns for n in ("p0.png", "p1.png")}

    calls.clear()
    monkeypatch.setattr(runner, "protect_batch", lambda *a, **k: calls.append(len(a[1])) or real_protect(*a, **k))
    resumed = runner.run(cfg("part"))
    assert calls == [2, 1]  # p2, p3 (the corrupt file between them is skipped) and p4
    assert resumed["complete"] and resumed["num_resumed"] == 2 and resumed["num_protected"] == 5
    assert resumed["num_failed"] == 1 and "p2b_corrupt.png" in resumed["failed"][0]["input"]
    assert [Path(e["output"]).name for e in resumed["images"]] == [f"p{i}.png" for i in range(5)]
    for i in range(5):
        assert (tmp_path / "part" / f"p{i}.png").read_bytes() == (tmp_path / "full" / f"p{i}.png").read_bytes()
    assert {n: (tmp_path / "part" / n).stat().st_mtime_ns for n in first} == first  # not written again
    calls.clear()
    assert runner.run(cfg("part", batch_size=1))["num_resumed"] == 5 and calls == []  # fewer per batch: allowed

    calls.clear()
    with pytest.raises(ValueError, match=r"manifest.json was written with other settings \(differing: budget\)"):
        runner.run(cfg("part", budget="4/255"))
    assert calls == []
    again = runner.run(cfg("part", budget="4/255", resume=False))
    assert calls == [2, 2, 1] and again["num_resumed"] == 0
    assert max(e["linf_255@apdm"] for e in again["images"]) <= 4

    calls.clear()
    Image.fromarray((torch.rand(20, 24, 3, generator=g) * 255).byte().numpy()).save(src / "p0.png")
    edited = runner.run(cfg("part", budget="4/255"))
    assert calls == [1] and edited["num_resumed"] == 4
    assert Path(edited["images"][0]["output"]).name == "p0.png"  # protected again into its own file
    assert edited["images"][0]["input_sha256"] == hashlib.sha256((src / "p0.png").read_bytes()).hexdigest()

    # both folders moved: the photos are found by content and their outputs through the manifest's relative names
    src = src.rename(tmp_path / "photos-moved")
    (tmp_path / "part").rename(tmp_path / "part-moved")
    calls.clear()
    moved = runner.run(cfg("part-moved", budget="4/255"))
    assert calls == [] and moved["num_resumed"] == 5
    assert {Path(e["input"]).parent.name for e in moved["images"]} == {"photos-moved"}
    assert all(Path(e["output"]).is_file() and "part-moved" in e["output"] for e in moved["images"])

    # a manifest from before entries named their file relative to the folder (outputs then lay directly in it):
    # moved again, it still resumes, reading the outputs through their names (as evaluate pairs them)
    manifest = tmp_path / "part-moved" / "manifest.json"
    old = json.loads(manifest.read_text())
    for e in old["images"]:
        del e["file"]
    manifest.write_text(json.dumps(old))
    (tmp_path / "part-moved").rename(tmp_path / "part-old")
    old_style = runner.run(cfg("part-old", budget="4/255"))
    assert calls == [] and old_style["num_resumed"] == 5
    assert all(Path(e["output"]).is_file() and "part-old" in e["output"] for e in old_style["images"])


def test_protect_images_keeps_the_aspect_ratio(tmp_path, monkeypatch):
    """Photos are protected at the model's short side with their aspect ratio kept (rounded to a side the model
    takes), per-image methods in one batch per shape, ASPL/FSMG at the group's most common shape; resolution_policy=
    squeeze protects every photo as a square. The budget holds on every saved file."""
    from apdm.config import ModelConfig, PersonalizationConfig, ProtectImagesRunConfig
    from apdm.core.images import load_image, model_shape
    from apdm.protect_images import run as runner

    assert model_shape((192, 288), 64, 16) == (64, 96) and model_shape((288, 192), 64, 16) == (96, 64)
    assert model_shape((3000, 4000), 512, 64) == (512, 704)        # 4:3 -> 682.7, rounded to a multiple of 64
    assert model_shape((100, 1000), 64, 16) == (64, 128)           # aspect capped at 2:1
    assert model_shape((50, 50), 64, 16) == (64, 64) == model_shape((192, 288), 64, 16, "squeeze")
    with pytest.raises(ValueError, match="unknown resolution policy 'crop'"):
        model_shape((50, 60), 64, 16, "crop")
    assert runner.group_shapes([(20, 30), (30, 20), (40, 60)], 64, 16, "aspect", joint=False) == [
        ((64, 96), [0, 2]), ((96, 64), [1])]
    assert runner.group_shapes([(20, 30), (30, 20), (40, 60)], 64, 16, "aspect", joint=True) == [
        ((64, 96), [0, 1, 2])]

    src = tmp_path / "photos"
    src.mkdir()
    g = torch.Generator().manual_seed(2)
    for name, (h, w) in {"a_wide.png": (40, 60), "b_tall.png": (60, 40), "c_wide.png": (20, 30)}.items():
        Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy()).save(src / name)
    shapes = []
    real_protect = runner.protect_batch
    monkeypatch.setattr(runner, "protect_batch",
                        lambda sd, x, *a, **k: shapes.append(tuple(x.shape)) or real_protect(sd, x, *a, **k))

    def protect(out, **kw):
        cfg = ProtectImagesRunConfig(model=ModelConfig(path="tiny", device="cpu"), steps=1, input=str(src),
                                     output_dir=str(tmp_path / out), quiet=True, **kw)
        manifest = runner.run(cfg)
        for e in manifest["images"]:
            orig, prot = load_image(e["input"]).pixels, load_image(e["output"]).pixels
            assert prot.shape == orig.shape and ((prot - orig) * 255).round().abs().max() <= 8
        return manifest

    protect("advdm", method="advdm")
    assert shapes == [(2, 3, 64, 96), (1, 3, 96, 64)]
    shapes.clear()
    protect("fsmg", method="fsmg", personalization=PersonalizationConfig(
        method="lora", steps=1, with_prior_preservation=False))
    assert shapes == [(3, 3, 64, 96)]
    shapes.clear()
    protect("squeeze", method="advdm", resolution_policy="squeeze")
    assert shapes == [(3, 3, 64, 64)]


def test_protect_images_recursive_keeps_the_folders_and_never_reads_its_output(tmp_path):
    """recursive=true protects sub-folders into the same structure; an output folder inside the input folder is
    not read back as input (a rerun does not protect the protected copies); evaluate pairs through the manifest."""
    from apdm.core.images import list_images
    from apdm.evaluation.run import protected_pairs

    src = tmp_path / "photos"
    g = torch.Generator().manual_seed(4)
    for rel in ("a.png", "2023/a.png", "2023/trip/b.png"):
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray((torch.rand(20, 20, 3, generator=g) * 255).byte().numpy()).save(src / rel)
    out = src / "protected"
    args = ["protect-images", "--method", "advdm", "--input", str(src), "--output", str(out), "model.path=tiny",
            "model.device=cpu", "steps=1", "quiet=true", "recursive=true"]
    assert main(args) == 0
    made = sorted(q.relative_to(out).as_posix() for q in out.rglob("*.png"))
    assert made == ["2023/a.png", "2023/trip/b.png", "a.png"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(e["file"] for e in manifest["images"]) == made
    assert main(args) == 0  # rerun: the 3 photos are kept, the outputs inside photos/ are not inputs
    again = json.loads((out / "manifest.json").read_text())
    assert again["num_protected"] == 3 and again["num_resumed"] == 3 and not again["failed"]
    assert main(args[:-1]) == 0  # without recursive=true: the top-level photo is kept, the others stay listed
    top = json.loads((out / "manifest.json").read_text())
    assert top["num_resumed"] == 1 and sorted(e["file"] for e in top["images"]) == made
    clean = list_images(src, recursive=True)
    clean = [c for c in clean if out not in c.parents]
    assert [q.relative_to(out).as_posix() for q in protected_pairs(clean, str(out))] == [
        "2023/a.png", "2023/trip/b.png", "a.png"]


def test_protect_images_out_of_memory_says_what_to_do(tmp_path, monkeypatch):
    from apdm.config import ModelConfig, ProtectImagesRunConfig
    from apdm.protect_images import run as runner

    src = tmp_path / "photos"
    src.mkdir()
    Image.new("RGB", (30, 20), (200, 100, 50)).save(src / "a.png")

    def no_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(runner, "protect_batch", no_memory)
    cfg = ProtectImagesRunConfig(model=ModelConfig(path="tiny", device="cpu"), method="advdm", steps=1,
                                 input=str(src), output_dir=str(tmp_path / "out"), quiet=True, batch_size=4)
    with pytest.raises(RuntimeError, match=r"out of memory protecting 1 photo\(s\) at 64x96 px with advdm.*"
                                           r"lower batch_size \(now 4\).*0 photo\(s\) already protected"):
        runner.run(cfg)


def test_protect_images_loads_one_group_at_a_time(tmp_path):
    """The runner's loader reads files only as groups are asked for (a large folder is never decoded at once)."""
    from apdm.protect_images.run import _groups

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(paths[-1])
    (tmp_path / "bad.png").write_bytes(b"no")
    paths.insert(1, tmp_path / "bad.png")
    paths.append(tmp_path / "made_later.png")  # does not exist yet when the first group is read
    errors: list[dict] = []
    groups = _groups(paths, 2, errors)
    first = next(groups)
    assert [im.path.name for im in first] == ["0.png", "1.png"] and len(errors) == 1
    Image.new("RGB", (8, 8)).save(tmp_path / "made_later.png")
    assert [[im.path.name for im in grp] for grp in groups] == [["2.png", "made_later.png"]] and len(errors) == 1


def _photo_and_target(tmp_path, seed: int, size: tuple[int, int]):
    """A folder ``photos/`` with one random (h, w) photo ``a.png``, and a random 16×16 ``target.png``."""
    src = tmp_path / "photos"
    src.mkdir()
    g = torch.Generator().manual_seed(seed)
    Image.fromarray((torch.rand(*size, 3, generator=g) * 255).byte().numpy()).save(src / "a.png")
    target = tmp_path / "target.png"
    Image.fromarray((torch.rand(16, 16, 3, generator=g) * 255).byte().numpy()).save(target)
    return src, target


def test_protect_images_photoguard_target(tmp_path):
    """``--target IMAGE`` reaches PhotoGuard (a different output than the gray default, recorded in the manifest);
    a target for another method or an unreadable target is a clear error."""
    from apdm.core.images import load_image

    src, target = _photo_and_target(tmp_path, seed=3, size=(20, 24))
    common = ["protect-images", "--method", "photoguard", "--input", str(src), "model.path=tiny",
              "model.device=cpu", "steps=4", "quiet=true"]
    outs = {}
    for name, extra in (("gray", []), ("target", ["--target", str(target)])):
        assert main(common + ["--output", str(tmp_path / name)] + extra) == 0
        manifest = json.loads((tmp_path / name / "manifest.json").read_text())
        assert manifest["target"] == (str(target) if extra else "flat gray (0.5)")
        assert manifest["images"][0]["linf_255@apdm"] <= 8
        outs[name] = load_image(manifest["images"][0]["output"]).pixels
    assert (outs["gray"] - outs["target"]).abs().max() > 0.5 / 255  # the target changed the attack
    # the errors, from the runner itself (the CLI prints them as one line and returns 1)
    from apdm.config import ModelConfig, ProtectImagesRunConfig
    from apdm.protect_images.run import run

    def cfg(method, target_path, out):
        return ProtectImagesRunConfig(model=ModelConfig(path="tiny", device="cpu"), method=method, steps=2,
                                      input=str(src), output_dir=str(tmp_path / out), target=str(target_path),
                                      quiet=True)

    with pytest.raises(ValueError, match="used by methods photoguard, mist only, not advdm"):
        run(cfg("advdm", target, "x"))
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ValueError, match="photoguard target: .*bad.png"):
        run(cfg("photoguard", bad, "y"))
    assert main(common + ["--output", str(tmp_path / "z"), "--target", str(bad)]) == 1
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # refused before any output


def test_protect_images_later_baselines_from_the_command_line(tmp_path):
    """The later field baselines run from the CLI with their options (recorded in the manifest's settings, a
    change of option is a change of settings), keep the budget and differ; bad options are refused up front."""
    from apdm.config import ModelConfig, ProtectImagesRunConfig
    from apdm.core.images import load_image
    from apdm.protect_images.run import run

    src, target = _photo_and_target(tmp_path, seed=5, size=(24, 20))
    outs = {}
    for name, extra in (("sds", []), ("sds", ["sds_direction=+"]), ("mist", ["--target", str(target)]),
                        ("pid", ["pid_loss=kl"]), ("caat", []),
                        ("metacloak", ["personalization.steps=2", "personalization.with_prior_preservation=false",
                                       "metacloak_pool_device=cpu"]),
                        ("simac", ["personalization.steps=2", "personalization.with_prior_preservation=false",
                                   "simac_feature_weight=0.5"])):
        out = tmp_path / f"{name}{len(outs)}"
        assert main(["protect-images", "--method", name, "--budget", "8/255", "--input", str(src), "--output",
                     str(out), "model.path=tiny", "model.device=cpu", "steps=3", "quiet=true", *extra]) == 0
        manifest = json.loads((out / "manifest.json").read_text())
        assert manifest["method"] == name and manifest["images"][0]["linf_255@apdm"] <= 8
        settings = manifest["settings"]
        assert ("sds_direction" in settings) == (name == "sds") and ("pid_loss" in settings) == (name == "pid")
        assert ("simac_feature_weight" in settings) == (name == "simac") and "metacloak_pool_device" not in settings
        outs[f"{name}{extra}"] = load_image(manifest["images"][0]["output"]).pixels
    assert json.loads((tmp_path / "mist2" / "manifest.json").read_text())["target"] == str(target)
    assert json.loads((tmp_path / "sds1" / "manifest.json").read_text())["settings"]["sds_direction"] == "+"
    assert json.loads((tmp_path / "pid3" / "manifest.json").read_text())["settings"]["pid_loss"] == "kl"
    assert json.loads((tmp_path / "simac6" / "manifest.json").read_text())["settings"]["simac_feature_weight"] == 0.5
    images = list(outs.values())
    assert all((a - b).abs().max() > 0.5 / 255 for i, a in enumerate(images) for b in images[i + 1:])

    def cfg(out, **kw):
        return ProtectImagesRunConfig(model=ModelConfig(path="tiny", device="cpu"), steps=2, input=str(src),
                                      output_dir=str(tmp_path / out), quiet=True, **kw)

    with pytest.raises(ValueError, match="used by methods photoguard, mist only, not sds"):
        run(cfg("x", method="sds", target=str(target)))
    with pytest.raises(ValueError, match="sds_direction='down'"):
        run(cfg("y", method="sds", sds_direction="down"))
    with pytest.raises(ValueError, match="pid_loss='logvar'.*add-log"):
        run(cfg("z", method="pid", pid_loss="logvar"))
    with pytest.raises(ValueError, match="simac_feature_weight=-1.0: give a non-negative number"):
        run(cfg("z", method="simac", simac_feature_weight=-1.0))
    with pytest.raises(ValueError, match="metacloak_pool_device='gpu': choose one of model, cpu"):
        run(cfg("z", method="metacloak", metacloak_pool_device="gpu"))
    assert not any((tmp_path / d).exists() for d in "xyz")
    # where MetaCloak keeps its pool is a memory setting: resuming with the pool on the model is not refused
    mc = tmp_path / "metacloak5"
    before = (mc / "manifest.json").read_bytes()
    assert main(["protect-images", "--method", "metacloak", "--budget", "8/255", "--input", str(src), "--output",
                 str(mc), "model.path=tiny", "model.device=cpu", "steps=3", "quiet=true", "personalization.steps=2",
                 "personalization.with_prior_preservation=false", "metacloak_pool_device=model"]) == 0
    assert json.loads((mc / "manifest.json").read_bytes())["images"] == json.loads(before)["images"]


def test_bench_protect_images_summary_keeps_each_subject_and_each_run():
    """The bench's JSON keys: the mean over subjects, each subject's value when there are several, and each attack
    run's mean over subjects with their standard error when there are several runs."""
    from apdm.bench import standard_error
    from apdm.bench.protect_images import summarize

    acc = {"ism_db_clean": [0.7, 0.5, 0.6], "psnr_ldu": [44.0]}
    runs = {"ism_db_clean": [[0.72, 0.52, 0.61], [0.68, 0.48, 0.59]]}
    out = summarize(acc, runs, 2)
    assert out["ism_db_clean"] == 0.6 and out["ism_db_clean_subjects"] == [0.7, 0.5, 0.6]
    assert out["ism_db_clean_runs"] == [round((0.72 + 0.52 + 0.61) / 3, 4), round((0.68 + 0.48 + 0.59) / 3, 4)]
    assert out["ism_db_clean_se"] == standard_error(out["ism_db_clean_runs"]) > 0
    assert out["psnr_ldu"] == 44.0 and not {"psnr_ldu_subjects", "psnr_ldu_runs"} & set(out)
    assert "ism_db_clean_runs" not in summarize(acc, runs, 1)
    # L-inf is the budget check: the largest change of any subject (the mean, 7.33, read as within 8/255)
    assert summarize({"linf255_ldu": [8.0, 6.0, 8.0], "linf255_aspl": [9.0, 6.0, 7.0]}, {}, 1)["linf255_aspl"] == 9.0


def test_bench_refuses_what_it_could_not_finish_before_any_work(tmp_path, capsys):
    """A bad --out was found only when the result was written, after the whole benchmark (a folder: a traceback);
    held-out subjects past the toy world's 410 were measured as fewer than the JSON said; an unknown toy-world
    method failed with a KeyError after the first attacks."""
    from apdm.bench import check_subjects
    from apdm.bench.toy_world import bench_toy_world

    for out, said in ((tmp_path, "is a folder"), (tmp_path / "afile" / "r.json", "could not be written there")):
        (tmp_path / "afile").write_text("x")
        assert main(["bench", "personalize-steps", "--out", str(out), "steps=1"]) == 2
        assert said in capsys.readouterr().err
    with pytest.raises(ValueError, match="the toy world holds 410 held-out subjects"):
        check_subjects(411)
    check_subjects(410)
    with pytest.raises(ValueError, match="methods: unknown foo; choose from dreambooth"):
        bench_toy_world(True, ["methods=dreambooth,foo", "workers=1"])
    # protected=F: the naive baseline would be protected with this run's settings, not the file's
    from apdm.bench.protect_model import bench_protect_model

    with pytest.raises(ValueError, match="protected=F with no_naive=false"):
        bench_protect_model(True, [f"protected={tmp_path / 'p.safetensors'}", "no_naive=false"])


def report_images(report: str) -> list[str]:
    """The files an HTML report's <img> tags show (their ``src``, URL-decoded)."""
    from html.parser import HTMLParser
    from urllib.parse import unquote

    srcs: list[str] = []

    class Imgs(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "img":
                srcs.append(unquote(dict(attrs)["src"]))

    Imgs().feed(report)
    return srcs


def test_evaluate_end_to_end_and_resume(tmp_path):
    from helpers import clean_and_protected_folders

    clean, prot = clean_and_protected_folders(tmp_path)
    out = tmp_path / "eval"
    args = ["evaluate", "model.path=tiny", "model.device=cpu", f"output_dir={out}", "quiet=true", "label=test",
            f"subjects=[{{name: s1, clean_data: {clean}, protected_data: {prot}}}]",
            "scenarios=[all_clean, all_perturbed]", "attacks=[none, 'jpeg:quality=50']",
            "personalizations=[{method: lora, steps: 2, learning_rate: 0.001, with_prior_preservation: false}]",
            "sample.num_images_per_prompt=2", "sample.num_inference_steps=2", "sample.prompts=[a photo of sks person]",
            "metrics.features=none", "metrics.brisque=false"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    recs = res["records"]
    cells = {(r["scenario"], r["attack"]) for r in recs if r["name"] == "seconds"}
    assert cells == {("all_clean", "none"), ("all_clean", "jpeg:quality=50"), ("all_perturbed", "none"),
                     ("all_perturbed", "jpeg:quality=50")}
    for r in recs:
        assert {"label", "subject", "scenario", "attack", "personalization", "metric", "value", "impl", "n"} <= set(r)
        assert "@" in r["metric"]
    assert any(r["name"] == "psnr" and r["scenario"] == "-" for r in recs)     # clean vs protected fidelity
    assert any(r["name"] == "dino" and r["available"] is False and r["reason"] for r in recs)

    report = (out / "report.html").read_text()
    srcs = report_images(report)
    assert len(srcs) >= 6 and all((out / s).is_file() for s in srcs)
    # the random-weight test model is flagged in the report; a real model folder (here the toy world) is not
    from apdm.config import EvaluateRunConfig
    from apdm.evaluation.report import write_report

    assert "is a random-weight pipeline" in report
    real = EvaluateRunConfig(label="test")
    real.model.path = "toy"
    assert "random-weight" not in write_report(tmp_path / "real.html", real, recs, []).read_text()

    # resume: a second run recomputes nothing (cell files untouched)
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert res["seed"] == 0 and res["config"]["label"] == "test"  # what produced the numbers, in the file itself
    assert res["provenance"]["apdm"] and res["provenance"]["torch"] == torch.__version__
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == stamps
    again = json.loads((out / "results.json").read_text())["records"]
    assert [{k: v for k, v in r.items() if k != "cached"} for r in again] == recs
    assert {r.get("cached", False) for r in again if r["scenario"] != "-"} == {True}  # answered from the cache
    assert not any(r.get("cached") for r in recs)
    # ... but a setting that changes the numbers is never answered from the cache: another LoRA rank recomputes the
    # four personalization cells, another sampler setting also the class-prompt cell, a changed photo all five
    lora8 = [a.replace("with_prior_preservation: false", "with_prior_preservation: false, lora_rank: 8") for a in args]
    assert main(lora8) == 0
    assert len(set((out / "cells").glob("*.json")) - set(stamps)) == 4
    assert main([a.replace("label=test", "label=renamed") for a in lora8]) == 0  # cached cells, this run's label
    assert {r["label"] for r in json.loads((out / "results.json").read_text())["records"]} == {"renamed"}
    assert main(args + ["sample.guidance_scale=3.0"]) == 0
    assert len(set((out / "cells").glob("*.json")) - set(stamps)) == 4 + 5
    Image.open(prot / "0.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(prot / "0.png")
    assert main(args) == 0
    assert len(set((out / "cells").glob("*.json")) - set(stamps)) == 4 + 5 + 5


def test_evaluate_pairs_photos_by_name_and_keeps_subjects_apart(tmp_path):
    """A plain protected folder pairs by name, so a photo that fails to load takes only itself and its twin out
    (before: the rest paired by position, one off, and the 'protection' measured 150/255); two subjects of one
    folder name are refused before any work; a name with '/' or '#' stays inside the output folder and shows in
    the report."""
    from apdm.config import EvalSubjectConfig, EvaluateRunConfig
    from apdm.core.images import list_images
    from apdm.evaluation.run import pair_by_name, run

    clean, prot = tmp_path / "alice" / "clean", tmp_path / "alice" / "prot"
    clean.mkdir(parents=True)
    prot.mkdir()
    g = torch.Generator().manual_seed(1)
    for i in range(4):
        x = (torch.rand(32, 32, 3, generator=g) * 200).byte()
        Image.fromarray(x.numpy()).save(clean / f"{i}.png")
        Image.fromarray((x + 6).numpy()).save(prot / (f"{i}.bmp" if i == 2 else f"{i}.png"))
    (clean / "1.png").write_bytes(b"not a png")           # a corrupt clean photo ...
    (prot / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # ... and another corrupt protected one
    listed_c, listed_p = list_images(clean), list_images(prot)
    assert [p.name for p in pair_by_name(listed_c, listed_p, "s")] == ["0.png", "1.png", "2.bmp", "3.png"]
    renamed = [p.with_name(f"x{i}.png") for i, p in enumerate(listed_p)]
    assert pair_by_name(listed_c, renamed, "s") == renamed                      # no shared names: sorted order
    with pytest.raises(ValueError, match=r"subject 'me': 3 protected vs 4 clean images, .*no protected file named "
                                         r"like 3.png"):
        pair_by_name(listed_c, listed_p[:3], "subject 'me'")

    out = tmp_path / "eval"
    common = ["evaluate", "model.path=tiny", "model.device=cpu", f"output_dir={out}", "quiet=true",
              "scenarios=[all_clean, all_perturbed]", "class_prompt_baseline=false",
              "personalizations=[{method: lora, steps: 1, learning_rate: 0.001, with_prior_preservation: false}]",
              "sample.num_images_per_prompt=1", "sample.num_inference_steps=1",
              "sample.prompts=[a photo of sks person]", "metrics.brisque=false"]
    assert main(common + [f"subjects=[{{name: 'a/../#1', clean_data: {clean}, protected_data: {prot}}}]"]) == 0
    recs = json.loads((out / "results.json").read_text())["records"]
    linf = next(r for r in recs if r["name"] == "linf_255")
    assert linf["n"] == 2 and linf["max"] == pytest.approx(6, abs=1.01)   # pairs 0 and 2: the true 6/255
    assert {r["subject"] for r in recs} == {"a/../#1"}
    assert all(p.resolve().is_relative_to(out.resolve()) for p in out.rglob("*"))
    assert not list(tmp_path.glob("*.png")) and not list((tmp_path / "alice").glob("*.png"))

    srcs = report_images((out / "report.html").read_text())
    assert srcs and all((out / s).is_file() for s in srcs)

    from apdm.config import PersonalizationConfig
    from apdm.evaluation.run import personalization_labels

    two_loras = [PersonalizationConfig(method="lora", lora_rank=4), PersonalizationConfig(method="lora", lora_rank=16),
                 PersonalizationConfig(method="dreambooth")]
    assert personalization_labels(two_loras) == ["lora (lora_rank=4)", "lora (lora_rank=16)", "dreambooth"]
    with pytest.raises(ValueError, match=r"personalizations\[0\] and \[1\] run the same personalization"):
        personalization_labels([PersonalizationConfig(seed=1), PersonalizationConfig(seed=2)])  # the run sets seeds

    bob = tmp_path / "bob" / "clean"
    shutil.copytree(clean, bob)
    two = [EvalSubjectConfig(clean_data=str(clean)), EvalSubjectConfig(clean_data=str(bob))]
    with pytest.raises(ValueError, match=r"subjects 1 and 2 are both named 'clean'"):
        run(EvaluateRunConfig(subjects=two, output_dir=str(tmp_path / "never")))
    assert not (tmp_path / "never").exists()


def test_evaluate_pairs_a_protect_images_folder_by_its_manifest(tmp_path):
    """Clean photos are paired with the files protect-images made from them (by content), not by sorted names:
    a.jpg and a.png become a.png and a-2.png, which sorted order would swap. A clean photo the manifest lacks is an
    error naming it; a plain folder keeps sorted-order pairing."""
    from apdm.core.images import list_images, load_image
    from apdm.evaluation.run import protected_pairs

    clean = tmp_path / "clean"
    clean.mkdir()
    g = torch.Generator().manual_seed(7)
    for name in ("a.jpg", "a.png", "b.png"):
        Image.fromarray((torch.rand(24, 24, 3, generator=g) * 255).byte().numpy()).save(clean / name, quality=95)
    out = tmp_path / "protected"
    assert main(["protect-images", "--method", "advdm", "--input", str(clean), "--output", str(out),
                 "model.path=tiny", "model.device=cpu", "steps=1", "quiet=true"]) == 0
    clean_paths = list_images(clean)
    pairs = protected_pairs(clean_paths, str(out))
    assert [p.name for p in pairs] == ["a.png", "a-2.png", "b.png"]
    assert [p.name for p in list_images(out)] == ["a-2.png", "a.png", "b.png"]  # what sorted pairing would use
    for c, p in zip(clean_paths, pairs):
        assert (load_image(c).pixels - load_image(p).pixels).abs().max() <= 8 / 255 + 1e-6
    extra = clean / "c.png"
    Image.fromarray((torch.rand(24, 24, 3, generator=g) * 255).byte().numpy()).save(extra)
    with pytest.raises(ValueError, match=r"manifest.json lists no protected version of 1 clean photo\(s\): .*c.png"):
        protected_pairs(list_images(clean), str(out))
    assert protected_pairs(clean_paths, str(clean)) is None  # no manifest: the caller pairs by sorted names
    # a manifest written before entries named their file (outputs directly in the folder), the folder moved since
    manifest = json.loads((out / "manifest.json").read_text())
    for e in manifest["images"]:
        del e["file"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    moved = out.rename(tmp_path / "moved")
    assert [p.relative_to(moved).as_posix() for p in protected_pairs(clean_paths, str(moved))] == [
        "a.png", "a-2.png", "b.png"]


def test_bench_options_are_checked():
    from apdm.bench import parse_options

    assert parse_options(["subjects=3", "methods=a,b"], {"subjects", "methods"}) == {"subjects": "3", "methods": "a,b"}
    with pytest.raises(ValueError, match="must look like key=value"):
        parse_options(["subjects"], {"subjects"})
    with pytest.raises(ValueError, match="unknown benchmark option 'subjets'"):
        parse_options(["subjets=3"], {"subjects"})


def test_bench_protect_images_checks_attacker_options():
    """identifier=, attack_seeds= and attack_seed_stride= are refused with a clear message before any protection or
    attack runs (in both benches that attack)."""
    from apdm.bench.protect_images import bench_protect_images
    from apdm.bench.protect_model import bench_protect_model

    with pytest.raises(ValueError, match="^identifier must be one word"):
        bench_protect_images(True, ["identifier=person", "methods=ldu"])
    with pytest.raises(ValueError, match="attack_seeds must be a whole number"):
        bench_protect_images(True, ["attack_seeds=0", "methods=ldu"])
    with pytest.raises(ValueError, match="no parameter 'round'"):
        bench_protect_images(True, ["purifiers=impress;gridpure:round=2", "methods=ldu"])
    with pytest.raises(ValueError, match="at most once"):
        bench_protect_images(True, ["purifiers=impress;impress:steps=3", "methods=ldu"])
    with pytest.raises(ValueError, match="give each model attack"):
        bench_protect_images(True, ["purifiers=jpeg:quality=50", "methods=ldu"])
    with pytest.raises(ValueError, match="sds_direction='down'"):
        bench_protect_images(True, ["sds_direction=down", "methods=sds", "robust_methods=none"])
    with pytest.raises(ValueError, match="pid_loss='logvar'"):
        bench_protect_images(True, ["pid_loss=logvar", "methods=pid", "robust_methods=none"])
    with pytest.raises(ValueError, match="attacker='dreamboth': choose one of dreambooth, lora, ti, custom_diffusion"):
        bench_protect_images(True, ["attacker=dreamboth", "methods=ldu"])
    with pytest.raises(ValueError, match="simac_feature_weight='much'"):
        bench_protect_images(True, ["simac_feature_weight=much", "methods=simac", "robust_methods=none"])
    with pytest.raises(ValueError, match="clean_references='yes please': true or false"):
        bench_protect_images(True, ["clean_references=yes please", "methods=ldu"])
    for bench in (bench_protect_images, bench_protect_model):
        with pytest.raises(ValueError, match="attack_seed_stride must be a whole number >= 1"):
            bench(True, ["attack_seed_stride=-3"])


def test_bench_boolean_options_take_yaml_words_and_refuse_typos():
    """Every true/false benchmark option goes through one parser: the YAML boolean words and 1/0 in any case are
    read, a typo is refused with the option's name before any work (before, ``long_attack=ture`` and
    ``gradient_checkpointing=yes`` were silently read as false)."""
    from apdm.bench import option_bool, run_benchmark
    from apdm.bench.protect_model import bench_protect_model
    from apdm.bench.speed import bench_speed
    from apdm.utils import parse_bool

    for word, want in [("true", True), ("Yes", True), (" 1 ", True), ("ON", True),
                       ("false", False), ("No", False), ("0", False), ("off", False)]:
        assert parse_bool(word) is want
        assert option_bool({"k": word}, "k", not want) is want
    assert option_bool({}, "k", True) is True and option_bool({}, "k", False) is False
    with pytest.raises(ValueError, match=r"^long_attack='ture': true or false \(twice the steps\)$"):
        option_bool({"long_attack": "ture"}, "long_attack", False, "twice the steps")
    for bench, option in [(bench_protect_model, "long_attack=ture"), (bench_protect_model, "no_naive=y"),
                          (bench_speed, "gradient_checkpointing=2")]:
        with pytest.raises(ValueError, match=f"^{option.split('=')[0]}='{option.split('=')[1]}': true or false"):
            bench(True, [option])
    with pytest.raises(ValueError, match="^quiet='loud': true or false"):
        run_benchmark("speed", None, True, ["quiet=loud"])


def test_bench_whole_number_options_name_the_option():
    """Every whole-number benchmark option goes through one reader: ``3.5``, ``abc`` or a number below the option's
    minimum is refused with the option's name (before: ``invalid literal for int()``, naming nothing, or a silent
    ``subjects=0``), before any protection or timing."""
    import re

    from apdm.bench import option_int
    from apdm.bench.protect_images import bench_protect_images
    from apdm.bench.speed import bench_speed

    assert option_int({"k": "12"}, "k", 3) == 12 and option_int({}, "k", 3) == 3
    assert option_int({"k": "0"}, "k", 5, minimum=0) == 0
    for text in ("3.5", "abc", "0", "-2"):
        with pytest.raises(ValueError, match=rf"^k must be a whole number >= 1 \(how many\), got '{re.escape(text)}'$"):
            option_int({"k": text}, "k", 3, 1, "how many")
    with pytest.raises(ValueError, match="^subjects must be a whole number >= 1, got '2.5'$"):
        bench_protect_images(True, ["subjects=2.5", "methods=ldu"])
    with pytest.raises(ValueError, match="^micro_batch must be a whole number >= 0, got '-1'$"):
        bench_speed(True, ["micro_batch=-1"])
    from apdm.bench import option_positive
    from apdm.bench.protect_model import bench_protect_model

    assert option_positive({"lr": "2e-4"}, "lr", 1.0) == 2e-4 and option_positive({}, "lr", 0.5) == 0.5
    for text in ("abc", "0", "-1e-4", "nan", "inf"):
        with pytest.raises(ValueError, match=rf"^lr must be a number > 0, got '{text}'$"):
            option_positive({"lr": text}, "lr", 1.0)
    with pytest.raises(ValueError, match=r"^learning_rate must be a number > 0 \(the protection's learning rate\)"):
        bench_protect_model(True, ["learning_rate=2e-4x"])


def test_toy_metric_backends_share_one_instrument_load():
    from apdm.evaluation import run as R

    R._toy_instruments.cache_clear()
    embed, impl_id = R.identity_backend("toy")
    detect, impl_det = R.detector_backend("toy", "person")
    feats, impl_feat = R.feature_backend("toy")
    assert (impl_id, impl_det, impl_feat) == ("toy-id", "toy-det", "toy-features")
    assert R._toy_instruments.cache_info().misses == 1 and R._toy_instruments.cache_info().hits == 2
    x = torch.rand(2, 3, 64, 64)
    assert embed(x).shape[0] == 2 and detect(x).shape == (2,) and feats(x).shape[0] == 2


def test_bench_options_may_follow_flags(capsys):
    # "NAME --quick --out F k=v" must reach the option check (argparse used to reject the trailing k=v)
    assert main(["bench", "personalize-steps", "--quick", "--out", "x.json", "stepz=3"]) == 2
    assert "unknown benchmark option 'stepz'" in capsys.readouterr().err


def test_train_perturber_with_dreambooth_anchors(tmp_path):
    """DreamBooth anchors with prior preservation get their class images; the PSNR floor reaches the saved ρ."""
    import shutil

    photos = sorted((ROOT / "assets/examples/subject").iterdir())
    for k, name in enumerate(("id-a", "id-b")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for p in photos[2 * k:2 * k + 2]:
            shutil.copy(p, tmp_path / "data" / name / p.name)
    out = tmp_path / "rho"
    rc = main(["train-perturber", "model.path=tiny", "model.device=cpu", f"data={tmp_path / 'data'}",
               f"output_dir={out}", "steps=2", "batch_size=2", "denoise_steps=2", "anchor_steps=1", "min_psnr=40",
               "personalization.method=dreambooth", "personalization.with_prior_preservation=true",
               "personalization.num_class_images=2", "personalization.class_sample_steps=2",
               f"personalization.class_data_dir={tmp_path / 'cls'}", "quiet=true", "checkpoint_every=1"])
    assert rc == 0
    assert not (out / "checkpoint").exists()  # checkpointed every step (model anchors' generators), removed at the end
    meta = json.loads((out / "rho.json").read_text())
    assert meta["training"]["personalization_method"] == "dreambooth" and meta["training"]["min_psnr"] == 40
    assert len(json.loads((out / "train_log.json").read_text())["history"]) == 2
    assert len(list((tmp_path / "cls").rglob("*.png"))) == 2  # the anchors' class images were generated


def test_toy_export_writes_the_asked_number_of_photos(tmp_path, capsys):
    """apdm toy export --images N: N photos per subject in train/, 8 references, all of the same drawn identity."""
    assert main(["toy", "export", "--out", str(tmp_path), "--subjects", "1", "--images", "6"]) == 0
    (root,) = tmp_path.glob("heldout-*")
    assert len(list((root / "train").glob("*.png"))) == 6 and len(list((root / "references").glob("*.png"))) == 8
    assert json.loads((root / "subject.json").read_text())["index"] == int(root.name.split("-")[1])
    assert main(["toy", "export", "--out", str(tmp_path / "none"), "--images", "0"]) == 2
    assert "photos per subject must be at least 1, got 0 (train)" in capsys.readouterr().err
    # a second export with fewer photos replaces train/ whole: no photo of the first is left to be trained on
    # (before: 02-05.png stayed, identical to references/00-03.png, leaking references into the training set)
    (root / "train" / "notes.txt").write_text("mine")
    (root / "protected").mkdir()
    assert main(["toy", "export", "--out", str(tmp_path), "--subjects", "1", "--images", "2",
                 "--training-identities", "2"]) == 0
    assert sorted(q.name for q in (root / "train").iterdir()) == ["00.png", "01.png"]
    assert (root / "protected").is_dir()  # what is not the export's own is left alone
    ids = sorted((tmp_path / "train-identities").iterdir())
    assert len(ids) == 2 and all(sorted(q.name for q in d.iterdir()) == [f"{k:02d}.png" for k in range(4)]
                                 for d in ids)
    # only training identities (the toy perturbation network's data, the encoder trap's keep set): no subject
    assert main(["toy", "export", "--out", str(tmp_path / "ids"), "--subjects", "0", "--training-identities", "1"]) == 0
    assert [q.name for q in (tmp_path / "ids").iterdir()] == ["train-identities"]
    for bad, said in ((["--subjects", "-1"], "subjects must be between 0 and"),
                      (["--subjects", "100000"], "subjects must be between 0 and"),
                      (["--subjects", "0"], "nothing to export"),
                      (["--training-identities", "-2"], "training identities must be between 0 and")):
        assert main(["toy", "export", "--out", str(tmp_path / "none")] + bad) == 2
        assert said in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    assert main(["toy", "export", "--out", str(tmp_path / "afile")]) == 2
    assert "afile is a file, not a folder" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()


def test_demo_refuses_an_output_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "demofile").write_text("x")
    assert main(["demo", "--quick", "--out", str(tmp_path / "demofile")]) == 2
    assert "demofile is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "demofile").read_text() == "x"


def test_toy_sample_refuses_bad_arguments_before_loading(tmp_path, capsys):
    """apdm toy sample: a count, step number or output name it cannot use is one line before any work (exit 2); a
    model folder that is not there is one line too (exit 1), no traceback."""
    base = ["toy", "sample", "--prompt", "a photo of a person", "--model", "tiny"]
    for bad, said in ((["--n", "0"], "--n must be at least 1"), (["--steps", "0"], "--steps must be between 1"),
                      (["--out", str(tmp_path / "grid.txt")], "give a .png or .jpg file name"),
                      (["--out", str(tmp_path)], "give a .png or .jpg file name")):
        assert main(base + bad) == 2
        assert said in capsys.readouterr().err
    assert main(["toy", "sample", "--prompt", "a", "--model", str(tmp_path / "nope"), "--out",
                 str(tmp_path / "g.png")]) == 1
    assert "nope" in capsys.readouterr().err and not (tmp_path / "g.png").exists()
    assert main(base + ["--n", "1", "--steps", "1", "--out", str(tmp_path / "g.png")]) == 0
    assert (tmp_path / "g.png").is_file()


def test_the_terminal_gets_one_line_for_ctrl_c_and_a_traceback_only_with_debug(tmp_path, monkeypatch, apdm_log):
    """Ctrl-C printed a 70-line traceback and never said that the same command continues; --debug, which the code
    looked for, was refused by the parser; train-perturber without data= trained on the current folder."""
    import apdm.protect_images.run as pi

    def interrupted(cfg):
        raise KeyboardInterrupt

    monkeypatch.setattr(pi, "run", interrupted)
    src = tmp_path / "in"
    src.mkdir()
    assert main(["protect-images", "--input", str(src), "--output", str(tmp_path / "out")]) == 130
    assert "protect-images interrupted. The same command again skips the photos already protected" in apdm_log()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        main(["personalize", "--debug", f"instance_data={tmp_path / 'nothing'}", "quiet=true"])
    assert main(["personalize", f"instance_data={tmp_path / 'nothing'}", "quiet=true"]) == 1
    monkeypatch.chdir(tmp_path)
    assert main(["train-perturber", "model.device=cpu", "quiet=true"]) == 1
    assert "set data=FOLDER: one sub-folder of photos per training identity" in apdm_log()


def test_log_lines_never_land_on_a_progress_bar_and_library_noise_is_dropped(capfd):
    """A log line written while a bar was open landed on the bar's line ("evaluating s1: 25%|██▌ | 1/4[apdm] ..");
    transformers' notice that torchvision is missing (left out on purpose) came with every model load; quiet=true
    left diffusers' and transformers' loading bars on."""
    import logging

    from tqdm import tqdm

    from apdm.core.models import load_sd
    from apdm.utils import LOG, set_progress, setup_logging

    handlers = LOG.handlers[:]
    LOG.handlers[:] = []
    setup_logging()
    try:
        with tqdm(total=4, desc="evaluating", file=sys.stderr) as bar:
            bar.update(1)
            LOG.info("subject 's1' attacked")
        logging.getLogger("transformers.utils.import_utils").warning(
            "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`")
        err = capfd.readouterr().err.replace("\r", "\n")
        assert any(line.startswith("[apdm] subject 's1' attacked") for line in err.splitlines()), err
        assert "requires torchvision" not in err
        set_progress(False)
        load_sd("toy", device="cpu")
        assert "Loading pipeline components" not in capfd.readouterr().err
    finally:
        set_progress(True)
        LOG.handlers[:] = handlers
