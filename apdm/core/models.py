"""Loading, building and saving Stable-Diffusion-format models.

:class:`SD` bundles the five components every engine needs (UNet, VAE, text encoder, tokenizer and the
*training* noise scheduler). It is a plain container: engines read ``sd.unet`` etc. and call the math in
:mod:`apdm.core.diffusion`. ``sd.pipeline()`` gives a diffusers ``StableDiffusionPipeline`` sharing the same
modules, and ``save_sd`` writes a directory that plain ``StableDiffusionPipeline.from_pretrained`` loads.

Model sources (``load_sd(path)``):
    * a local diffusers directory (``model_index.json``, safetensors weights) of SD 1.x/2.x — the normal case;
    * a hub id such as ``stable-diffusion-v1-5/stable-diffusion-v1-5`` — works with network or a warm HF cache; offline it
      fails with a message saying weights must be a local path;
    * ``tiny`` — :func:`tiny_sd`, a random-weight pipeline of real diffusers/transformers classes (tests, smoke);
    * ``toy`` — the toy-world model (``apdm.toy``), from the cache or ``assets/``;
    * ``random:sd15`` / ``random:sd21base`` — the real architecture with random weights (:func:`random_sd`): no
      download, no meaning, but the true sizes, so speed and memory of real-size runs can be measured anywhere.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from apdm.utils import LOG, select_device, select_dtype


class ModelLoadError(RuntimeError):
    """A model path/id could not be loaded; the message says why and what to do."""


@dataclass
class SD:
    """A Stable Diffusion model as its components.

    Attributes:
        unet: ``UNet2DConditionModel``; predicts noise (or v) for scaled latents (N,4,h,w).
        vae: ``AutoencoderKL``; images in [-1,1] <-> latents (scaled by ``vae.config.scaling_factor``).
        text_encoder: ``CLIPTextModel``; token ids (N,L) -> hidden states (N,L,D).
        tokenizer: ``CLIPTokenizer``.
        noise_scheduler: ``DDPMScheduler`` holding the training noise schedule (``alphas_cumprod``,
            ``prediction_type``); the samplers in :mod:`apdm.core.diffusion` derive everything from it.
        device: where the modules live.
        dtype: dtype of the frozen weights (trainable copies are kept in fp32 by the engines).
        source: where it was loaded from (path, hub id, ``tiny``), recorded in outputs.
    """

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    noise_scheduler: Any
    device: torch.device
    dtype: torch.dtype
    source: str = ""

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (8 for SD)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Native image resolution in pixels (512 for SD-1.5, 64 for the toy world)."""
        return int(self.unet.config.sample_size) * self.vae_scale_factor

    @property
    def size_multiple(self) -> int:
        """Image sides the model takes are multiples of this (pixels per latent cell × the UNet's downsampling:
        64 for SD, 16 for the toy world)."""
        return self.vae_scale_factor * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def pipeline(self, scheduler: str = "ddim"):
        """A diffusers ``StableDiffusionPipeline`` sharing these modules (no copies)."""
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(
            vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer, unet=self.unet,
            scheduler=make_scheduler(self.noise_scheduler, scheduler), safety_checker=None,
            feature_extractor=None, requires_safety_checker=False,
        )

    def clone(self, unet: bool = True, text_encoder: bool = False) -> "SD":
        """A copy sharing the frozen parts; ``unet``/``text_encoder`` (and tokenizer) deep-copied on request."""
        return SD(
            unet=copy.deepcopy(self.unet) if unet else self.unet,
            vae=self.vae,
            text_encoder=copy.deepcopy(self.text_encoder) if text_encoder else self.text_encoder,
            tokenizer=copy.deepcopy(self.tokenizer) if text_encoder else self.tokenizer,
            noise_scheduler=self.noise_scheduler,
            device=self.device, dtype=self.dtype, source=self.source,
        )

    def fingerprint(self) -> str:
        """A short hash of the model's identity (UNet config + a few weights), for cache keys and for checking that
        two benchmark results were measured on the same model.

        Where the model was loaded from is left out (the same weights in the repo's ``assets/`` and in the user
        cache are one model), and so are diffusers' bookkeeping keys (``_name_or_path``, ``_diffusers_version``,
        and ``_use_default_values``, whose order changes with the hash seed of the process).
        """
        h = hashlib.sha256()
        config = {k: v for k, v in self.unet.config.items() if not k.startswith("_")}
        h.update(json.dumps(config, sort_keys=True, default=str).encode())
        with torch.no_grad():
            for i, p in enumerate(self.unet.parameters()):
                if i % 20 == 0:
                    h.update(p.detach().float().flatten()[:64].cpu().numpy().tobytes())
        return h.hexdigest()[:16]

    def weights_digest(self) -> str:
        """A short SHA-256 of every weight of the UNet, the text encoder and the VAE (and the UNet config): the key
        of what the model generates (class images). :meth:`fingerprint` samples a few UNet weights only, so a
        protection that changed only the cross-attention, or only the text encoder, kept the unprotected model's
        fingerprint and reused its cached class images. Seconds on SD (2 GB read once)."""
        h = hashlib.sha256(self.fingerprint().encode())
        with torch.no_grad():
            for part in (self.unet, self.text_encoder, self.vae):
                for name, t in part.state_dict().items():
                    h.update(name.encode())
                    h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]


SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "dpmsolver": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
}


def make_scheduler(noise_scheduler, name: str):
    """A diffusers sampling scheduler of kind ``name`` with the same noise schedule as ``noise_scheduler``."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown sampler '{name}'; choose one of {', '.join(SCHEDULERS)}")
    return getattr(diffusers, SCHEDULERS[name]).from_config(noise_scheduler.config)


def _from_components(unet, vae, text_encoder, tokenizer, scheduler, device, dtype, source) -> SD:
    from diffusers import DDPMScheduler

    # latent SD never clips x̂_0 (diffusers' SD pipeline turns clip_sample off on the scheduler it is given): a config
    # without the key (an Euler one) left DDPM's default on, and the ddpm sampler clipped the latents to [-1, 1]
    noise_scheduler = DDPMScheduler.from_config(scheduler.config, clip_sample=False)
    for module in (unet, vae, text_encoder):
        module.to(device)
        if module.dtype != dtype:
            module.to(dtype=dtype)
        module.requires_grad_(False)
        module.eval()
    return SD(unet, vae, text_encoder, tokenizer, noise_scheduler, device, dtype, source)


def is_untrained(path: str) -> bool:
    """Whether a ``model.path`` names a random-weight pipeline (``tiny``, the default, or ``random:...``)."""
    return path == "tiny" or path.startswith("random:")


def warn_if_untrained(path: str, consequence: str) -> bool:
    """Warn (and return True) when ``path`` names a random-weight pipeline (:func:`is_untrained`), saying what that
    means for the command's output (``consequence``, e.g. "the protected photos will protect against no real
    model"): a user who forgets ``--model`` learns it from the log, not from an attacker."""
    if is_untrained(path):
        LOG.warning("model.path=%s is a random-weight pipeline for tests and timing: %s; name the model an attacker "
                    "would use (--model / model.path=)", path, consequence)
        return True
    return False


#: What apdm runs: the components it loads from a diffusers folder, and the message when a model is something else.
SUPPORTED = "apdm supports Stable Diffusion 1.x/2.x (a UNet on the VAE's latents, one CLIP text encoder)"
_REQUIRED = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
_WEIGHTED = ("unet", "vae", "text_encoder")
#: Optional pipeline components apdm never uses: passed as None, so they are neither required nor loaded.
_UNUSED = ("safety_checker", "feature_extractor", "image_encoder")
#: File endings of single-file checkpoints, and of the ones that are pickles.
_SINGLE_FILE = (".safetensors", ".sft", ".ckpt", ".pt", ".pth", ".bin")
_PICKLE = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
_HUB_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*/[A-Za-z0-9_][A-Za-z0-9_.-]*")


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{file}: could not read it as JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ModelLoadError(f"{file}: expected a JSON object, found {type(data).__name__}")
    return data


def _listed(index: dict, name: str) -> bool:
    """Whether ``model_index.json`` lists component ``name`` with a class (``[null, null]`` means absent)."""
    entry = index.get(name)
    return isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1] is not None


def _check_index(index: dict, name: str) -> None:
    """Refuse a pipeline that is not SD 1.x/2.x from its ``model_index.json`` alone (before any weight is read)."""
    cls = str(index.get("_class_name", "a pipeline"))
    if _listed(index, "text_encoder_2") or _listed(index, "tokenizer_2") or cls.startswith("StableDiffusionXL"):
        raise ModelLoadError(f"{name}: an SDXL pipeline (two text encoders): {SUPPORTED}")
    missing = [c for c in _REQUIRED if not _listed(index, c)]
    if missing:
        raise ModelLoadError(f"{name}: a {cls} whose model_index.json lists no {', '.join(missing)}: {SUPPORTED}")


