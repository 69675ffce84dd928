"""FGSM and PGD (Madry et al. 2018) for linf and l2, with random start and early stop.

Early stop: a point whose current iterate is misclassified (judged on the logits of the same forward
pass that produced its gradient, so no extra pass) keeps that iterate and leaves the batch.

On a stochastic model seen one draw at a time (no EOT averaging, ``Oracle.single_draw``), one misclassified draw
says little: the next draw may classify the same iterate right. There PGD takes every step on every point and
returns the last iterate, as the textbook loop does; with restarts, a point counts as fooled when a fresh draw of
its last iterate misclassifies it (the last restart needs no such pass).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F

from attacks.base import Attack, Oracle, Threat, register_attack
from attacks.losses import LOSSES
from bench.errors import BenchError


def _loss(name: str):
    if name not in LOSSES:
        raise BenchError(f"unknown loss {name!r}; choose from {', '.join(LOSSES)}")
    return LOSSES[name]


@register_attack("fgsm")
class FGSM(Attack):
    """One step of size eps along the gradient sign (linf) or the normalized gradient (l2)."""

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
        x_best = x.clone()
        done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        todo = torch.arange(x.shape[0], device=x.device)
        for r in range(self.restarts):
            if todo.numel() == 0:
                break
            x_adv, fooled = self._single(oracle, x[todo], y[todo], judge_last=r < self.restarts - 1)
            update = ~done[todo]  # a point fooled by an earlier restart keeps that example
            x_best[todo[update]] = x_adv[update]
            done[todo[fooled]] = True
            todo = todo[~fooled] if self.early_stop else todo
        return x_best

    def _single(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor, judge_last: bool = True):
        """One PGD run; returns the final/first-fooling iterates and which points were fooled. On single draws of a
        stochastic model the last iterates are only judged (one more forward pass) if ``judge_last`` (a restart
        follows)."""
        x_out = x.clone()
        fooled = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        active = torch.arange(x.shape[0], device=x.device)
        x_adv = self.threat.random_start(x) if self.random_start else x.clone()
        memory = torch.zeros_like(x)  # per-point state of the ascent direction (momentum), if any
        single_draw = oracle.single_draw
        for _ in range(self.steps):
            _, grad, logits = oracle.loss_grad(x_adv, y[active], self._loss_fn)
            if not single_draw:  # no verdict from one draw: then every point keeps stepping
                keep = self._record(x_out, fooled, active, x_adv, logits, y)
                if not bool(keep.all()):
                    active, x_adv, grad, memory = active[keep], x_adv[keep], grad[keep], memory[keep]
                if active.numel() == 0:
                    return x_out, fooled
            direction, memory = self.direction(grad, memory)
            x_adv = self.threat.project(self.threat.step(x_adv, direction, self.step_size), x[active])
        if single_draw and not judge_last:
            x_out[active] = x_adv
        else:
            self._record(x_out, fooled, active, x_adv, oracle.logits(x_adv), y, last=single_draw)
        return x_out, fooled

    def direction(self, grad: torch.Tensor, memory: torch.Tensor):
        """The ascent direction from this step's gradient (and per-point memory); PGD uses the gradient."""
        return grad, memory

    def _record(self, x_out, fooled, active, x_adv, logits, y, last: bool = False) -> torch.Tensor:
        """Store the current iterates of points not yet fooled (of every point if ``last``), mark the misclassified
        ones; return the mask of points to keep attacking (all of them without early stop)."""
        hit = logits.argmax(1) != y[active]
        store = torch.ones_like(hit) if last else ~fooled[active]  # a fooled point keeps its first adversarial iterate
        x_out[active[store]] = x_adv[store]
        fooled[active[hit]] = True
        return ~hit if self.early_stop else torch.ones_like(hit)


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
