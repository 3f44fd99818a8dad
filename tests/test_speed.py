"""Real-size random architectures and ``apdm bench speed`` (run here on the tiny model; on a GPU with random:sd15)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from apdm.core.models import ARCHITECTURES, ModelLoadError, build_components, load_sd


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch, unet, text", [("sd15", 859_520_964, 123_060_480),
                                              ("sd21base", 865_910_724, 340_387_840)])
def test_random_architectures_have_the_published_sizes(arch, unet, text):
    """Parameter counts of the published checkpoints (UNet, VAE 83,653,863, text encoder), built on the meta
    device (nothing allocated)."""
    a = ARCHITECTURES[arch]
    with torch.device("meta"):
        u, vae, te, _, sched = build_components(a["unet"], a["vae"], a["text"])
    assert (_count(u), _count(vae), _count(te)) == (unet, 83_653_863, text)
    assert u.config.sample_size * 2 ** (len(vae.config.block_out_channels) - 1) == 512
    assert sched.config.beta_schedule == "scaled_linear"


def test_unknown_random_architecture_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="random:sd15"):
        load_sd("random:sd3")


def test_tiny_fingerprint_does_not_depend_on_the_hash_seed():
    """diffusers records a code-built model's defaults in set order; the fingerprint (class-image cache keys,
    benchmark baselines) must not change with PYTHONHASHSEED."""
    code = "from apdm.core.models import tiny_sd; print(tiny_sd().fingerprint())"
    prints = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                             env={**os.environ, "PYTHONHASHSEED": seed}).stdout.strip() for seed in ("1", "2", "3")}
    assert len(prints) == 1 and len(prints.pop()) == 16


def test_fingerprint_follows_the_weights_not_the_folder(tiny_sd, tmp_path):
    """The same weights in two folders are one model (baselines and caches match); another weight is another."""
    from apdm.core.models import save_sd

    for name in ("a", "b"):
        save_sd(tiny_sd, tmp_path / name)
    a, b = (load_sd(str(tmp_path / n), device="cpu", dtype="fp32") for n in ("a", "b"))
    assert a.source != b.source and a.fingerprint() == b.fingerprint() == tiny_sd.fingerprint()
    with torch.no_grad():
        next(b.unet.parameters()).flatten()[0] += 1.0
    assert b.fingerprint() != a.fingerprint()


def test_speed_bench_times_every_engine(tmp_path):
    from apdm.cli import main

    out = tmp_path / "speed.json"
    assert main(["bench", "speed", "--quick", "--out", str(out), "quiet=true", "repeats=1", "device=cpu",
                 "inner_steps=1", "outer_steps=10", "images=2", "trap_images=3", "trap_steps=100",
                 "micro_batch=2", "upscaler=tiny"]) == 0
    r = json.loads(out.read_text())
    assert (r["model"], r["device"], r["resolution"], r["images"]) == ("tiny", "cpu", 64, 2)
    # what produced the numbers, in every benchmark's JSON
    assert r["provenance"]["torch"] == torch.__version__ and r["provenance"]["apdm"] and "peak_rss_mb_workers" in r
    assert r["provenance"]["torch_threads"] >= 1 and not {"torch", "torch_threads", "cpu"} & set(r)  # said once
    timed = [k for k in r if k.startswith("seconds_per_")]
    # 3 personalization steps, the L2P outer step, LDU apply and train step, ASPL, AdvDM, PhotoGuard, SDS, Mist,
    # PID, CAAT, SimAC's selection round and iteration, MetaCloak's pool step and iteration (+ projections),
    # the encoder trap's step, the purifiers (IMPRESS step, GrIDPure round, DiffPure call, upscaler step, + projections)
    # of two timings, each a median: lost in the noise on a loaded machine they are None with a note (never 0.0),
    # and so are the projections that need them
    differences = ("seconds_per_step_ldu_train", "seconds_per_step_noisy_upscale", "seconds_per_step_caat",
                   "seconds_per_step_metacloak_pool", "seconds_per_iteration_metacloak")
    projections = ("seconds_per_image_caat_projected", "seconds_per_image_metacloak_projected",
                   "seconds_per_image_noisy_upscale_projected")
    assert len(timed) == 36 and all(r[k] > 0 for k in timed if k not in differences + projections)
    assert all(r[k] is None or r[k] > 0 for k in differences + projections)
    assert all(f"note_{k.removeprefix('seconds_')}" in r for k in differences if r[k] is None)
    # projections follow from the measured unit: 10 outer steps, 50 ASPL iterations over 2 images
    assert r["hours_protect_model_projected"] == pytest.approx(r["seconds_per_outer_step"] * 10 / 3600, abs=1e-3)
    assert r["seconds_per_image_aspl_projected"] == pytest.approx(r["seconds_per_iteration_aspl"] * 50 / 2, rel=1e-2)
    if r["seconds_per_step_caat"] is not None:
        assert r["seconds_per_image_caat_projected"] >= r["seconds_per_step_caat"] * 249 / 2 - 2e-3
    assert r["seconds_per_image_simac_projected"] == pytest.approx(
        r["seconds_per_round_simac_selection"] * 50 + r["seconds_per_iteration_simac"] * 50 / 2, rel=1e-2, abs=2e-3)
    # MetaCloak: the pool's setup and first step (≥ 0) + 999 more steps + 2,400 iterations (the recorded units
    # are rounded to 1e-4 s, hence the tolerance)
    if r["seconds_per_step_metacloak_pool"] is not None and r["seconds_per_iteration_metacloak"] is not None:
        assert r["seconds_per_image_metacloak_projected"] >= (r["seconds_per_step_metacloak_pool"] * 999
                                                              + r["seconds_per_iteration_metacloak"] * 2400) / 2 - 0.2
    for name, steps in (("advdm", 100), ("photoguard", 1000), ("sds", 100), ("mist", 100), ("pid", 1000)):
        assert r[f"seconds_per_image_{name}_projected"] == pytest.approx(r[f"seconds_per_step_{name}"] * steps / 2,
                                                                        rel=1e-2, abs=2e-3)
    assert r["hours_encoder_trap_projected"] == pytest.approx(r["seconds_per_step_encoder_trap"] * 100 / 3600,
                                                              abs=1e-3)
    assert (r["trap_images"], r["trap_micro_batch"], r["trap_steps"], r["trap_preserve_batch"]) == (3, 2, 100, 8)
    # IMPRESS's 3000 steps and GrIDPure's 20 rounds, per image of the 2
    assert r["seconds_per_image_impress_projected"] == pytest.approx(r["seconds_per_step_impress"] * 3000 / 2,
                                                                     rel=1e-2)
    assert r["seconds_per_image_gridpure_projected"] == pytest.approx(r["seconds_per_round_gridpure"] * 20 / 2,
                                                                      rel=1e-2)
    one, step = r["seconds_per_call_noisy_upscale_1step"], r["seconds_per_step_noisy_upscale"]
    if step is not None:
        assert r["seconds_per_image_noisy_upscale_projected"] == pytest.approx((one + 74 * step) / 2, rel=1e-2,
                                                                               abs=2e-3)
    assert r["peak_rss_mb"] > 100  # torch and the models are resident
    assert not any(k.startswith("peak_gpu_mb") for k in r)  # CPU run: no GPU memory keys


def test_speed_bench_rejects_unknown_parts():
    from apdm.bench.speed import bench_speed

    with pytest.raises(ValueError, match="unknown parts"):
        bench_speed(True, ["parts=protect-everything"])


def test_step_by_difference_separates_setup_from_steps(monkeypatch):
    """The speed bench times MetaCloak's pool, CAAT and the upscaler by difference: (setup + 1 step) and (setup +
    1 + repeats steps). With a clock that charges 0.05 s of setup and 0.02 s per step the two come out exactly (the
    bench's own test could only check them >= 0, which the code's clamp guarantees)."""
    from apdm.bench import speed

    monkeypatch.setattr(speed, "timed", lambda fn, device, repeats: (fn(), 123.0))  # fn() returns its "seconds"
    one, per_step, peak = speed._step_by_difference(lambda steps: 0.05 + 0.02 * steps, torch.device("cpu"), 5)
    assert (one, peak) == (pytest.approx(0.07), 123.0) and per_step == pytest.approx(0.02)


def test_speed_bench_refuses_what_protect_model_refuses():
    """mixed_precision=fp16 timed a protection step protect-model no longer runs (no loss scaling)."""
    from apdm.bench.speed import bench_speed

    with pytest.raises(ValueError, match="mixed_precision must be no or bf16"):
        bench_speed(True, ["mixed_precision=fp16"])
