"""Benchmarks (``apdm bench NAME --out F.json [--quick]``): speed, memory and efficacy numbers as flat JSON.

Targets are measured here, never by timed assertions in tests. Each benchmark is a function
``fn(quick: bool, overrides: list[str]) -> dict`` listed in :data:`BENCHMARKS`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time


def parse_options(overrides: list[str], known: set[str]) -> dict[str, str]:
    """``["subjects=3", ...]`` -> ``{"subjects": "3"}``; a malformed or unknown option is a clear error."""
    opts = {}
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"benchmark option '{o}' must look like key=value")
        key, value = o.split("=", 1)
        if key not in known:
            raise ValueError(f"unknown benchmark option '{key}' (known: {', '.join(sorted(known))})")
        opts[key] = value
    return opts


def method_list(text: str, known, key: str = "methods", outside: str = "unknown") -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` for a benchmark's list of methods, refusing a name not in ``known`` (as
    ``{key}: {outside} X; choose from ...``) and a name given twice (before 2026-12-07 ``methods=advdm,advdm`` ran
    every protection and attack twice and doubled the per-subject lists)."""
    methods = text.split(",")
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"{key}: {outside} {', '.join(unknown)}; choose from {', '.join(known)}")
    twice = sorted({m for m in methods if methods.count(m) > 1})
    if twice:
        raise ValueError(f"{key}: {', '.join(twice)} given more than once; name each method once "
                         f"(e.g. {key}={','.join(dict.fromkeys(methods))})")
    return methods


def result_json(result: dict) -> tuple[dict, str]:
    """A benchmark result and its strict-JSON text (``allow_nan=False``): non-finite numbers become ``null`` and the
    key ``non_finite`` names each (``{path: "inf"}``) with a warning, so a bare ``Infinity`` is never written."""
    from apdm.utils import LOG, _json_default, finite_json

    result, bad = finite_json(result)
    if bad:
        LOG.warning("benchmark result: non-finite values written as null: %s",
                    ", ".join(f"{k}={v}" for k, v in bad.items()))
        result["non_finite"] = bad
    return result, json.dumps(result, indent=2, allow_nan=False, default=_json_default)


def option_bool(opts: dict[str, str], key: str, default: bool, meaning: str = "") -> bool:
    """A ``key=true|false`` benchmark option (also 1/0, yes/no, on/off, any case; see
    :func:`apdm.utils.parse_bool`), ``default`` when absent; any other value is a ValueError naming the option and,
    when given, what it means."""
    from apdm.utils import parse_bool

    if key not in opts:
        return default
    try:
        return parse_bool(opts[key])
    except ValueError:
        raise ValueError(f"{key}={opts[key]!r}: true or false" + (f" ({meaning})" if meaning else "")) from None


def _option_number(opts: dict[str, str], key: str, default, parse, requirement: str, meaning: str):
    """``default`` when ``key`` is absent, else ``parse(text)``; a ValueError from ``parse`` (a malformed or
    out-of-range value) becomes one naming the option, its ``requirement``, what it means (if given) and the value."""
    if key not in opts:
        return default
    try:
        return parse(opts[key])
    except ValueError:
        raise ValueError(f"{key} must be {requirement}{f' ({meaning})' if meaning else ''}, "
                         f"got '{opts[key]}'") from None


def option_int(opts: dict[str, str], key: str, default: int, minimum: int = 1, meaning: str = "") -> int:
    """A whole-number benchmark option ``key=N`` with N ≥ ``minimum``, ``default`` when absent; anything else
    (``3.5``, ``abc``, a number below ``minimum``) is a ValueError naming the option and, when given, what it
    means, raised before any work."""
    def parse(text: str) -> int:
        n = int(text)
        if n < minimum:
            raise ValueError
        return n

    return _option_number(opts, key, default, parse, f"a whole number >= {minimum}", meaning)


def option_positive(opts: dict[str, str], key: str, default: float, meaning: str = "") -> float:
    """A positive finite number option ``key=X`` (``1e-4``, ``0.0002``), ``default`` when absent; anything else is a
    ValueError naming the option and, when given, what it means."""
    import math

    def parse(text: str) -> float:
        x = float(text)
        if not (math.isfinite(x) and x > 0):
            raise ValueError
        return x

    return _option_number(opts, key, default, parse, "a number > 0", meaning)


def toy_setup(overrides: list[str], known: set[str]):
    """Shared preamble of the toy-world benchmarks: options (``known`` plus ``model``, ``device``, ``workers``),
    seeding, the model and the instruments.

    Returns:
        (options dict, :class:`apdm.core.models.SD`, toy ``Instruments``).
    """
    from apdm.bench import jobs
    from apdm.core.models import load_sd
    from apdm.toy.world import model_path
    from apdm.utils import seed_everything

    opts = parse_options(overrides, known | {"model", "device", "workers"})
    seed_everything(0)
    sd = load_sd(opts.get("model", str(model_path())), device=opts.get("device", "auto"))
    jobs.worker_count(opts, sd)  # a bad workers= is refused now, not after the first measurements
    jobs.remember_model(sd)  # jobs run in this process (workers=1) reuse the model and instruments loaded here
    return opts, sd, jobs.instruments()


