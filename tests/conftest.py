"""Shared fixtures: tiny models and data, and skips for tests that need the offline CIFAR-10 bundle."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from bench.paths import data_dir, weights_dir
from tests.helpers import TinyNet

REPO = Path(__file__).resolve().parent.parent


def has_cifar10_jpeg() -> bool:
    return (data_dir() / "cifar10-jpeg" / "test.npz").is_file()


def has_weights(relative: str) -> bool:
    return (weights_dir() / relative).is_file()


needs_data = pytest.mark.skipif(not has_cifar10_jpeg(), reason="offline CIFAR-10 bundle not found (set BENCH_DATA_DIR)")
needs_resnet20 = pytest.mark.skipif(
    not (has_cifar10_jpeg() and has_weights("akamaster_resnet_cifar10/resnet20-12fca82f.th")),
    reason="CIFAR-10 bundle or ResNet-20 weights not found (set BENCH_DATA_DIR / BENCH_WEIGHTS_DIR)",
)
needs_resnet4b = pytest.mark.skipif(
    not (has_cifar10_jpeg() and has_weights("abcrown_cifar10/resnet4b.pth")),
    reason="CIFAR-10 bundle or ResNet-4b weights not found",
)


@pytest.fixture
def tiny_net() -> TinyNet:
    return TinyNet().eval()


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 3, 8, 8, generator=g), torch.randint(0, 10, (6,), generator=g)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Keep decode caches of the tests out of the user's cache, but share one per session."""
    if "BENCH_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("BENCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