def _check_unet(folder: Path, name: str) -> None:
    """Refuse a UNet that takes inputs apdm does not give it (extra input channels, extra conditioning)."""
    file = folder / "unet" / "config.json"
    if not file.is_file():
        return
    unet = _read_json(file)
    vae_file = folder / "vae" / "config.json"
    latent = _read_json(vae_file).get("latent_channels", 4) if vae_file.is_file() else 4
    channels = unet.get("in_channels", 4)
    if channels == 9 and latent == 4:
        raise ModelLoadError(f"{name}: an inpainting UNet (9 input channels: latents, mask and masked image): "
                             f"{SUPPORTED}")
    if channels != latent:
        raise ModelLoadError(f"{name}: a UNet with {channels} input channels for {latent} latent channels (an "
                             f"image-conditioned model such as InstructPix2Pix or an upscaler): {SUPPORTED}")
    for key, what in (("addition_embed_type", "extra SDXL-style conditioning"),
                      ("class_embed_type", "class or image-embedding conditioning, as in unCLIP")):
        if unet.get(key) is not None:
            raise ModelLoadError(f"{name}: a UNet with {key}={unet[key]!r} ({what}), which apdm does not feed: "
                                 f"{SUPPORTED}")


def _safetensors_variant(name: str) -> str | None:
    """The weight variant of a ``.safetensors`` file name (``"fp16"``), or None for the plain weights:
    diffusion_pytorch_model[-00001-of-00002][.fp16].safetensors, or the legacy .fp16-00001-of-00002 form."""
    parts = re.sub(r"-\d+-of-\d+", "", name[: -len(".safetensors")]).split(".")
    return parts[-1] if len(parts) > 1 else None


def _weight_files(component: Path) -> tuple[bool, set[str], list[str]]:
    """(non-variant safetensors present, variants of the safetensors present, pickle weight files) of a folder."""
    plain, variants, pickles = False, set(), []
    for f in sorted(component.iterdir()):
        if f.name.endswith(_PICKLE):
            pickles.append(f.name)
        elif f.name.endswith(".safetensors"):
            variant = _safetensors_variant(f.name)
            if variant is None:
                plain = True
            else:
                variants.add(variant)
    return plain, variants, pickles


def local_folder(path: str, revision: str | None = None) -> Path | None:
    """The local diffusers folder ``model.path`` loads from: the folder itself, the toy world's for ``toy``, the
    Hugging Face cache's snapshot for a hub id already downloaded (nothing is fetched); None for ``tiny`` /
    ``random:`` pipelines or a hub id not in the cache."""
    if is_untrained(path):
        return None
    if path == "toy":
        from apdm.toy import model_path

        return Path(model_path())
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if _looks_local(path):
        return None
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(path, revision=revision, local_files_only=True))
    except Exception:  # noqa: BLE001 (not in the cache, not a hub id, no huggingface_hub: nothing local)
        return None


def model_fingerprint(model) -> dict:
    """What identifies a model (a ``ModelConfig``) for a cache of results computed on it: its path, revision and
    dtype, and for a local folder each file's relative path, size and modification time (cheap for a 4 GB
    checkpoint; a model saved again into the same folder gets a new fingerprint, so no result computed on the old
    one is reused). The folder is the one :func:`load_sd` reads (:func:`local_folder`: ``~`` expanded, ``toy`` and a
    hub id already in the Hugging Face cache resolved), so ``~/m`` and its absolute path fingerprint alike, and a
    model saved again there is told apart. A folder of at most :data:`HASHED_FOLDER_BYTES` (the toy world's 18 MB)
    is fingerprinted by its files' contents (SHA-256) instead of their times, which a fresh checkout resets: its
    cached results then hold from one clone to the next. Used by evaluate's cells and protect-model's "already
    done"."""
    path = str(Path(model.path).expanduser()) if model.path.startswith("~") else model.path
    fp: dict = {"path": path, "revision": model.revision, "dtype": model.dtype}
    try:
        root = local_folder(model.path, model.revision)
    except FileNotFoundError:  # no toy model built: nothing to list (loading it says what to do)
        root = None
    if root is not None and root.is_dir():
        fp["files"] = folder_files(root)
    return fp


def folder_files(root: Path) -> list:
    """Each file of the folder ``root`` as ``[relative path, size, content digest or modification time]``, sorted:
    by content (SHA-256) when the folder holds at most :data:`HASHED_FOLDER_BYTES`, else by time (see
    :func:`model_fingerprint`, which it serves, as it serves the keys of attacks that load a model of their own and
    of evaluate's local metric models). ``root`` may be a single weights file: ``[[its name, size, digest or
    time]]``."""
    from apdm.utils import file_sha256

    root = Path(root)
    files = [root] if root.is_file() else [f for f in root.rglob("*") if f.is_file()]
    base = root.parent if root.is_file() else root
    small = sum(f.stat().st_size for f in files) <= HASHED_FOLDER_BYTES
    return sorted([f.relative_to(base).as_posix(), f.stat().st_size,
                   file_sha256(f)[:16] if small else f.stat().st_mtime_ns] for f in files)


