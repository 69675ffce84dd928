"""Transfer attack: adversarial examples crafted on a *source* model, then shown to the defense.

``source="classifier"`` (default) attacks the defense's own bare classifier, the "oblivious" attack that
purification papers often report; any registered classifier name (``resnet56``, ``robustbench:...``) attacks
another model. The source is attacked with PGD (``steps``, step 2.5 * eps / steps, random start) through a
plain oracle, so it costs no passes through the defense; only the final examples are classified by it. A
transfer attack that beats every white-box attack on some points is a sign of masked gradients. When the
source *is* the evaluated model (the bare classifier, or a defense whose stages are all the identity) the attack
is white-box PGD; the record says so (``source_is_target``) and the black-box integrity check ignores it.

The attack on the source runs every step on every point (no early stop once the source is fooled: a barely
adversarial example transfers poorly) and hands over each point's lowest source-margin iterate, the most confidently
misclassified one on the source; the defense's verdict comes from the evaluation's draws on that example.

``attack`` (default ``pgd``) and ``attack_params`` choose another attack to run on the source (``mim``,
``deepfool``, ``cw-linf``...): the AID-Purifier paper's "oblivious" columns are each attack run on the bare
classifier, then shown to the purifier.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

import torch
from torch import nn

from attacks.base import ATTACKS, Attack, Oracle, Threat, register_attack
from attacks.gradient import PGD
from attacks.verdict import Judge
from bench.core.errors import BenchError


def _defense_of(model: nn.Module) -> nn.Module:
    """Unwrap counting and view wrappers down to the defense."""
    while not hasattr(model, "classifier") and hasattr(model, "model"):
        model = model.model
    return model


@register_attack("transfer")
class Transfer(Attack):
    """PGD on a source model; the defense only sees the result."""

    completes = True

    uses_oracle = False
    norms = ("linf", "l2", "stadv")  # stadv: the flow attack on the source

    def __init__(self, threat: Threat, source: str = "classifier", steps: int = 20, loss: str = "ce", attack: str = "pgd",
                 attack_params: Optional[Dict[str, Any]] = None) -> None:
        super().__init__(threat)
        self.source, self.steps, self.loss, self.attack = source, steps, loss, attack
        self.attack_params = dict(attack_params or {})
        if attack == "pgd" and threat.norm == "stadv":  # PGD needs a pixel threat: the flow attack instead
            attack = self.attack = "stadv"
            self.attack_params = self.attack_params or {"steps": steps}
        if attack == "pgd" and not self.attack_params:
            self._inner: Attack = PGD(threat, steps=steps, loss=loss)
        else:
            cls = ATTACKS.get(attack)
            if not cls.uses_oracle:
                raise BenchError(f"transfer: {attack} runs its own model loop; it cannot attack the source model")
            try:
                self._inner = cls(threat, **self.attack_params)
            except TypeError as exc:
                raise BenchError(f"transfer: bad attack_params for {attack}: {exc}") from None
        self._inner.early_stop = False  # run to completion on the source
        self._source_model = None
        self.source_is_target: bool | None = None  # known once the attack has run

    def params(self) -> Dict[str, Any]:
        if isinstance(self._inner, PGD) and self.attack == "pgd" and not self.attack_params:
            return {"source": self.source, "steps": self.steps, "step_size": self._inner.step_size, "loss": self.loss}
        return {"source": self.source, "attack": self.attack, "attack_params": self._inner.params()}

    def source_model(self, model: nn.Module, device: torch.device) -> nn.Module:
        if self.source == "classifier":
            defense = _defense_of(model)
            if not hasattr(defense, "classifier"):  # a bare classifier is its own source
                self.source_is_target = True
                return defense
            self.source_is_target = all(isinstance(getattr(defense, stage, nn.Identity()), nn.Identity)
                                        for stage in ("transform", "purifier"))
            return defense.classifier
        if self._source_model is None:
            from bench.classifiers import load_classifier

            self._source_model = load_classifier(self.source, device)
        return self._source_model

    def describe(self) -> Dict[str, Any]:
        extra = {} if self.source_is_target is None else {"source_is_target": self.source_is_target}
        return {**super().describe(), **extra}

    def perturb(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        source = self.source_model(model, x.device)
        # the source's own judge (never the evaluation's, which judges the defense)
        oracle = Oracle(source, Judge(source, draws=1, stochastic=False))
        return self.threat.project(self._inner.run(oracle, x, y).detach(), x)
