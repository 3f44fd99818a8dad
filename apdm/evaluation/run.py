"""``apdm evaluate``: the shared protocol runner — does a protection hold?

For every cell (subject × scenario × attack × personalization) it builds the attacker's training set
(clean / protected / mixed), applies the robustness attack (JPEG, blur, DiffPure, ...), personalizes with the
shared simulator, samples ``sample.num_images_per_prompt`` images per prompt and scores them against the
subject's clean reference photos. Results are flat records in ``results.json``; ``report.html`` shows image grids,
metric tables and metric-vs-attack-strength plots. Finished cells are stored in ``cells/`` and skipped on rerun.

Scenarios (Anti-DreamBooth / APDM protocols): ``all_clean`` (N clean), ``all_perturbed`` (N protected),
``one_clean`` (1 clean + N−1 protected), ``one_perturbed`` (1 protected + N−1 clean).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import torch

from apdm.config import EvaluateRunConfig, PersonalizationConfig, to_dict, to_yaml
from apdm.utils import (
    LOG,
    atomic_write_text,
    file_sha256,
    peak_rss_mb,
    progress,
    provenance,
    seed_everything,
)

SCENARIOS = ("all_clean", "all_perturbed", "one_clean", "one_perturbed")


# ============================================================================ data
def scenario_images(clean: torch.Tensor, protected: torch.Tensor | None, scenario: str) -> torch.Tensor:
    """The attacker's training images for a scenario. ``clean``/``protected``: (N,3,H,W), same order."""
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown scenario '{scenario}'; choose from {', '.join(SCENARIOS)}")
    if scenario == "all_clean":
        return clean
    if protected is None:
        raise ValueError(f"scenario '{scenario}' needs protected_data")
    if scenario == "all_perturbed":
        return protected
    mixed = protected.clone() if scenario == "one_clean" else clean.clone()
    mixed[0] = clean[0] if scenario == "one_clean" else protected[0]
    return mixed


def apply_attack(images: torch.Tensor, spec: str, sd, seed: int = 0, quiet: bool = True) -> torch.Tensor:
    """Apply one robustness attack ``spec`` (``none``, ``jpeg:quality=75``, ``diffpure:strength=0.2``,
    ``gridpure``, ``impress:steps=500`` ...) to images (N,3,H,W) in [0,1]; model attacks use ``sd``. A random
    attack (model attacks, ``noise``) draws from ``seed`` unless its spec sets ``seed=``, so a run's attacks
    follow its seed and a rerun draws the same."""
    import inspect

    from apdm.attacks.transforms import MODEL_ATTACKS, parse_attack, parse_model_attack

    if spec.strip().partition(":")[0].strip().lower() in MODEL_ATTACKS:
        fn, kwargs = parse_model_attack(spec)
        return fn(images, sd, seed=seed, quiet=quiet, **kwargs)
    fn = parse_attack(spec)
    if "seed" in inspect.signature(fn).parameters and "seed=" not in spec.replace(" ", ""):
        return fn(images, seed=seed)
    return fn(images)


# ============================================================================ metric backends
@functools.lru_cache(maxsize=1)
def _toy_instruments():
    """The toy instruments, loaded once per process (identity, detector and features share them)."""
    from apdm.toy import instruments as I
    from apdm.toy.world import instruments_path

    return I.load_instruments(instruments_path())


def identity_backend(name: str) -> tuple[Callable | None, str]:
    """(embed(images) -> embeddings [, found], impl tag) for ``metrics.identity``."""
    if name == "none":
        return None, ""
    if name == "toy":
        from apdm.toy import instruments as I

        inst = _toy_instruments()
        return (lambda x: I.embed(inst.encoder, x)), "toy-id"
    if name.startswith("toy:"):  # another toy-world identity encoder (e.g. one built with another seed)
        from apdm.toy import instruments as I

        path = Path(name[len("toy:"):])
        if not (path / "instruments.json").is_file() and (path / "instruments" / "instruments.json").is_file():
            path = path / "instruments"  # the output folder of `apdm toy build`
        if not (path / "instruments.json").is_file():
            raise ValueError(f"identity backend '{name}': {path} holds no toy instruments (instruments.json)")
        other = I.load_instruments(path)
        return (lambda x: I.embed(other.encoder, x)), f"toy-id:{other.config.get('fingerprint', '')[:8]}"
    if name == "dlib":
        from apdm.evaluation.identity import dlib_face_embed

        return dlib_face_embed, "dlib-resnet"
    raise ValueError(f"unknown identity backend '{name}' (toy, toy:DIR, dlib, none)")


def detector_backend(name: str, subject_class: str) -> tuple[Callable | None, str]:
    """(detect(images) -> (N,) probabilities, impl tag) for ``metrics.detector``."""
    if name == "none":
        return None, ""
    if name == "toy":
        from apdm.toy import instruments as I

        inst = _toy_instruments()
        return (lambda x: I.detector_scores(inst.detector, x, subject_class)), "toy-det"
    from apdm.evaluation import identity as ID

    table = {"dlib-hog": ID.dlib_face_detect, "haar": ID.haar_face_detect, "mtcnn": ID.mtcnn_face_detect}
    if name not in table:
        raise ValueError(f"unknown detector backend '{name}' (toy, dlib-hog, haar, mtcnn, none)")
    return table[name], {"haar": "opencv-haar"}.get(name, name)  # the tags docs/metrics.md gives