#: local model folders up to this size are fingerprinted by content (:func:`model_fingerprint`), larger ones by
#: their files' sizes and times (reading 2-4 GB of SD on every evaluate run would cost seconds to minutes)
HASHED_FOLDER_BYTES = 64 << 20


def stored_dtype(path: str) -> torch.dtype | None:
    """The dtype a local diffusers folder stores its UNet weights in (read from the safetensors header, no tensor
    loaded; the plain files, else the ``fp16`` variant), or None for ``tiny``/``random:``/hub ids or when unreadable.
    A command that writes a model derived from ``path`` saves in this dtype, whatever dtype it computed in."""
    from safetensors import SafetensorError, safe_open

    unet = Path(path).expanduser() / "unet"
    if not unet.is_dir():
        return None
    files = sorted(unet.glob("*.safetensors"), key=lambda f: (".fp16." in f.name, f.name))
    names = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
    for f in files[:1]:
        try:
            with safe_open(str(f), framework="pt") as h:
                keys = list(h.keys())
                return names.get(h.get_slice(keys[0]).get_dtype()) if keys else None
        except (OSError, ValueError, SafetensorError):  # unreadable header: the caller keeps its own dtype
            return None
    return None


def restore_source_precision(module: torch.nn.Module, component: Path, computed: torch.dtype) -> int:
    """Put back the precision a run lost by computing in a coarser dtype than its source stores.

    ``module`` (already cast to the source's dtype, e.g. fp32) holds weights that were loaded from ``component``
    (the source's sub-folder, e.g. ``sd15/unet``) at ``computed`` precision (bf16/fp16) and then changed by the run.
    Each tensor becomes ``source + (module − round(source))``, with ``round`` the cast to ``computed``: the run's
    change added to the source's own weights, so whatever the run did not change (a frozen block, the VAE, an
    element no update reached) is the source's to the bit instead of its rounding. Reads the source's non-variant
    safetensors files (sharded too); tensors the files lack or hold in another shape are left as they are.

    Returns:
        How many of the module's tensors were restored (0 when ``component`` holds no plain safetensors file).
    """
    from safetensors import safe_open

    if not component.is_dir():
        return 0
    files = [f for f in sorted(component.glob("*.safetensors")) if _safetensors_variant(f.name) is None]
    state = module.state_dict()
    done = 0
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                for key in h.keys():  # noqa: SIM118 (a safetensors handle, not a dict)
                    t = state.get(key)
                    if t is None or not t.is_floating_point():
                        continue
                    src = h.get_tensor(key)
                    if tuple(src.shape) != tuple(t.shape):
                        continue
                    src = src.to(t.dtype)
                    t.copy_((src + (t.detach().cpu() - src.to(computed).to(t.dtype))).to(t.device))
                    done += 1
    return done


def _check_tokenizer(folder: Path) -> None:
    """Refuse a tokenizer folder without a vocabulary: transformers loads one holding only tokenizer_config.json
    as a 2-token tokenizer (every prompt the same ids: silently wrong results), and an empty one fails later."""
    if (folder / "tokenizer.json").is_file() or all((folder / f).is_file() for f in ("vocab.json", "merges.txt")):
        return
    present = sorted(f.name for f in folder.iterdir()) if folder.is_dir() else []
    raise ModelLoadError(f"{folder}: no vocabulary: it needs tokenizer.json, or vocab.json and merges.txt (it holds "
                         f"{', '.join(present) if present else 'nothing'}; an incomplete download or copy?)")


