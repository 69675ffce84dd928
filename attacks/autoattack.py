"""AutoAttack (Croce & Hein 2020) through the reference implementation, ``pyautoattack``.

``version="standard"`` is APGD-CE, APGD-T, FAB-T and Square; ``version="rand"`` is APGD-CE and APGD-DLR
with EOT over 20 draws, for randomized defenses. pyautoattack runs its own model loop (and its own EOT),
so this attack cannot be wrapped by ``EOT``/``BPDA``; pass a BPDA view of the model yourself if needed.

Counting, for a stochastic defense: pyautoattack calls a point broken when one forward pass misclassifies its
example, and never attacks a point its own single clean pass got wrong (it returns the clean image, counted wrong).
Either verdict is a draw of the defense misclassifying an image inside the threat ball, so both stand: every point
pyautoattack reports misclassified is handed to the evaluation's judge as broken (``Judge.force``), and the
evaluation's own draws on the returned example may break more. A point counts broken if either says so.
"""

from __future__ import annotations

import logging
from typing import Any, Dict

import torch
from torch import nn

from attacks.base import Attack, Threat, register_attack
from attacks.verdict import current_judge
from bench.core.errors import BenchError

_NORMS = {"linf": "Linf", "l2": "L2"}


@register_attack("autoattack")
class AutoAttackReference(Attack):
    """pyautoattack's AutoAttack on the whole model."""

    uses_oracle = False

    def __init__(self, threat: Threat, version: str = "standard", seed: int = 0, batch_size: int = 256) -> None:
        super().__init__(threat)
        if version not in ("standard", "rand"):
            raise BenchError(f"autoattack version must be standard or rand (a suite's \"auto\" is resolved for the defense "
                             f"before the attack is built), got {version!r}")
        self.version, self.seed, self.batch_size = version, seed, batch_size

    def params(self) -> Dict[str, Any]:
        return {"version": self.version, "seed": self.seed, "batch_size": self.batch_size}

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from pyautoattack import AutoAttack

        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        adversary = AutoAttack(
            model, norm=_NORMS[self.threat.norm], eps=self.threat.eps, version=self.version,
            device=x.device, seed=self.seed,
        )
        x_adv, y_adv = adversary.run_standard_evaluation(x.contiguous(), y, batch_size=min(self.batch_size, x.shape[0]))
        x_adv = self.threat.project(x_adv.detach(), x)
        judge = current_judge()
        if judge is not None:  # pyautoattack's own verdict stands beside the evaluation's draws
            judge.force(x_adv[y_adv.to(y.device) != y])
        return x_adv
