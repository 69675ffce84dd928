"""Per-sample attack losses on logits: cross-entropy, DLR (untargeted and targeted), CW margin."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, y, reduction="none")


def _true_and_best_other(logits: torch.Tensor, y: torch.Tensor):
    true = logits.gather(1, y[:, None]).squeeze(1)
    other = logits.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return true, other.max(dim=1).values


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """CW margin loss: max other logit minus the true logit (positive once misclassified)."""
    true, best_other = _true_and_best_other(logits, y)
    return best_other - true


def dlr(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of Logits Ratio (Croce & Hein 2020): the margin scaled by z_pi1 - z_pi3."""
    ordered = logits.sort(dim=1, descending=True).values
    return margin(logits, y) / (ordered[:, 0] - ordered[:, 2] + 1e-12)


def dlr_targeted(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR: (z_t - z_y) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
    ordered = logits.sort(dim=1, descending=True).values
    true = logits.gather(1, y[:, None]).squeeze(1)
    tgt = logits.gather(1, target[:, None]).squeeze(1)
    return (tgt - true) / (ordered[:, 0] - 0.5 * (ordered[:, 2] + ordered[:, 3]) + 1e-12)


LOSSES = {"ce": ce, "dlr": dlr, "margin": margin}