def feature_backend(spec: str) -> tuple[Callable | None, str]:
    """(feature extractor, impl tag) for FID/KID: ``toy``, ``inception:PATH``, ``none``."""
    if spec == "none":
        return None, ""
    if spec == "toy":
        return _toy_instruments().features, "toy-features"
    if spec.startswith("inception:"):
        from apdm.evaluation.distribution import inception_extractor

        return inception_extractor(spec.split(":", 1)[1]), "inception"
    raise ValueError(f"unknown feature backend '{spec}' (toy, inception:PATH, none)")


def score_generations(generated: torch.Tensor, references: torch.Tensor, cfg: EvaluateRunConfig, backends: dict,
                      prompt: str) -> list[dict]:
    """All generation metrics for one set of generated images (N,3,H,W) vs references (M,3,H,W)."""
    from apdm.evaluation import identity as ID
    from apdm.evaluation.distribution import distribution_records
    from apdm.evaluation.metrics import measure, unavailable

    recs = ID.identity_records(generated, references, backends["embed"], backends["detect"],
                               backends["embed_impl"], backends["detect_impl"])
    m = cfg.metrics
    if backends.get("features_error"):
        recs += [unavailable(name, backends["features_impl"], backends["features_error"], False)
                 for name in ("fid", "kid")]
    elif backends["features"] is not None:
        recs += distribution_records(references, generated, backends["features"], backends["features_impl"])
    if m.dino_path and "dino" not in backends:
        recs.append(unavailable("dino", model_tag(m.dino_path), backends.get("dino_error", "not loaded"), True))
    elif m.dino_path:
        recs.append(measure("dino", model_tag(m.dino_path), True, ID.dino, backends["dino"], generated, references))
    else:
        recs.append(unavailable("dino", "dino", "metrics.dino_path not set (needs local ViT weights)", True))
    if m.clip_path and "clip" not in backends:
        for name in ("clip_i", "clip_t"):
            recs.append(unavailable(name, model_tag(m.clip_path), backends.get("clip_error", "not loaded"), True))
    elif m.clip_path:
        tag = model_tag(m.clip_path)
        recs.append(measure("clip_i", tag, True, ID.clip_i, backends["clip"][0], generated, references))
        recs.append(measure("clip_t", tag, True, ID.clip_t, backends["clip"][0], backends["clip"][1],
                            generated, prompt))
    else:
        for name in ("clip_i", "clip_t"):
            recs.append(unavailable(name, "clip", "metrics.clip_path not set (needs local CLIP weights)", True))
    if m.brisque:
        from apdm.evaluation import iqa

        recs.append(iqa.brisque_record(generated))
    if m.clip_iqa:
        from apdm.evaluation import iqa

        if "clip" in backends:  # transformers CLIP from a local path
            recs.append(measure("clip_iqa", model_tag(m.clip_path), True, iqa.clip_iqa, backends["clip"][0],
                                backends["clip"][1], generated))
        elif m.clip_path:  # the local CLIP failed to load: say why, never another implementation's number
            recs.append(unavailable("clip_iqa", model_tag(m.clip_path), backends.get("clip_error", "not loaded"),
                                    True))
        else:
            recs.append(measure("clip_iqa", "pyiqa", True, iqa.clipiqa_pyiqa, generated))
    if m.liqe:
        from apdm.evaluation import iqa

        recs.append(measure("liqe", "pyiqa-liqe_mix", True, iqa.liqe_pyiqa, generated))
    return recs


def generation_metrics(cfg: EvaluateRunConfig, backends: dict) -> list[tuple[str, str, bool | None, str | None]]:
    """``(name, impl, higher_is_better, reason)`` of each record :func:`score_generations` gives with ``cfg`` and
    ``backends`` (in its order), without computing any: what a cell reports unavailable when its images cannot be
    scored (:func:`unscored_records`). ``reason`` is set for a metric that is unavailable whatever the images (not
    configured, or its model did not load), as :func:`score_generations` says it. Keep in step with it."""
    m = cfg.metrics
    out: list[tuple[str, str, bool | None, str | None]] = []
    if backends["embed"] is not None:
        out.append(("ism", backends["embed_impl"], True, None))
    if backends["detect"] is not None:
        out += [("fdfr", backends["detect_impl"], False, None), ("sds", backends["detect_impl"], True, None)]
    if backends.get("features_error") or backends["features"] is not None:
        out += [(name, backends["features_impl"], False, backends.get("features_error")) for name in ("fid", "kid")]
    if m.dino_path:
        out.append(("dino", model_tag(m.dino_path), True,
                    None if "dino" in backends else backends.get("dino_error", "not loaded")))
    else:
        out.append(("dino", "dino", True, "metrics.dino_path not set (needs local ViT weights)"))
    clip_error = None if "clip" in backends else backends.get("clip_error", "not loaded")
    for name in ("clip_i", "clip_t"):
        out.append((name, model_tag(m.clip_path), True, clip_error) if m.clip_path else
                   (name, "clip", True, "metrics.clip_path not set (needs local CLIP weights)"))
    if m.brisque:
        out.append(("brisque", "apdm", False, None))
    if m.clip_iqa:
        out.append(("clip_iqa", model_tag(m.clip_path), True, clip_error) if m.clip_path else
                   ("clip_iqa", "pyiqa", True, None))
    if m.liqe:
        out.append(("liqe", "pyiqa-liqe_mix", True, None))
    return out


def unscored_records(cfg: EvaluateRunConfig, backends: dict, reason: str, n: int) -> list[dict]:
    """Unavailable records (``value`` None) for every metric :func:`score_generations` would give, for ``n``
    generated images that cannot be scored (NaN/inf: a diverged personalization): ``reason`` says so, except for a
    metric that is unavailable anyway (not configured, its model not loaded), which keeps its own reason."""
    from apdm.evaluation.metrics import unavailable

    return [unavailable(name, impl, own or reason, hib, n)
            for name, impl, hib, own in generation_metrics(cfg, backends)]


