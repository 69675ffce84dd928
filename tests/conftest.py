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


UNDER_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def shared_missing(reason: str) -> None:
    """A test whose shared data or weights are missing: skipped on a developer's machine, failed under CI
    (``CI=true``), where ``../shared`` must be beside the checkout, so a partly present folder is never a silent skip."""
    if UNDER_CI:
        pytest.fail(f"{reason} (CI=true: the shared data and weights must be present)", pytrace=False)
    pytest.skip(reason)


def _needs(available: bool, reason: str):
    """Mark a test that needs shared files; ``pytest_runtest_setup`` skips or fails it when they are missing."""
    return pytest.mark.needs_shared(available=available, reason=reason)


needs_data = _needs(has_cifar10_jpeg(), "offline CIFAR-10 bundle not found (set BENCH_DATA_DIR)")
needs_resnet20 = _needs(
    has_cifar10_jpeg() and has_weights("akamaster_resnet_cifar10/resnet20-12fca82f.th"),
    "CIFAR-10 bundle or ResNet-20 weights not found (set BENCH_DATA_DIR / BENCH_WEIGHTS_DIR)",
)
needs_resnet4b = _needs(
    has_cifar10_jpeg() and has_weights("abcrown_cifar10/resnet4b.pth"),
    "CIFAR-10 bundle or ResNet-4b weights not found",
)


def pytest_runtest_setup(item):
    for mark in item.iter_markers("needs_shared"):
        if not mark.kwargs["available"]:
            shared_missing(mark.kwargs["reason"])


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
