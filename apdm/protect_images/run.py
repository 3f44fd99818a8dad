"""``apdm protect-images`` and ``apdm train-perturber``: protect a folder of photos with one command.

Resolution policy: every photo is resized (whole image, no crop) to the model resolution, its short side to the
model's and its aspect ratio kept (``resolution_policy=aspect``, up to 2:1) or squeezed to a square (``squeeze``);
the method computes a perturbation there, and the perturbation (``protected − clean`` at model resolution) is
upsampled bicubically to the photo's own size, added to the *original* pixels, projected onto the L∞ budget
ball and [0,1], and quantized to 8 bits so that the saved file itself satisfies ``|saved − original| ≤ budget``
(:func:`apdm.protect_images.budget.apply_delta_to_original`; ``original`` at its own precision, 16 bits included).
PNG keeps that exactly; a JPEG re-compresses afterwards, and the manifest measures each file as written. Inputs
are never modified; a bad file is reported in the manifest and skipped; outputs are written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import time
from pathlib import Path

import torch

from apdm.config import ProtectImagesRunConfig, TrainPerturberRunConfig, to_yaml
from apdm.utils import LOG, atomic_write_json, atomic_write_text, file_sha256, peak_rss_mb, progress, seed_everything

METHOD_NAMES = ("ldu", "aspl", "fsmg", "advdm", "photoguard", "sds", "mist", "pid", "caat", "metacloak",
                "simac")
#: methods that pull the photos towards a target image (``target=``)
TARGET_METHODS = ("photoguard", "mist")
#: methods that protect a group of photos together (one surrogate trained on all of them), so at one size
JOINT_METHODS = ("aspl", "fsmg", "caat", "metacloak", "simac")
#: methods whose surrogate is ``cfg.personalization`` (with its class images); CAAT keeps its own
SURROGATE_METHODS = ("aspl", "fsmg", "metacloak", "simac")


def group_shapes(sizes: list[tuple[int, int]], size: int, multiple: int, policy: str, joint: bool
                 ) -> list[tuple[tuple[int, int], list[int]]]:
    """How a group of photos is protected: ``[(model (h, w), [indices of the photos protected at it]), ...]``.

    Each photo gets :func:`apdm.core.images.model_shape`; photos sharing a shape go in one batch, in order of first
    appearance. ``joint`` (ASPL/FSMG): the whole group at its most common shape (the first such on a tie), since
    their surrogate is trained on all the photos together.
    """
    from apdm.core.images import model_shape

    shapes = [model_shape(hw, size, multiple, policy) for hw in sizes]
    if joint and shapes:
        shapes = [max(dict.fromkeys(shapes), key=shapes.count)] * len(shapes)
    order = list(dict.fromkeys(shapes))
    return [(shape, [i for i, s in enumerate(shapes) if s == shape]) for shape in order]


def is_grey(pixels: torch.Tensor) -> bool:
    """Whether a (3,H,W) photo is grey: its three channels equal everywhere (a grayscale file, or a black-and-white
    photo stored as RGB). Such a photo is given the mean over the channels of the method's perturbation, so it stays
    grey (its file is still RGB, with three equal channels): each channel's perturbation is within the budget, so
    their mean is, and the projection and 8-bit rounding act on each channel alike."""
    return bool(torch.equal(pixels[0], pixels[1]) and torch.equal(pixels[1], pixels[2]))


def _method_kwargs(cfg: ProtectImagesRunConfig, sd, target: torch.Tensor | None = None) -> dict:
    """The pixel method's keyword arguments from ``cfg``; ``target``: PhotoGuard's (3,H,W) target image in [0,1]
    (kept at its own size; :func:`protect_batch` resizes it to each batch's)."""
    kw: dict = {}
    if cfg.steps:
        kw["steps"] = cfg.steps
    if cfg.pgd_alpha:
        kw["pgd_alpha"] = cfg.pgd_alpha
    if cfg.eot:
        kw["eot_transforms"] = list(cfg.eot)
    if target is not None:
        kw["target"] = target[None]  # resized to each batch's size by protect_batch
    from apdm.protect_images.baselines import METHOD_OPTIONS

    for key, (method, name, _) in METHOD_OPTIONS.items():
        if cfg.method == method:
            kw[name] = getattr(cfg, key)
    if cfg.method in SURROGATE_METHODS:
        from apdm.personalization.simulator import class_images_for

        kw["personalization"] = cfg.personalization
        kw["class_images"] = class_images_for(sd, cfg.personalization, quiet=cfg.quiet)
    return kw


def protect_batch(sd, images: torch.Tensor, cfg: ProtectImagesRunConfig, budget: float, rho=None,
                  extra: dict | None = None) -> torch.Tensor:
    """Protect (N,3,h,w) images at a size the model takes with ``cfg.method``; returns the same shape in [0,1]."""
    if cfg.method == "ldu":
        from apdm.protect_images import ldu

        return ldu.apply(sd, rho, images, budget, batch_size=cfg.batch_size, quiet=cfg.quiet)
    from apdm.protect_images.baselines import METHODS

    extra = dict(extra or {})
    if extra.get("target") is not None:  # PhotoGuard's target, at the size these photos are protected at
        from apdm.core.images import to_model_resolution

        extra["target"] = to_model_resolution(extra["target"], tuple(images.shape[-2:])).to(images.device)
    return METHODS[cfg.method](sd, images, budget=budget, seed=cfg.seed, quiet=cfg.quiet, **extra)


def closeness_summary(entries: list[dict]) -> dict:
    """Over a manifest's image entries: how many, mean and lowest PSNR (dB; identical images, whose PSNR is
    infinite, are left out of both), lowest SSIM, the largest L∞ change in grey levels, and whether all are within
    the budget, and how many were saved unchanged (a photo of a few pixels cannot carry the perturbation)."""
    psnr = [e["psnr@apdm"] for e in entries if e.get("psnr@apdm") is not None]
    ssim = [e["ssim@skimage"] for e in entries if e.get("ssim@skimage") is not None]
    return {"num": len(entries),
            "psnr_mean@apdm": round(sum(psnr) / len(psnr), 2) if psnr else None,
            "psnr_min@apdm": round(min(psnr), 2) if psnr else None,
            "ssim_min@skimage": round(min(ssim), 4) if ssim else None,
            "linf_255_max@apdm": max((e["linf_255@apdm"] for e in entries), default=None),
            "all_within_budget": all(e.get("within_budget", True) for e in entries),
            "num_unchanged": sum(1 for e in entries if e.get("unchanged"))}


#: the options only the pixel methods use (LDU's ρ makes its perturbation in one forward pass)
PIXEL_OPTIONS = ("steps", "pgd_alpha", "eot")


def output_format(name: str) -> str:
    """``format=`` as :func:`apdm.core.images.save_image` takes it: lower case, ``jpg`` read as ``jpeg``."""
    name = str(name).strip().lower()
    return "jpeg" if name == "jpg" else name


def _shown(value) -> str:
    """An option's value as typed on the command line (``[jpeg, blur]``, not ``['jpeg', 'blur']``)."""
    return f"[{', '.join(map(str, value))}]" if isinstance(value, (list, tuple)) else str(value)


def check_protect_config(cfg: ProtectImagesRunConfig) -> tuple[float, str]:
    """Raise ValueError naming the ``apdm protect-images`` key whose value is out of range or unused by the method
    (before any model loads); warn about settings the method ignores. Returns ``(budget, format)``: the budget as
    an L∞ radius on [0, 1] and the output format (``png`` or ``jpeg``)."""
    from apdm.core.images import FORMATS
    from apdm.protect_images.baselines import METHOD_OPTIONS, check_method_option
    from apdm.protect_images.budget import parse_budget

    if cfg.method not in METHOD_NAMES:
        raise ValueError(f"unknown method '{cfg.method}'; choose one of {', '.join(METHOD_NAMES)}")
    if not str(cfg.input).strip():
        raise ValueError("no input: pass --input DIR_OR_FILES (or input=...)")
    for key, value, low, high, why in (
            ("batch_size", cfg.batch_size, 1, None, ""), ("steps", cfg.steps, 0, None, " (0 = the method's default)"),
            ("jpeg_quality", cfg.jpeg_quality, 1, 100, "")):
        if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
            span = f"from {low} to {high}" if high is not None else f">= {low}"
            raise ValueError(f"{key}={value}: must be a whole number {span}{why}")
    alpha = cfg.pgd_alpha
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:  # NaN fails too
        raise ValueError(f"pgd_alpha={alpha}: must be a number from 0 to 1, the PGD step on [0,1] images (e.g. "
                         f"{1 / 255:.5f} = 1/255; 0 = the method's default)")
    check_eot(cfg.eot)
    fmt = output_format(cfg.format)
    if fmt not in FORMATS:
        raise ValueError(f"format={cfg.format}: choose png (lossless, the default) or jpeg (jpg)")
    if any(sep in cfg.suffix for sep in {"/", "\\", os.sep, os.altsep} - {None}) or ".." in cfg.suffix:
        raise ValueError(f"suffix={cfg.suffix!r}: a suffix is appended to each output's name and must not contain a "
                         f"path separator or '..' (the outputs stay in the output folder)")
    if cfg.resolution_policy not in ("aspect", "squeeze"):
        raise ValueError(f"resolution_policy={cfg.resolution_policy}: choose aspect or squeeze")
    if cfg.keep_exif and cfg.strip_metadata:
        raise ValueError("keep_exif=true and strip_metadata=true contradict each other: strip_metadata removes all "
                         "metadata, EXIF included; pass one of them")
    for key in METHOD_OPTIONS:
        check_method_option(key, getattr(cfg, key))
    if cfg.method == "ldu":
        if not cfg.rho_path:
            raise ValueError("method ldu needs a trained perturbation network: rho_path=FOLDER (train one with "
                             "`apdm train-perturber`)")
        unused = [f"{key}={_shown(getattr(cfg, key))}" for key in PIXEL_OPTIONS if getattr(cfg, key)]
        if unused:
            raise ValueError(f"method ldu does not use {', '.join(unused)}: its network ρ makes the perturbation in "
                             f"one forward pass ({', '.join(PIXEL_OPTIONS)} are the pixel methods' options); leave "
                             f"{'it' if len(unused) == 1 else 'them'} out")
    default = ProtectImagesRunConfig()
    ignored = [f"{key}={_shown(getattr(cfg, key))}" for key, (method, _, _) in METHOD_OPTIONS.items()
               if method != cfg.method and getattr(cfg, key) != getattr(default, key)]
    if cfg.method not in SURROGATE_METHODS:
        ignored += [f"personalization.{f.name}={_shown(getattr(cfg.personalization, f.name))}"
                    for f in dataclasses.fields(cfg.personalization)
                    if getattr(cfg.personalization, f.name) != getattr(default.personalization, f.name)]
    if ignored:
        LOG.warning("method %s does not use %s: ignored, and left out of the settings a resumed run must match",
                    cfg.method, ", ".join(ignored))
    return parse_budget(cfg.budget), fmt  # its errors name the budget


def budget_setting(budget: float) -> str:
    """A budget as the manifest's settings record it: ``k/255`` with ``k`` to 6 digits, however it was given
    (``8/255``, ``8`` and ``0.0313725`` all give ``8/255``)."""
    return f"{round(float(budget) * 255.0, 6):g}/255"


def normalized_settings(settings: dict) -> dict:
    """A run's settings (:func:`run_settings`, or an earlier manifest's) in the one form that compares equal when
    the outputs would be equal: the budget as parsed and printed ``k/255`` (:func:`budget_setting`), the format in
    lower case (``jpg`` = ``jpeg``), and only what the method uses: ``personalization`` for the surrogate methods
    (:data:`SURROGATE_METHODS`), ``rho_path`` for LDU, ``steps``/``pgd_alpha``/``eot`` for the pixel methods,
    ``jpeg_quality`` for JPEG output. So a manifest written before this form still resumes when it agrees."""
    from apdm.protect_images.budget import parse_budget

    out = json.loads(json.dumps(settings, default=str))
    method = out.get("method")
    try:
        out["budget"] = budget_setting(parse_budget(out["budget"]))
    except (KeyError, ValueError):
        pass
    if isinstance(out.get("format"), str):
        out["format"] = output_format(out["format"])
    drop = [] if method in SURROGATE_METHODS else ["personalization"]
    drop += list(PIXEL_OPTIONS) if method == "ldu" else ["rho_path"]
    drop += [] if out.get("format") == "jpeg" else ["jpeg_quality"]
    for key in drop:
        out.pop(key, None)
    return out


def run_settings(cfg: ProtectImagesRunConfig, sd, rho_dir: Path | None = None) -> dict:
    """Everything that decides what protection a file gets, for resuming: the config without where the photos come
    from (``input``, ``recursive``), where they go, how loud the run is, which device runs it and how many photos
    go per batch (lowering ``batch_size`` is the cure for running out of memory, so a resumed run may change it;
    its new groups then differ from an uninterrupted run's) and where MetaCloak keeps its pool (also a memory
    setting, with the same outputs), plus the model's fingerprint and the hashes of the files the config names (ρ's
    weights, PhotoGuard's target), so retraining ρ into the same folder or editing the target is a change of
    settings; in the form of :func:`normalized_settings` (what the method does not use left out)."""
    settings = dataclasses.asdict(cfg)
    for key in ("input", "output_dir", "recursive", "quiet", "resume", "batch_size", "metacloak_pool_device"):
        settings.pop(key)
    from apdm.protect_images.baselines import METHOD_OPTIONS

    for key, (method, _, _) in METHOD_OPTIONS.items():  # one method's option
        if cfg.method != method:
            settings.pop(key, None)
    settings["model"].pop("device")
    settings["model_fingerprint"] = sd.fingerprint()
    if cfg.method == "ldu":
        from apdm.protect_images.ldu import RHO_WEIGHTS, rho_folder

        settings["rho_sha256"] = file_sha256((rho_dir or rho_folder(cfg.rho_path)) / RHO_WEIGHTS)
    if cfg.target:
        settings["target_sha256"] = file_sha256(cfg.target)
    return normalized_settings(settings)  # the form it takes in manifest.json


_UNSET = object()


def setting_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """What differs between an earlier run's settings and this one's (both :func:`normalized_settings`), one
    ``key OLD before, NEW now`` each, a nested setting by its dotted key (``personalization.steps``), sorted. The
    budget reads ``k/255`` as the settings record it (``8/255`` before, ``8.007/255`` now for ``--budget 0.0314``);
    a setting one of them lacks reads ``not set`` (and a group of settings the other has, ``set``)."""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            changes += setting_changes(a, b, f"{prefix}{key}.")
            continue
        shown = ["not set" if v is _UNSET else "set" if isinstance(v, dict) else "''" if v == "" else _shown(v)
                 for v in (a, b)]
        changes.append(f"{prefix}{key} {shown[0]} before, {shown[1]} now")
    return changes


def _compared(settings: dict) -> dict:
    """The settings a resume compares: LDU's ρ is the hash of its weights (``rho_sha256``), not the path it was
    named by (``rho_path=toy`` and ``assets/toy/rho`` are one ρ; the manifest still records the path)."""
    return {k: v for k, v in settings.items() if not (k == "rho_path" and "rho_sha256" in settings)}


def _previous_run(out: Path, settings: dict, resume: bool) -> tuple[dict, float]:
    """What an earlier run left in ``out``: ``({real input path: manifest entry}, seconds it took)``.

    Raises:
        ValueError: ``out/manifest.json`` was written with other settings (and ``resume`` is on): mixing two
            protections in one folder is refused, naming what differs.
    """
    path = out / "manifest.json"
    if not resume or not path.is_file():
        return {}, 0.0
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        old = normalized_settings(manifest["settings"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{path} exists but cannot be resumed from ({exc.__class__.__name__}: it was not written "
                         f"by this version of `apdm protect-images`); choose another output folder, or pass "
                         f"resume=false to protect every photo again into this one") from exc
    old, now = _compared(old), _compared(settings)
    if old != now:
        keys = sorted(k for k in set(old) | set(now) if old.get(k) != now.get(k))
        raise ValueError(f"{path} was written with other settings (differing: {', '.join(keys)}): "
                         f"{'; '.join(setting_changes(old, now))}. Choose another output folder, or pass "
                         f"resume=false to protect every photo again into this one")
    entries = {os.path.realpath(e["input"]): e for e in manifest.get("images", [])}
    return entries, float(manifest.get("seconds_total", 0.0))


def manifest_output(entry: dict, folder: Path) -> Path:
    """A manifest entry's output file inside the output ``folder`` it was read from, so a moved folder still resumes
    and still pairs: through the entry's path relative to the folder (``file``), else, in manifests written before
    ``file`` (and ``recursive=true``) existed, whose outputs all lie directly in the folder, through the recorded
    output's name. The one reading of a manifest's outputs, for resuming here and for evaluate's pairing
    (:func:`apdm.evaluation.run.protected_pairs`)."""
    return folder / entry["file"] if "file" in entry else folder / Path(entry["output"]).name


def usable_output(path: Path) -> bool:
    """Whether an earlier run's output file is there and whole: not empty, and its image data readable (a PNG's
    chunks and checksums; other formats decoded at reduced size). A missing, emptied or cut-short output is not, and
    its photo is protected again."""
    from PIL import Image

    try:
        if not path.is_file() or path.stat().st_size == 0:
            return False
        with Image.open(path, formats=["PNG", "JPEG"]) as im:  # apdm writes only these
            if im.format == "PNG":
                im.verify()
            else:
                im.draft(im.mode, (1, 1))
                im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        return False
    return True


def _match_previous(paths: list[Path], previous: dict[str, dict], out: Path):
    """Split this run's inputs against an earlier run's manifest entries (``{real input path: entry}``).

    An input is *done* when an entry with its bytes (SHA-256) has a usable output (:func:`usable_output`): found by
    its path, or by its content alone when the input folder has moved (each entry is claimed once, so duplicate
    photos each get their own output). Every input's own entry (its exact path, its bytes) is claimed first, and
    only then are the others matched by content, so a copy of a photo added since (``0copy.png`` beside ``a.png``)
    gets an output of its own instead of taking over ``a.png``'s. An input whose entry no longer matches (edited
    since, or its output deleted, emptied or damaged) is protected again into the same file. An input that cannot
    be read to be hashed (permission denied, gone since it was listed) goes the way of a fresh run: the loader
    reports it and it is skipped (its earlier entry, if any, stays in the manifest with the others).

    Returns:
        ``(done, todo, dest_of, others, sha_of)``: ``{real path: entry}`` of the kept photos (with ``input``
        updated), the paths to protect, ``{real path: output Path}`` for those to write over their earlier output,
        the entries of earlier inputs not in this run whose files still exist (kept in the manifest), and
        ``{real path: SHA-256}`` of the inputs hashed here (all of them when there is an earlier run, else none).
    """
    by_content = {}
    for e in previous.values():
        by_content.setdefault(e.get("input_sha256"), []).append(e)
    usable: dict[int, bool] = {}

    def ok(e: dict) -> bool:  # each output checked once
        if id(e) not in usable:
            usable[id(e)] = usable_output(manifest_output(e, out))
        return usable[id(e)]
    claimed: set[int] = set()
    done, todo, dest_of, sha_of = {}, [], {}, {}
    reals = [os.path.realpath(p) for p in paths]
    for p, real in zip(paths, reals):
        if previous:
            sha = _sha256_or_none(p)
            if sha is not None:
                sha_of[real] = sha
    kept: dict[str, dict] = {}  # real path -> the entry it keeps
    for real in reals:  # first every input's own entry: same path, same bytes, usable output
        entry, sha = previous.get(real), sha_of.get(real)
        if entry is not None and sha is not None and entry.get("input_sha256") == sha and ok(entry):
            kept[real] = entry
            claimed.add(id(entry))
    for p, real in zip(paths, reals):
        if real in kept:
            continue
        sha = sha_of.get(real)
        if sha is None:  # no earlier run, or unreadable: the loader reports it, as in a fresh run
            todo.append(p)
            continue
        own = previous.get(real)
        own = own if own is not None and id(own) not in claimed else None
        if own is None or own.get("input_sha256") != sha:  # moved here, or edited: an unclaimed entry of its bytes
            moved = [e for e in by_content.get(sha, []) if id(e) not in claimed and ok(e)]
            if moved:
                kept[real] = moved[0]
                claimed.add(id(moved[0]))
                continue
        if own is not None:  # edited since, or its output damaged: protected again into the same file
            claimed.add(id(own))
            dest_of[real] = manifest_output(own, out)
        todo.append(p)
    for p, real in zip(paths, reals):
        if real in kept:
            done[real] = {**kept[real], "input": str(p), "output": str(manifest_output(kept[real], out))}
    others = [{**e, "output": str(manifest_output(e, out))} for e in previous.values()
              if id(e) not in claimed and ok(e)]
    return done, todo, dest_of, others, sha_of


def _sha256_or_none(path: Path) -> str | None:
    """The file's SHA-256, or None when it cannot be read (the loader then says why)."""
    try:
        return file_sha256(path)
    except OSError as exc:
        LOG.debug("%s: cannot be hashed (%s)", path, exc)
        return None


def _groups(paths: list[Path], batch_size: int, errors: list[dict]):
    """Load ``paths`` lazily, ``batch_size`` readable photos at a time (so a folder of any size needs memory for one
    group only); unreadable files are logged, appended to ``errors`` and left out of the groups."""
    from apdm.core.images import ImageLoadError, load_image

    group = []
    for p in paths:
        try:
            group.append(load_image(p))
        except ImageLoadError as exc:
            LOG.warning("skipping %s", exc)
            errors.append({"input": str(p), "error": exc.reason})
            continue
        if len(group) == batch_size:
            yield group
            group = []
    if group:
        yield group


def _manifest_outputs(out: Path) -> set[str]:
    """The real paths of the outputs ``out``'s ``manifest.json`` lists, whatever settings made them (empty without a
    readable manifest)."""
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
        return {os.path.realpath(manifest_output(e, out)) for e in manifest.get("images", [])}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()


def _inputs_outside_outputs(paths: list[Path], out: Path, suffix: str, fmt: str, spec: str | list[str],
                            outputs: set[str] | None = None) -> list[Path]:
    """``paths`` without this command's outputs. An output folder strictly inside an input folder (one that ``spec``
    names, or the folder of a glob, up to its first wildcard, or of a file it names) is never read as input: every
    file in it is left out, suffix or not. Otherwise, with a ``suffix``, the output folder may hold inputs (be the
    input folder, or a folder above it): only the files in it that are this command's outputs are left out, those
    listed in its ``manifest.json`` and those named ``<stem><suffix>.<ext>`` (or ``<stem><suffix>-<n>.<ext>``) in
    the output format. Without one, every file inside the output folder is left out. ``outputs``: the manifest's
    outputs (:func:`_manifest_outputs`) when the caller has read them already.

    Raises:
        ValueError: no input is left.
    """
    import glob

    from apdm.core.images import FORMATS

    inside = os.path.realpath(out) + os.sep
    within = [p for p in paths if os.path.realpath(p).startswith(inside)]
    if not within:
        return paths
    roots = set()  # the folders spec names: each folder, each glob's (up to its first wildcard), each file's
    for entry in [spec] if isinstance(spec, str) else spec:
        text = os.path.expanduser(entry.strip())
        if not text:
            continue
        root = Path(text)
        if glob.has_magic(text) and not root.exists():  # "Trip [2024]/" names a folder, not a glob
            parts = root.parts[:next((i for i, part in enumerate(root.parts) if glob.has_magic(part)), None)]
            root = Path(*parts) if parts else Path(".")
        elif not root.is_dir():
            root = root.parent
        roots.add(os.path.realpath(root))
    nested = any(inside.startswith(root.rstrip(os.sep) + os.sep) and inside != root.rstrip(os.sep) + os.sep
                 for root in roots)  # strictly below an input folder
    relaxed = bool(suffix) and not nested
    if relaxed:
        if outputs is None:  # none (no readable manifest): the names alone tell the outputs
            outputs = _manifest_outputs(out)
        named = re.compile(rf".+{re.escape(suffix)}(-\d+)?{re.escape(FORMATS[fmt])}")
        within = [p for p in within if os.path.realpath(p) in outputs or named.fullmatch(Path(p).name)]
        if within:
            LOG.info("leaving out %d file(s) in the output folder %s that are this command's outputs (named "
                     "*%s%s or listed in its manifest.json)", len(within), out, suffix, FORMATS[fmt])
    else:
        LOG.info("leaving out %d file(s) inside the output folder %s", len(within), out)
    left = set(map(id, within))
    kept = [p for p in paths if id(p) not in left]
    if not kept:
        if relaxed:
            raise ValueError(f"every input file in {out} is an output of this command (named *{suffix}"
                             f"{FORMATS[fmt]} or listed in its manifest.json): nothing to protect")
        if nested:
            raise ValueError(f"every input file is inside the output folder {out}, which lies inside an input folder "
                             f"(its files are never read as input); choose another --output, or name {out} itself "
                             f"as the input")
        raise ValueError(f"every input file is inside the output folder {out}; choose another --output, or pass a "
                         f"suffix (e.g. suffix=_protected) to write the protected copies into the input folder")
    return kept


def run(cfg: ProtectImagesRunConfig) -> dict:
    """Protect every image of ``cfg.input`` into ``cfg.output_dir``; write ``manifest.json``.

    Photos are loaded one group (``batch_size``) at a time. ``manifest.json`` is rewritten (atomically) after every
    group with ``"complete": false`` until the last one, so a killed run leaves a record of what is done, and a
    rerun with the same settings (``resume``, default on; :func:`normalized_settings`) skips every photo the
    manifest lists whose input bytes are unchanged and whose output file is usable (:func:`usable_output`). Each
    group starts from ``seed``, so a resumed run writes the same files as an uninterrupted one.

    Returns:
        the manifest dict (method, budget, skipped files, and per image PSNR/SSIM/L∞, whether it is within the
        budget, measured on the file as written (decoded again, so a JPEG's re-compression counts) against the
        original at the precision it was read (``bit_depth``), its time, and ``unchanged`` with the reason when the
        saved photo equals the original rounded to 8 bits).

    Raises:
        NothingProtected: input files were found but every one was skipped and none was protected before (the
            manifest is written first; the command exits with status 1).
    """
    from apdm.core.images import (
        JPEG_WARNING,
        ImageLoadError,
        list_images,
        load_image,
        output_metadata,
        protect_output_path,
        save_image,
        split_spec,
        to_model_resolution,
    )
    from apdm.core.models import load_sd, warn_if_untrained
    from apdm.protect_images.budget import (
        apply_delta_to_original,
        budget_levels,
        budget_report,
        format_budget,
        to_uint8,
    )

    budget, fmt = check_protect_config(cfg)  # every option checked before any model loads
    target = None
    if cfg.target:  # checked before the model loads
        if cfg.method not in TARGET_METHODS:
            raise ValueError(f"target={cfg.target}: a target image is used by methods {', '.join(TARGET_METHODS)} "
                             f"only, not {cfg.method}")
        try:
            target = load_image(cfg.target).pixels
        except ImageLoadError as exc:
            raise ValueError(f"{cfg.method} target: {exc}") from exc
    rho_dir = None
    if cfg.method == "ldu":  # a missing ρ folder is named before the model loads; resolved once for the run
        from apdm.protect_images.ldu import rho_folder

        rho_dir = rho_folder(cfg.rho_path)
    if fmt == "jpeg":
        LOG.warning(JPEG_WARNING)
    out = Path(cfg.output_dir).expanduser()
    spec = split_spec(cfg.input)
    listed = list_images(spec, recursive=cfg.recursive)
    manifest_outputs = _manifest_outputs(out)  # read once, for both uses
    paths = _inputs_outside_outputs(listed, out, cfg.suffix, fmt, spec, manifest_outputs)
    # a file left out as an output (by its name or place) that no manifest of this folder lists may be the user's own
    # photo (a.jpg's output a_p.png next to a photo already named a_p.png): never written over, a new name is taken
    never_written = {os.path.realpath(p) for p in listed} - {os.path.realpath(p) for p in paths} - manifest_outputs
    one = spec if isinstance(spec, str) else spec[0] if len(spec) == 1 else ""  # "photos/," is photos/ too
    root = Path(os.path.expanduser(one.strip())) if one.strip() else None
    root = root if cfg.recursive and root is not None and root.is_dir() else None

    def dest_folder(photo: Path) -> Path:  # with recursive=true the sub-folder structure is kept
        return out / os.path.relpath(photo.parent, root) if root is not None else out
    warn_if_untrained(cfg.model.path, "the protected photos will protect against no real model")
    sd = load_sd(cfg.model.path, cfg.model.device, cfg.model.dtype, cfg.model.revision)
    rho = None
    if cfg.method == "ldu":
        from apdm.protect_images import ldu

        rho = ldu.load_rho(rho_dir, device=sd.device)
        ldu.check_rho_fits(rho, sd, budget, where=cfg.rho_path)
    settings = run_settings(cfg, sd, rho_dir)
    previous, seconds_before = _previous_run(out, settings, cfg.resume)
    out.mkdir(parents=True, exist_ok=True)

    # photos already protected with these settings are kept; the others get an output name in input order
    done, todo, dest_of, others, sha_of = _match_previous(paths, previous, out)
    taken = ({os.path.realpath(p) for p in paths} | never_written
             | {os.path.realpath(manifest_output(e, out)) for e in previous.values()})
    if done:
        LOG.info("resuming: %d of %d photo(s) are already protected in %s with these settings; protecting the "
                 "other %d", len(done), len(paths), out, len(todo))
    LOG.info("protecting %d file(s) with %s at budget %s (model %s)", len(todo), cfg.method,
             format_budget(budget), sd.source)

    extra = _method_kwargs(cfg, sd, target) if cfg.method != "ldu" and todo else {}
    new: dict[str, dict] = {}  # real input path -> entry, for the photos protected in this run
    errors: list[dict] = []
    size = sd.resolution
    t_all = time.perf_counter()

    def write_manifest(complete: bool) -> dict:
        seconds = seconds_before + time.perf_counter() - t_all
        ordered = [done.get(os.path.realpath(p)) or new.get(os.path.realpath(p)) for p in paths]
        images = [e for e in ordered if e is not None] + others
        manifest = {
            "method": cfg.method, "budget": format_budget(budget), "budget_float": budget, "model": sd.source,
            **({"target": cfg.target or "flat gray (0.5)"} if cfg.method in TARGET_METHODS else {}),
            "device": str(sd.device), "format": fmt, "metadata": "EXIF kept" if cfg.keep_exif else
            ("all stripped" if cfg.strip_metadata else "EXIF stripped, ICC profile kept"),
            "complete": complete, "num_protected": len(images), "num_failed": len(errors),
            "num_resumed": len(done), "summary": closeness_summary(images), "images": images, "failed": errors,
            "seconds_total": round(seconds, 2),
            "seconds_per_image": round(seconds / max(1, len(images)), 3),
            "peak_rss_mb": round(peak_rss_mb(), 1), "settings": settings, "config": to_yaml(cfg),
        }
        atomic_write_json(out / "manifest.json", manifest)
        return manifest

    bar = progress(total=len(todo), desc=f"protect-images ({cfg.method})", unit="photo", disable=cfg.quiet)
    for group in _groups(todo, cfg.batch_size, errors):
        seed_everything(cfg.seed)  # each group as if it were the run's first: resuming changes no pixel
        t0 = time.perf_counter()
        deltas = {}
        for shape, members in group_shapes([im.size for im in group], size, sd.size_multiple, cfg.resolution_policy,
                                           joint=cfg.method in JOINT_METHODS):
            clean = torch.stack([to_model_resolution(group[i].pixels, shape) for i in members]).to(sd.device)
            try:
                protected = protect_batch(sd, clean, cfg, budget, rho, extra)
            except torch.OutOfMemoryError as exc:
                raise RuntimeError(
                    f"protect-images: out of memory protecting {len(members)} photo(s) at {shape[0]}x{shape[1]} px "
                    f"with {cfg.method} on {sd.device}; lower batch_size (now {cfg.batch_size}) and run the same "
                    f"command again: the {len(done) + len(new)} photo(s) already protected in {out} are kept") from exc
            deltas.update({i: (p - c).cpu() for i, p, c in zip(members, protected, clean)})
            del clean, protected
        per_image = (time.perf_counter() - t0) / len(group)
        for i, im in enumerate(group):
            delta = deltas[i]
            if is_grey(im.pixels):  # a grey photo gets a grey perturbation: no colour noise on it
                delta = delta.mean(0, keepdim=True).expand_as(delta).contiguous()
            final = apply_delta_to_original(im.pixels, delta, budget)
            real = os.path.realpath(im.path)
            dest = dest_of.get(real) or protect_output_path(im.path, dest_folder(im.path), cfg.suffix, fmt, taken)
            save_image(final, dest, format=fmt, quality=cfg.jpeg_quality, alpha=im.alpha, source=im.path,
                       **output_metadata(im, cfg.keep_exif, cfg.strip_metadata))
            # measured on the file as written (a JPEG is not what was encoded), against the original as read
            report = budget_report(im.pixels, load_image(dest).pixels, budget)
            entry = {"input": str(im.path), "output": str(dest), "file": Path(os.path.relpath(dest, out)).as_posix(),
                     "input_sha256": sha_of.get(real) or _sha256_or_none(im.path),  # hashed once
                     "size_hw": list(im.size), "mode": im.mode, "bit_depth": im.bit_depth,
                     "seconds": round(per_image, 3), **report}
            if budget_levels(budget) and torch.equal(to_uint8(final), to_uint8(im.pixels)):
                h, w = delta.shape[-2:]
                small = im.size[0] < h and im.size[1] < w
                entry["unchanged"] = (f"the perturbation, computed at {h}x{w} px and shrunk to the photo's "
                                      f"{im.size[0]}x{im.size[1]} px (height x width), rounds to nothing: too small "
                                      f"a photo to carry one" if small else
                                      f"{cfg.method}'s perturbation rounds to less than one grey level everywhere")
                LOG.warning("%s: saved unchanged (rounded to 8 bits): %s", im.path, entry["unchanged"])
            new[real] = entry
        write_manifest(complete=False)
        bar.update(len(new) + len(errors) - bar.n)  # unreadable files count as handled
        del group, deltas
    bar.close()
    manifest = write_manifest(complete=True)
    summary = manifest["summary"]
    if summary["num"]:
        over = "" if summary["all_within_budget"] else " -- OVER BUDGET, see manifest.json" + (
            " (JPEG re-compression changes the saved pixels by more than the budget; PNG keeps it)"
            if fmt == "jpeg" else "")
        small = (f"; {summary['num_unchanged']} of them saved unchanged (see their 'unchanged' note)"
                 if summary["num_unchanged"] else "")
        LOG.info("all %d: PSNR %s dB mean, %s dB lowest; SSIM %s lowest; largest change %s/255 (budget %s)%s%s",
                 summary["num"], summary["psnr_mean@apdm"], summary["psnr_min@apdm"], summary["ssim_min@skimage"],
                 summary["linf_255_max@apdm"], format_budget(budget), small, over)
    if errors and not new and not done:  # files were found, and not one of them has a protected copy
        raise NothingProtected(manifest, out, errors)
    # the last line: where the photos are
    LOG.info("protected %d image(s) into %s (%d already there, %d skipped); manifest.json written", len(new), out,
             len(done), len(errors))
    return manifest


class NothingProtected(RuntimeError):
    """``apdm protect-images`` found input files but protected none of them, and none was protected before: every
    one was skipped (unreadable, a camera RAW file, a HEIC without pillow-heif, ...). ``manifest.json`` is written
    first, listing them under ``failed`` (``.manifest`` holds it); the command exits with status 1."""

    def __init__(self, manifest: dict, out: Path, errors: list[dict]):
        self.manifest = manifest
        named = "; ".join(f"{Path(e['input']).name}: {e['error']}" for e in errors[:3])
        more = f"; and {len(errors) - 3} more" if len(errors) > 3 else ""
        super().__init__(f"no photo protected: all {len(errors)} input file(s) were skipped ({named}{more}); "
                         f"{out / 'manifest.json'} lists them under 'failed'")


def check_train_config(cfg: TrainPerturberRunConfig) -> float:
    """Raise ValueError naming the ``apdm train-perturber`` key whose value is out of range (before any model
    loads); returns the budget as an L∞ radius on [0, 1]."""
    from apdm.personalization.simulator import check_personalization
    from apdm.protect_images.budget import parse_budget

    if not str(cfg.data).strip():  # it read the current folder, and trained on whatever sub-folders it held
        raise ValueError("set data=FOLDER: one sub-folder of photos per training identity (never the people you "
                         "will protect)")
    per = cfg.personalization
    check_personalization(per)  # the anchors' personalization
    for key, value, low in (("steps", cfg.steps, 1), ("batch_size", cfg.batch_size, 1),
                            ("anchor_steps", cfg.anchor_steps, 0), ("denoise_steps", cfg.denoise_steps, 1),
                            ("width", cfg.width, 1), ("checkpoint_every", cfg.checkpoint_every, 0),
                            ("personalization.batch_size", per.batch_size, 1),
                            # the anchors train anchor_steps steps, or personalization.steps when it is 0
                            ("personalization.steps" if not cfg.anchor_steps else "anchor_steps",
                             cfg.anchor_steps or per.steps, 1)):
        if isinstance(value, bool) or int(value) != value or value < low:
            why = " (the anchors' steps when anchor_steps is 0)" if key == "personalization.steps" else ""
            raise ValueError(f"{key} must be a whole number >= {low}{why}, got {value}")
    for key, value in (("learning_rate", cfg.learning_rate), ("personalization.learning_rate", per.learning_rate)):
        if not value > 0:  # also refuses NaN
            raise ValueError(f"{key} must be > 0, got {value}")
    for key, value in (("lambda_init", cfg.lambda_init), ("lambda_step", cfg.lambda_step), ("min_psnr", cfg.min_psnr)):
        if not value >= 0:
            raise ValueError(f"{key} must be >= 0, got {value}")
    if not 0 <= cfg.shuffle_prob <= 1:
        raise ValueError(f"shuffle_prob must be in [0, 1], got {cfg.shuffle_prob}")
    check_eot(cfg.eot)
    return parse_budget(cfg.budget)  # its errors name the budget


def check_eot(eot) -> None:
    """Refuse an ``eot=`` (protect-images' PGD, train-perturber's training augmentations) that names a transform
    :data:`apdm.protect_images.pgd.EOT_TRANSFORMS` lacks, naming it and the choices."""
    from apdm.protect_images.pgd import EOT_TRANSFORMS

    eot = [eot] if isinstance(eot, str) else list(eot or [])
    for name in eot:
        if name not in EOT_TRANSFORMS:
            raise ValueError(f"eot={_shown(eot)}: unknown transform '{name}'; choose from "
                             f"{', '.join(EOT_TRANSFORMS)}")


def identity_folders(root: Path, output_dir: Path) -> list[Path]:
    """The sub-folders of ``root`` (sorted by name) that hold image files: one per identity. Hidden folders and
    ``output_dir`` (when it lies in ``root``) are left out; a folder without image files is skipped with a warning.

    Raises:
        ValueError: no sub-folder holds an image file.
    """
    from apdm.core.images import list_images

    out = output_dir.resolve()
    found, skipped = [], []
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        if sub.name.startswith("."):
            continue
        if sub.resolve() == out:
            LOG.info("train-perturber: %s is the output folder (output_dir), not an identity", sub)
            continue
        try:
            list_images(sub)
        except FileNotFoundError:
            LOG.warning("train-perturber: skipped %s: no photos in it", sub)
            skipped.append(sub.name)
            continue
        found.append(sub)
    if not found:
        try:
            loose = len(list_images(root))  # photos directly in the folder are not an identity's
        except FileNotFoundError:
            loose = 0
        raise ValueError(f"{root}: expected one sub-folder of photos per identity, found none with photos"
                         + (f" (skipped: {', '.join(skipped)})" if skipped else "")
                         + (f"; its {loose} photo(s) directly in it are not read: put each identity's photos in a "
                            f"sub-folder of its own" if loose else ""))
    return found


def train(cfg: TrainPerturberRunConfig) -> dict:
    """Train ρ on ``cfg.data`` (one sub-folder per identity; hidden folders, folders without photos and
    ``cfg.output_dir`` are skipped) and save it to ``cfg.output_dir``: ``rho.safetensors`` and ``rho.json``, then
    ``train_config.yaml`` (the settings it was trained with, written only once it is, so a refused or interrupted
    training leaves an earlier ρ's record as it was) and ``train_log.json``, whose ``seconds`` add up every session
    of a resumed training (each checkpoint records the time spent until it; ``seconds_this_session`` is the last
    one's, and ``seconds_note`` says when a checkpoint from before apdm recorded it leaves the earlier time out)."""
    from apdm.core.images import list_images, load_images
    from apdm.core.models import load_sd, warn_if_untrained
    from apdm.personalization.simulator import class_images_for
    from apdm.protect_images import ldu

    budget = check_train_config(cfg)
    root = Path(cfg.data).expanduser()
    if root.is_file():
        raise FileNotFoundError(f"data={cfg.data} is a file, not a folder: give the folder holding one sub-folder of "
                                f"photos per identity")
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    folders = identity_folders(root, Path(cfg.output_dir).expanduser())
    warn_if_untrained(cfg.model.path, "the trained perturbation network will protect against no real model")
    sd = load_sd(cfg.model.path, cfg.model.device, cfg.model.dtype, cfg.model.revision)
    identities, unusable = {}, []
    for sub in folders:
        images, ok, errors = load_images(list_images(sub), size=sd.resolution)
        for e in errors:
            LOG.warning("skipped %s: %s", e["path"], e["error"])
        if ok:
            identities[sub.name] = images.to(sd.device)
        else:
            LOG.warning("train-perturber: skipped %s: none of its photos could be read", sub)
            unusable.append(sub.name)
    if not identities:
        raise ValueError(f"{root}: expected one sub-folder of photos per identity, found none with usable photos "
                         f"(unreadable: {', '.join(unusable)})")
    out = Path(cfg.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint"
    if not cfg.resume and ckpt.exists():
        shutil.rmtree(ckpt)
    LOG.info("training the LDU perturbation network on %d identities for %d steps", len(identities), cfg.steps)
    history: list[dict] = []
    timing: dict = {}
    t0 = time.perf_counter()
    class_images = class_images_for(sd, cfg.personalization, quiet=cfg.quiet)  # None unless the anchors need them
    rho = ldu.train_perturber(
        sd, identities, budget=budget, steps=cfg.steps, learning_rate=cfg.learning_rate,
        batch_size=cfg.batch_size, personalization=cfg.personalization, anchor_steps=cfg.anchor_steps or None,
        class_images=class_images, shuffle_prob=cfg.shuffle_prob, lambda_init=cfg.lambda_init,
        lambda_step=cfg.lambda_step, min_psnr=cfg.min_psnr or None, denoise_steps=cfg.denoise_steps,
        width=cfg.width, seed=cfg.seed, quiet=cfg.quiet, history=history, checkpoint_dir=ckpt,
        checkpoint_every=cfg.checkpoint_every, eot=cfg.eot, timing=timing)
    ldu.save_rho(rho, out)
    atomic_write_text(out / "train_config.yaml", to_yaml(cfg))  # the settings of the ρ now beside it
    shutil.rmtree(ckpt, ignore_errors=True)
    session = time.perf_counter() - t0
    before = timing.get("seconds_before", 0.0)
    summary = {"seconds": round(session + (before or 0.0), 1), "identities": list(identities),
               "parameters": ldu.count_parameters(rho), "history": history}
    if timing.get("resumed_at"):
        summary["seconds_this_session"] = round(session, 1)
        if before is None:
            summary["seconds_note"] = (f"resumed at step {timing['resumed_at']} from a checkpoint written before apdm "
                                       f"recorded the time spent: 'seconds' leaves out the earlier sessions' time")
    atomic_write_json(out / "train_log.json", summary)
    LOG.info("perturbation network written to %s (%.0f s); protect photos with it: apdm protect-images --method ldu "
             "--rho %s --model %s ...", out, summary["seconds"], out, cfg.model.path)
    return summary