def scored_or_unavailable(gen: torch.Tensor, refs: torch.Tensor, cfg: EvaluateRunConfig, backends: dict,
                          prompt: str, where: str, cause: str) -> tuple[list[dict], torch.Tensor]:
    """:func:`score_generations` of ``gen`` (N,3,H,W), and ``gen`` for the grid; when some of its images hold a NaN
    or inf pixel, instead unavailable records (:func:`unscored_records`) saying how many and ``cause``, a warning
    naming ``where``, and the images with those pixels black, so the run goes on."""
    from apdm.evaluation.metrics import nonfinite_count

    bad = nonfinite_count(gen)
    if not bad:
        return score_generations(gen, refs, cfg, backends, prompt), gen
    why = f"{bad} of {len(gen)} generated images contain NaN/inf: {cause}"
    LOG.warning("%s: %s; its metrics are reported unavailable", where, why)
    return unscored_records(cfg, backends, why, len(gen)), gen.nan_to_num(nan=0.0, posinf=1.0, neginf=0.0)


def model_tag(path: str) -> str:
    """The implementation tag of a metric computed with the local model at ``path``: its folder name
    (``/models/dinov2-small`` -> ``dinov2-small``), so that numbers of two backbones do not share a tag; a hub cache
    snapshot (``…/models--facebook--dino-vits16/snapshots/<commit>``) is named by its model (``dino-vits16``), not
    by the commit, and ``.`` by the folder it is. Two different models in folders of the same name still share one:
    name the folders after the model."""
    folder = Path(path).expanduser().resolve()
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return folder.parent.parent.name.split("--")[-1]
    return folder.name or path


def metric_models(cfg: EvaluateRunConfig) -> dict:
    """The run's model-backed metric backends (FID/KID features, DINO, CLIP), loaded once and shared by every
    subject. One that cannot load (an extra not installed, a bad local path) is kept as its reason
    (``features_error``, ``dino_error``, ``clip_error``): the metrics it feeds are reported unavailable with that
    reason and the run goes on (docs/metrics.md). A misspelt backend name still raises ``ValueError``."""
    from apdm.evaluation import identity as ID
    from apdm.evaluation.metrics import MetricUnavailable
    from apdm.utils import MissingDependency

    m = cfg.metrics
    b: dict = {}
    try:
        b["features"], b["features_impl"] = feature_backend(m.features)
    except (MetricUnavailable, MissingDependency) as exc:
        b["features"], b["features_impl"] = None, m.features.partition(":")[0]
        b["features_error"] = f"metrics.features={m.features}: {exc}"
    for key, path, load in (("dino", m.dino_path, ID.load_vit), ("clip", m.clip_path, ID.load_clip)):
        if path:
            try:
                b[key] = load(path)
            except (MetricUnavailable, MissingDependency) as exc:
                b[f"{key}_error"] = f"metrics.{key}_path={path}: {exc}"
    for key in ("features_error", "dino_error", "clip_error"):
        if key in b:
            LOG.warning("reported unavailable: %s", b[key])
    return b


def _backends(cfg: EvaluateRunConfig, subject_class: str, models: dict | None = None) -> dict:
    """Every metric backend for one subject: the run's ``models`` (:func:`metric_models`, loaded here when not
    given) and the identity embedder and detector (the toy detector scores ``subject_class``)."""
    embed, embed_impl = identity_backend(cfg.metrics.identity)
    detect, detect_impl = detector_backend(cfg.metrics.detector, subject_class)
    return {**(metric_models(cfg) if models is None else models), "embed": embed, "embed_impl": embed_impl,
            "detect": detect, "detect_impl": detect_impl}


#: metrics settings that change only the clean-vs-protected fidelity records, never a cell's generated images or
#: scores: left out of the cells' cache keys, so toggling them reuses every finished cell
FIDELITY_ONLY = ("fidelity", "lpips")


def cell_metrics(cfg: EvaluateRunConfig) -> dict:
    """The metrics settings a cell's records depend on (its part of the cache key): all but :data:`FIDELITY_ONLY`."""
    return {k: v for k, v in dataclasses.asdict(cfg.metrics).items() if k not in FIDELITY_ONLY}


def _path_files(path: str | Path) -> list | None:
    """:func:`apdm.core.models.folder_files` of a local model folder or weights file; ``None`` when ``path`` is not
    there."""
    from apdm.core.models import folder_files

    p = Path(path).expanduser()
    return folder_files(p) if p.exists() else None


def metric_model_files(cfg: EvaluateRunConfig) -> dict:
    """The metric models a cell's records depend on beyond their settings (:func:`cell_metrics` holds names and
    paths, not contents), for its cache key: the toy instruments' fingerprint (their two weight files, and the
    feature scale FID/KID's toy features use) when a backend is ``toy``, the files of a ``toy:DIR`` identity encoder,
    and the files of ``metrics.dino_path``, ``metrics.clip_path`` and ``inception:PATH`` when they are on disk.
    Empty for a run that uses none of these (its keys are as before 2026-12-07), so that rebuilding the instruments
    (``apdm toy build skip_model=true``) or replacing a local model computes the cells again instead of reusing
    numbers of the old ones."""
    m = cfg.metrics
    out: dict = {}
    if "toy" in (m.identity, m.detector, m.features):
        inst = _toy_instruments()
        out["toy_instruments"] = {"fingerprint": inst.config.get("fingerprint"),
                                  **({"feature_scale": inst.config.get("feature_scale")} if m.features == "toy"
                                     else {})}
    if m.identity.startswith("toy:"):  # the folder identity_backend loads
        path = Path(m.identity[len("toy:"):])
        if not (path / "instruments.json").is_file() and (path / "instruments" / "instruments.json").is_file():
            path = path / "instruments"
        out["identity_files"] = _path_files(path)
    for key, path in (("dino_files", m.dino_path), ("clip_files", m.clip_path),
                      ("features_files", m.features.split(":", 1)[1] if m.features.startswith("inception:") else "")):
        files = _path_files(path) if path else None
        if files is not None:
            out[key] = files
    return out


