"""Square Attack (Andriushchenko et al., ECCV 2020), the score-based black-box attack of AutoAttack, written from the
paper's Algorithms 1-3.

Random search on the margin loss z_y - max_{i != y} z_i: each query changes the perturbation inside a random
square window (linf: the window's pixels move to x +- eps, one random sign per channel; l2: the paper's window pair,
which moves budget from a second window into the first with the "meta" pattern of nested rectangles), and the change
is kept when the margin falls. The window side shrinks with the query count (the paper's schedule for p, the
fraction of pixels changed, rescaled to the number of queries). For the ``stadv`` threat the same linf search runs on
the flow field (2 channels bounded by eps), and the candidate is the image warped by it.

It only queries scores, through the oracle's ``logits``: under ``EOT`` those are the mean logits over the draws.
Every candidate is offered to the attack's ``Candidates`` (``attacks.verdict``): a point leaves once the judge
confirms it broken, and a point never broken returns its lowest-margin candidate (never the clean image). It uses no
gradient, so suites never add a BPDA variant of it; a black-box attack that beats every white-box attack on some
point is a sign of masked gradients (a PROTOCOL check). The window position is drawn once per query for the whole
batch (each image still sees a uniformly random window per query), as the reference implementation does.
"""

from __future__ import annotations

import math
from typing import Any, Dict

import torch

from attacks.base import Attack, Oracle, Threat, register_attack
from attacks.stadv import warp
from attacks.verdict import Candidates, margin
from bench.core.errors import BenchError

# The paper's schedule: p is halved at these fractions (in 1/10,000) of the query budget.
_HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def p_schedule(p_init: float, query: int, queries: int) -> float:
    """The fraction of pixels a query changes, for query number ``query`` of ``queries``."""
    progress = int(query / queries * 10000)
    return p_init / 2 ** sum(progress > h for h in _HALVINGS)


def _signs(*shape: int, device) -> torch.Tensor:
    return torch.randint(0, 2, shape, device=device).float() * 2 - 1


def _nested_rectangles(a: int, b: int, device) -> torch.Tensor:
    """An a x b block whose value at a pixel is sum_{k >= d} 1 / (k + 1)^2, d its Chebyshev distance from the centre
    (the sum of the nested rectangles that contain it), scaled to unit l2 norm."""
    ci, cj = a // 2, b // 2
    rings = max(ci + 1, cj + 1)
    d = torch.maximum((torch.arange(a, device=device) - ci).abs()[:, None], (torch.arange(b, device=device) - cj).abs()[None, :])
    weights = 1.0 / torch.arange(1, rings + 1, device=device, dtype=torch.float32) ** 2
    tail = weights.flip(0).cumsum(0).flip(0)  # tail[k] = sum_{j >= k} weights[j]
    block = tail[d.clamp(max=rings - 1)]
    return block / block.norm()