def _check_folder(folder: Path, index: dict) -> str | None:
    """Check a local diffusers folder before loading it: every component ``model_index.json`` lists has its
    sub-folder (the unused optional ones aside), every weighted component has safetensors weights, and the
    tokenizer its vocabulary (tokenizer.json, or vocab.json + merges.txt).

    Returns:
        The weight variant to load (``"fp16"`` for a folder saved with ``save_pretrained(variant="fp16")``), or
        None for the plain files.

    Raises:
        ModelLoadError: naming the missing sub-folder or file, or the component whose weights are only pickles.
    """
    listed = [c for c in index if not c.startswith("_") and c not in _UNUSED and _listed(index, c)]
    missing = [c for c in listed if not (folder / c).is_dir()]
    if missing:
        names, paths = ", ".join(f"'{c}'" for c in missing), ", ".join(str(folder / c) for c in missing)
        s, verb = ("s", "are") if len(missing) > 1 else ("", "is")
        raise ModelLoadError(f"{folder}: model_index.json lists {names}, but the sub-folder{s} {paths} {verb} missing "
                             f"(an incomplete download or copy?)")
    for comp, config in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                         ("scheduler", "scheduler_config.json")):
        if not (folder / comp / config).is_file():
            raise ModelLoadError(f"{folder / comp}: {config} is missing (an incomplete download or copy?)")
    _check_tokenizer(folder / "tokenizer")
    found = {c: _weight_files(folder / c) for c in _WEIGHTED}
    pickled = [c for c, (plain, variants, pickles) in found.items() if not plain and not variants and pickles]
    if pickled:
        where = "; ".join(f"{folder / c}: {', '.join(found[c][2])}" for c in pickled)
        raise ModelLoadError(
            f"{folder}: weights only as pickles ({where}); apdm loads safetensors only and never unpickles a "
            f"model's weights. Convert the folder once, in an environment where you trust the file, e.g. `python -c "
            f"\"from diffusers import StableDiffusionPipeline as P; P.from_pretrained('{folder}').save_pretrained("
            f"'{folder}-safetensors', safe_serialization=True)\"`, and pass model.path={folder}-safetensors")
    empty = [c for c, (plain, variants, _) in found.items() if not plain and not variants]
    if empty:
        raise ModelLoadError(f"{folder / empty[0]}: no weights (no .safetensors file)")
    lacking = [c for c, (plain, _, _) in found.items() if not plain]
    if not lacking:
        return None
    common = set.intersection(*(found[c][1] for c in lacking))
    if not common:
        raise ModelLoadError(f"{folder}: no variant of the weights is there for every component "
                             f"({'; '.join(f'{c}: {sorted(found[c][1])}' for c in lacking)})")
    return "fp16" if "fp16" in common else min(common)


def _looks_local(path: str) -> bool:
    """Whether a path that does not exist was meant as a local file or folder rather than a hub id (owner/name)."""
    p = Path(path).expanduser()
    return (path.startswith((".", "/", "~", "\\")) or "\\" in path or p.suffix.lower() in _SINGLE_FILE + (".json",)
            or not _HUB_ID.fullmatch(path) or "--" in path or ".." in path or p.parent.is_dir())


def _single_file_error(p: Path) -> ModelLoadError:
    out = p.with_name(p.stem + "-diffusers")
    pickle = f" (a {p.suffix} file is a pickle: convert only one you trust)" if p.suffix.lower() in _PICKLE else ""
    return ModelLoadError(
        f"{p}: a single-file checkpoint, which apdm does not load: it loads diffusers model folders (model_index.json "
        f"with unet/, vae/, text_encoder/, tokenizer/, scheduler/). Convert it once{pickle}, on a machine that has "
        f"the model's original config (diffusers fetches it from the hub, or pass original_config=): `python -c "
        f"\"from diffusers import StableDiffusionPipeline as P; P.from_single_file('{p}').save_pretrained('{out}')\"`, "
        f"and pass model.path={out}")


