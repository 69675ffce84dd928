"""Stacked defenses: ``a+b`` runs defense a's stages, then defense b's, then the (shared) frozen classifier.

AID-Purifier's paper stacks add-on purifiers (``pixeldefend+aid-purifier``, ``nrp+aid-purifier``: the first one
cleans the image, AID-Purifier, which reads the classifier's features, comes last). A stack is built from the
member defenses through the defense API (``build_defense`` of each member in front of the same classifier), never
hand-written: its purifier stage is the chain of the members' transform and purifier stages, in order.

- Randomness: the stack is stochastic when any member is.
- Gradients: the chain is differentiable when every member stage is. Under BPDA, each member stage keeps its own
  treatment: a non-differentiable one (PixelDefend, AID-Purifier) back-propagates as its surrogate (the
  identity), a differentiable one (NRP, ``aid-purifier-unrolled``) with its exact gradient, each at its real
  input in the chain.
- Options: ``member.key=value`` (``--defense-option aid-purifier.steps=5``) goes to that member.
- Records: the name is the full stack (``pixeldefend+aid-purifier``); ``config.members`` holds every member's
  own description (name, version, config and checkpoint).

Any ``a+b[+c...]`` of registered defenses can be built; the stacks the AID-Purifier paper measures are also
registered by name so the registry-wide defense tests cover them.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from bench.core.errors import BenchError
from defenses.base import DEFENSES, Card, Defense, _bpda_stage, register_defense

SEPARATOR = "+"


class StageChain(nn.Module):
    """The member defenses' stages applied one after another (a purifier stage of the stack)."""

    def __init__(self, stages: Sequence[nn.Module]) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.differentiable = all(getattr(stage, "differentiable", True) for stage in stages)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x = stage(x)
        return x

    def bpda(self, x: torch.Tensor, forced: bool = False) -> torch.Tensor:
        """The chain under BPDA: every member stage with its own surrogate, at its real input."""
        for stage in self.stages:
            x = _bpda_stage(stage, x, forced)
        return x


def _split_options(members: Sequence[str], options: Dict[str, Any]) -> List[Dict[str, Any]]:
    keys = {member.replace("-", "_"): i for i, member in enumerate(members)}
    keys.update({member: i for i, member in enumerate(members)})
    routed: List[Dict[str, Any]] = [{} for _ in members]
    for key, value in options.items():
        member, dot, option = key.partition(".")
        if not dot or member not in keys:
            raise BenchError(f"stacked defense {SEPARATOR.join(members)}: option {key!r} must be MEMBER.KEY, "
                             f"with MEMBER among {', '.join(members)}")
        routed[keys[member]][option] = value
    return routed


class StackedDefense(Defense):
    """Member defenses in order, sharing one classifier (subclasses set ``members``)."""

    members: Tuple[str, ...] = ()
    version = "1"

    def __init__(self, classifier: nn.Module, **options: Any) -> None:
        from defenses.base import build_defense

        parts = [build_defense(member, classifier, **opts) for member, opts in zip(self.members, _split_options(self.members, options))]
        self._init_from(classifier, parts)

    def _init_from(self, classifier: nn.Module, parts: Sequence[Defense]) -> None:
        stages = [stage for part in parts for stage in (part.transform, part.purifier) if not isinstance(stage, nn.Identity)]
        super().__init__(classifier, purifier=StageChain(stages))
        self.stochastic = any(part.stochastic for part in parts)
        self._described = [{key: value for key, value in part.describe().items() if key != "classifier"} for part in parts]
        self._problems = [f"{part.name}: {problem}" for part in parts for problem in part.known_problems()]

    def known_problems(self) -> List[str]:
        return list(self._problems)

    @classmethod
    def stack_card(cls) -> Optional[Card]:
        """The members' cards joined: the stack is the paper's combination of published defenses."""
        cards = [DEFENSES.get(member).card for member in cls.members]
        if any(card is None for card in cards):
            return None
        join = lambda field: " + ".join(str(getattr(card, field)) for card in cards)  # noqa: E731
        venues = " + ".join(f"{c.venue} {c.year}" if c.year and str(c.year) not in c.venue else c.venue for c in cards)
        return Card(title=join("title"), authors=" / ".join(c.authors for c in cards), venue=venues, year=None,
                    paper=join("paper"), code=" + ".join(c.code or "(none)" for c in cards), weights=join("weights"),
                    differences=join("differences"))

    @classmethod
    def for_testing(cls, classifier: nn.Module) -> "StackedDefense":
        parts = []
        for member in cls.members:
            member_cls = DEFENSES.get(member)
            parts.append(member_cls.for_testing(classifier) if hasattr(member_cls, "for_testing") else member_cls(classifier))
        stack = cls.__new__(cls)
        stack._init_from(classifier, parts)
        return stack

    def config(self) -> Dict[str, Any]:
        return {"members": self._described}


def stack_class(name: str) -> type:
    """The ``StackedDefense`` subclass for ``a+b[+c...]`` (registered members only)."""
    members = tuple(name.split(SEPARATOR))
    if len(members) < 2 or not all(members):
        raise BenchError(f"a stacked defense names two or more defenses joined by '{SEPARATOR}', got {name!r}")
    for member in members:
        DEFENSES.get(member)  # unknown members fail here, with the registry's message
    return _stack_type(members)


def _stack_type(members: Sequence[str]) -> type:
    name = SEPARATOR.join(members)
    return type(f"Stacked[{name}]", (StackedDefense,), {"members": tuple(members), "name": name})


def register_stack(*members: str) -> type:
    """Register the stack of ``members`` under its full name (``a+b``); members are looked up when it is built."""
    return register_defense(SEPARATOR.join(members))(_stack_type(members))


# The stacks of the AID-Purifier paper's Tables 3 and 10, and their adaptive (unrolled-gradient) forms.
for _members in (("pixeldefend", "aid-purifier"), ("nrp", "aid-purifier"),
                 ("pixeldefend", "aid-purifier-unrolled"), ("nrp", "aid-purifier-unrolled")):
    register_stack(*_members)
