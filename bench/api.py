"""The Python API: what ``bench`` does from the shell, from a script or a notebook.

    import bench

    subset = bench.load_subset("cifar10-jpeg", n=64)            # the fixed, hashed subset (first 64 of seed 0)
    defense = bench.load_defense("atop", classifier="resnet20")   # a ready nn.Module: transform -> purifier -> classifier
    record = bench.evaluate(defense, suite="linf", budget="smoke", subset=subset)
    print(record.summary())

``evaluate`` takes any ``nn.Module`` that maps images in [0, 1] (NCHW) to logits: a registered defense, a
``bench.Defense`` subclass of your own (declare ``stochastic`` / non-differentiable stages so the suite adds EOT /
BPDA), or a plain model (evaluated as one differentiable classifier). It runs exactly what ``bench run`` runs (the
suite, the integrity checks, their corrections) and returns a ``Record``; ``bench run`` itself is ``bench.run``.
Register your own defenses and attacks with the decorators the project uses (``bench.register_defense``,
``bench.register_attack``); from a notebook, re-running the defining cell replaces the entry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from bench.classifiers import Classifier, ClassifierInfo
from bench.classifiers import load_classifier as _load_classifier
from bench.classifiers.base import state_dict_sha256
from bench.data.subset import Subset
from bench.data.subset import load_subset as _load_subset
from bench.evaluation.runner import RunConfig, evaluate_defense, resolve_device, resolve_suite
from bench.evaluation.runner import run as _run
from bench.reports.summary import end_of_run, format_result
from defenses.base import Defense, build_defense

log = logging.getLogger(__name__)

__all__ = ["Record", "load_classifier", "load_defense", "load_subset", "evaluate", "run"]

Device = Union[str, torch.device]


@dataclass
class Record:
    """A run's record (``data``, the JSON written to ``path``) with the numbers people read first."""

    data: Dict[str, Any]
    path: Optional[Path] = None

    @property
    def clean_accuracy(self) -> float:
        return self.data["clean"]["accuracy"]

    @property
    def robust_accuracy(self) -> float:
        """Worst case over the suite (and, for stochastic defenses, over the re-classification draws)."""
        return self.data["robust"]["accuracy"]

    @property
    def headline(self) -> float:
        return self.data["headline"]["accuracy"]

    @property
    def unreliable(self) -> bool:
        return bool(self.data["unreliable"])

    @property
    def run_id(self) -> str:
        return self.data["run_id"]

    def summary(self) -> str:
        """The table ``bench run`` prints, and the end-of-run line."""
        return format_result(self.data) + "\n" + end_of_run(self.data, self.path)

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def __repr__(self) -> str:
        d = self.data
        return (f"Record({d['defense']['name']} on {d['classifier']['name']}, clean {100 * self.clean_accuracy:.2f}%, "
                f"robust {100 * self.robust_accuracy:.2f}%, n={d['subset']['n']}, path={self.path})")


def load_classifier(name: str = "resnet20", device: Device = "cpu") -> Classifier:
    """A frozen classifier by name (``bench list classifiers``): inputs in [0, 1], it normalizes itself."""
    return _load_classifier(name, resolve_device(str(device)))


def load_defense(name: str = "none", classifier: Union[str, nn.Module] = "resnet20", device: Device = "cpu",
                 **options: Any) -> Defense:
    """The defense ``name`` (``bench list defenses``, or ``a+b`` to stack two) in front of ``classifier`` (a name or
    a loaded ``Classifier``), in eval mode on ``device``. ``options`` are the defense's own (``checkpoint=...``)."""
    device = resolve_device(str(device))
    model = _load_classifier(classifier, device) if isinstance(classifier, str) else classifier.to(device)
    return build_defense(name, model, **options).to(device).eval()


def load_subset(dataset: str = "cifar10-jpeg", n: int = 512, seed: int = 0, download: bool = False) -> Subset:
    """The fixed subset every number is measured on: ``n`` images of the test split drawn with ``seed``; its
    ``x`` (float32 NCHW in [0, 1]) and ``y`` are tensors, ``subset_hash`` identifies it in records."""
    return _load_subset(dataset, n, seed, download=download)


def run(config: RunConfig) -> Record:
    """``bench run`` with a ``RunConfig`` (every flag of the command is a field)."""
    data, path = _run(config)
    return Record(data, path)


class _ModuleClassifier(nn.Module):
    """A user's module as the classifier of a pipeline, with the description a record needs."""

    def __init__(self, net: nn.Module, info: ClassifierInfo) -> None:
        super().__init__()
        self.net, self.info = net, info

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class ModelUnderTest(Defense):
    """Any ``nn.Module`` evaluated as it is: one differentiable model from image to logits (not registered)."""

    def __init__(self, model: nn.Module, name: str, stochastic: bool, info: ClassifierInfo) -> None:
        super().__init__(_ModuleClassifier(model, info))
        self.name, self.stochastic = name, stochastic  # per instance: each wrapped module is its own "defense"

    def config(self) -> Dict[str, Any]:
        return {"module": type(self.classifier.net).__qualname__, "via": "bench.evaluate"}


