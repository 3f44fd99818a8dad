"""Shared fixtures: tiny real Stable Diffusion components built in code (no downloads, no mocks)."""

from __future__ import annotations

import logging
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


def _apdm_messages(level: int, lower_logger: bool = False):
    """Gather the apdm logger's messages at ``level`` and above (``lower_logger``: also set the logger itself to
    ``level`` for the test); yields ``text()``: them so far, as one string (and forgets them). main() stops that
    logger propagating, so caplog would not see them; a stream handler made in an earlier test may hold a closed
    capture stream, so capfd does not either."""
    from apdm.utils import LOG

    records: list = []
    catch = logging.Handler(level)
    catch.emit = records.append
    old = LOG.level
    LOG.addHandler(catch)
    if lower_logger:
        LOG.setLevel(level)

    def text() -> str:
        out = " | ".join(r.getMessage() for r in records)
        records.clear()
        return out

    yield text
    LOG.removeHandler(catch)
    LOG.setLevel(old)


@pytest.fixture
def apdm_log():
    """``apdm_log()``: the apdm logger's warnings and errors so far, as one string (and forgets them)."""
    yield from _apdm_messages(logging.WARNING)


@pytest.fixture
def apdm_info_log():
    """``apdm_info_log()``: the apdm logger's messages, info and above, so far, as one string (and forgets them)."""
    yield from _apdm_messages(logging.INFO, lower_logger=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
