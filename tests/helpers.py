"""Small models for fast tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """A small deterministic conv net for fast attack tests."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))
