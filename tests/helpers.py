"""Small models for fast tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from torch import nn


def load_script(name: str) -> ModuleType:
    """A module of ``scripts/`` (not a package) by its file name without ``.py``, for testing its functions."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class TinyNet(nn.Module):
    """A small deterministic conv net for fast attack tests."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))


class NearestColor(nn.Module):
    """Classifies an image by the nearest of 10 fixed colours to its mean colour.

    Differentiable, with margins that vary smoothly across images, so a small linf attack breaks some
    points and not others: a cheap stand-in for a real classifier in end-to-end tests.
    """

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.register_buffer("centers", 0.2 + 0.6 * torch.rand(10, 3, generator=g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3))
        return -100.0 * ((mean[:, None, :] - self.centers[None]) ** 2).sum(-1)


class CoinOfTheLowBits(nn.Module):
    """Deterministic, but the eighth decimal of the pixel sum decides between the image and its negative."""

    def forward(self, x):
        coin = torch.frac(1e7 * x.double().flatten(1).sum(1)) > 0.5
        return torch.where(coin.view(-1, 1, 1, 1), 1 - x, x)