def meta_pattern(s: int, device) -> torch.Tensor:
    """The l2 attack's s x s pattern: nested rectangles of opposite signs in the two halves, unit l2 norm, randomly
    transposed."""
    pattern = torch.cat([_nested_rectangles(s // 2, s, device), -_nested_rectangles(s - s // 2, s, device)])
    pattern = pattern / pattern.norm()
    return pattern.t() if bool(torch.rand(()) > 0.5) else pattern


def _norm(t: torch.Tensor, dims) -> torch.Tensor:
    return t.pow(2).sum(dim=dims, keepdim=True).sqrt()


@register_attack("square")
class Square(Attack):
    """Square Attack on the margin loss, ``queries`` queries per restart; ``p_init`` 0.8 as AutoAttack sets it."""

    completes = True

    uses_gradients = False
    norms = ("linf", "l2", "stadv")

    def __init__(self, threat: Threat, queries: int = 5000, restarts: int = 1, p_init: float = 0.8) -> None:
        super().__init__(threat)
        if queries < 1 or restarts < 1 or not 0 < p_init <= 1:
            raise BenchError("square needs queries >= 1, restarts >= 1 and 0 < p_init <= 1")
        self.queries, self.restarts, self.p_init = queries, restarts, p_init

    def params(self) -> Dict[str, Any]:
        return {"queries": self.queries, "restarts": self.restarts, "p_init": self.p_init, "loss": "margin"}

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        found = Candidates(oracle, x, y, self.early_stop)
        for _ in range(self.restarts):
            todo = found.open()
            if todo.numel() == 0:
                break
            self._search(oracle, found, todo, x[todo], y[todo])
        return found.x

    def _render(self, x: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The candidate image for perturbation ``delta`` (a pixel difference, or a flow for ``stadv``)."""
        if self.threat.norm == "stadv":
            return warp(x, delta).clamp(0.0, 1.0)
        if self.threat.norm == "l2":
            delta = delta / _norm(delta, (1, 2, 3)).clamp_min(1e-12) * self.threat.eps
        return (x + delta).clamp(0.0, 1.0)

    def _search(self, oracle: Oracle, found: Candidates, owners: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> None:
        delta = self._init(x)
        candidate = self._render(x, delta)
        logits = oracle.logits(candidate)
        best = margin(logits, y)
        if self.threat.norm != "stadv":  # what the box left of the perturbation
            delta = candidate - x
        keep = found.offer(owners, candidate, logits)
        for query in range(self.queries):
            if not bool(keep.all()):
                owners, x, y, delta, best = owners[keep], x[keep], y[keep], delta[keep], best[keep]
                if owners.numel() == 0:
                    return
            p = p_schedule(self.p_init, query, self.queries)
            proposal = self._linf_step(delta, p) if self.threat.norm != "l2" else self._l2_step(delta, p)
            candidate = self._render(x, proposal)
            logits = oracle.logits(candidate)
            m = margin(logits, y)
            improved = (m < best).view(-1, 1, 1, 1)
            if self.threat.norm != "stadv":
                proposal = candidate - x
            delta = torch.where(improved, proposal, delta)
            best = torch.minimum(m, best)
            keep = found.offer(owners, candidate, logits)

    def _variable_shape(self, x: torch.Tensor):
        return (x.shape[0], 2, *x.shape[2:]) if self.threat.norm == "stadv" else tuple(x.shape)

    def _init(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = self._variable_shape(x)
        eps = self.threat.eps
        if self.threat.norm != "l2":  # vertical stripes of +-eps
            return eps * _signs(b, c, 1, w, device=x.device).expand(b, c, h, w).clone()
        delta = torch.zeros(b, c, h, w, device=x.device)
        s = h // 5
        start = (h - 5 * s) // 2
        for i in range(start, start + 5 * s, s):  # a 5 x 5 grid of meta patterns with random signs
            for j in range(start, start + 5 * s, s):
                delta[:, :, i : i + s, j : j + s] += meta_pattern(s, x.device) * _signs(b, c, 1, 1, device=x.device)
        return delta / _norm(delta, (1, 2, 3)).clamp_min(1e-12) * eps

    def _window_side(self, p: float, h: int, w: int, least: int) -> int:
        return min(max(int(round(math.sqrt(p * h * w))), least), h, w)

    def _linf_step(self, delta: torch.Tensor, p: float) -> torch.Tensor:
        """A random window of every image set to +-eps, one sign per channel (also the flow field for ``stadv``)."""
        b, c, h, w = delta.shape
        s = self._window_side(p, h, w, 1)
        i, j = int(torch.randint(0, h - s + 1, ())), int(torch.randint(0, w - s + 1, ()))
        proposal = delta.clone()
        proposal[:, :, i : i + s, j : j + s] = self.threat.eps * _signs(b, c, 1, 1, device=delta.device)
        return proposal

    def _l2_step(self, delta: torch.Tensor, p: float) -> torch.Tensor:
        """The paper's l2 update: window 1 gets a fresh meta pattern plus its old direction, with the budget of
        windows 1 and 2 and whatever the image has left; window 2 is emptied."""
        b, c, h, w = delta.shape
        s = self._window_side(p, h, w, 3)
        s = s + 1 if s % 2 == 0 and s < min(h, w) else s
        i1, j1, i2, j2 = (int(torch.randint(0, n - s + 1, ())) for n in (h, w, h, w))
        both = torch.zeros(1, 1, h, w, device=delta.device)
        both[..., i1 : i1 + s, j1 : j1 + s] = 1.0
        both[..., i2 : i2 + s, j2 : j2 + s] = 1.0
        window = delta[:, :, i1 : i1 + s, j1 : j1 + s]
        left = (self.threat.eps**2 - _norm(delta, (1, 2, 3)) ** 2).clamp_min(0.0)  # budget the image has not used
        budget = (left / c + _norm(delta * both, (2, 3)) ** 2).sqrt()  # per image and channel
        new = meta_pattern(s, delta.device) * _signs(b, c, 1, 1, device=delta.device)
        new = new + window / _norm(window, (2, 3)).clamp_min(1e-12)
        new = new / _norm(new, (2, 3)).clamp_min(1e-12) * budget
        proposal = delta.clone()
        proposal[:, :, i2 : i2 + s, j2 : j2 + s] = 0.0
        proposal[:, :, i1 : i1 + s, j1 : j1 + s] = new
        return proposal
