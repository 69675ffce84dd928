"""``none``: the bare classifier, reported beside every defense on the same subset."""

from __future__ import annotations

from torch import nn

from defenses.base import Defense, register_defense


@register_defense("none")
class NoDefense(Defense):
    """No transform, no purifier: the classifier alone."""

    version = "1"

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__(classifier)