def file_fidelity_records(clean_paths: list[Path], prot_paths: list[Path], clean: torch.Tensor,
                          protected: torch.Tensor, with_lpips: bool, where: str) -> list[dict]:
    """Clean-vs-protected fidelity records measured on the files as they are, pair by pair (one pair in memory at
    a time), not on the model-resolution copies that personalization trains on: a resize changes the
    perturbation (a 12/255 change on 256-px photos read 10/255 at most and 13 dB too high at 64 px).

    A pair whose two files differ in size is measured on its model-resolution copies (``clean``/``protected``, in
    ``clean_paths``' order), with a warning; the records count such pairs in ``n_resized`` (with a ``note``) and
    give the sizes measured in ``sizes`` (``{"WxH": pairs}``).
    """
    from apdm.core.images import ImageLoadError, load_image
    from apdm.evaluation.fidelity import fidelity_records_pairs

    sizes: dict[str, int] = {}
    resized: list[str] = []

    def pairs():
        for i, (cp, pp) in enumerate(zip(clean_paths, prot_paths)):
            try:
                c, p = load_image(cp).pixels, load_image(pp).pixels
                why = "" if c.shape == p.shape else f"{c.shape[2]}x{c.shape[1]} vs {p.shape[2]}x{p.shape[1]}"
            except ImageLoadError as exc:  # changed on disk since it was loaded for personalization
                c, p, why = None, None, str(exc)
            if why:
                LOG.warning("%s: clean photo %s and protected photo %s (%s): fidelity measured at model resolution",
                            where, cp.name, pp.name, why)
                resized.append(cp.name)
                c, p = clean[i], protected[i]
            hw = f"{c.shape[2]}x{c.shape[1]}"
            sizes[hw] = sizes.get(hw, 0) + 1
            yield c[None], p[None]
            del c, p

    recs = fidelity_records_pairs(pairs(), with_lpips=with_lpips,
                                  lpips_off="disabled (metrics.lpips=false; needs the extra 'lpips')")
    extra: dict = {"sizes": sizes, "n_resized": len(resized)}
    note = ""
    if resized:
        note = (f"{len(resized)} pair(s) whose clean and protected files differ in size measured at model "
                f"resolution: {', '.join(resized[:5])}{' …' if len(resized) > 5 else ''}")
    out = []
    for r in recs:
        notes = "; ".join(n for n in (r.get("note", ""), note) if n)
        out.append({**r, **extra, **({"note": notes} if notes else {})})
    return out


# ============================================================================ the runner
def safe_name(text: str) -> str:
    """``text`` as a file-name part: letters, digits, ``.``, ``-`` and ``_`` kept, any other run of characters
    (``/``, ``#``, spaces, ``..``) one ``_``; never empty, never a path out of the folder."""
    return re.sub(r"[^\w.-]+", "_", str(text)).replace("..", "_").strip("._") or "_"


def _cell_key(*parts) -> str:
    """A cell's file name: a readable slug of ``parts`` and a hash of all of them (``parts`` may hold a fingerprint
    dict, hashed and left out of the slug)."""
    text = "|".join(json.dumps(p, sort_keys=True, default=str) if isinstance(p, dict) else str(p) for p in parts)
    slug = "-".join(safe_name(str(p).replace("=", ""))[:24] for p in parts if not isinstance(p, dict))
    return f"{slug}-{hashlib.sha1(text.encode()).hexdigest()[:8]}"


def _attack_parts(spec: str) -> tuple:
    """An attack's part of a cell's key: its spec, and the settings it runs with (the spec's parameters merged
    with its function's defaults, or a preset's values), so that a changed default in the code keys a new cell
    instead of reusing one computed with the old value; an attack that loads a model of its own (Noisy Upscaling)
    adds that model's files (its module's ``model_files``), and one whose module names a ``CELL_VERSION`` adds it
    (a fix that changes what the attack computes keys new cells). An attack without settings (``none``, ``flip``) is its
    spec alone, keyed as before 2026-12-07. The seed is left out: it is the run's (in the key) or the spec's."""
    import inspect

    from apdm.attacks.transforms import MODEL_ATTACKS, parse_attack, parse_model_attack

    model_files = version = None
    name = spec.strip().partition(":")[0].strip().lower()
    if name in MODEL_ATTACKS:
        import importlib

        fn, kwargs = parse_model_attack(spec)
        skip = {"images", "sd", "seed", "quiet"}
        module = importlib.import_module(MODEL_ATTACKS[name])
        model_files, version = getattr(module, "model_files", None), getattr(module, "CELL_VERSION", None)
    else:
        fn, kwargs = parse_attack(spec), {}
        while isinstance(fn, functools.partial):  # a preset's or the spec's values (the outer wins)
            kwargs = {**fn.keywords, **kwargs}
            fn = fn.func
        skip = {"images", "generator", "seed"}
    params = inspect.signature(fn).parameters.items()
    settings = {k: p.default for k, p in params if k not in skip and p.default is not inspect.Parameter.empty}
    settings.update((k, v) for k, v in kwargs.items() if k not in skip)
    if model_files is not None:  # an attack with a model of its own (Noisy Upscaling's upscaler): its files too
        settings["model_files"] = model_files(**settings)
    if version is not None:
        settings["cell_version"] = version
    return (spec, {"attack_settings": settings}) if settings else (spec,)


