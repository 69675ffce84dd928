"""FGSM and PGD (Madry et al. 2018) for linf and l2, with random start, restarts and early stop.

Every iterate is offered to the attack's ``Candidates`` (``attacks.verdict``) with the logits of the pass that
produced its gradient (no extra pass): a point leaves once the judge confirms it broken (for a stochastic defense,
any of the evaluation's fresh draws wrong), and a point never broken returns its lowest-margin iterate. Restarts of
few remaining points run side by side (``attacks.base.run_groups``).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from attacks.base import Attack, Oracle, Threat, register_attack, run_groups
from attacks.losses import LOSSES
from attacks.verdict import Candidates
from bench.core.errors import BenchError


def _loss(name: str):
    if name not in LOSSES:
        raise BenchError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    return LOSSES[name]


@register_attack("fgsm")
class FGSM(Attack):
    """One step of size eps along the gradient sign (linf) or the normalized gradient (l2)."""

    completes = True

    def __init__(self, threat: Threat, loss: str = "ce") -> None:
        super().__init__(threat)
        self.loss = loss
        self._loss_fn = _loss(loss)

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        _, grad, _ = oracle.loss_grad(x, y, self._loss_fn)
        return self.threat.project(self.threat.step(x, grad, self.threat.eps), x)

    def params(self) -> Dict[str, Any]:
        return {"loss": self.loss}


@register_attack("pgd")
class PGD(Attack):
    """Projected gradient ascent; step size defaults to 2.5 * eps / steps (Madry et al.).

    ``step_fraction`` gives the step as a fraction of eps instead (a paper's step 0.01 at eps 8/255 is
    fraction 0.31875), so a suite keeps the paper's ratio when run at another ``--eps``.
    """

    completes = True

    def __init__(
        self, threat: Threat, steps: int = 20, step_size: float | None = None, loss: str = "ce",
        random_start: bool = True, restarts: int = 1, step_fraction: float | None = None,
    ) -> None:
        super().__init__(threat)
        if steps < 1 or restarts < 1:
            raise BenchError("pgd needs steps >= 1 and restarts >= 1")
        if step_size is not None and step_fraction is not None:
            raise BenchError("pgd takes step_size or step_fraction, not both")
        self.steps, self.loss, self.random_start, self.restarts = steps, loss, random_start, restarts
        self.step_fraction = step_fraction
        if step_fraction is not None:
            step_size = step_fraction * threat.eps
        self.step_size = step_size if step_size is not None else 2.5 * threat.eps / steps
        self._loss_fn = _loss(loss)

    def params(self) -> Dict[str, Any]:
        return {"steps": self.steps, "step_size": self.step_size, "loss": self.loss,
                "random_start": self.random_start, "restarts": self.restarts,
                **({"step_fraction": self.step_fraction} if self.step_fraction is not None else {})}

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        found = Candidates(oracle, x, y, self.early_stop)
        started = 0
        while started < self.restarts:
            todo = found.open()
            if todo.numel() == 0:
                break
            group = run_groups(len(todo), self.restarts - started, x.device)
            owners = todo.repeat(group)
            self._ascend(oracle, found, owners, x[owners], y[owners])
            started += group
        return found.x

    def _ascend(self, oracle: Oracle, found: Candidates, owners: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        """One PGD run for rows ``x`` (row i attacks point ``owners[i]``); every iterate is offered to ``found``."""
        x_adv = self.threat.random_start(x) if self.random_start else x.clone()
        memory = torch.zeros_like(x)  # per-row state of the ascent direction (momentum), if any
        for _ in range(self.steps):
            _, grad, logits = oracle.loss_grad(x_adv, y, self._loss_fn)
            keep = found.offer(owners, x_adv, logits)
            if not bool(keep.all()):
                owners, x, y, x_adv, grad, memory = (t[keep] for t in (owners, x, y, x_adv, grad, memory))
                if owners.numel() == 0:
                    return
            direction, memory = self.direction(grad, memory)
            x_adv = self.threat.project(self.threat.step(x_adv, direction, self.step_size), x)
        found.offer(owners, x_adv, oracle.logits(x_adv))

    def direction(self, grad: torch.Tensor, memory: torch.Tensor):
        """The ascent direction from this step's gradient (and per-row memory); PGD uses the gradient."""
        return grad, memory


@register_attack("cw-linf")
class CWLinf(PGD):
    """The CW margin loss under PGD (the "CW-linf" of Madry et al. and many purification papers): projected
    steps on max_{i != y} z_i - z_y, which ignores how confident the softmax is."""

    def __init__(self, threat: Threat, steps: int = 100, step_size: float | None = None, random_start: bool = True,
                 restarts: int = 1) -> None:
        super().__init__(threat, steps, step_size, "margin", random_start, restarts)


def plain_pgd(model, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
              start: Optional[Callable[[torch.Tensor], torch.Tensor]] = None) -> torch.Tensor:
    """linf PGD on the cross-entropy as it is usually written (Madry et al.): uniform random start, sign steps,
    projection, every step on every point (no early stop, no pass counting). AID-Purifier's training uses it to
    craft examples; ``bench perf`` times it as the textbook reference for ``PGD``, starting it from ``PGD``'s own
    random start (``start``, e.g. ``Threat.random_start``) so that both draw the same start from the same seed."""
    x_adv = start(x) if start is not None else (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + step_size * grad.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()
