"""``none``: the bare classifier, reported beside every defense on the same subset."""

from __future__ import annotations

from torch import nn

from defenses.base import Card, Defense, register_defense


@register_defense("none")
class NoDefense(Defense):
    """No transform, no purifier: the classifier alone."""

    version = "1"
    card = Card(title="No defense: the frozen classifier alone, on the same images", authors="", venue="", year=None,
                paper="", code=None, weights="the classifier's own (see its provenance in the record's classifier field)",
                differences="none: the reference every defense is read against")

    def __init__(self, classifier: nn.Module) -> None:
        super().__init__(classifier)
