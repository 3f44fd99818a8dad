"""The toy world as one object: where its model and instruments live, its datasets, its build and sampling.

``apdm toy build`` runs :func:`build`: draw the pretraining set, pretrain the SD-format model
(:mod:`apdm.toy.model`), train the instruments (:mod:`apdm.toy.instruments`), and write both to the cache
(``<apdm cache>/toy``). The committed copy under ``assets/toy`` (fp16) is used when no cache exists, so the demo
and the tests need no rebuild. Engines never import this module: they receive a model path like any other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from apdm.toy import draw
from apdm.toy.model import ToyModelConfig, ToyTrainConfig
from apdm.utils import LOG, atomic_dir, atomic_write_json, cache_dir

REPO_ASSETS = Path(__file__).resolve().parents[2] / "assets" / "toy"


def toy_root(prefer_cache: bool = True) -> Path:
    """Folder holding ``model/`` and ``instruments/``: the user cache if built there, else the repo's assets."""
    cached = cache_dir() / "toy"
    if prefer_cache and (cached / "model" / "model_index.json").is_file():
        return cached
    if (REPO_ASSETS / "model" / "model_index.json").is_file():
        return REPO_ASSETS
    return cached


def model_path() -> Path:
    """The toy model folder (diffusers format). Raises FileNotFoundError with the fix if it does not exist."""
    p = toy_root() / "model"
    if not (p / "model_index.json").is_file():
        raise FileNotFoundError(f"no toy-world model at {p}: run `apdm toy build` first")
    return p


def _part(name: str, marker: str) -> Path | None:
    """``<root>/<name>`` of the first root (the model's toy root, the repo's assets, the user cache) holding a file
    matching ``marker``: a cache with a built model but no ρ of its own still finds the shipped one."""
    for root in (toy_root(), REPO_ASSETS, cache_dir() / "toy"):
        if any((root / name).glob(marker)):
            return root / name
    return None


def instruments_path() -> Path:
    """The toy instruments folder (safetensors + JSON)."""
    p = _part("instruments", "*.safetensors")
    if p is None:
        raise FileNotFoundError("no toy-world instruments found: run `apdm toy build` first")
    return p


def rho_path() -> Path | None:
    """The toy world's trained LDU ρ folder, or None (train one: ``recipes/toy-train-perturber.yaml``)."""
    return _part("rho", "rho.json")


# ============================================================================ datasets
def pretraining_set(num_identities: int, images_per_identity: int, seed: int = 0, size: int = 64,
                    classes=draw.CLASSES) -> tuple[torch.Tensor, list[list[str]]]:
    """Images of *pretraining* identities of every class with caption variants for each image.

    Returns:
        (images (N,3,size,size) float32 in [0,1], captions: per image a list of caption strings of varying
        detail: the class caption, the full attribute caption and two partial ones).
    """
    ids_all = draw.split()["pretrain"]
    images, captions = [], []
    for cls in classes:
        ids = ids_all[:num_identities]
        arr, idx, _ = draw.render_dataset(cls, ids, images_per_identity, seed=seed, size=size, detail="class")
        images.append(draw.to_tensor(arr))
        for i, ident_idx in enumerate(idx.tolist()):
            ident = draw.identity_from_index(cls, ident_idx)
            rng = np.random.default_rng([seed, draw.CLASSES.index(cls), ident_idx, i, 99])
            captions.append([draw.caption(ident, cls, "class"), draw.caption(ident, cls, "full"),
                             draw.caption(ident, cls, "partial", rng), draw.caption(ident, cls, "partial", rng)])
    return torch.cat(images), captions


@dataclass
class HeldoutSubject:
    """A held-out identity (never seen in pretraining) used as a personalization target."""

    cls: str
    index: int
    identity: dict
    images: torch.Tensor            # (n,3,H,W) in [0,1]: the subject's "photos"
    references: torch.Tensor        # (m,3,H,W): other photos of the same identity (ISM references)
    class_prompt: str = ""
    instance_prompt: str = ""
    full_caption: str = ""