def load_sd(path: str = "tiny", device: str = "auto", dtype: str = "auto", revision: str | None = None) -> SD:
    """Load a Stable Diffusion model (see module docstring for accepted sources).

    A folder (or hub id) is checked before any weight is read: an SDXL, inpainting or otherwise conditioned model,
    a missing component sub-folder and weights stored only as pickles (``.bin``) are refused with a
    :class:`ModelLoadError`; weights are read from safetensors only, the ``fp16`` variant
    (``*.fp16.safetensors``) where the plain files are absent.

    Args:
        path: local diffusers directory, hub id, ``tiny``, ``toy`` or ``random:sd15`` / ``random:sd21base``.
        device: ``auto`` | ``cpu`` | ``cuda[:i]`` | ``mps``; one this machine lacks is refused first
            (:func:`apdm.utils.select_device`, a RuntimeError).
        dtype: ``auto`` | ``fp32`` | ``fp16`` | ``bf16`` for the frozen weights.
        revision: hub revision (ignored, with a warning, for local folders).

    Raises:
        ModelLoadError: with a message naming the path and the reason (missing folder, single-file checkpoint,
            unsupported pipeline, pickled weights, offline hub id, ...).
        RuntimeError: the device is not available here.
    """
    dev = select_device(device)
    dt = select_dtype(dtype, dev)
    if path == "tiny":
        return tiny_sd(device=str(dev), dtype=dt)
    if path.startswith("random:"):
        return random_sd(path.split(":", 1)[1], device=str(dev), dtype=dt)
    if path == "toy":
        from apdm.toy import model_path  # resolved lazily: the toy world is optional

        path = str(model_path())
    p = Path(path).expanduser()
    kwargs: dict[str, Any] = {"use_safetensors": True}
    if p.is_file():
        if p.suffix.lower() in _SINGLE_FILE:
            raise _single_file_error(p)
        raise ModelLoadError(f"{p}: a file, not a diffusers model folder (a folder with model_index.json)")
    if p.exists():
        if not (p / "model_index.json").is_file():
            raise ModelLoadError(f"{p}: not a diffusers model folder (model_index.json is missing)")
        index = _read_json(p / "model_index.json")
        _check_index(index, str(p))
        _check_unet(p, str(p))
        kwargs["variant"] = _check_folder(p, index)
        if revision:
            LOG.warning("model.revision=%s is ignored: %s is a local folder", revision, p)
        if kwargs["variant"]:
            LOG.info("%s: loading the %s variant of the weights (the plain files are not there)", p, kwargs["variant"])
        kwargs["local_files_only"] = True
        source = str(p)
    elif _looks_local(path):
        raise ModelLoadError(f"model {'file' if p.suffix.lower() in _SINGLE_FILE else 'folder'} not found: "
                             f"{p.absolute()}")
    else:
        _check_hub(path, revision)
        kwargs["revision"] = revision
        source = path
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from apdm.utils import progress_enabled

    quiet = not progress_enabled()  # quiet=true also hides diffusers' and transformers' loading bars
    bars = [(m, m.is_progress_bar_enabled()) for m in (diffusers_logging, transformers_logging)]
    try:
        if quiet:
            for m, _ in bars:
                m.disable_progress_bar()
        with warnings.catch_warnings():  # newer diffusers call torch_dtype deprecated; older ones know nothing else
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            pipe = StableDiffusionPipeline.from_pretrained(
                source, safety_checker=None, feature_extractor=None, image_encoder=None,
                requires_safety_checker=False, torch_dtype=dt, **kwargs,
            )
    except (OSError, ValueError) as exc:
        where = p if p.exists() else f"'{path}' (from the Hugging Face hub)"
        raise ModelLoadError(f"{where}: could not load the diffusers model: {exc}") from exc
    finally:
        for m, was_on in bars:
            if quiet and was_on:
                m.enable_progress_bar()
    LOG.info("loaded %s on %s (%s)", path, dev, str(dt).replace("torch.", ""))
    return _from_components(pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer, pipe.scheduler, dev, dt, str(path))


def _check_hub(path: str, revision: str | None) -> None:
    """Fetch only the configs of hub id ``path`` (or find them in the HF cache) and refuse an unsupported model
    before its weights are downloaded; without network or cache, say how to get the weights as a local folder."""
    try:
        from huggingface_hub import snapshot_download

        configs = Path(snapshot_download(path, revision=revision, allow_patterns=["model_index.json", "*/config.json"]))
    except Exception as exc:  # offline, unknown repo, no access: all end the same way for the user
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        raise ModelLoadError(
            f"could not load '{path}': not found as a local folder ({Path(path).absolute()}), and the Hugging Face "
            f"hub did not give it ({type(exc).__name__}: {first}). Without network access the weights must be a "
            f"local path: download the model elsewhere (e.g. `hf download {path} --local-dir ./sd`) and pass "
            f"model.path=./sd"
        ) from exc
    if not (configs / "model_index.json").is_file():
        raise ModelLoadError(f"'{path}' on the Hugging Face hub: not a diffusers model (model_index.json is missing)")
    _check_index(_read_json(configs / "model_index.json"), f"'{path}' on the Hugging Face hub")
    _check_unet(configs, f"'{path}' on the Hugging Face hub")


#: Real architectures (component configs as published with the models; parameter counts checked in the tests:
#: SD-1.5 UNet 859,520,964, SD-2.1 UNet 865,910,724, VAE 83,653,863, CLIP ViT-L text 123,060,480, OpenCLIP ViT-H
#: text 340,387,840). Used by :func:`random_sd` for size-true speed and memory measurements without weights.
_SD_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "norm_num_groups": 32, "layers_per_block": 2,
           "block_out_channels": [128, 256, 512, 512], "down_block_types": ["DownEncoderBlock2D"] * 4,
           "up_block_types": ["UpDecoderBlock2D"] * 4, "sample_size": 512, "scaling_factor": 0.18215}
