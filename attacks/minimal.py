"""Minimal-perturbation attacks, used inside a bounded threat: CW-l2 (Carlini & Wagner 2017) and DeepFool
(Moosavi-Dezfooli et al. 2016).

Both look for the *smallest* perturbation that changes the label, not the worst one inside the ball. In a
bounded evaluation a point counts as broken only by an adversarial example inside the threat ball: CW-l2
keeps, per point, the smallest adversarial example it met inside the ball; DeepFool stops at its first
adversarial iterate. Either way a result outside the ball is projected into it (it may or may not stay
adversarial; the evaluation re-classifies it). Both read the model only through the oracle (loss, input
gradient, logits), so EOT and BPDA wrap them like any other attack.

- ``cw-l2``: minimise ||delta||_2^2 + c * max(z_y - max_{i != y} z_i, -kappa) over x_adv = (tanh(w) + 1) / 2
  with Adam (lr 0.01), ``steps`` per constant c, and a binary search over c (``search_steps`` rounds, c
  starting at ``c`` and multiplied by 10 while no adversarial example is found). l2 threats only.
- ``deepfool``: linearise the decision boundaries of the ``candidates`` most likely classes and step to the
  nearest one (l2: along w_k; linf: along sign(w_k), the l1-dual step), overshoot 0.02, at most ``steps``
  steps. Each step costs one loss-gradient pass per candidate class.
"""

from __future__ import annotations

from typing import Any, Dict

import torch

from attacks.base import Attack, Oracle, Threat, register_attack
from bench.errors import BenchError


def _size(delta: torch.Tensor, norm: str) -> torch.Tensor:
    flat = delta.flatten(1)
    return flat.abs().max(dim=1).values if norm == "linf" else flat.norm(dim=1)


