"""Minimal-perturbation attacks, used inside a bounded threat: CW-l2 (Carlini & Wagner 2017) and DeepFool
(Moosavi-Dezfooli et al. 2016).

Both look for the *smallest* perturbation that changes the label, not the worst one inside the ball. In a
bounded evaluation a point counts as broken only by an adversarial example inside the threat ball, under the
verdict rule of ``attacks.verdict``: every in-ball iterate (for DeepFool, the iterate projected into the ball) is
offered to the attack's ``Candidates``, a point leaves once the judge confirms it broken, and a point never broken
returns its lowest-margin in-ball candidate. Both read the model only through the oracle (loss, input gradient,
logits), so EOT and BPDA wrap them like any other attack.

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
from attacks.verdict import Candidates
from bench.core.errors import BenchError


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

    completes = True

    norms = ("l2",)

    def __init__(self, threat: Threat, steps: int = 100, search_steps: int = 5, c: float = 0.1, kappa: float = 0.0,
                 lr: float = 0.01) -> None:
        super().__init__(threat)
        if steps < 1 or search_steps < 1 or c <= 0 or kappa < 0 or lr <= 0:
            raise BenchError("cw-l2 needs steps >= 1, search_steps >= 1, c > 0, kappa >= 0, lr > 0")
        self.steps, self.search_steps, self.c, self.kappa, self.lr = steps, search_steps, c, kappa, lr

    def params(self) -> Dict[str, Any]:
        return {"steps": self.steps, "search_steps": self.search_steps, "c": self.c, "kappa": self.kappa, "lr": self.lr}

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        found = Candidates(oracle, x, y, self.early_stop)
        all_rows = torch.arange(n, device=x.device)
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
            found_now = torch.zeros(n, dtype=torch.bool, device=x.device)
            for t in range(1, self.steps + 1):
                x_adv = (torch.tanh(w) + 1) / 2
                _, grad_f, logits = oracle.loss_grad(x_adv, y, f)
                inside = _size(x_adv - x, self.threat.norm) <= self.threat.eps
                if inside.any():
                    found.offer(all_rows[inside], x_adv[inside], logits[inside])
                found_now |= logits.argmax(1) != y
                # d/dw of ||x_adv - x||^2 + c * f, through x_adv = (tanh(w) + 1) / 2
                grad_x = 2 * (x_adv - x) + c.view(-1, 1, 1, 1) * grad_f
                grad_w = grad_x * (1 - torch.tanh(w) ** 2) / 2
                m = 0.9 * m + 0.1 * grad_w
                v = 0.999 * v + 0.001 * grad_w**2
                w = w - self.lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
            last = (torch.tanh(w) + 1) / 2
            # binary search: smaller c where an adversarial example was found, larger where not
            upper = torch.where(found_now, torch.minimum(upper, c), upper)
            lower = torch.where(found_now, lower, torch.maximum(lower, c))
            c = torch.where(torch.isfinite(upper), (lower + upper) / 2, c * 10)
            if self.early_stop and bool(found.broken.all()):
                break
        empty = torch.isinf(found.margin) & ~found.broken  # no in-ball candidate yet: the last iterate, projected
        if empty.any():
            projected = self.threat.project(last[empty], x[empty])
            found.offer(all_rows[empty], projected, oracle.logits(projected))
        return found.x


@register_attack("deepfool")
class DeepFool(Attack):
    """DeepFool (l2, or linf with the l1-dual step) with overshoot; the best in-ball adversarial example is kept."""

    completes = True

    def __init__(self, threat: Threat, steps: int = 50, overshoot: float = 0.02, candidates: int = 10) -> None:
        super().__init__(threat)
        if steps < 1 or overshoot < 0 or candidates < 2:
            raise BenchError("deepfool needs steps >= 1, overshoot >= 0 and candidates >= 2")
        self.steps, self.overshoot, self.candidates = steps, overshoot, candidates

    def params(self) -> Dict[str, Any]:
        return {"steps": self.steps, "overshoot": self.overshoot, "candidates": self.candidates}

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        found = Candidates(oracle, x, y, self.early_stop)
        logits = oracle.logits(x)
        k = min(self.candidates, logits.shape[1])
        # candidate classes: the k most likely on the clean image, the true class excluded
        others = logits.scatter(1, y[:, None], float("-inf")).topk(k - 1, dim=1).indices
        total = torch.zeros_like(x)
        x_adv = x.clone()
        owners = torch.arange(n, device=x.device)
        for step in range(self.steps):
            margins, grads = [], []
            for j in range(k - 1):
                loss, grad, logits = oracle.loss_grad(x_adv, y[owners], _margin_to(others[owners, j]))
                margins.append(loss)
                grads.append(grad)
            if step > 0:  # the first iterate is the clean image
                keep = found.offer(owners, *self._in_ball(oracle, x_adv, x[owners], logits))
                owners, x_adv, total = owners[keep], x_adv[keep], total[keep]
                margins, grads = [t[keep] for t in margins], [t[keep] for t in grads]
                if owners.numel() == 0:
                    return found.x
            f = torch.stack(margins, 1).abs()  # distance of the linearised boundary in logit units
            w = torch.stack(grads, 1)  # (B, k-1, C, H, W)
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
            x_adv = (x[owners] + (1 + self.overshoot) * total).clamp(0, 1)
        found.offer(owners, *self._in_ball(oracle, x_adv, x[owners], oracle.logits(x_adv)))
        return found.x

    def _in_ball(self, oracle: Oracle, x_adv: torch.Tensor, x: torch.Tensor, logits: torch.Tensor):
        """The iterates projected into the ball, with logits for them (one more pass for those that moved)."""
        candidate = self.threat.project(x_adv, x)
        moved = (candidate != x_adv).flatten(1).any(1)
        if moved.any():
            logits = logits.clone()
            logits[moved] = oracle.logits(candidate[moved])
        return candidate, logits