_SD_UNET = {"sample_size": 64, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [320, 640, 1280, 1280],
            "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
            "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3, "norm_num_groups": 32}
ARCHITECTURES = {
    "sd15": {
        "unet": {**_SD_UNET, "cross_attention_dim": 768, "attention_head_dim": 8},
        "vae": _SD_VAE,
        "text": {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                 "num_hidden_layers": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                 "projection_dim": 768},
    },
    "sd21base": {
        "unet": {**_SD_UNET, "cross_attention_dim": 1024, "attention_head_dim": [5, 10, 20, 20],
                 "use_linear_projection": True},
        "vae": _SD_VAE,
        "text": {"vocab_size": 49408, "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                 "num_hidden_layers": 23, "max_position_embeddings": 77, "hidden_act": "gelu",
                 "projection_dim": 512},
    },
}
_SD_SCHEDULER = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
                 "beta_end": 0.012, "clip_sample": False, "steps_offset": 1}


def build_components(unet_cfg: dict, vae_cfg: dict, text_cfg: dict, words=(), seed: int = 0):
    """Random-weight (unet, vae, text_encoder, tokenizer, scheduler) of real diffusers/transformers classes.

    Each module is built right after ``torch.manual_seed(seed)``. The tokenizer is apdm's own word-level CLIP
    tokenizer (:mod:`apdm.core.tokenizer`); ``text_cfg`` may give a larger ``vocab_size`` than it has (rows never
    indexed, as in a real checkpoint's size). Under ``with torch.device("meta"):`` nothing is allocated.
    """
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from apdm.core.tokenizer import build_tokenizer

    tokenizer = build_tokenizer(words)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    torch.manual_seed(seed)
    vae = AutoencoderKL(**vae_cfg)
    torch.manual_seed(seed)
    text = {"vocab_size": len(tokenizer), **text_cfg}
    text_encoder = CLIPTextModel(CLIPTextConfig(bos_token_id=tokenizer.bos_token_id,
                                                eos_token_id=tokenizer.eos_token_id,
                                                pad_token_id=tokenizer.pad_token_id, **text))
    return unet, vae, text_encoder, tokenizer, DDPMScheduler(**_SD_SCHEDULER)


def random_sd(arch: str = "sd15", seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32) -> SD:
    """A real-size Stable Diffusion architecture (:data:`ARCHITECTURES`) with random weights.

    Its outputs mean nothing; its sizes, FLOPs and memory are the real model's, so ``apdm bench speed
    model=random:sd15`` times real-size protection on a GPU without any download. Building SD-1.5 takes ~1.1B
    parameters: seconds on a GPU host, ~5 GB of RAM in fp32.
    """
    if arch not in ARCHITECTURES:
        raise ModelLoadError(f"unknown architecture 'random:{arch}' (known: "
                             f"{', '.join('random:' + a for a in ARCHITECTURES)})")
    a = ARCHITECTURES[arch]
    parts = build_components(a["unet"], a["vae"], a["text"], seed=seed)
    return _from_components(*parts, torch.device(device), dtype, f"random:{arch}")


def tiny_sd(seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32, sample_size: int = 8,
            words=(), vae_downsample: int = 8) -> SD:
    """A random-weight Stable Diffusion of real diffusers/transformers classes at tiny size (no downloads).

    Geometry follows SD: a x8 VAE with 4 latent channels, so ``sample_size=8`` gives 64x64 images. Used by
    the tests and by ``model.path=tiny`` smoke runs. Building takes well under a second on CPU.

    Args:
        seed: every component is built right after ``torch.manual_seed(seed)`` (deterministic weights).
        device, dtype: placement of the modules.
        sample_size: latent side; image side = ``sample_size * vae_downsample``.
        words: extra whole-word tokens for the tokenizer.
        vae_downsample: 8 (SD geometry) or 2/4 (cheaper VAE, larger latents).
    """
    levels = {2: 2, 4: 3, 8: 4}[vae_downsample]
    unet_cfg = dict(
        sample_size=sample_size, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32,
    )
    vae_cfg = dict(
        in_channels=3, out_channels=3, latent_channels=4, norm_num_groups=8, layers_per_block=1,
        block_out_channels=[8, 16, 16, 16][:levels],
        down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels,
        sample_size=sample_size * vae_downsample,
    )
    text_cfg = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                    max_position_embeddings=77)
    parts = build_components(unet_cfg, vae_cfg, text_cfg, words=words, seed=seed)
    return _from_components(*parts, torch.device(device), dtype, "tiny")


