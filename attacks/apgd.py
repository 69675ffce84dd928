"""Auto-PGD (Croce & Hein, ICML 2020), written from the paper's Algorithm 1.

Step size starts at 2 * eps and is halved at checkpoints w_j = ceil(p_j * N) (p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) when fewer than rho of the steps since the last
checkpoint increased the loss, or when the step was not reduced last time and the best loss did not
improve; after a reduction the iterate restarts from the best point. Momentum 0.75 after the first step.
Losses: CE, DLR, and targeted DLR over the top-k other classes (``apgd-t``).

Every iterate is offered to the attack's ``Candidates`` (``attacks.verdict``): a point leaves once the judge
confirms it broken, and a point never broken returns its lowest-margin iterate over all restarts and targets. The
runs (restarts x targets) of few remaining points go side by side in one batch (``attacks.base.run_groups``), so
finishing 3 points with 9 targets costs about what one run on 27 points costs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import torch

from attacks.base import Attack, Oracle, Threat, register_attack, run_groups
from attacks.losses import LOSSES, dlr_targeted
from attacks.verdict import Candidates
from bench.core.errors import BenchError


def checkpoints(steps: int) -> List[int]:
    """Iteration numbers (1-based) at which the step-size condition is checked."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(q * steps, 6)) for q in p[1:] if q <= 1.0 + 1e-9} - {0})


class APGD(Attack):
    """APGD with loss ``ce`` or ``dlr`` (untargeted) or targeted DLR when ``targets`` > 0."""

    completes = True

    default_loss = "ce"
    default_targets = 0

    def __init__(
        self, threat: Threat, steps: int = 100, restarts: int = 1, loss: Optional[str] = None,
        targets: Optional[int] = None, rho: float = 0.75,
    ) -> None:
        super().__init__(threat)
        self.loss = loss if loss is not None else self.default_loss
        self.targets = targets if targets is not None else self.default_targets
        if self.loss not in LOSSES or steps < 1 or restarts < 1 or not 0 <= self.targets <= 9:
            raise BenchError(f"{self.name}: bad settings (loss {self.loss}, steps {steps}, restarts {restarts})")
        self.steps, self.restarts, self.rho = steps, restarts, rho
        self._checks = set(checkpoints(steps))

    def params(self) -> Dict[str, Any]:
        loss = "dlr-targeted" if self.targets else self.loss
        return {"steps": self.steps, "restarts": self.restarts, "loss": loss, "targets": self.targets, "rho": self.rho}

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        found = Candidates(oracle, x, y, self.early_stop)
        runs = [t for t in (range(self.targets) if self.targets else [None]) for _ in range(self.restarts)]
        others = None
        if self.targets:  # the other classes by their clean logits, most likely first (the true class excluded)
            others = oracle.logits(x).scatter(1, y[:, None], float("-inf")).argsort(dim=1, descending=True)
        started = 0
        while started < len(runs):
            todo = found.open()
            if todo.numel() == 0:
                break
            group = run_groups(len(todo), len(runs) - started, x.device)
            owners = todo.repeat(group)
            target = None
            if others is not None:
                target = torch.cat([others[todo, runs[started + g]] for g in range(group)])
            self._once(oracle, found, owners, x[owners], y[owners], target)
            started += group
        return found.x

    def _loss_fn(self, target: Optional[torch.Tensor]) -> Callable:
        if target is None:
            return LOSSES[self.loss]
        return lambda logits, lab: dlr_targeted(logits, lab[:, 0], lab[:, 1])

    def _once(self, oracle: Oracle, found: Candidates, owners: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
              target: Optional[torch.Tensor]) -> None:
        """One APGD run from a random start for rows ``x`` (row i attacks point ``owners[i]``)."""
        n, loss_fn = x.shape[0], self._loss_fn(target)
        lab = y if target is None else torch.stack([y, target], dim=1)
        x_adv = self.threat.random_start(x)
        loss, grad, logits = oracle.loss_grad(x_adv, lab, loss_fn)
        s = {
            "owners": owners, "x": x, "lab": lab, "x_adv": x_adv, "x_prev": x_adv,
            "grad": grad, "loss": loss, "x_max": x_adv, "grad_max": grad, "loss_max": loss,
            "loss_max_check": loss, "step": torch.full((n,), 2 * self.threat.eps, device=x.device),
            "increases": torch.zeros(n, device=x.device), "reduced": torch.zeros(n, dtype=torch.bool, device=x.device),
        }
        s = _keep(s, found.offer(owners, x_adv, logits))
        last_check = 0
        for k in range(self.steps):
            if s["owners"].numel() == 0:
                return
            logits = self._step(oracle, s, loss_fn, momentum=0.0 if k == 0 else 0.25)
            keep = found.offer(s["owners"], s["x_adv"], logits)
            if k + 1 in self._checks:
                self._adapt(s, k + 1 - last_check)
                last_check = k + 1
            s = _keep(s, keep)

    def _step(self, oracle: Oracle, s: Dict[str, torch.Tensor], loss_fn: Callable, momentum: float) -> torch.Tensor:
        x, x_adv = s["x"], s["x_adv"]
        z = self.threat.project(self.threat.step(x_adv, s["grad"], s["step"]), x)
        x_new = self.threat.project(x_adv + (1 - momentum) * (z - x_adv) + momentum * (x_adv - s["x_prev"]), x)
        loss, grad, logits = oracle.loss_grad(x_new, s["lab"], loss_fn)
        s["increases"] = s["increases"] + (loss > s["loss"]).float()
        better = loss > s["loss_max"]
        s["x_max"] = torch.where(better.view(-1, 1, 1, 1), x_new, s["x_max"])
        s["grad_max"] = torch.where(better.view(-1, 1, 1, 1), grad, s["grad_max"])
        s["loss_max"] = torch.maximum(loss, s["loss_max"])
        s["x_prev"], s["x_adv"], s["grad"], s["loss"] = x_adv, x_new, grad, loss
        return logits

    def _adapt(self, s: Dict[str, torch.Tensor], window: int) -> None:
        """Checkpoint: halve the step and restart from the best point where progress stalled."""
        oscillating = s["increases"] < self.rho * window
        stale = (~s["reduced"]) & (s["loss_max_check"] >= s["loss_max"])
        reduce = oscillating | stale
        s["step"] = torch.where(reduce, s["step"] / 2, s["step"])
        r4 = reduce.view(-1, 1, 1, 1)
        s["x_adv"] = torch.where(r4, s["x_max"], s["x_adv"])
        s["grad"] = torch.where(r4, s["grad_max"], s["grad"])
        s["reduced"], s["loss_max_check"] = reduce, s["loss_max"].clone()
        s["increases"] = torch.zeros_like(s["increases"])


def _keep(s: Dict[str, torch.Tensor], keep: torch.Tensor) -> Dict[str, torch.Tensor]:
    return {k: v[keep] for k, v in s.items()}


@register_attack("apgd-ce")
class APGDCE(APGD):
    default_loss = "ce"


@register_attack("apgd-dlr")
class APGDDLR(APGD):
    default_loss = "dlr"


@register_attack("apgd-t")
class APGDTargeted(APGD):
    """Targeted DLR towards each of the top-``targets`` other classes in turn (AutoAttack's APGD-T)."""

    default_loss = "dlr"
    default_targets = 9
