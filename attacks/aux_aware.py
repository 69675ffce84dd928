"""The auxiliary-aware attack (Shi et al. 2021; AID-Purifier's Eq. 2): attack the classifier and the purifier's
auxiliary network together.

For a defense whose purifier reads an auxiliary discriminator (AID-Purifier: ``p_adv = sigmoid(D(h(x)))``), PGD
maximises

    (1 - lam) * CE(C(x_adv), y) - lam * L_D(x_adv),    L_D = BCE(p_adv(x_adv), clean) = -log(1 - p_adv(x_adv)),

so that for large ``lam`` the example looks clean to D (the purification leaves it alone) and for small ``lam`` it
fools the bare classifier hardest. The paper leaves L_D's target implicit; the clean target is the one that makes
the attack "unlikely to be affected by the auxiliary network's purification". The example is crafted on the bare
classifier and the discriminator (no pass through the purification loop), then classified by the whole defense.
Sweep ``lam`` (the paper's Figure 4) by listing several specs with their own labels.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from attacks.base import Attack, Threat, register_attack
from attacks.transfer import _defense_of
from bench.core.errors import BenchError


def find_auxiliary(defense: nn.Module) -> nn.Module:
    """The stage of ``defense`` with an auxiliary discriminator (a module with ``p_adv_logit``)."""
    for module in defense.modules():
        if callable(getattr(module, "p_adv_logit", None)):
            return module
    raise BenchError(f"aux-aware: {type(defense).__name__} has no auxiliary discriminator (no stage with p_adv_logit)")


@register_attack("aux-aware")
class AuxiliaryAware(Attack):
    """PGD on (1 - lam) * CE of the bare classifier - lam * BCE(D(x), clean)."""

    completes = True

    uses_oracle = False
    norms = ("linf", "l2")

    def __init__(self, threat: Threat, lam: float = 0.0, steps: int = 10, step_size: Optional[float] = None,
                 random_start: bool = True) -> None:
        super().__init__(threat)
        if not 0.0 <= float(lam) <= 1.0 or steps < 1:
            raise BenchError(f"aux-aware needs 0 <= lam <= 1 and steps >= 1, got lam={lam}, steps={steps}")
        self.lam, self.steps, self.random_start = float(lam), int(steps), bool(random_start)
        self.step_size = float(step_size) if step_size is not None else 2.5 * threat.eps / steps

    def params(self) -> Dict[str, Any]:
        return {"lam": self.lam, "steps": self.steps, "step_size": self.step_size, "random_start": self.random_start}

    def objective(self, classifier: nn.Module, auxiliary: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-sample (1 - lam) * CE - lam * L_D."""
        terms = torch.zeros(x.shape[0], device=x.device)
        if self.lam < 1:
            terms = terms + (1 - self.lam) * F.cross_entropy(classifier(x), y, reduction="none")
        if self.lam > 0:
            terms = terms - self.lam * F.softplus(auxiliary.p_adv_logit(x))  # BCE(sigmoid(logit), 0)
        return terms

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        defense = _defense_of(model)
        classifier, auxiliary = defense.classifier, find_auxiliary(defense)
        x_adv = self.threat.random_start(x) if self.random_start else x.clone()
        for _ in range(self.steps):
            x_adv = x_adv.detach().requires_grad_(True)
            with torch.enable_grad():
                (grad,) = torch.autograd.grad(self.objective(classifier, auxiliary, x_adv, y).sum(), x_adv)
            x_adv = self.threat.project(self.threat.step(x_adv.detach(), grad, self.step_size), x)
        return x_adv.detach()
