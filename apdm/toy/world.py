"""The toy world as one object: where its model and instruments live, its datasets, its build and sampling.

``apdm toy build`` runs :func:`build`: draw the pretraining set, pretrain the SD-format model
(:mod:`apdm.toy.model`), train the instruments (:mod:`apdm.toy.instruments`), and write both to the cache
(``<apdm cache>/toy``). The committed copy under ``assets/toy`` (fp16) is used when no cache exists, so the demo
and the tests need no rebuild. Engines never import this module: they receive a model path like any other.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from apdm.toy import draw
from apdm.toy.model import ToyModelConfig, ToyTrainConfig
from apdm.utils import LOG, atomic_dir, atomic_write_json, cache_dir

REPO_ASSETS = Path(__file__).resolve().parents[2] / "assets" / "toy"


_ANNOUNCED: set[str] = set()  # the toy_root() log lines already given in this process


def _announce(message: str, *args) -> None:
    text = message % args
    if text not in _ANNOUNCED:
        _ANNOUNCED.add(text)
        LOG.info(text)


def build_complete(root: Path) -> bool:
    """Whether ``root`` holds a finished ``apdm toy build``: its ``build_state.json`` records every model stage
    done, and the model and the instruments exist."""
    try:
        state = json.loads((root / "build_state.json").read_text())
        complete = len(state["done"]) == len(state["settings"]["stages"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return (complete and (root / "model" / "model_index.json").is_file()
            and (root / "instruments" / "instruments.json").is_file()
            and any((root / "instruments").glob("*.safetensors")))


def toy_root(prefer_cache: bool = True) -> Path:
    """Folder holding ``model/`` and ``instruments/``: the user cache if a *finished* build is there
    (:func:`build_complete`: a half-built cache never replaces the committed world), else the repo's assets."""
    cached = cache_dir() / "toy"
    if prefer_cache and (cached / "model" / "model_index.json").is_file():
        if build_complete(cached):
            _announce("toy world: using the build in %s (not the committed %s)", cached, REPO_ASSETS)
            return cached
        if (REPO_ASSETS / "model" / "model_index.json").is_file():
            _announce("toy world: %s holds an unfinished build (its build_state.json does not record every stage "
                      "done, or it has no instruments); using the committed %s", cached, REPO_ASSETS)
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
    ids = draw.pretraining_ids(num_identities, "pretraining identities per class")
    images, captions = [], []
    for cls in classes:
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
        ValueError: ``subjects`` or ``training_identities`` outside what the world holds, ``num_images`` < 1,
            ``out_dir`` an existing file, or ``out_dir`` holding the other class's subjects (``subject.json``) or
            training identities (recorded in their photos' EXIF description) that this export would replace.
    """
    from apdm.core.images import save_image

    split = draw.split()
    if not 0 <= subjects <= len(split["heldout"]):
        raise ValueError(f"subjects must be between 0 and {len(split['heldout'])} (the held-out identities), "
                         f"got {subjects}")
    train_ids = draw.pretraining_ids(training_identities, "training identities", low=0)
    if subjects == 0 and training_identities == 0:
        raise ValueError("nothing to export: subjects and training identities are both 0")
    if num_images < 1 or num_references < 1 or images_per_training_identity < 1:
        raise ValueError(f"photos per subject must be at least 1, got {num_images} (train), {num_references} "
                         f"(references), {images_per_training_identity} (per training identity)")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out} is a file, not a folder")
    _check_export_class(out, cls, split["heldout"][:subjects], training_identities > 0)
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
        arr, idx, _ = draw.render_dataset(cls, train_ids, images_per_training_identity, seed=5)
        imgs = draw.to_tensor(arr)
        per_identity: dict[int, list[torch.Tensor]] = {}
        for img, ident in zip(imgs, idx.tolist()):
            per_identity.setdefault(ident, []).append(img)
        exif = _class_exif(cls)  # the class, recorded in each photo (the folder holds nothing but photos)
        for ident, photos in per_identity.items():
            with atomic_dir(out / "train-identities" / f"id-{ident:04d}") as tmp:
                for k, img in enumerate(photos):
                    save_image(img, tmp / f"{k:02d}.png", exif=exif)
        written["training_identities"] = len(train_ids)
    return written


#: EXIF ImageDescription of an exported training identity's photos: the prefix, then the class
_CLASS_TAG = "apdm toy export, class: "


def _class_exif(cls: str) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x010E] = _CLASS_TAG + cls  # ImageDescription
    return exif.tobytes()


def _check_export_class(out: Path, cls: str, heldout_ids: list[int], training_identities: bool) -> None:
    """Refuse an export of ``cls`` that would replace (or join) the other class's subjects or training identities
    in ``out``: the folder names carry no class (docs and recipes name ``heldout-0001``), so a dog export would
    silently replace a person's photos."""
    from PIL import Image

    for idx in heldout_ids:
        f = out / f"heldout-{idx:04d}" / "subject.json"
        if not f.is_file():
            if any((f.parent / part).exists() for part in ("train", "references")):  # not an export's: the user's
                raise ValueError(f"{f.parent} holds train/ or references/ but no subject.json: it was not written "
                                 f"by apdm toy export, and an export would replace those folders; choose another "
                                 f"--out or move it")
            continue
        try:
            other = json.loads(f.read_text()).get("class")
        except (OSError, ValueError, AttributeError) as exc:
            raise ValueError(f"{f}: not a readable toy-export subject.json ({exc}); an export of {cls} subjects "
                             f"would replace that folder: choose another --out or remove it") from None
        if other != cls:
            raise ValueError(f"{f} is a {other} subject; exporting {cls} subjects would replace it (the folder "
                             f"names carry no class): choose another --out")
    if not training_identities:
        return
    for folder in sorted((out / "train-identities").glob("id-*")):
        for photo in sorted(folder.glob("*.png"))[:1]:
            try:
                with Image.open(photo, formats=["PNG"]) as im:
                    said = str(im.getexif().get(0x010E, ""))
            except OSError:
                continue  # not an image we can read: nothing recorded
            if said.startswith(_CLASS_TAG) and said[len(_CLASS_TAG):] != cls:
                raise ValueError(f"{out / 'train-identities'} holds {said[len(_CLASS_TAG):]} training identities "
                                 f"({photo}); exporting {cls} ones there would mix or replace them (the folder "
                                 f"names carry no class): choose another --out")


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


def _check_stages(cfg: ToyBuildConfig) -> None:
    """The model stages' settings that can be checked before any work (ValueError naming the key)."""
    for k, stage in enumerate(cfg.more_stages, start=2):
        if stage.init_from:
            raise ValueError(f"more_stages: stage {k} has init_from={stage.init_from!r}; a later stage always "
                             "continues the stage before it (set train.init_from to start from a model)")
    from apdm.toy.model import check_model_config, check_train_config

    named = [("train", cfg.train)] + [(f"more_stages[{i}]", s) for i, s in enumerate(cfg.more_stages)]
    for k, (name, stage) in enumerate(named):
        check_train_config(stage, name)
        draw.pretraining_ids(stage.num_identities, f"{name}.num_identities")
        keys = ["unet_steps", "unet_batch", "images_per_identity"]
        keys += ["vae_steps", "vae_batch"] if k == 0 and not stage.init_from else []  # the one VAE training
        for key in keys:  # zero or fewer: an empty training loop crashed after the drawing and the VAE stage
            if not getattr(stage, key) >= 1:
                raise ValueError(f"{name}.{key} must be a whole number >= 1, got {getattr(stage, key)}")
    check_model_config(cfg.model)


def build(cfg: ToyBuildConfig) -> dict:
    """Build the toy world (model and instruments) and return a report (also written as ``build_report.json``).

    The model stages run in order (``train``, then each of ``more_stages`` continuing the saved model of the one
    before). ``<output>/build_state.json`` records the settings and each finished stage, so a killed build (or
    a rerun) continues with the first unfinished stage, inside it from its last checkpoint; a build with other
    settings starts over.
    """
    import dataclasses
    import shutil

    from apdm.toy.model import STAGE_MARKER, check_init_from, pretrain, work_dir

    root = Path(cfg.output_dir) if cfg.output_dir else cache_dir() / "toy"
    if root.exists() and not root.is_dir():
        raise ValueError(f"output_dir {root} is a file, not a folder")
    if not cfg.skip_model:
        _check_stages(cfg)
    root.mkdir(parents=True, exist_ok=True)
    report: dict = {}
    t0 = time.perf_counter()
    if not cfg.skip_model:
        stages = [cfg.train] + list(cfg.more_stages)
        settings = {"model": dataclasses.asdict(cfg.model), "stages": [dataclasses.asdict(s) for s in stages]}
        state_file = root / "build_state.json"
        marker_file = root / "model" / STAGE_MARKER
        state = json.loads(state_file.read_text()) if state_file.is_file() else None
        if state is not None and (state["settings"] != settings or
                                  (state["done"] and not (root / "model" / "model_index.json").is_file())):
            LOG.info("toy build: %s is from other settings (or its model is gone); starting over", state_file)
            shutil.rmtree(work_dir(root / "model"), ignore_errors=True)  # its checkpoints belong to those settings
            # and its instruments (their detector learnt that model's VAE round trips): never paired with a new model
            shutil.rmtree(root / "instruments", ignore_errors=True)
            state = None
        done = state["done"] if state else []
        try:  # written with the model in one atomic step; anything else is no marker
            marker = json.loads(marker_file.read_text()) if marker_file.is_file() else None
        except (OSError, ValueError):
            marker = None
        if isinstance(marker, dict) and marker.get("settings") == settings and marker.get("stage") == len(done) + 1:
            # the stage's model was saved (with this marker, in one step) but the build was killed before
            # build_state.json recorded it: record it now instead of training it again on its own output
            LOG.info("toy build: model stage %d was saved but not recorded (killed in between); recording it",
                     len(done) + 1)
            done.append(marker["report"])
            shutil.rmtree(work_dir(root / "model"), ignore_errors=True)
        if not done and cfg.train.init_from:
            check_init_from(cfg.train.init_from)
        atomic_write_json(state_file, {"settings": settings, "done": done})
        marker_file.unlink(missing_ok=True)
        if done:
            LOG.info("toy build: %d of %d model stage(s) already done in %s; continuing", len(done), len(stages), root)
        for k in range(len(done), len(stages)):
            stage = stages[k] if k == 0 else dataclasses.replace(stages[k], init_from=str(root / "model"))
            LOG.info("toy build: model stage %d of %d (%s; this takes a while; progress bars follow)", k + 1,
                     len(stages), "VAE, then UNet + text encoder" if k == 0 and not stage.init_from
                     else f"{stage.unet_steps} more UNet + text encoder steps")
            done.append(pretrain(root / "model", cfg.model, stage, fp16=True,
                                 stage_record={"stage": k + 1, "settings": settings}))
            atomic_write_json(state_file, {"settings": settings, "done": done})
            marker_file.unlink(missing_ok=True)
        report["model_stages"] = done
    if not cfg.skip_instruments:
        from apdm.toy.instruments import train_instruments

        vae = None
        if (root / "model" / "vae").is_dir():  # the detector also learns the world's VAE round trip
            from diffusers import AutoencoderKL

            vae = AutoencoderKL.from_pretrained(root / "model" / "vae", torch_dtype=torch.float32,
                                                use_safetensors=True).eval()
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
