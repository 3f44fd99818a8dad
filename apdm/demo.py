"""``apdm demo``: the toy-world demonstration of the whole tool, end to end, on a CPU.

1. export a held-out toy subject (4 photos + reference photos) as an image folder;
2. ``protect-images``: protect the photos with LDU (the shipped toy ρ) — and ASPL unless ``--quick``;
3. ``protect-model``: protect the toy model against the subject with APDM (``recipes/toy-protect-model.yaml``);
4. ``evaluate``: attack everything with DreamBooth (clean, protected, JPEG-75 and DiffPure-purified inputs) and
   score with the toy instruments;
5. one combined ``report.html`` + ``results.json``.

It only composes the public commands' ``run()`` functions with ordinary folders; nothing in the engines knows it is
the toy world.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def run_demo(out_dir: str = "outputs/demo", quick: bool = False, quiet: bool = True) -> Path:
    """Run the demo into ``out_dir``; returns the report path. ``quiet=False`` shows each step's progress bars
    (``quiet=True`` hides them all: the L2P and evaluation bars read only the global switch, which only the CLI set)."""
    from apdm.utils import progress_enabled, set_progress

    was = progress_enabled()
    set_progress(not quiet)
    try:
        return _run_demo(out_dir, quick, quiet)
    finally:
        set_progress(was)


def _run_demo(out_dir: str, quick: bool, quiet: bool) -> Path:
    from apdm.bench.toy_world import toy_recipe
    from apdm.config import (EvalSubjectConfig, EvaluateRunConfig, MetricsConfig, ModelConfig, ProtectImagesRunConfig,
                             ProtectModelRunConfig, SubjectConfig, load_config)
    from apdm.evaluation import run as evaluate
    from apdm.evaluation.report import write_report
    from apdm.protect_images.run import run as protect_images
    from apdm.protect_model.run import run as protect_model
    from apdm.toy.world import export, model_path, rho_path
    from apdm.utils import LOG, atomic_write_json, provenance

    out = Path(out_dir)
    LOG.info("demo 1/4: exporting a held-out toy subject to %s", out / "data")
    subject = Path(export(out / "data", subjects=1)["subjects"][0])
    model = ModelConfig(path=str(model_path()))

    rho = rho_path()
    has_rho = rho is not None
    methods = (["ldu"] if has_rho else []) + (["aspl"] if not (quick and has_rho) else [])
    LOG.info("demo 2/4: protecting the photos (%s)%s", ", ".join(methods),
             "" if has_rho else "; no toy LDU network found (train one: recipes/toy-train-perturber.yaml)")
    for m in methods:
        cfg = ProtectImagesRunConfig(model=model, method=m, budget="8/255", input=str(subject / "train"),
                                     output_dir=str(out / f"protected-{m}"), rho_path=str(rho or ""),
                                     steps=20 if m == "aspl" else 0, quiet=quiet)
        if m == "aspl":
            cfg.personalization = dataclasses.replace(toy_recipe("dreambooth").personalization,
                                                      with_prior_preservation=False)
        protect_images(cfg)

    LOG.info("demo 3/4: protecting the model itself (APDM)")
    pm = load_config(ProtectModelRunConfig, RECIPES / "toy-protect-model.yaml",
                     [f"output_dir={out / 'apdm'}", f"quiet={str(quiet).lower()}"])
    pm.model = model
    pm.subjects = [SubjectConfig(instance_data=str(subject / "train"))]
    if quick:
        pm.protect.outer_steps = max(10, pm.protect.outer_steps // 2)
    protect_model(pm)

    LOG.info("demo 4/4: attacking and scoring (DreamBooth, with and without purification)")
    db = toy_recipe("dreambooth")
    sample = dataclasses.replace(db.sample, prompts=["a photo of sks person"], num_images_per_prompt=8 if quick else 16)
    metrics = MetricsConfig(identity="toy", detector="toy", features="toy", brisque=True)
    records, gallery = [], []
    runs = [("unprotected", model.path, "")]
    runs += [(f"{m} images", model.path, str(out / f"protected-{m}")) for m in methods]
    runs += [("apdm model", str(out / "apdm" / "model"), "")]
    for label, path, protected in runs:
        cfg = EvaluateRunConfig(
            model=ModelConfig(path=path), label=label, metrics=metrics, sample=sample,
            subjects=[EvalSubjectConfig(name=subject.name, clean_data=str(subject / "train"), protected_data=protected,
                                        reference_data=str(subject / "references"))],
            scenarios=["all_perturbed"] if protected else ["all_clean"],
            attacks=(["none", "jpeg:quality=75", "diffpure:strength=0.2"] if protected and not quick else ["none"]),
            personalizations=[db.personalization], class_prompt_baseline=label == "unprotected",
            output_dir=str(out / "evaluate" / label.replace(" ", "-")), quiet=quiet)
        result = evaluate.run(cfg)
        records += result["records"]
        sub = Path(cfg.output_dir).relative_to(out)
        gallery += [{"subject": f"{label}", "title": g["title"], "file": str(sub / g["file"])}
                    for g in _gallery(Path(cfg.output_dir))]
    attacks = list(dict.fromkeys(r["attack"] for r in records if r.get("attack") not in (None, "-")))
    atomic_write_json(out / "results.json", {"label": "apdm toy-world demo", "quick": quick,
                                             "models": {label: path for label, path, _ in runs},
                                             "provenance": provenance(), "records": records})
    summary_cfg = EvaluateRunConfig(model=ModelConfig(path=" and ".join(dict.fromkeys(p for _, p, _ in runs))),
                                    label="apdm toy-world demo", sample=sample, attacks=attacks,
                                    scenarios=["all_clean", "all_perturbed"], personalizations=[db.personalization])
    report = write_report(out / "report.html", summary_cfg, records, gallery)
    LOG.info("demo done: open %s", report)
    return report


def _gallery(folder: Path) -> list[dict]:
    """The image grids an evaluate run wrote, with titles from its report."""
    import html
    import re
    import urllib.parse

    page = (folder / "report.html").read_text(encoding="utf-8")
    # the report writes each src HTML-escaped and URL-quoted (report.py); both are undone, so that the combined
    # report quotes the file name once again, not twice (José.png -> Jos%C3%A9.png, not Jos%25C3%25A9.png)
    return [{"file": urllib.parse.unquote(html.unescape(f)), "title": html.unescape(t)}
            for f, t in re.findall(r"<img src='([^']+)' alt='([^']*)'>", page)]