def subject_names(subjects) -> list[str]:
    """Each evaluation subject's name: its ``name``, else its clean folder's name, else ``subject<i>``.

    Raises:
        ValueError: two subjects would share a name (or its file-name form), so one would read the other's cached
            cells and overwrite its images; names both and says to set ``name:``.
    """
    names = [s.name or Path(s.clean_data.split(",")[0]).name or f"subject{i}" for i, s in enumerate(subjects)]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        j = seen.setdefault(safe_name(n).lower(), i)
        if j != i:
            raise ValueError(f"subjects {j + 1} and {i + 1} are both named '{names[j]}'" +
                             (f" / '{n}'" if n != names[j] else "") + " (from their clean_data folders unless set): "
                             "give each a distinct name, e.g. subjects=[{name: alice, clean_data: ...}, "
                             "{name: bob, clean_data: ...}]")
    return names


#: personalization keys an evaluation sets itself (each subject's prompts, the run's seed)
RUN_SET_KEYS = ("instance_prompt", "class_prompt", "seed")


def personalization_labels(pers) -> list[str]:
    """Each personalization's name in records and the report: its method, and when another entry has the same
    method, the settings in which they differ (``lora (lora_rank=16)``), so that two LoRAs stay apart. The keys
    the run sets itself (:data:`RUN_SET_KEYS`) do not tell entries apart.

    Raises:
        ValueError: two entries that would run the same personalization (naming both).
    """
    dicts = [{k: v for k, v in dataclasses.asdict(p).items() if k not in RUN_SET_KEYS} for p in pers]
    labels = []
    for i, d in enumerate(dicts):
        twins = [o for o in dicts if o["method"] == d["method"] and o is not d]
        same = next((j for j, o in enumerate(dicts) if o == d and j != i), None)
        if same is not None:
            raise ValueError(f"personalizations[{min(i, same)}] and [{max(i, same)}] run the same personalization "
                             f"(the prompts and seed come from the subjects and the run): remove one")
        differ = [k for k in d if any(o[k] != d[k] for o in twins)]
        labels.append(d["method"] + (f" ({', '.join(f'{k}={d[k]}' for k in differ)})" if twins else ""))
    return labels


def pair_by_name(clean: list[Path], protected: list[Path], where: str) -> list[Path]:
    """The protected file of each clean photo, for a protected folder without a protect-images manifest.

    By name when every clean photo has exactly one protected file of its stem (``a.jpg`` ↔ ``a.png``: protect-images
    keeps the stem; protected files of no clean photo are left out, with a warning); else by sorted position when
    both lists are as long (both as listed, before any file is read, so a file that fails to load cannot shift the
    pairs after it).

    Returns:
        protected paths in ``clean``'s order.

    Raises:
        ValueError: neither rule pairs them; names ``where`` and the clean photos without a namesake.
    """
    by_stem: dict[str, list[Path]] = {}
    for p in protected:
        by_stem.setdefault(p.stem, []).append(p)
    stems = [c.stem for c in clean]
    if len(set(stems)) == len(stems) and all(len(by_stem.get(s, [])) == 1 for s in stems):
        if len(protected) > len(clean):
            LOG.warning("%s: %d protected file(s) have no clean photo of the same name; not used", where,
                        len(protected) - len(clean))
        return [by_stem[s][0] for s in stems]
    if len(protected) == len(clean):
        LOG.info("%s: clean and protected photos do not share names; pairing them in sorted order", where)
        return list(protected)
    lonely = [c.name for c in clean if c.stem not in by_stem]
    raise ValueError(f"{where}: {len(protected)} protected vs {len(clean)} clean images, and they do not pair by name"
                     + (f" (no protected file named like {', '.join(lonely[:5])}{' …' if len(lonely) > 5 else ''})"
                        if lonely else "")
                     + ": give each protected photo its clean photo's name (any extension), or the same number of "
                       "photos in the same sorted order")


def protected_pairs(clean_paths: list[Path], protected_data: str) -> list[Path] | None:
    """The protected version of each clean photo, when ``protected_data`` is an ``apdm protect-images`` output folder.

    Its ``manifest.json`` records each input's SHA-256, so each clean photo is matched by content to the file made
    from it, whatever the names (``a.jpg`` and ``a.png`` give ``a.png`` and ``a-2.png``, which sorted order would
    pair the wrong way round) and wherever the folders have moved since.

    Returns:
        protected files in ``clean_paths``' order, or ``None`` when ``protected_data`` is not such a folder (the
        caller then pairs by sorted names).

    Raises:
        ValueError: a clean photo has no protected version in the manifest (named, with the manifest).
    """
    from apdm.protect_images.run import manifest_output

    folder = Path(os.path.expanduser(protected_data.strip()))  # "~/out" as list_images reads it (it was not found)
    manifest_path = folder / "manifest.json"
    if "," in protected_data or not manifest_path.is_file():
        return None
    try:
        images = json.loads(manifest_path.read_text(encoding="utf-8"))["images"]
        by_content = {e["input_sha256"]: manifest_output(e, folder) for e in images}
    except (ValueError, KeyError, TypeError):
        return None  # not written by protect-images, or by a version without input hashes
    out, missing = [], []
    for p in clean_paths:
        match = by_content.get(file_sha256(p))
        if match is None:
            missing.append(str(p))
        else:
            out.append(match)
    if missing:
        raise ValueError(f"{manifest_path} lists no protected version of {len(missing)} clean photo(s): "
                         f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''} (protect them into that folder, "
                         f"or leave them out of clean_data)")
    return out


