"""Shared fixtures. Tests that need real CIFAR-10 read PCFAST_CIFAR10_DIR and skip without it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True)
def _few_threads():
    # CI machines have two cores; more threads only add contention.
    torch.set_num_threads(2)
    yield


@pytest.fixture
def cifar10_dir() -> Path:
    path = os.environ.get("PCFAST_CIFAR10_DIR")
    if not path:
        pytest.skip("PCFAST_CIFAR10_DIR is not set (the folder holding cifar-10-batches-py)")
    if not (Path(path) / "cifar-10-batches-py").is_dir():
        pytest.fail(f"PCFAST_CIFAR10_DIR={path} holds no cifar-10-batches-py folder")
    return Path(path)


@pytest.fixture
def cuda_device() -> torch.device:
    """A CUDA device; the test skips where there is none (queried when the test runs)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")
