"""Auto-PGD (Croce & Hein, ICML 2020), written from the paper's Algorithm 1.

Step size starts at 2 * eps and is halved at checkpoints w_j = ceil(p_j * N) (p_0 = 0, p_1 = 0.22,
p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)) when fewer than rho of the steps since the last
checkpoint increased the loss, or when the step was not reduced last time and the best loss did not
improve; after a reduction the iterate restarts from the best point. Momentum 0.75 after the first step.
Losses: CE, DLR, and targeted DLR over the top-k other classes (``apgd-t``). Points leave the batch as
soon as they are misclassified (early stop).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Dict, List, Optional

import torch

from attacks.base import Attack, Oracle, Threat, register_attack
from attacks.losses import LOSSES, dlr_targeted
from bench.errors import BenchError


def checkpoints(steps: int) -> List[int]:
    """Iteration numbers (1-based) at which the step-size condition is checked."""
    p = [0.0, 0.22]
    while p[-1] < 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(q * steps, 6)) for q in p[1:] if q <= 1.0 + 1e-9} - {0})


class APGD(Attack):
    """APGD with loss ``ce`` or ``dlr`` (untargeted) or targeted DLR when ``targets`` > 0."""

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
        x_out = x.clone()
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        todo = torch.arange(x.shape[0], device=x.device)
        ranks = range(2, self.targets + 2) if self.targets else [None]
        clean_order = oracle.logits(x).argsort(dim=1, descending=True) if self.targets else None
        for rank in ranks:
            for _ in range(self.restarts):
                if todo.numel() == 0:
                    return x_out
                target = clean_order[todo, rank - 1] if rank is not None else None
                x_adv, fooled = self._once(oracle, x[todo], y[todo], target)
                update = ~done[todo]  # a point fooled by an earlier run keeps that example
                x_out[todo[update]] = x_adv[update]
                done[todo[fooled]] = True
                todo = todo[~fooled] if self.early_stop else todo
        return x_out

    def _loss_fn(self, target: Optional[torch.Tensor]) -> Callable:
        if target is None:
            return LOSSES[self.loss]
        return lambda logits, lab: dlr_targeted(logits, lab[:, 0], lab[:, 1])

    def _once(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor]):
        """One APGD run from a random start; returns (adversarial or best-loss points, fooled mask)."""
        n, loss_fn = x.shape[0], self._loss_fn(target)
        lab = y if target is None else torch.stack([y, target], dim=1)
        x_out = x.clone()
        fooled = torch.zeros(n, dtype=torch.bool, device=x.device)
        x_adv = self.threat.random_start(x)
        loss, grad, logits = oracle.loss_grad(x_adv, lab, loss_fn)
        s = {
            "idx": torch.arange(n, device=x.device), "x": x, "y": y, "lab": lab, "x_adv": x_adv, "x_prev": x_adv,
            "grad": grad, "loss": loss, "x_max": x_adv, "grad_max": grad, "loss_max": loss,
            "loss_max_check": loss, "step": torch.full((n,), 2 * self.threat.eps, device=x.device),
            "increases": torch.zeros(n, device=x.device), "reduced": torch.zeros(n, dtype=torch.bool, device=x.device),
        }
        s = _keep(s, _record(x_out, fooled, s["idx"], x_adv, logits, y, self.early_stop))
        last_check = 0
        for k in range(self.steps):
            if s["idx"].numel() == 0:
                break
            logits = self._step(oracle, s, loss_fn, momentum=0.0 if k == 0 else 0.25)
            keep = _record(x_out, fooled, s["idx"], s["x_adv"], logits, s["y"], self.early_stop)
            if k + 1 in self._checks:
                self._adapt(s, k + 1 - last_check)
                last_check = k + 1
            s = _keep(s, keep)
        rest = ~fooled[s["idx"]]
        x_out[s["idx"][rest]] = s["x_max"][rest]  # unbroken points return their highest-loss iterate
        return x_out, fooled

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


def _record(x_out, fooled, idx, x_adv, logits, y, early_stop: bool = True) -> torch.Tensor:
    """Store first misclassified iterates; return the mask of points still to attack (all without early stop)."""
    hit = logits.argmax(1) != y
    new = hit & ~fooled[idx]
    x_out[idx[new]] = x_adv[new]
    fooled[idx[hit]] = True
    return ~hit if early_stop else torch.ones_like(hit)


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
