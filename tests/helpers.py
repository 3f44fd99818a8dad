"""Helpers shared by several test files (pytest puts tests/ on sys.path)."""

from pathlib import Path

import torch

from apdm.personalization import simulator as S


def fixed_personalization_loss(state, images, seeds=range(4)) -> float:
    """The simulator loss on fixed noise/timesteps (reseeded generator), averaged over a few draws, so values
    before and after training (or protecting) are comparable."""
    vals = []
    for s in seeds:
        state.generator.manual_seed(1000 + s)
        with torch.no_grad():
            vals.append(S.loss(state, images, batch_size=images.shape[0])[0].item())
    return sum(vals) / len(vals)


def tiny_protect_model_args(tmp_path) -> list[str]:
    """``apdm protect-model`` overrides for a seconds-long run on the tiny model: a two-photo subject folder made
    under ``tmp_path``, 2 outer x 1 inner steps, 2 class images; the output goes to ``tmp_path / "out"``."""
    from PIL import Image

    imgs = tmp_path / "subject"
    imgs.mkdir()
    for i in range(2):
        Image.new("RGB", (70, 60), (40 * i, 120, 200)).save(imgs / f"{i}.png")
    return ["model.path=tiny", "model.device=cpu", f"output_dir={tmp_path / 'out'}", "quiet=true",
            f"subjects=[{{instance_data: {imgs}}}]", "protect.outer_steps=2", "protect.inner_steps=1",
            "protect.num_class_images=2", "personalization.class_sample_steps=2",
            f"personalization.class_data_dir={tmp_path / 'cls'}", "protect.learning_rate=1e-3"]


def clean_and_protected_folders(tmp_path, n: int = 2):
    """``tmp_path/clean`` with ``n`` random 64x64 PNGs and ``tmp_path/prot`` with their negatives (same names), as a
    subject's clean and "protected" photos for evaluate; returns the two folders."""
    from PIL import Image

    clean, prot = tmp_path / "clean", tmp_path / "prot"
    clean.mkdir()
    prot.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        x = (torch.rand(64, 64, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(x).save(clean / f"{i}.png")
        Image.fromarray(255 - x).save(prot / f"{i}.png")
    return clean, prot


def stop_after_first_checkpoint(monkeypatch, run, *args, saver: tuple | None = None):
    """Run ``run(*args)`` until it has saved its first checkpoint, then stop it there as Ctrl-C would (the
    KeyboardInterrupt is asserted); checkpointing is restored afterwards. ``saver``: ``(module, function name)`` of
    the checkpoint writer, by default the toy trainings' (``apdm.toy.model._save_train_state``: the toy upscaler)."""
    import pytest

    import apdm.toy.model as M

    module, name = saver or (M, "_save_train_state")
    saved = getattr(module, name)

    def save_then_stop(*a, **kw):
        saved(*a, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, name, save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(*args)
    monkeypatch.setattr(module, name, saved)


def protect_images_cfg(src, out, **kw):
    """A protect-images config on the tiny model (AdvDM, one step, quiet) from ``src`` into ``out``; ``kw`` wins."""
    from apdm.config import ModelConfig, ProtectImagesRunConfig

    base = {"model": ModelConfig(path="tiny", device="cpu"), "method": "advdm", "steps": 1, "quiet": True}
    return ProtectImagesRunConfig(input=str(src), output_dir=str(out), **{**base, **kw})


def noise_photo(path, h: int = 20, w: int = 24, seed: int = 0, mode: str = "RGB") -> Path:
    """Write an ``h`` x ``w`` photo of uniform noise (RGB, or grey with ``mode="L"``) to ``path``; returns it."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    shape = (h, w) if mode == "L" else (h, w, 3)
    pixels = rng.integers(0, 256, shape, dtype=np.uint8)
    (Image.fromarray(pixels, mode) if mode == "L" else Image.fromarray(pixels)).save(path)
    return Path(path)


def tiny_evaluate_args(out, subjects: str, *extra: str, images: int = 1) -> list[str]:
    """``apdm evaluate`` arguments for a seconds-long run on the tiny model: one clean scenario, no attack, a
    one-step LoRA, ``images`` samples of one prompt, no BRISQUE; ``subjects`` as a YAML list, ``extra`` last."""
    return ["evaluate", "model.path=tiny", "model.device=cpu", f"output_dir={out}", "quiet=true",
            "scenarios=[all_clean]", "attacks=[none]", "class_prompt_baseline=false",
            "personalizations=[{method: lora, steps: 1, learning_rate: 0.001, with_prior_preservation: false}]",
            f"sample.num_images_per_prompt={images}", "sample.num_inference_steps=1",
            "sample.prompts=[a photo of sks person]", "metrics.brisque=false", f"subjects={subjects}", *extra]