def check_subjects(n: int, offset: int = 0, key: str = "subjects") -> None:
    """Refuse ``n`` held-out toy subjects from position ``offset`` when the toy world holds fewer (it would silently
    measure fewer than the result says).

    Raises:
        ValueError: naming ``key`` and the number of held-out identities.
    """
    from apdm.toy import draw

    total = len(draw.split()["heldout"])
    if n < 1 or offset < 0 or offset + n > total:
        raise ValueError(f"{key}: the toy world holds {total} held-out subjects (positions 0 to {total - 1}); "
                         f"asked for {n} from position {offset}")


# ---------------------------------------------------------------------------- the evaluation attacker's options
# shared by the toy benches that attack with the toy personalization recipes (protect-model, protect-images)
def attack_config(per_cfg, subj, word: str):
    """The evaluation attacker's config ``per_cfg`` for held-out subject ``subj`` (prompt "a photo of sks person",
    "sks" being ``per_cfg.identifier``) when the attacker names the subject ``word``: "a photo of WORD person"
    (DreamBooth, LoRA; TI learns the token ``<WORD>``)."""
    from apdm.evaluation.protocol import with_prompts
    from apdm.personalization.simulator import swap_identifier

    prompt = swap_identifier(subj.instance_prompt, per_cfg.identifier, word)
    return dataclasses.replace(with_prompts(per_cfg, prompt, subj.class_prompt), identifier=word)


def identifier_option(opts: dict, key: str) -> str:
    """``identifier=WORD`` / ``other_identifier=WORD``: one word without spaces (default the recipe's "sks")."""
    word = opts.get(key, "sks")
    if not word or any(ch.isspace() for ch in word) or word in ("person", "a", "photo", "of"):
        raise ValueError(f"{key} must be one word without spaces, not a word of the prompt (e.g. zwx or t@t), "
                         f"got '{word}'")
    return word


def attack_run(per_cfg, sample, run: int, stride: int | None = None):
    """Run ``run`` (0, 1, …) of an attack: ``per_cfg`` and ``sample`` with the attacker's seed (its noise, timesteps,
    prior images, …) and the sampling seed both raised by ``run`` · ``stride``; run 0 is the attack unchanged.

    ``stride`` defaults to :data:`apdm.core.diffusion.SEED_STRIDE`, so the runs share no sampling noise and no prior
    (class) image: both are seeded per image (seed + i). ``stride=1`` is how runs were seeded before 2026-12-04
    (runs r and r + 1 then shared all but one of their samples' initial noises and of their class images, so they
    were correlated draws); the bench option ``attack_seed_stride=1`` reproduces those results."""
    from apdm.core.diffusion import SEED_STRIDE

    step = run * (SEED_STRIDE if stride is None else stride)
    return dataclasses.replace(per_cfg, seed=per_cfg.seed + step), dataclasses.replace(sample, seed=sample.seed + step)


def attack_seed_stride(opts: dict) -> int:
    """``attack_seed_stride=N``: how far apart the seeds of an attack's runs are (:func:`attack_run`; default
    :data:`apdm.core.diffusion.SEED_STRIDE`, independent runs; 1 reproduces results written before 2026-12-04)."""
    from apdm.core.diffusion import SEED_STRIDE

    return option_int(opts, "attack_seed_stride", SEED_STRIDE, 1, f"the seed distance between an attack's runs; "
                      f"{SEED_STRIDE} by default, 1 as before 2026-12-04")


def standard_error(values: list[float]) -> float:
    """Standard error of the mean of ``values`` (sample standard deviation / √n; n ≥ 2): how far the mean of n
    independent attacker runs may sit from the attack's expectation (mean ± 2 se covers it about 95 % of the time
    for normal runs; with 3 runs the interval is rough). Meaningful only for independent runs
    (``attack_seed_stride`` ≥ the sample count, the default)."""
    return round(statistics.stdev(values) / len(values) ** 0.5, 4)


def ratio_standard_error(numerators: list[float], denominators: list[float]) -> float | None:
    """Standard error of the ratio of means R = mean(numerators) / mean(denominators) over n ≥ 2 paired independent
    runs (numerator r and denominator r from run r), by the delta method: se(R) ≈ sd(a_r − R·b_r) / (√n · mean(b)).

    This is the uncertainty of a protection ratio computed on mean ISMs (removed gain / gain), unlike the spread of
    per-run ratios a_r / b_r, which a run with a gain near zero makes arbitrary. First-order: it assumes the mean
    denominator sits well away from zero relative to its own standard error. ``None`` when mean(b) ≤ 0 (no gain)."""
    n = len(numerators)
    if n < 2 or n != len(denominators):
        raise ValueError(f"ratio_standard_error needs two or more paired runs, got {n} numerators and "
                         f"{len(denominators)} denominators")
    mean_b = sum(denominators) / n
    if mean_b <= 0:
        return None
    r = sum(numerators) / n / mean_b
    residuals = [a - r * b for a, b in zip(numerators, denominators)]  # mean exactly 0 by construction of r
    return round(statistics.stdev(residuals) / n ** 0.5 / mean_b, 4)


