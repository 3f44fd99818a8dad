"""Benchmark jobs in worker processes give the numbers the calling process gives (apdm.bench.jobs)."""

import pytest
import torch

from apdm.bench import jobs
from apdm.config import PersonalizationConfig


def lora_job(spec, seed: int) -> dict:
    """Two LoRA steps on the tiny model; what a benchmark attack would score, reduced to numbers."""
    from apdm.personalization import simulator as S

    sd = jobs.model(spec)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    state = S.setup(sd, PersonalizationConfig(method="lora", with_prior_preservation=False, seed=seed))
    for _ in range(2):
        S.step(state, images)
    lora = torch.cat([p.detach().flatten() for n, p in state.sd.unet.named_parameters() if "lora_" in n])
    return {"history": state.history, "lora_sum": float(lora.double().sum())}


def failing_job():
    raise ValueError("bad input in job")


def test_jobs_in_workers_match_inline():
    spec = ("tiny", "cpu")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # workers run one thread each; the last bits of a matmul depend on the split
    try:
        torch.rand(123)  # whatever ran before must not matter
        inline = [jobs.executor(1).submit(lora_job, spec, s).result() for s in (0, 1)]
    finally:
        torch.set_num_threads(threads)
    with jobs.executor(2) as pool:
        futures = [pool.submit(lora_job, spec, s) for s in (1, 0)]  # other order, other processes
        pooled = [f.result() for f in futures][::-1]
    assert pooled == inline
    assert inline[0] != inline[1]


def test_inline_executor_hands_errors_to_the_caller():
    fut = jobs.executor(1).submit(failing_job)
    with pytest.raises(ValueError, match="bad input in job"):
        fut.result()


def nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds


def test_pool_cancels_waiting_jobs_when_the_block_fails():
    """An error surfaces without first running every queued job (each can take minutes in a benchmark)."""
    with pytest.raises(ValueError, match="bad input in job"):
        with jobs.executor(2) as pool:
            bad = pool.submit(failing_job)
            waiting = [pool.submit(nap, 0.5) for _ in range(20)]
            bad.result()
    assert any(f.cancelled() for f in waiting)