def write_strict_json(path: Path, obj) -> None:
    """Write ``obj`` as strict JSON (atomically, pretty-printed): a NaN or inf that reached a record unfiltered is
    written ``null``, never the bare ``NaN``/``Infinity`` that strict parsers (JavaScript, jq, Go) reject."""
    from apdm.utils import _json_default, finite_json

    atomic_write_text(path, json.dumps(finite_json(obj)[0], indent=2, default=_json_default, allow_nan=False) + "\n")


def forget_stale_results(out: Path, cfg: EvaluateRunConfig) -> None:
    """Remove ``out``'s ``results.json`` and ``report.html`` when they are of a run with other settings than
    ``cfg``'s (``resume`` and ``quiet`` aside; or unreadable), once the model has loaded and before this run writes
    its ``config.yaml``: an interrupted or failed run then leaves a
    folder whose ``config.yaml`` is its own and no results of another run next to it (finished cells stay in
    ``cells/``). A rerun with the same settings keeps them until it writes its own."""
    results, report = out / "results.json", out / "report.html"

    def numbers_settings(config: dict) -> dict:  # resume and quiet change no number
        return {k: v for k, v in config.items() if k not in ("resume", "quiet")}

    if results.is_file():
        try:
            same = numbers_settings(json.loads(results.read_text(encoding="utf-8")).get("config")) == \
                numbers_settings(json.loads(json.dumps(to_dict(cfg), default=str)))
        except (ValueError, OSError, AttributeError):
            same = False
        if same:
            return
    for f in (results, report):
        if f.is_file():
            f.unlink()
            LOG.info("removed %s: it was written by a run with other settings", f)