def heldout_subjects(n: int, cls: str = "person", num_images: int = 4, num_references: int = 8, size: int = 64,
                     seed: int = 0, offset: int = 0) -> list[HeldoutSubject]:
    """``n`` held-out subjects of class ``cls``, each with training photos and separate reference photos."""
    ids = draw.split()["heldout"][offset:offset + n]
    out = []
    for idx in ids:
        ident = draw.identity_from_index(cls, idx)
        arr, _, _ = draw.render_dataset(cls, [idx], num_images + num_references, seed=seed + 1, size=size)
        t = draw.to_tensor(arr)
        word = cls
        out.append(HeldoutSubject(cls=cls, index=idx, identity=ident, images=t[:num_images],
                                  references=t[num_images:], class_prompt=f"a photo of a {word}",
                                  instance_prompt=f"a photo of sks {word}",
                                  full_caption=draw.caption(ident, cls, "full")))
    return out


def export(out_dir: str | Path, subjects: int = 2, cls: str = "person", num_images: int = 4,
           num_references: int = 8, training_identities: int = 0, images_per_training_identity: int = 4) -> dict:
    """Write toy data as ordinary image folders (so every command takes plain folders):

    ``out/heldout-XXXX/train/*.png`` (the subject's photos), ``out/heldout-XXXX/references/*.png`` (other photos
    of the same identity) and, if ``training_identities`` > 0, ``out/train-identities/id-XXXX/*.png`` drawn from
    *pretraining* identities (e.g. to train the LDU perturbation network without touching held-out subjects).
    Each ``train``, ``references`` and ``id-XXXX`` folder is written whole and replaces an earlier export's
    (so a second export with fewer photos leaves none of the first's behind); other files are left alone.

    Raises:
        ValueError: ``subjects`` or ``training_identities`` outside what the world holds, ``num_images`` < 1, or
            ``out_dir`` an existing file.
    """
    from apdm.core.images import save_image

    split = draw.split()
    if not 0 <= subjects <= len(split["heldout"]):
        raise ValueError(f"subjects must be between 0 and {len(split['heldout'])} (the held-out identities), "
                         f"got {subjects}")
    if not 0 <= training_identities <= len(split["pretrain"]):
        raise ValueError(f"training identities must be between 0 and {len(split['pretrain'])}, got "
                         f"{training_identities}")
    if subjects == 0 and training_identities == 0:
        raise ValueError("nothing to export: subjects and training identities are both 0")
    if num_images < 1 or num_references < 1 or images_per_training_identity < 1:
        raise ValueError(f"photos per subject must be at least 1, got {num_images} (train), {num_references} "
                         f"(references), {images_per_training_identity} (per training identity)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    written = {"subjects": [], "training_identities": 0}
    for subj in heldout_subjects(subjects, cls, num_images, num_references):
        root = out / f"heldout-{subj.index:04d}"
        for part, imgs in (("train", subj.images), ("references", subj.references)):
            with atomic_dir(root / part) as tmp:
                for i, img in enumerate(imgs):
                    save_image(img, tmp / f"{i:02d}.png")
        atomic_write_json(root / "subject.json", {"class": cls, "index": subj.index, "identity": subj.identity,
                                                  "instance_prompt": subj.instance_prompt,
                                                  "class_prompt": subj.class_prompt, "caption": subj.full_caption})
        written["subjects"].append(str(root))
    if training_identities > 0:
        ids = split["pretrain"][:training_identities]
        arr, idx, _ = draw.render_dataset(cls, ids, images_per_training_identity, seed=5)
        imgs = draw.to_tensor(arr)
        per_identity: dict[int, list[torch.Tensor]] = {}
        for img, ident in zip(imgs, idx.tolist()):
            per_identity.setdefault(ident, []).append(img)
        for ident, photos in per_identity.items():
            with atomic_dir(out / "train-identities" / f"id-{ident:04d}") as tmp:
                for k, img in enumerate(photos):
                    save_image(img, tmp / f"{k:02d}.png")
        written["training_identities"] = len(ids)
    return written


# ============================================================================ build
#: stage 2 of the committed world: 2,000 more UNet + text encoder steps at half the peak lr, fresh photos (seed 1).
STAGE2 = {"unet_steps": 2000, "unet_lr": 2e-4, "text_lr": 1e-4, "seed": 1}


@dataclass
class ToyBuildConfig:
    """``apdm toy build``: everything needed to rebuild the committed toy world from scratch."""

    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    #: stage 1: VAE, then UNet + text encoder.
    train: ToyTrainConfig = field(default_factory=ToyTrainConfig)
    #: further stages, in order, each continuing the model of the stage before: the VAE is kept (so the latent
    #: space does not change; their ``vae_*`` keys are unused), the UNet and text encoder train ``unet_steps``
    #: more steps on a pretraining set drawn with the stage's own ``seed`` (same identities, fresh photos).
    #: Default: the committed world's stage 2. ``[]`` = stage 1 only.
    more_stages: list[ToyTrainConfig] = field(default_factory=lambda: [ToyTrainConfig(**STAGE2)])
    #: where to write; empty = the user cache (``<apdm cache>/toy``).
    output_dir: str = ""
    #: also copy the result (fp16) into the repo's assets/toy.
    write_assets: bool = False
    skip_model: bool = False
    skip_instruments: bool = False
    instruments_quick: bool = False
    seed: int = 0
    quiet: bool = False


def build(cfg: ToyBuildConfig) -> dict:
    """Build the toy world (model and instruments) and return a report (also written as ``build_report.json``).

    The model stages run in order (``train``, then each of ``more_stages`` continuing the saved model of the one
    before). ``<output>/build_state.json`` records the settings and each finished stage, so a killed build (or
    a rerun) continues with the first unfinished stage, inside it from its last checkpoint; a build with other
    settings starts over.
    """
    import dataclasses
    import json
    import shutil

    from apdm.toy.model import pretrain, work_dir

    root = Path(cfg.output_dir) if cfg.output_dir else cache_dir() / "toy"
    root.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    t0 = time.perf_counter()
    if not cfg.skip_model:
        stages = [cfg.train] + list(cfg.more_stages)
        for k, stage in enumerate(cfg.more_stages, start=2):
            if stage.init_from:
                raise ValueError(f"more_stages: stage {k} has init_from={stage.init_from!r}; a later stage always "
                                 "continues the stage before it (set train.init_from to start from a model)")
        settings = {"model": dataclasses.asdict(cfg.model), "stages": [dataclasses.asdict(s) for s in stages]}
        state_file = root / "build_state.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else None
        if state is not None and (state["settings"] != settings or
                                  (state["done"] and not (root / "model" / "model_index.json").is_file())):
            LOG.info("toy build: %s is from other settings (or its model is gone); starting over", state_file)
            shutil.rmtree(work_dir(root / "model"), ignore_errors=True)  # its checkpoints belong to those settings
            state = None
        done = state["done"] if state else []
        atomic_write_json(state_file, {"settings": settings, "done": done})
        if done:
            LOG.info("toy build: %d of %d model stage(s) already done in %s; continuing", len(done), len(stages), root)
        for k in range(len(done), len(stages)):
            stage = stages[k] if k == 0 else dataclasses.replace(stages[k], init_from=str(root / "model"))
            LOG.info("toy build: model stage %d of %d (%s; this takes a while; progress bars follow)", k + 1,
                     len(stages), "VAE, then UNet + text encoder" if k == 0 and not stage.init_from
                     else f"{stage.unet_steps} more UNet + text encoder steps")
            done.append(pretrain(root / "model", cfg.model, stage, fp16=True))
            atomic_write_json(state_file, {"settings": settings, "done": done})
        report["model_stages"] = done
    if not cfg.skip_instruments:
        from apdm.toy.instruments import train_instruments

        vae = None
        if (root / "model" / "vae").is_dir():  # the detector also learns the world's VAE round trip
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(root / "model" / "vae", torch_dtype=torch.float32).eval()
        LOG.info("toy build: training the instruments (identity encoder, detector%s, features)",
                 " with VAE round trips" if vae is not None else "")
        _, report["instruments"] = train_instruments(root / "instruments", seed=cfg.seed,
                                                     quick=cfg.instruments_quick, vae=vae, quiet=cfg.quiet)
    report["seconds_total"] = round(time.perf_counter() - t0, 1)
    atomic_write_json(root / "build_report.json", report)
    if cfg.write_assets:
        for part in ("model", "instruments"):
            if (root / part).is_dir():
                dst = REPO_ASSETS / part
                if dst.exists():
                    shutil.rmtree(dst)
                shutil.copytree(root / part, dst)
        shutil.copy(root / "build_report.json", REPO_ASSETS / "build_report.json")
    LOG.info("toy world built in %.0f s at %s", report["seconds_total"], root)
    return report
