"""Data-parallel runs over several processes (``torchrun`` / ``accelerate launch``), for ``apdm protect-model``.

A launcher starts one process per GPU and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and
``MASTER_PORT``. :func:`init_from_env` turns that into a process group (NCCL on CUDA, gloo on CPU) and pins the
process to GPU ``LOCAL_RANK``. Every process then runs the same protection with its own random draws
(:func:`rank_seed`); the protection gradients are averaged before each update, so θ stays identical on every
process while each outer step sees ``world_size`` times the samples. Only the main process writes files.

Without a launcher (``WORLD_SIZE`` unset or 1) everything here is a no-op: rank 0 of 1.
"""

from __future__ import annotations

import datetime
import os

#: rank r draws its randomness from ``seed + RANK_SEED_STRIDE * r`` (rank 0: the single-process seed).
RANK_SEED_STRIDE = 1_000_003


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) unless a process group is initialized."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """True on the process that writes outputs (rank 0, or the only process)."""
    return rank_world()[0] == 0


def rank_seed(seed: int) -> int:
    """This process's seed for data-parallel draws: ``seed`` on rank 0, shifted by the rank elsewhere."""
    return seed + RANK_SEED_STRIDE * rank_world()[0]


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    import torch.distributed as dist

    if rank_world()[1] > 1:
        dist.barrier()


def init_from_env() -> tuple[int, int]:
    """Join the process group a launcher described in the environment; returns (rank, world size).

    Idempotent. On CUDA machines each process is pinned to ``cuda:LOCAL_RANK`` first, so ``device=auto`` /
    ``cuda`` mean that process's own GPU.

    Raises:
        RuntimeError: ``WORLD_SIZE`` > 1 but the launcher's variables are incomplete (names the missing ones).
    """
    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return rank_world()
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} not set: start several processes with "
                           "`torchrun --nproc_per_node N -m apdm.cli ...` or `accelerate launch -m apdm.cli ...`")
    cuda = torch.cuda.is_available()
    if cuda:  # modulo: a cluster that shows each process only its own GPU (CUDA_VISIBLE_DEVICES) has one device
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
    # generous: the other processes wait at a barrier while the main one generates the class images (hundreds of
    # 50-step samples on SD), longer than the default 10-minute collective timeout. On a CUDA machine both
    # backends: NCCL for CUDA tensors, gloo for CPU ones (model.device=cpu there, and all_gather_object)
    dist.init_process_group(backend="cpu:gloo,cuda:nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=2))
    return rank_world()


def finish() -> None:
    """Leave the process group (no-op in a single process). The processes besides the main one call it as soon as
    the protection is done, so they never wait on the main one's solo work (encoder trap, saving) under the
    collective timeout."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def agree(obj, what: str) -> None:
    """Check that every process holds the same ``obj`` (JSON-able: settings, photo digests, the step a resume
    starts from); no-op in a single process.

    Raises:
        RuntimeError: naming ``what`` and the processes that differ from the main one (e.g. one that could not
            read a photo, or found no checkpoint where the main one resumes): their gradients would be averaged
            over different data or different weights without any other error.
    """
    import hashlib
    import json

    import torch.distributed as dist

    world = rank_world()[1]
    if world <= 1:
        return
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
    digests: list = [None] * world
    dist.all_gather_object(digests, digest)
    differ = [r for r, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise RuntimeError(f"the {world} processes disagree on {what}: process(es) {differ} differ from process 0 "
                           "(a photo one of them cannot read, a checkpoint folder that is not shared, ...); every "
                           "process must see the same files")


def distinct_devices(device) -> None:
    """Check that no two processes on one machine train on the same GPU (``device``: this process's model
    device); no-op in a single process and for CPU processes (they share the CPU by design).

    Two processes on one GPU (a launcher started more processes than the machine has GPUs, ``LOCAL_RANK`` unset, or
    an explicit ``model.device=cuda:0``) would fail only at the first NCCL gradient sum, after the class images were
    generated, or crowd one GPU's memory.

    Raises:
        RuntimeError: naming the processes that share a GPU and how to fix the launch.
    """
    import socket

    import torch
    import torch.distributed as dist

    world = rank_world()[1]
    if world <= 1:
        return
    mine = None if torch.device(device).type in ("cpu", "meta") else (socket.gethostname(), _gpu_identity(device))
    seen: list = [None] * world
    dist.all_gather_object(seen, mine)
    shared: dict = {}
    for rank, where in enumerate(seen):
        if where is not None:
            shared.setdefault(where, []).append(rank)
    clash = {f"{host} {dev}": ranks for (host, dev), ranks in shared.items() if len(ranks) > 1}
    if clash:
        raise RuntimeError("several processes would train on one GPU: "
                           + "; ".join(f"processes {r} on {w}" for w, r in clash.items())
                           + ". Start one process per GPU (torchrun --nproc_per_node = the number of GPUs), leave "
                           "model.device=auto (each process then takes GPU LOCAL_RANK)")


def _gpu_identity(device) -> str:
    """The physical GPU behind ``device`` as comparable text: its UUID where CUDA can say (a cluster that shows each
    process only its own GPU calls every one ``cuda:0``); else the name with the process's ``CUDA_VISIBLE_DEVICES``."""
    import torch

    device = torch.device(device)
    index = device.index
    if device.type == "cuda" and torch.cuda.is_available():
        index = torch.cuda.current_device() if index is None else index  # "cuda": the GPU this process was pinned to
        try:
            return f"GPU {torch.cuda.get_device_properties(index).uuid}"
        except (AttributeError, RuntimeError):  # an older torch without .uuid
            pass
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    return f"{device.type}:{index or 0}" + (f" (CUDA_VISIBLE_DEVICES={visible})" if visible else "")
