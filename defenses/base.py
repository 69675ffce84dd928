"""The defense API: ``transform -> purifier -> classifier`` as one ``nn.Module``.

A defense declares whether it is stochastic and whether exact gradients flow through every stage.
A stage without useful gradients (``differentiable = False`` on the stage) declares a BPDA surrogate
(identity by default) that ``bpda_forward`` uses on the backward pass while keeping the real forward.
A defense may also offer an *attacker surrogate* (``attack_surrogate``): a cheaper model with the same
interface (fewer purification steps, say) that suites may use for gradients; whether a point is broken is
always decided by the real defense.
Defenses register with ``@register_defense("name")`` in their own file under ``defenses/``; third-party
ones come from ``--plugin file.py`` or the ``bench.defenses`` entry-point group.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from bench.core.errors import BenchError
from bench.core.registry import Registry


@dataclass(frozen=True)
class Card:
    """What a reader needs to know about a defense before trusting a number, as RobustBench's entries give it: the
    paper (title, authors, venue, year, link), the authors' code, where the weights shipped here come from and under
    which license, and what differs from the paper at this scale. Records carry it (outside the run id: editing a card
    changes no result); ``bench show-card NAME`` prints it; boards link to it."""

    title: str
    authors: str
    venue: str
    year: Optional[int]
    paper: str  # a link, or "" for none
    code: Optional[str]  # the authors' code, or None when they released none we know of
    weights: str  # provenance and license of the weights shipped with the package
    differences: str  # what differs from the paper at this scale

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        when = f"{self.venue} {self.year}" if self.year and str(self.year) not in self.venue else self.venue
        return f"{self.title} ({self.authors}; {when})" if self.authors else self.title


def card_of(defense) -> Optional[Card]:
    """A defense's card (for a class or an instance); a stack's joins its members' (computed when asked, once every
    member is registered)."""
    cls = defense if isinstance(defense, type) else type(defense)
    joined = getattr(cls, "stack_card", None)
    return joined() if joined is not None else cls.card


class Defense(nn.Module):
    """Base class of every defense. Inputs are images in [0, 1], NCHW; outputs are logits."""

    name: ClassVar[str] = ""
    version: ClassVar[str] = "1"
    stochastic: ClassVar[bool] = False
    #: The paper's headline for this defense, printed beside a run's numbers so that a reader of a CPU-scale run knows
    #: where it stands (empty for defenses without one). Not part of the record: it describes the paper, not the run.
    paper_reference: ClassVar[str] = ""
    #: The paper's row for a run under another threat norm than the headline's (``{"l2": "..."}``): a run at l2 quotes
    #: the paper's l2 table, not its linf headline. Norms not listed fall back to ``paper_reference``.
    paper_references: ClassVar[Dict[str, str]] = {}
    #: The defense's card (``Card``); a plug-in may have none, and its records say so.
    card: ClassVar[Optional[Card]] = None

    def __init__(
        self, classifier: nn.Module, transform: Optional[nn.Module] = None, purifier: Optional[nn.Module] = None
    ) -> None:
        super().__init__()
        self.transform = transform if transform is not None else nn.Identity()
        self.purifier = purifier if purifier is not None else nn.Identity()
        self.classifier = classifier

    @classmethod
    def reference_for(cls, norm: Optional[str] = None) -> str:
        """The paper's row for a run under ``norm`` (``paper_references``), else its headline (``paper_reference``)."""
        return cls.paper_references.get(norm, cls.paper_reference) if norm else cls.paper_reference

    @property
    def differentiable(self) -> bool:
        """True when exact gradients flow through every stage (no BPDA needed)."""
        return all(getattr(stage, "differentiable", True) for stage in (self.transform, self.purifier))

    @property
    def gradient_route(self) -> str:
        """How the input gradient crosses the pipeline when it is differentiated as is: ``exact`` unless a stage
        declares its own ``gradient_route`` (DiffPure's purification: exact, adjoint or bpda). Integrity messages
        name it, so a flagged gradient says which route produced it."""
        routes = [getattr(stage, "gradient_route", "exact") for stage in (self.transform, self.purifier)]
        named = [route for route in routes if route != "exact"]
        return "+".join(named) if named else "exact"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.purifier(self.transform(x)))

    def bpda_forward(self, x: torch.Tensor, stages: Tuple[str, ...] = ()) -> torch.Tensor:
        """Same output as ``forward``; non-differentiable stages back-propagate through their surrogate.

        ``stages`` names stages ("transform", "purifier") to treat the same way although they are
        differentiable; such a stage must declare a ``surrogate`` (the identity of a 4-channel purifier
        input is not an image, so there is no silent default).
        """
        unknown = set(stages) - {"transform", "purifier", "pipeline"}
        if unknown:
            raise BenchError(f"unknown pipeline stages {sorted(unknown)}; use transform and/or purifier, or pipeline")
        if "pipeline" in stages:  # everything before the classifier as one identity on the backward pass
            with torch.no_grad():
                h = self.purifier(self.transform(x))
            if h.shape != x.shape:
                raise BenchError(f"defense {self.name}: its purified output {tuple(h.shape)} is not image-shaped "
                                 f"{tuple(x.shape)}; the pipeline has no identity surrogate")
            return self.classifier(x + (h - x).detach())
        h = x
        for name in ("transform", "purifier"):
            stage = getattr(self, name)
            forced = name in stages
            if forced and getattr(stage, "surrogate", None) is None and not isinstance(stage, nn.Identity):
                raise BenchError(f"defense {self.name}: its {name} declares no surrogate for BPDA")
            h = _bpda_stage(stage, h, forced)
        return self.classifier(h)

    def config(self) -> Dict[str, Any]:
        """The resolved configuration stored in records (override to add options)."""
        return {}

    def known_problems(self) -> List[str]:
        """Problems the defense knows of itself that make its numbers no robustness claim (e.g. weights whose training
        manifest shows they do not work); every one goes into the record's ``unreliable_reasons``. None by default."""
        return []

    def attack_surrogate(self) -> Optional[nn.Module]:
        """A cheaper model the attacker may differentiate instead of this one (e.g. fewer purification steps),
        or None. Suites whose budget sets ``"surrogate": true`` use it for gradients; the real defense still
        classifies every adversarial example. Override together with ``surrogate_config``."""
        return None

    def surrogate_config(self) -> Dict[str, Any]:
        """The attack-side settings of ``attack_surrogate`` (stored in records beside ``config``)."""
        return {}

    def describe(self) -> Dict[str, Any]:
        info = getattr(self.classifier, "info", None)
        return {
            "name": self.name,
            "version": self.version,
            "stochastic": self.stochastic,
            "differentiable": self.differentiable,
            "config": self.config(),
            **({"surrogate_config": self.surrogate_config()} if self.attack_surrogate() is not None else {}),
            "classifier": info.name if info is not None else type(self.classifier).__name__,
        }