def as_defense(model: nn.Module, subset: Subset, name: Optional[str] = None, stochastic: Optional[bool] = None) -> Defense:
    """``model`` as the harness evaluates it: a ``Defense`` as it is; a ``Classifier`` behind the ``none`` defense;
    any other module as one model (``stochastic`` defaults to its ``stochastic`` attribute, else False)."""
    if isinstance(model, Defense):
        return model
    if isinstance(model, Classifier):
        return build_defense("none", model)
    label = name or type(model).__name__
    info = ClassifierInfo(name=label, architecture=type(model).__qualname__, dataset=subset.dataset,
                          num_classes=subset.num_classes, mean=None, std=None, training="unknown", train_eps=None,
                          weights=f"in memory, sha256 {state_dict_sha256(model)[:16]}", source="bench.evaluate",
                          weights_sha256=state_dict_sha256(model))
    declared = bool(getattr(model, "stochastic", False)) if stochastic is None else stochastic
    return ModelUnderTest(model, label, declared, info)


def evaluate(
    model: nn.Module, suite: Optional[str] = None, *, threat: Optional[str] = None, eps: Optional[float] = None,
    budget: str = "auto", subset: Optional[Subset] = None, dataset: str = "cifar10-jpeg", n: int = 512, seed: int = 0,
    name: Optional[str] = None, stochastic: Optional[bool] = None, device: Device = "auto",
    batch_size: Union[int, str] = 128, out: Union[str, Path] = "runs", checks: bool = True, success_draws: int = 10,
    headline: str = "worst",
) -> Record:
    """Evaluate ``model`` (any ``nn.Module`` from images in [0, 1] to logits) as ``bench run`` evaluates a defense.

    ``suite`` (default: the threat's own suite) at ``budget`` (smoke, cpu, full, or auto: full on CUDA, cpu on a
    CPU), on ``subset`` (default: ``load_subset(dataset, n, seed)``). The record is written under ``out`` and
    returned. ``name`` labels a plain module in the record (default: its class name).
    """
    device = resolve_device(str(device))
    subset = subset if subset is not None else load_subset(dataset, n, seed)
    resolved, resolved_threat = resolve_suite(suite, threat, budget, eps, device)
    defense = as_defense(model, subset, name, stochastic).to(device).eval()
    classifier_info = defense.classifier.info
    config = RunConfig(defense=defense.name, threat=resolved_threat.norm, classifier=classifier_info.name,
                       dataset=subset.dataset, suite=resolved.name, budget=resolved.budget, eps=resolved_threat.eps,
                       n=subset.n, seed=subset.seed, success_draws=success_draws, headline=headline, checks=checks,
                       device=str(device), batch_size=batch_size, out=Path(out))
    data, path = evaluate_defense(defense, subset, resolved, resolved_threat, config, device)
    return Record(data, path)


def curve_points(defense_name: str, classifier: str, eps_values: Sequence[float], suite: Optional[str], threat: str,
                 budget: str, subset: Subset, device, runs: Path,
                 defense_options: Optional[Dict[str, Any]] = None) -> List[Dict[str, Any]]:
    """One record per (model, eps > 0) through ``bench.evaluate``; eps 0 is the worst case without an attack, the
    no-attack floor (every re-classification draw right on the clean image; the clean accuracy for a deterministic
    defense), with the one-draw clean accuracy beside it. Returns the points."""
    points = []
    for label, name, options in ((defense_name, defense_name, defense_options or {}), ("none (bare classifier)", "none", {})):
        model = load_defense(name, classifier, device, **options)
        clean = None
        for eps in sorted(eps_values):
            if eps == 0:
                continue
            record = evaluate(model, suite, threat=threat, eps=eps, budget=budget, subset=subset, device=device, out=runs)
            log.info("%s eps %.4g: robust %.2f%%", label, eps, 100 * record.robust_accuracy)
            clean = (record.data.get("clean_worst") or record["clean"], record["clean"])
            points.append({"model": label, "eps": eps, "robust": record["robust"], "suite": record["suite"],
                           "unreliable": record.unreliable, "record": str(record.path)})
        if 0 in eps_values and clean is not None:
            points.append({"model": label, "eps": 0.0, "robust": clean[0], "clean_one_draw": clean[1], "suite": None,
                           "unreliable": False, "record": None})
    return sorted(points, key=lambda p: (p["model"] != defense_name, p["eps"]))
