"""Square Attack (Andriushchenko et al. 2020), the score-based black-box attack of AutoAttack, from the
reference code (``pyautoattack.square``).

It only queries scores, through the oracle's ``logits``: under ``EOT`` those are the mean logits over the
draws, which is what a score-based attack should query for a stochastic defense. It uses no gradient, so
suites never add a BPDA variant of it. A black-box attack that beats every white-box attack on some point is
a sign of masked gradients (a PROTOCOL check).
"""

from __future__ import annotations

import logging
from typing import Any, Dict

import torch

from attacks.base import Attack, Oracle, Threat, register_attack
from bench.errors import BenchError

_NORMS = {"linf": "Linf", "l2": "L2"}


@register_attack("square")
class Square(Attack):
    """pyautoattack's SquareAttack, margin loss, ``queries`` queries per restart."""

    uses_gradients = False

    def __init__(self, threat: Threat, queries: int = 5000, restarts: int = 1, p_init: float = 0.8) -> None:
        super().__init__(threat)
        if queries < 1 or restarts < 1 or not 0 < p_init <= 1:
            raise BenchError("square needs queries >= 1, restarts >= 1 and 0 < p_init <= 1")
        self.queries, self.restarts, self.p_init = queries, restarts, p_init

    def params(self) -> Dict[str, Any]:
        return {"queries": self.queries, "restarts": self.restarts, "p_init": self.p_init, "loss": "margin"}

    def run(self, oracle: Oracle, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        from pyautoattack.square import SquareAttack

        logging.getLogger("auto-attack").setLevel(logging.WARNING)
        # The reference code reseeds torch's global generator; derive its seed from ours so runs stay reproducible.
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
        attack = SquareAttack(oracle.logits, norm=_NORMS[self.threat.norm], n_queries=self.queries, eps=self.threat.eps,
                              p_init=self.p_init, n_restarts=self.restarts, seed=seed, loss="margin", device=x.device)
        return attack.perturb(x.contiguous(), y)