def run(cfg: EvaluateRunConfig) -> dict:
    """Run the protocol; write ``results.json``, ``report.html``, image grids and per-cell caches.

    Returns:
        ``{"records": [...], "output_dir": str}``.
    """
    from apdm.core import diffusion as D
    from apdm.core.images import list_images, load_images, load_spec, save_grid, split_spec
    from apdm.core.models import load_sd, model_fingerprint, warn_if_untrained
    from apdm.evaluation.protocol import (
        check_optimizer_extra,
        check_sampler_steps,
        personalize_and_sample,
        with_prompts,
    )
    from apdm.evaluation.report import write_report

    if not cfg.subjects:
        raise ValueError("no subjects: set subjects=[{clean_data: DIR, protected_data: DIR}] in the recipe")
    for key, example in (("scenarios", "[all_clean, all_protected]"), ("attacks", "[none] (no purification)"),
                         ("personalizations", "[{method: dreambooth}]")):
        if not getattr(cfg, key):  # every personalization cell would be skipped: a run that measures no attacker
            raise ValueError(f"{key}=[] leaves no cell to run (each cell is a scenario x attack x personalization); "
                             f"give at least one, e.g. {key}={example}")
    for s in cfg.scenarios:
        if s not in SCENARIOS:
            raise ValueError(f"unknown scenario '{s}'; choose from {', '.join(SCENARIOS)}")
    from apdm.attacks.transforms import check_attack

    for spec in cfg.attacks:  # a typo, or an upscaler not here, should stop the run now, not after hours of work
        check_attack(spec, loadable=True)
    names = subject_names(cfg.subjects)
    from apdm.personalization.simulator import check_personalization

    default = PersonalizationConfig()
    for i, per in enumerate(cfg.personalizations):
        check_personalization(per, f"personalizations[{i}]",  # the prompts trained with: each subject's
                              {f"subjects[{j}].instance_prompt": s.instance_prompt for j, s in enumerate(cfg.subjects)})
        check_optimizer_extra(per.optimizer, f"personalizations[{i}].optimizer")  # not after the class images
        unused = [f"{k}={getattr(per, k)!r}" for k in RUN_SET_KEYS if getattr(per, k) != getattr(default, k)]
        if unused:
            LOG.warning("personalizations[%d]: %s not used: the attacker takes each subject's prompts "
                        "(subjects=[{..., instance_prompt: ..., class_prompt: ...}]) and the run's seed", i,
                        ", ".join(unused))
    per_label = {id(p): label for p, label in zip(cfg.personalizations, personalization_labels(cfg.personalizations))}
    D.check_sample(cfg.sample)
    models = metric_models(cfg)  # once per run; a misspelt backend stops the run here, before the model loads
    backends_of = {name: _backends(cfg, subj.subject_class, models) for subj, name in zip(cfg.subjects, names)}
    out = Path(cfg.output_dir)
    (out / "cells").mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    computed_by = {k: v for k, v in provenance().items() if k in ("apdm", "git_commit")}  # in each cell's records
    seed_everything(cfg.seed)
    warn_if_untrained(cfg.model.path, "the evaluation's numbers say nothing about protection on a real model")
    sd = load_sd(cfg.model.path, cfg.model.device, cfg.model.dtype, cfg.model.revision)
    check_sampler_steps(sd, cfg.sample)  # pndm's least step count depends on the model's scheduler config
    from apdm.personalization.run import check_size
    from apdm.personalization.simulator import check_lora_targets

    if cfg.resolution:
        check_size(sd, cfg.resolution)
    for i, per in enumerate(cfg.personalizations):  # before any cell's class images
        check_lora_targets(sd.unet, per, f"personalizations[{i}]")
    # the run can start: config.yaml is this run's from now, with no results.json of another run beside it (a run
    # that fails before here, e.g. a misspelt model path, leaves the last run's results as they were)
    forget_stale_results(out, cfg)
    atomic_write_text(out / "config.yaml", to_yaml(cfg))
    size = cfg.resolution or sd.resolution
    records: list[dict] = []
    gallery: list[dict] = []
    t_start = time.perf_counter()

    attacked: dict[tuple[str, str], torch.Tensor] = {}  # one subject's purified photos, shared by its cells
    shown: set[str] = set()

    def show_attacked(name: str, scenario: str, attack: str, fp: dict, train: torch.Tensor | None = None) -> None:
        """Put the grid of the attacked training photos in the report (written when ``train`` is given). Its file
        name carries the subject's fingerprint ``fp``, so a cached cell shows the photos of its own run."""
        file = f"images/attacked-{_cell_key(safe_name(name), scenario, attack, cfg.seed, fp)}.png"
        if train is not None:
            save_grid(train, out / file, nrow=8)
        if file not in shown and (out / file).is_file():
            shown.add(file)
            gallery.append({"subject": name, "title": f"what the attacker trains on: {scenario} · {attack}",
                            "file": file})

    def training_images(name: str, clean, protected, scenario: str, attack: str, fp: dict) -> torch.Tensor:
        """The scenario's photos after the attack, computed once per subject and shared by every personalization
        (model purifiers take minutes per photo)."""
        if (scenario, attack) not in attacked:
            train = scenario_images(clean, protected, scenario)
            if attack != "none":
                t_attack = time.perf_counter()
                train = apply_attack(train, attack, sd, seed=cfg.seed, quiet=cfg.quiet)
                LOG.info("subject '%s', %s photos after %s: %.1f s", name, scenario, attack,
                         time.perf_counter() - t_attack)
                show_attacked(name, scenario, attack, fp, train)
            attacked[(scenario, attack)] = train
        return attacked[(scenario, attack)]

    model_fp = model_fingerprint(cfg.model)  # (apdm.core.models)
    metric_files = metric_model_files(cfg)
    for subj, name in zip(cfg.subjects, names):
        slug = safe_name(name)
        clean_listed = list_images(split_spec(subj.clean_data))
        clean, clean_paths, errors = load_images(clean_listed, size=size, quiet=True)
        for e in errors:
            LOG.warning("subject '%s': skipped clean photo %s: %s", name, e["path"], e["error"])
        if not clean_paths:
            raise ValueError(f"subject '{name}': no usable clean images in {subj.clean_data}")
        protected, prot_paths = None, []
        if subj.protected_data:
            paired = protected_pairs(clean_paths, subj.protected_data)
            if paired is None:  # a plain folder: pairs fixed on the listings, before a failed file could shift them
                twin = dict(zip(clean_listed, pair_by_name(clean_listed, list_images(split_spec(subj.protected_data)),
                                                           f"subject '{name}'")))
                paired = [twin[c] for c in clean_paths]
            protected, prot_ok, errors = load_images(paired, size=size, quiet=True)
            if errors:  # drop each failed protected photo with its clean twin, so every scenario trains on pairs
                loaded = set(prot_ok)
                keep = [i for i, p in enumerate(paired) if p in loaded]
                for e in errors:
                    LOG.warning("subject '%s': skipped protected photo %s (%s), and its clean photo with it", name,
                                e["path"], e["error"])
                if not keep:
                    raise ValueError(f"subject '{name}': no usable protected images in {subj.protected_data}")
                clean, clean_paths = clean[keep], [clean_paths[i] for i in keep]
            prot_paths = prot_ok
        refs, ref_paths = clean, clean_paths
        if subj.reference_data:
            refs, ref_paths, errors = load_spec(subj.reference_data, size=size)
            if not ref_paths:
                why = "; ".join(f"{Path(e['path']).name}: {e['error']}" for e in errors[:3])
                raise ValueError(f"subject '{name}': no usable reference images in {subj.reference_data}"
                                 + (f" ({why}{' …' if len(errors) > 3 else ''})" if why else ""))
        # everything a cell's numbers depend on besides its scenario, attack and personalization: a changed model,
        # photo, prompt, sampler or metric never reuses a cached cell (the fidelity-only settings are left out: they
        # change no cell)
        subject_fp = {"model": model_fp, "subject": dataclasses.asdict(subj), "resolution": size, "seed": cfg.seed,
                      "sample": dataclasses.asdict(cfg.sample), "metrics": cell_metrics(cfg),
                      "photos": [[file_sha256(p) for p in paths] for paths in (clean_paths, prot_paths, ref_paths)]}
        if metric_files:  # the toy instruments' fingerprint, local metric models' files (none: keys as before)
            subject_fp["metric_models"] = metric_files
        backends = backends_of[name]
        base = {"label": cfg.label, "subject": name}
        save_grid(refs, out / "images" / f"{slug}-references.png", nrow=min(8, len(refs)))
        gallery.append({"subject": name, "title": "references (clean photos)", "file": f"images/{slug}-references.png"})
        if protected is not None:
            save_grid(protected, out / "images" / f"{slug}-protected.png", nrow=min(8, len(protected)))
            gallery.append({"subject": name, "title": "protected inputs", "file": f"images/{slug}-protected.png"})
            if cfg.metrics.fidelity:  # on the files as they are, not the model-resolution copies
                for r in file_fidelity_records(clean_paths, prot_paths, clean, protected, cfg.metrics.lpips,
                                               f"subject '{name}'"):
                    records.append({**base, "scenario": "-", "attack": "-", "personalization": "-", "prompt": "-", **r})

        if cfg.class_prompt_baseline:
            # sampled at `size` since 2026-12-07 (before: at the model's resolution, under a key holding `size`):
            # a baseline cached at another resolution than the model's is computed again; the others keep their keys
            resized = [{"baseline_sampled_at": size}] if size != sd.resolution else []
            key = _cell_key(slug, "class_prompt", subj.class_prompt, subject_fp, *resized)
            cell_file = out / "cells" / f"{key}.json"
            if cfg.resume and cell_file.is_file():
                recs = [{**r, "label": cfg.label, "cached": True, "computed_by": r.get("computed_by")}
                        for r in json.loads(cell_file.read_text())]
            else:
                gen = D.generate(sd, [subj.class_prompt], cfg.sample.num_images_per_prompt,
                                 cfg.sample.num_inference_steps, cfg.sample.guidance_scale, cfg.sample.negative_prompt,
                                 cfg.sample.seed, cfg.sample.batch_size, cfg.sample.sampler, height=size, width=size,
                                 quiet=cfg.quiet)
                scored, gen = scored_or_unavailable(
                    gen, refs, cfg, backends, subj.class_prompt,
                    f"subject '{name}', class-prompt baseline '{subj.class_prompt}'",
                    "the model's own samples of the class prompt are not finite (check the model's weights and dtype)")
                save_grid(gen, out / "images" / f"{key}.png", nrow=8)
                recs = [{**base, "scenario": "-", "attack": "-", "personalization": "none (class prompt)",
                         "prompt": subj.class_prompt, **r, "computed_by": computed_by} for r in scored]
                write_strict_json(cell_file, recs)
            records += recs
            gallery.append({"subject": name, "title": f"no personalization: '{subj.class_prompt}'",
                            "file": f"images/{key}.png"})

        cells = [(sc, at, pc) for sc in cfg.scenarios for at in cfg.attacks for pc in cfg.personalizations
                 if not (sc != "all_clean" and protected is None)]
        skipped = [sc for sc in cfg.scenarios if sc != "all_clean" and protected is None]
        if skipped:
            LOG.warning("subject '%s' has no protected_data: skipping scenarios %s", name,
                        ", ".join(sorted(set(skipped))))
        attacked.clear()
        for scenario, attack, per in progress(cells, desc=f"evaluating {name}"):
            method = per_label[id(per)]
            key = _cell_key(slug, scenario, *_attack_parts(attack), per.method, subject_fp, dataclasses.asdict(per))
            cell_file = out / "cells" / f"{key}.json"
            if cfg.resume and cell_file.is_file():
                LOG.info("cell %s/%s/%s/%s already done; skipping", name, scenario, attack, method)
                if attack != "none":
                    show_attacked(name, scenario, attack, subject_fp)
                records += [{**r, "label": cfg.label, "personalization": method, "cached": True,  # this run's names
                             "computed_by": r.get("computed_by")}  # None: cached by a version before 2026-12-07
                            for r in json.loads(cell_file.read_text())]
                gallery += [{"subject": name, "title": f"{scenario} · {attack} · {method} · '{p}'",
                             "file": f"images/{key}-{i}.png"} for i, p in enumerate(cfg.sample.prompts)]
                continue
            t0 = time.perf_counter()
            train = training_images(name, clean, protected, scenario, attack, subject_fp)
            pcfg = with_prompts(per, subj.instance_prompt, subj.class_prompt)
            pcfg = dataclasses.replace(pcfg, seed=cfg.seed)
            result = personalize_and_sample(sd, train, pcfg, list(cfg.sample.prompts), cfg.sample, quiet=cfg.quiet)
            cell_recs = []
            for i, (prompt, gen) in enumerate(result["images"].items()):
                loss = result.get("loss_last")  # a diverged personalization: its cell says so, the run goes on
                scored, gen = scored_or_unavailable(
                    gen, refs, cfg, backends, prompt, f"cell {name}/{scenario}/{attack}/{method}, prompt '{prompt}'",
                    "the personalization diverged" + (f" (last loss {loss:.4g}; try a lower learning_rate)"
                                                      if isinstance(loss, (int, float)) else ""))
                save_grid(gen, out / "images" / f"{key}-{i}.png", nrow=8)
                gallery.append({"subject": name, "title": f"{scenario} · {attack} · {method} · '{prompt}'",
                                "file": f"images/{key}-{i}.png"})
                for r in scored:
                    cell_recs.append({**base, "scenario": scenario, "attack": attack, "personalization": method,
                                      "prompt": prompt, **r})
            cell_recs.append({**base, "scenario": scenario, "attack": attack, "personalization": method,
                              "prompt": "-", "metric": "seconds@apdm", "name": "seconds", "impl": "apdm",
                              "value": round(time.perf_counter() - t0, 2), "higher_is_better": None, "n": 1,
                              "available": True})
            cell_recs = [{**r, "computed_by": computed_by} for r in cell_recs]
            write_strict_json(cell_file, cell_recs)
            records += cell_recs
            del result

    summary = {"label": cfg.label, "model": sd.source, "seed": cfg.seed,
               "seconds_total": round(time.perf_counter() - t_start, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
               "provenance": provenance(), "config": to_dict(cfg), "records": records}
    write_strict_json(out / "results.json", summary)
    write_report(out / "report.html", cfg, records, gallery)
    LOG.info("evaluation done: %d records; report at %s", len(records), out / "report.html")
    return {"records": records, "output_dir": str(out)}
