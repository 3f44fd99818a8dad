"""Shared fixtures: tiny real Stable Diffusion components built in code (no downloads, no mocks)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# OMP_NUM_THREADS wins (set it to 1 on a busy machine: oversubscribed torch threads are ~20x slower)
torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 0)) or max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_sd():
    """A random-weight tiny SD (64x64 images, x8 VAE). Tests must not modify it in place."""
    from apdm.core.models import tiny_sd as build

    return build(seed=0)


@pytest.fixture
def rand_images():
    """Four deterministic random images (4,3,64,64) in [0,1]."""
    return torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
