"""Random transforms of AToP (Lin et al., Sec. 3.1), reusable by any defense.

Each transform maps images (B, 3, H, W) in [0, 1] to ``cat([x_t, mask], dim=1)`` so the purifier sees
which pixels are missing (mask 1 = kept, 0 = missing). Masks are drawn per image from a grid of p x p
patches (p = side / 8 by default) with missing rate r; fresh randomness on every call, never shared
across a batch, and never the identity (at least one patch is always missing).

- ``RT1``: ``x_t = m * x``                                  (Eq. 2)
- ``RT2``: ``x_t = m * (x + eta)``, eta ~ N(0, sigma^2)     (Eq. 3)
- ``RT3``: N non-overlapping masks that together miss every patch exactly once; output stacks the N
  transformed copies as (B, 4N, H, W). ``MaskedEnsemble`` runs the purifier on each copy and keeps only
  the pixels it generated: ``x_hat = sum_i (1 - m_i) * g(x_t^i)`` (Eq. 4).
"""

from __future__ import annotations

from typing import Any, Dict

import torch
from torch import nn

from bench.core.errors import BenchError


def patch_grid(side: int, patch: int) -> int:
    if patch < 1 or side % patch:
        raise BenchError(f"mask patch size {patch} must divide the image side {side}")
    return side // patch


def _expand_patches(keep: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, g, g) patch mask -> (B, 1, g*patch, g*patch) pixel mask."""
    return keep.repeat_interleave(patch, dim=1).repeat_interleave(patch, dim=2).unsqueeze(1)


def random_patch_mask(batch: int, side: int, patch: int, missing_rate: float, device=None) -> torch.Tensor:
    """Per-image mask with round(r * g^2) missing patches (at least one), chosen uniformly."""
    grid = patch_grid(side, patch)
    cells = grid * grid
    missing = min(cells, max(1, round(missing_rate * cells)))
    ranks = torch.rand(batch, cells, device=device).argsort(dim=1).argsort(dim=1)
    keep = (ranks >= missing).float().view(batch, grid, grid)
    return _expand_patches(keep, patch)


def partition_masks(batch: int, side: int, patch: int, n_masks: int, device=None) -> torch.Tensor:
    """(N, B, 1, H, W): N masks per image whose missing patches partition the grid."""
    grid = patch_grid(side, patch)
    cells = grid * grid
    if not 1 <= n_masks <= cells:
        raise BenchError(f"RT3 needs 1 <= N <= {cells} masks, got {n_masks}")
    group = torch.rand(batch, cells, device=device).argsort(dim=1).argsort(dim=1) * n_masks // cells
    return torch.stack([_expand_patches((group != i).float().view(batch, grid, grid), patch) for i in range(n_masks)])


class RandomTransform(nn.Module):
    """Base of RT1/RT2/RT3: holds the hyperparameters and declares the transform stochastic."""

    stochastic = True
    differentiable = True

    def __init__(self, sigma: float = 0.0, patch_fraction: float = 1 / 8, missing_rate: float = 0.25) -> None:
        super().__init__()
        if sigma < 0 or not 0 < missing_rate < 1 or not 0 < patch_fraction <= 1:
            raise BenchError(f"bad transform settings sigma={sigma}, r={missing_rate}, p={patch_fraction}")
        self.sigma, self.patch_fraction, self.missing_rate = sigma, patch_fraction, missing_rate

    def patch(self, side: int) -> int:
        return max(1, round(side * self.patch_fraction))

    def noisy(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.sigma * torch.randn_like(x) if self.sigma > 0 else x

    def config(self) -> Dict[str, Any]:
        return {"transform": type(self).__name__, "sigma": self.sigma, "patch_fraction": self.patch_fraction,
                "missing_rate": self.missing_rate}


class RT1(RandomTransform):
    """Random patch mask (no noise)."""

    def __init__(self, patch_fraction: float = 1 / 8, missing_rate: float = 0.25) -> None:
        super().__init__(0.0, patch_fraction, missing_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = random_patch_mask(x.shape[0], x.shape[-1], self.patch(x.shape[-1]), self.missing_rate, x.device)
        return torch.cat([mask * self.noisy(x), mask], dim=1)


class RT2(RT1):
    """Gaussian noise, then the random patch mask."""

    def __init__(self, sigma: float = 0.25, patch_fraction: float = 1 / 8, missing_rate: float = 0.25) -> None:
        RandomTransform.__init__(self, sigma, patch_fraction, missing_rate)


class RT3(RandomTransform):
    """Gaussian noise, then N non-overlapping masks; output (B, 4N, H, W) for ``MaskedEnsemble``."""

    def __init__(self, sigma: float = 0.25, patch_fraction: float = 1 / 8, n_masks: int = 4) -> None:
        super().__init__(sigma, patch_fraction, 1.0 / n_masks)
        self.n_masks = n_masks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        masks = partition_masks(x.shape[0], x.shape[-1], self.patch(x.shape[-1]), self.n_masks, x.device)
        noisy = self.noisy(x)
        return torch.cat([torch.cat([m * noisy, m], dim=1) for m in masks], dim=1)

    def config(self) -> Dict[str, Any]:
        return {**super().config(), "n_masks": self.n_masks}


class MaskedInpainting(nn.Module):
    """RT1/RT2's purification: the purifier restores the whole image from ``cat([x_t, mask])``.

    ``surrogate`` (used only when an attack is told to skip the purifier in the gradient) is the
    transformed image x_t itself: the "BPDA identity through the purifier" of the paper's Sec. 4.4.
    """

    def __init__(self, purifier: nn.Module) -> None:
        super().__init__()
        self.purifier = purifier

    def forward(self, transformed: torch.Tensor) -> torch.Tensor:
        return self.purifier(transformed)

    def surrogate(self, transformed: torch.Tensor) -> torch.Tensor:
        return transformed[:, :3]


class MaskedEnsemble(nn.Module):
    """RT3's purification: run ``purifier`` on each masked copy, keep only the pixels it generated.

    ``surrogate`` is the noisy image x + eta: every pixel is kept in N - 1 of the N copies.
    """

    def __init__(self, purifier: nn.Module, n_masks: int) -> None:
        super().__init__()
        if n_masks < 2:
            raise BenchError(f"RT3 needs at least 2 masks, got {n_masks}")
        self.purifier, self.n_masks = purifier, n_masks

    def surrogate(self, stacked: torch.Tensor) -> torch.Tensor:
        b, _, h, w = stacked.shape
        return stacked.view(b, self.n_masks, 4, h, w)[:, :, :3].sum(dim=1) / (self.n_masks - 1)

    def forward(self, stacked: torch.Tensor) -> torch.Tensor:
        b, _, h, w = stacked.shape
        copies = stacked.view(b, self.n_masks, 4, h, w).transpose(0, 1).reshape(self.n_masks * b, 4, h, w)
        generated = self.purifier(copies).view(self.n_masks, b, 3, h, w)
        missing = 1 - copies[:, 3:4].view(self.n_masks, b, 1, h, w)
        return (missing * generated).sum(dim=0)