def _bpda_stage(stage: nn.Module, h: torch.Tensor, forced: bool = False) -> torch.Tensor:
    if getattr(stage, "differentiable", True) and not forced:
        return stage(h)
    if hasattr(stage, "bpda"):  # a composite stage (a stack's chain) applies BPDA member by member
        return stage.bpda(h, forced)
    surrogate = getattr(stage, "surrogate", None)
    approx = surrogate(h) if surrogate is not None else h
    with torch.no_grad():
        exact = stage(h)
    return approx + (exact - approx).detach()


DEFENSES: Registry[type] = Registry("defense", base=Defense, packages=["defenses"], entry_point_group="bench.defenses")


def register_defense(name: str):
    """Class decorator: register a ``Defense`` subclass under ``name`` (also sets ``cls.name``)."""

    def decorator(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, Defense)):
            raise TypeError(f"@register_defense({name!r}) must decorate a Defense subclass, got {cls!r}")
        cls.name = name
        DEFENSES.add(name, cls)
        return cls

    return decorator


def build_defense(name: str, classifier: nn.Module, **options: Any) -> Defense:
    """Instantiate the defense called ``name`` in front of ``classifier``; ``a+b`` stacks registered defenses."""
    if "+" in name and name not in DEFENSES:
        from defenses.stack import stack_class

        cls = stack_class(name)
    else:
        cls = DEFENSES.get(name)
    try:
        return cls(classifier, **options)
    except TypeError as exc:
        if options and "argument" in str(exc):
            raise BenchError(f"defense {name} does not accept options {sorted(options)}: {exc}") from None
        raise


SHIPPED_DIR = Path(__file__).with_name("checkpoints")


def resolve_checkpoint(explicit: Optional[str], candidates: Sequence[Tuple[Path, str]], missing: str) -> Tuple[Path, str]:
    """(path, source) of a defense's weights: ``explicit`` (the ``checkpoint=`` option, source "option") if given,
    else the first existing candidate (e.g. what the user trained, then what ships with the package); ``missing``
    is the error shown when none exists (it should say how to train one)."""
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise BenchError(f"checkpoint={explicit}: no such file")
        return path, "option"
    for path, source in candidates:
        if path.is_file():
            return path, source
    raise BenchError(missing)


def checkpoint_display(path: Optional[Path], source: str) -> Optional[str]:
    """How a record names a checkpoint: shipped files by their place in the package (the same on every machine)."""
    if path is None:
        return None
    return path.relative_to(SHIPPED_DIR.parent.parent).as_posix() if source == "shipped" else str(path)


def manifest_training(weights: Optional[Path]) -> Dict[str, Any]:
    """What the ``bench train`` manifest beside a ``<name>.weights.pt`` says about its training (settings, epochs,
    the last epoch's logged values), for records; empty when there is no manifest."""
    if weights is None or not weights.name.endswith(".weights.pt"):  # a file named otherwise has no manifest beside it
        return {}
    manifest = weights.with_name(weights.name[: -len(".weights.pt")] + ".manifest.json")
    if not manifest.is_file():
        return {}
    import json

    data = json.loads(manifest.read_text())
    config, history = data.get("config", {}), data.get("history", [])
    return {"settings": config.get("settings"), "train_size": config.get("train_size"),
            "classifier": config.get("classifier"), "epochs_done": len(history), "last_epoch": history[-1] if history else None}