def submit_attack_runs(pool, spec, state, images, references, cfg, sample, n_runs: int,
                       keep_images: int = 0, stride: int | None = None, subject_class: str = "person") -> list:
    """Submit the ``n_runs`` runs of one evaluation attack (:func:`attack_run`, seeds ``stride`` apart) to ``pool``
    as :func:`apdm.bench.jobs.attack` jobs on the model ``spec`` with UNet ``state`` (``None`` = unchanged); run 0
    keeps ``keep_images`` samples; the detector scores a subject of ``subject_class``. Returns the futures, run r at
    index r."""
    from apdm.bench import jobs

    futs = []
    for r in range(n_runs):
        run_cfg, run_sample = attack_run(cfg, sample, r, stride)
        futs.append(pool.submit(jobs.attack, spec, state, images, references, run_cfg, run_cfg.instance_prompt,
                                run_sample, keep_images=keep_images if r == 0 else 0, subject_class=subject_class))
    return futs


def attack_seeds(opts: dict, quick: bool = True) -> int:
    """``attack_seeds=K``: how many times every attack is run (K ≥ 1; default 1 with ``--quick``, else 3)."""
    return option_int(opts, "attack_seeds", 1 if quick else 3, 1, "how many seeds each attack is run with")


def _personalize_steps(quick: bool, overrides: list[str]) -> dict:
    from apdm.bench.personalize import bench_personalize_steps

    return bench_personalize_steps(quick, overrides)


def _toy_world(quick: bool, overrides: list[str]) -> dict:
    from apdm.bench.toy_world import bench_toy_world

    return bench_toy_world(quick, overrides)


def _protect_model(quick: bool, overrides: list[str]) -> dict:
    from apdm.bench.protect_model import bench_protect_model

    return bench_protect_model(quick, overrides)


def _protect_images(quick: bool, overrides: list[str]) -> dict:
    from apdm.bench.protect_images import bench_protect_images

    return bench_protect_images(quick, overrides)


def _speed(quick: bool, overrides: list[str]) -> dict:
    from apdm.bench.speed import bench_speed

    return bench_speed(quick, overrides)


#: name -> function(quick, overrides) -> flat dict of numbers
BENCHMARKS = {
    "personalize-steps": _personalize_steps,
    "toy-world": _toy_world,
    "protect-model": _protect_model,
    "protect-images": _protect_images,
    "speed": _speed,
}


def check_out(out: str, what: str = "--out ") -> None:
    """Refuse an ``--out`` the result could not be written to, before hours of benchmark: a folder (or a name
    ending in ``/``, which was written as a file named like the folder), or a file in a folder that cannot be
    created or written (checked by creating and removing a temporary file there). ``what`` names the option in the
    message (``save_protected=``).

    Raises:
        ValueError: naming the path and the problem.
    """
    import tempfile
    from pathlib import Path

    path = Path(out)
    if path.is_dir() or out.endswith(("/", os.sep)):
        raise ValueError(f"{what}{out} is a folder; give a file name such as {path / 'result.json'}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ValueError(f"{what}{out}: the result could not be written there ({exc.strerror or exc})") from exc


def run_benchmark(name: str, out: str | None, quick: bool, overrides: list[str]) -> int:
    """Run one benchmark, print its JSON and write it atomically to ``out`` (checked first). ``quiet=true`` hides
    progress bars. Every result records what produced it (``provenance``: versions, git commit, machine, torch
    threads) and the peak memory of this process and of the worker processes it started."""
    from apdm.utils import atomic_write_text, peak_rss_mb, provenance, set_progress

    if out:
        check_out(out)
    quiet = [o for o in overrides if o.split("=", 1)[0] == "quiet"]
    if quiet:
        set_progress(not option_bool({"quiet": quiet[-1].split("=", 1)[-1]}, "quiet", False, "hide progress bars"))
        overrides = [o for o in overrides if o not in quiet]
    t0 = time.perf_counter()
    result = BENCHMARKS[name](quick, overrides)
    result.setdefault("seconds_total", round(time.perf_counter() - t0, 2))
    result.setdefault("peak_rss_mb", round(peak_rss_mb(), 1))
    # the largest worker process that has ended (benchmark jobs run in spawned workers when workers > 1)
    result.setdefault("peak_rss_mb_workers", round(peak_rss_mb(children=True), 1))
    result, text = result_json({"benchmark": name, "quick": quick, **result, "provenance": provenance()})
    print(text)
    if out:
        atomic_write_text(out, text + "\n")  # as atomic_write_json, but strict JSON (no Infinity / NaN)
        from apdm.utils import LOG

        LOG.info("bench %s: result written to %s (%.0f s)", name, out, result["seconds_total"])
    return 0 if result else 1
