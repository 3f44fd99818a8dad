"""Benchmarks (``apdm bench NAME --out F.json [--quick]``): speed, memory and efficacy numbers as flat JSON.

Targets are measured here, never by timed assertions in tests. Each benchmark is a function
``fn(quick: bool, overrides: list[str]) -> dict`` listed in :data:`BENCHMARKS`.
"""

from __future__ import annotations

import json
import sys
import time


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


#: name -> function(quick, overrides) -> flat dict of numbers
BENCHMARKS = {
    "personalize-steps": _personalize_steps,
    "toy-world": _toy_world,
    "protect-model": _protect_model,
    "protect-images": _protect_images,
}


def run_benchmark(name: str, out: str | None, quick: bool, overrides: list[str]) -> int:
    """Run one benchmark, print its JSON and write it atomically to ``out``."""
    from apdm.utils import atomic_write_json, peak_rss_mb

    t0 = time.perf_counter()
    result = BENCHMARKS[name](quick, overrides)
    result.setdefault("seconds_total", round(time.perf_counter() - t0, 2))
    result.setdefault("peak_rss_mb", round(peak_rss_mb(), 1))
    result = {"benchmark": name, "quick": quick, **result}
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        atomic_write_json(out, result)
    return 0 if result else 1