def _margin_to(k: torch.Tensor):
    """Per-sample loss z_k - z_y (positive once class k beats the true class)."""

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return logits.gather(1, k[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)

    return loss


@register_attack("cw-l2")
class CWL2(Attack):
    """Carlini-Wagner l2 with a binary search over c; returns the smallest in-ball adversarial example found."""

    norms = ("l2",)

    def __init__(self, threat: Threat, steps: int = 100, search_steps: int = 5, c: float = 0.1, kappa: float = 0.0,
                 lr: float = 0.01) -> None:
        super().__init__(threat)
        if steps < 1 or search_steps < 1 or c <= 0 or kappa < 0 or lr <= 0:
            raise BenchError("cw-l2 needs steps >= 1, search_steps >= 1, c > 0, kappa >= 0, lr > 0")
        self.steps, self.search_steps, self.c, self.kappa, self.lr = steps, search_steps, c, kappa, lr

    def params(self) -> Dict[str, Any]:
        return {"steps": self.steps, "search_steps": self.search_steps, "c": self.c, "kappa": self.kappa, "lr": self.lr}

    def _keep_best(self, best: torch.Tensor, best_size: torch.Tensor, x_new: torch.Tensor, x: torch.Tensor,
                   fooled: torch.Tensor) -> None:
        size = _size(x_new - x, self.threat.norm)
        better = fooled & (size <= self.threat.eps) & (size < best_size)
        best[better] = x_new[better]
        best_size[better] = size[better]

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        best, best_size = x.clone(), torch.full((n,), float("inf"), device=x.device)
        last = x.clone()
        c = torch.full((n,), self.c, device=x.device)
        lower, upper = torch.zeros(n, device=x.device), torch.full((n,), float("inf"), device=x.device)
        w0 = torch.atanh((2 * x - 1).clamp(-1 + 1e-6, 1 - 1e-6))
        kappa = self.kappa

        def f(logits: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:  # the CW objective's classification term
            true = logits.gather(1, yy[:, None]).squeeze(1)
            other = logits.scatter(1, yy[:, None], float("-inf")).max(dim=1).values
            return (true - other).clamp_min(-kappa)

        for _ in range(self.search_steps):
            w = w0.clone()
            m, v = torch.zeros_like(w), torch.zeros_like(w)
            found = torch.zeros(n, dtype=torch.bool, device=x.device)
            for t in range(1, self.steps + 1):
                x_adv = (torch.tanh(w) + 1) / 2
                _, grad_f, logits = oracle.loss_grad(x_adv, y, f)
                fooled = logits.argmax(1) != y
                self._keep_best(best, best_size, x_adv, x, fooled)
                found |= fooled
                # d/dw of ||x_adv - x||^2 + c * f, through x_adv = (tanh(w) + 1) / 2
                grad_x = 2 * (x_adv - x) + c.view(-1, 1, 1, 1) * grad_f
                grad_w = grad_x * (1 - torch.tanh(w) ** 2) / 2
                m = 0.9 * m + 0.1 * grad_w
                v = 0.999 * v + 0.001 * grad_w**2
                w = w - self.lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
            last = (torch.tanh(w) + 1) / 2
            # binary search: smaller c where an adversarial example was found, larger where not
            upper = torch.where(found, torch.minimum(upper, c), upper)
            lower = torch.where(found, lower, torch.maximum(lower, c))
            c = torch.where(torch.isfinite(upper), (lower + upper) / 2, c * 10)
        done = torch.isfinite(best_size)
        out = self.threat.project(last, x)
        out[done] = best[done]
        return out


@register_attack("deepfool")
class DeepFool(Attack):
    """DeepFool (l2, or linf with the l1-dual step) with overshoot; the best in-ball adversarial example is kept."""

    def __init__(self, threat: Threat, steps: int = 50, overshoot: float = 0.02, candidates: int = 10) -> None:
        super().__init__(threat)
        if steps < 1 or overshoot < 0 or candidates < 2:
            raise BenchError("deepfool needs steps >= 1, overshoot >= 0 and candidates >= 2")
        self.steps, self.overshoot, self.candidates = steps, overshoot, candidates

    def params(self) -> Dict[str, Any]:
        return {"steps": self.steps, "overshoot": self.overshoot, "candidates": self.candidates}

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        out = x.clone()  # per point: its first adversarial iterate, projected into the ball if it overshot
        logits = oracle.logits(x)
        k = min(self.candidates, logits.shape[1])
        # candidate classes: the k most likely on the clean image, the true class excluded
        others = logits.scatter(1, y[:, None], float("-inf")).topk(k - 1, dim=1).indices
        total = torch.zeros_like(x)
        x_adv = x.clone()
        active = torch.arange(n, device=x.device)
        for _ in range(self.steps):
            margins, grads = [], []
            for j in range(k - 1):
                loss, grad, logits = oracle.loss_grad(x_adv, y[active], _margin_to(others[active, j]))
                margins.append(loss)
                grads.append(grad)
            fooled = logits.argmax(1) != y[active]
            out[active[fooled]] = self.threat.project(x_adv[fooled], x[active[fooled]])
            keep = ~fooled
            active, x_adv, total = active[keep], x_adv[keep], total[keep]
            if active.numel() == 0:
                return out
            f = torch.stack(margins, 1)[keep].abs()  # distance of the linearised boundary in logit units
            w = torch.stack(grads, 1)[keep]  # (B, k-1, C, H, W)
            dual = w.flatten(2).abs().sum(2) if self.threat.norm == "linf" else w.flatten(2).norm(dim=2)
            dist = f / dual.clamp_min(1e-12)
            j = dist.argmin(1)
            rows = torch.arange(len(j), device=x.device)
            wj, dj = w[rows, j], (dist[rows, j] + 1e-4).view(-1, 1, 1, 1)
            if self.threat.norm == "linf":
                r = dj * wj.sign()
            else:
                r = dj * wj / wj.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
            total = total + r
            x_adv = (x[active] + (1 + self.overshoot) * total).clamp(0, 1)
        out[active] = self.threat.project(x_adv, x[active])  # never fooled: the last iterate, projected
        return out