def save_slow_vocabulary(tokenizer, folder: str | Path) -> list[str]:
    """Write a BPE tokenizer's ``vocab.json`` and ``merges.txt`` (and ``added_tokens.json`` for tokens added past
    the vocabulary) into ``folder`` where they are missing, from its ``tokenizer.json`` model.

    transformers 5 saves a tokenizer as ``tokenizer.json`` only; transformers 4's ``CLIPTokenizer`` (the class a
    Stable Diffusion ``model_index.json`` names, loaded by diffusers under transformers 4) reads these files instead.
    Returns the files written (none when they are there already, or for a tokenizer that is not a BPE).
    """
    folder = Path(folder)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return []  # transformers 4 wrote them itself
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE":
        return []
    written = [str(f) for f in backend.model.save(str(folder))]
    vocab_size = backend.get_vocab_size(with_added_tokens=False)
    added = {tok: i for tok, i in tokenizer.added_tokens_encoder.items() if i >= vocab_size}
    if added and not (folder / "added_tokens.json").is_file():
        (folder / "added_tokens.json").write_text(json.dumps(added, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                                                  encoding="utf-8")
        written.append(str(folder / "added_tokens.json"))
    return written


def _edit_json(config: Path, edit: Callable[[dict], dict]) -> None:
    """Rewrite the JSON file ``config`` (a saved component's config) as ``edit`` returns it, when that differs."""
    data = json.loads(config.read_text(encoding="utf-8"))
    new = edit(dict(data))
    if new != data:
        config.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _text_encoder_loads_fp32(config: Path) -> None:
    """Make a text encoder saved in half precision load in float32 when no ``torch_dtype`` is given, as diffusers
    loads the UNet and VAE: transformers 5 loads it in the ``dtype`` its config records, so a plain
    ``StableDiffusionPipeline.from_pretrained(folder)`` of half-precision weights mixed an fp16 text encoder with an
    fp32 UNet and failed at the first step ("mat1 and mat2 must have the same dtype"). The weights stay as saved."""
    _edit_json(config, lambda data: {k: "float32" if k in ("dtype", "torch_dtype") else v for k, v in data.items()})


def _leave_unset(config_file: Path, config) -> None:
    """Drop from a saved scheduler config the keys its source left unset (diffusers' ``_use_default_values``).

    ``save_pretrained`` writes every default out, so a saved copy sampled differently from its source: SD 1.5's
    config sets no ``timestep_spacing``, which ``euler`` and ``dpmsolver`` then take as their own default
    (``linspace``) on the source but as the written DDIM one (``leading``) on the copy (timesteps 999, 946, … vs
    951, 901, …). Left unset, each sampler resolves the key on the copy as on the source.
    """
    unset = set(config.get("_use_default_values", []))
    _edit_json(config_file, lambda data: {k: v for k, v in data.items() if k not in unset})


def save_sd(sd: SD, out_dir: str | Path, scheduler: str = "ddim", safe_serialization: bool = True,
            quiet: bool = False, dtype: torch.dtype | None = None) -> Path:
    """Save ``sd`` as a diffusers folder (safetensors) that ``StableDiffusionPipeline.from_pretrained`` loads.

    Written atomically: the folder appears under its final name only once complete. The tokenizer is saved both
    ways (:func:`save_slow_vocabulary`), so transformers 4 loads the folder as well as 5. ``quiet`` also silences
    transformers' "Writing model shards" bar of the text encoder. ``dtype`` (e.g. :func:`stored_dtype` of the
    source) saves the weights in that dtype; ``sd``'s modules are cast in place to it. A half-precision text
    encoder's config says float32 (:func:`_text_encoder_loads_fp32`), so a plain ``from_pretrained`` without
    ``torch_dtype`` loads every part in float32 (with ``torch_dtype`` every part takes that).
    """
    from transformers.utils import logging as hf_logging

    from apdm.utils import atomic_dir

    was_on = hf_logging.is_progress_bar_enabled()
    if quiet:
        hf_logging.disable_progress_bar()
    try:
        with atomic_dir(out_dir) as tmp:
            pipe = sd.pipeline(scheduler)
            if dtype is not None:
                pipe.to(dtype=dtype)
            pipe.save_pretrained(str(tmp), safe_serialization=safe_serialization)
            save_slow_vocabulary(sd.tokenizer, Path(tmp) / "tokenizer")
            _leave_unset(Path(tmp) / "scheduler" / "scheduler_config.json", pipe.scheduler.config)
            for config in Path(tmp).glob("*/config.json"):  # diffusers records where each part was loaded from:
                # a local path (home folder, a person's name) in a folder that is published
                _edit_json(config, lambda data: {k: v for k, v in data.items() if k != "_name_or_path"})
            if dtype is not None and dtype != torch.float32:
                _text_encoder_loads_fp32(Path(tmp) / "text_encoder" / "config.json")
    finally:
        if quiet and was_on:
            hf_logging.enable_progress_bar()
    return Path(out_dir)
