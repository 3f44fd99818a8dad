"""Data-parallel protection over several processes (gloo on CPU here; NCCL on GPUs, same code)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from apdm.config import PersonalizationConfig, ProtectConfig

PER = PersonalizationConfig(method="dreambooth", learning_rate=1e-3, batch_size=1)
PCFG = ProtectConfig(outer_steps=2, inner_steps=1, learning_rate=1e-3, checkpoint_every=1)


def _subject():
    from apdm.protect_model import l2p

    g = torch.Generator().manual_seed(0)
    return l2p.Subject("s", torch.rand(2, 3, 64, 64, generator=g), torch.rand(2, 3, 64, 64, generator=g),
                       torch.rand(3, 3, 64, 64, generator=g), "a photo of sks person", "a photo of a person")


def _sgd_step(sd, seed: int) -> dict[str, torch.Tensor]:
    """θ after one outer step with plain SGD at lr 1, i.e. θ0 − (the gradient θ receives)."""
    from apdm.protect_model import l2p

    theta, trainable = l2p.prepare_theta(sd, PCFG)
    theta.train()
    opt = torch.optim.SGD(list(trainable.values()), lr=1.0)
    l2p.outer_step(0, theta, trainable, sd.unet, sd, [_subject()], PER, PCFG, opt, seed)
    return {n: p.detach().clone() for n, p in trainable.items()}


def _worker(rank: int, world: int, port: int, folder: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from safetensors.torch import save_file

    from apdm.core import distributed
    from apdm.core.models import tiny_sd
    from apdm.protect_model import l2p
    from apdm.utils import set_progress

    set_progress(False)
    assert distributed.init_from_env() == (rank, world)
    sd = tiny_sd(seed=0)
    sgd = _sgd_step(sd, seed=5)
    theta, _, _ = l2p.protect(sd, [_subject()], PER, PCFG, seed=5, checkpoint_dir=os.path.join(folder, "ckpt"))
    save_file({**{f"sgd/{n}": t.contiguous() for n, t in sgd.items()},
               **{f"theta/{n}": p.detach().contiguous() for n, p in theta.named_parameters()}},
              os.path.join(folder, f"rank{rank}.safetensors"))
    distributed.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_average_their_protection_gradients(tmp_path):
    """Each rank draws its own samples; θ receives the mean of the ranks' gradients and stays identical on both."""
    from safetensors.torch import load_file

    from apdm.core.distributed import RANK_SEED_STRIDE
    from apdm.core.models import tiny_sd

    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1))
    assert r0.keys() == r1.keys()
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # same θ on every process, bit for bit

    # the reference in one process: each rank's gradient, from its own seed, then their mean
    sd = tiny_sd(seed=0)
    theta0 = dict(sd.unet.named_parameters())
    g0 = {n: theta0[n] - t for n, t in _sgd_step(sd, 5).items()}
    g1 = {n: theta0[n] - t for n, t in _sgd_step(sd, 5 + RANK_SEED_STRIDE).items()}
    diff = sum(float((g0[n] - g1[n]).abs().sum()) for n in g0)
    assert diff > 1e-3 * sum(float(g.abs().sum()) for g in g0.values())  # the ranks really drew differently
    for n in g0:
        torch.testing.assert_close(r0[f"sgd/{n}"], theta0[n] - (g0[n] + g1[n]) / 2, atol=1e-5, rtol=1e-4, msg=n)
    progress = json.loads((tmp_path / "ckpt" / "progress.json").read_text())
    assert progress["next_step"] == 2  # the main process checkpointed


def test_incomplete_launcher_environment_is_a_clear_error(monkeypatch):
    from apdm.core import distributed

    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(RuntimeError, match="RANK, MASTER_ADDR, MASTER_PORT not set.*torchrun"):
        distributed.init_from_env()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env() == (0, 1) and distributed.rank_seed(7) == 7


def test_torchrun_protect_model_cli(tmp_path):
    """The provider's command under ``torchrun --nproc_per_node 2``: one model written, by the main process."""
    from helpers import tiny_protect_model_args

    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "apdm.cli",
           "protect-model", *tiny_protect_model_args(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    log = json.loads((out / "protect_log.json").read_text())
    assert log["world_size"] == 2 and len(log["history"]) == 2
    assert (out / "model" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert not (out / "checkpoint").exists()
    # the same command in one process is another protection (each step averaged two processes' draws), not "done"
    assert log["run"]["processes"] == 2


def _said_worker(rank: int, world: int, port: int, folder: str, check, *args) -> None:
    """Join a ``world``-process gloo group, run ``check(rank, *args)`` and write what it said (its RuntimeError's
    message, or "no error") to ``folder/said<rank>.txt``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from apdm.core import distributed

    distributed.init_from_env()
    try:
        check(rank, *args)
        said = "no error"
    except RuntimeError as exc:
        said = str(exc)
    with open(os.path.join(folder, f"said{rank}.txt"), "w") as f:
        f.write(said)
    distributed.finish()


def _disagree(rank: int) -> None:
    from apdm.core import distributed

    distributed.agree({"photos": ["a", "b"]}, "the photos")  # the same on both: passes
    distributed.agree({"photos": ["a", "b"][: 2 - rank]}, "the photos")  # rank 1 could not read one photo


def test_processes_that_see_other_photos_are_refused(tmp_path):
    """A process that cannot read a photo (or finds no checkpoint where the main one resumes) trained on other data,
    its gradients averaged with the others' and no error anywhere; now every process stops, naming the ones that
    differ."""
    mp.spawn(_said_worker, args=(2, _free_port(), str(tmp_path), _disagree), nprocs=2, join=True)
    for rank in (0, 1):
        said = (tmp_path / f"said{rank}.txt").read_text()
        assert "the 2 processes disagree on the photos: process(es) [1] differ from process 0" in said, said


def test_other_commands_refuse_several_processes(monkeypatch, capsys):
    """Under torchrun every process ran the whole protect-images / evaluate / personalize job and wrote the same
    files (on a GPU machine all on GPU 0); only protect-model runs data parallel, the others now refuse."""
    from apdm.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in (["protect-images", "--method", "advdm", "--input", "x", "--output", "y"], ["evaluate"],
                    ["personalize"], ["train-perturber"]):
        assert main(command) == 2
        assert f"apdm {command[0]} runs in one process (WORLD_SIZE=2" in capsys.readouterr().err


def _on_device(rank: int, devices: list) -> None:
    from apdm.core import distributed

    distributed.distinct_devices(devices[rank])  # only the device's name is compared: no GPU needed for the launch


@pytest.mark.parametrize("devices, ok", [(["cuda:0", "cuda:0"], False), (["cuda:0", "cuda"], False),
                                         (["cuda:0", "cuda:1"], True), (["cpu", "cpu"], True)])
def test_two_processes_on_one_gpu_are_refused(tmp_path, devices, ok):
    """Two processes on one GPU failed only at the first NCCL gradient sum, after the class images were made."""
    mp.spawn(_said_worker, args=(2, _free_port(), str(tmp_path), _on_device, devices), nprocs=2, join=True)
    for rank in (0, 1):
        said = (tmp_path / f"said{rank}.txt").read_text()
        assert (said == "no error") if ok else ("processes [0, 1] on" in said and "one process per GPU" in said), said
