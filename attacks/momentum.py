"""MIM and TI-BIM (Dong et al. 2018, 2019): iterative attacks that change PGD's ascent direction.

- ``mim``: momentum iterative method. The direction accumulates L1-normalised gradients with decay ``mu``
  (1.0 in the paper), g <- mu * g + grad / ||grad||_1, and the step follows sign(g) (linf) or g / ||g||_2 (l2).
  Step size eps / steps, no random start, as in the paper.
- ``ti-bim``: translation-invariant basic iterative method. The gradient is smoothed with a Gaussian kernel
  (``kernel`` pixels wide, sigma = kernel / sqrt(3) as in the authors' code) before the sign step; the paper's
  kernel 15 is for ImageNet, 5 suits 32x32 images. Step size eps / steps, no random start.

Both keep PGD's early stop and projection, and read the model only through the oracle, so EOT and BPDA wrap
them like any other attack.
"""

from __future__ import annotations

import math
from typing import Any, Dict

import torch
import torch.nn.functional as F

from attacks.base import Threat, register_attack
from attacks.gradient import PGD
from bench.core.errors import BenchError


@register_attack("mim")
class MIM(PGD):
    """Momentum iterative method: PGD whose direction is a decaying sum of L1-normalised gradients."""

    def __init__(self, threat: Threat, steps: int = 10, mu: float = 1.0, step_size: float | None = None,
                 loss: str = "ce", random_start: bool = False, restarts: int = 1) -> None:
        super().__init__(threat, steps, step_size if step_size is not None else threat.eps / steps, loss, random_start, restarts)
        if mu < 0:
            raise BenchError(f"mim needs mu >= 0, got {mu}")
        self.mu = mu

    def direction(self, grad: torch.Tensor, memory: torch.Tensor):
        l1 = grad.abs().flatten(1).sum(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        memory = self.mu * memory + grad / l1
        return memory, memory

    def params(self) -> Dict[str, Any]:
        return {**super().params(), "mu": self.mu}


def gaussian_kernel(size: int) -> torch.Tensor:
    """Normalised (1, 1, size, size) Gaussian with sigma = size / sqrt(3)."""
    sigma = size / math.sqrt(3)
    ax = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    one = torch.exp(-0.5 * (ax / sigma) ** 2)
    kernel = one[:, None] * one[None, :]
    return (kernel / kernel.sum()).view(1, 1, size, size)


@register_attack("ti-bim")
class TIBIM(PGD):
    """Translation-invariant BIM: the gradient is smoothed by a Gaussian kernel before each step."""

    def __init__(self, threat: Threat, steps: int = 10, kernel: int = 5, step_size: float | None = None,
                 loss: str = "ce", random_start: bool = False, restarts: int = 1) -> None:
        super().__init__(threat, steps, step_size if step_size is not None else threat.eps / steps, loss, random_start, restarts)
        if kernel < 1 or kernel % 2 == 0:
            raise BenchError(f"ti-bim needs an odd kernel size >= 1, got {kernel}")
        self.kernel = kernel
        self._weights = gaussian_kernel(kernel)

    def direction(self, grad: torch.Tensor, memory: torch.Tensor):
        channels = grad.shape[1]
        weights = self._weights.to(grad).expand(channels, 1, -1, -1)
        return F.conv2d(grad, weights, padding=self.kernel // 2, groups=channels), memory

    def params(self) -> Dict[str, Any]:
        return {**super().params(), "kernel": self.kernel}
