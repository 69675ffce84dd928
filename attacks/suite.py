"""Suites: frozen, versioned lists of attack specs, stored as JSON data in ``attacks/suites/``.

A suite file names its threat (norm, default eps) and gives the attacks in up to three **budgets**:
``smoke`` (seconds, for tests and CI), ``cpu`` (a real but reduced evaluation that fits a CPU session) and
``full`` (the protocol's full strength, a GPU job; ``paper`` is its older name, still read). Each budget lists its
attacks and how many EOT draws every gradient attack gets when the defense is stochastic. ``load_suite(name, norm, budget)`` resolves one
budget into a ``Suite``; the record stores the suite name, version, budget and every resolved setting.

``Suite.build`` resolves a suite for a defense: exact-gradient attacks always; for a defense with
non-differentiable stages, each gradient attack again under ``BPDA`` (an addition, never a replacement);
``EOT`` around every gradient attack when stochastic (``autoattack`` runs its own loop: version ``auto`` picks ``rand``
for a stochastic defense, ``standard`` otherwise). An attack spec may also ask for BPDA through named
stages that *are* differentiable (``"bpda": ["purifier"]``): that measures how much an evaluation that
skips a stage in the gradient over-credits the defense (PROTOCOL: "purifier skipped in the gradient").

By default the attacks run one after another on the points still robust (early stop; the result is the
per-sample worst case). A suite with ``"independent": true`` runs every attack on all clean-correct points
so each attack's own accuracy is known, as the columns of the papers' tables need.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch

from attacks.adaptive import BPDA, EOT, Surrogate
from attacks.base import ATTACKS, Attack, Threat, canonical_norm
from bench.core.errors import BenchError
from bench.core.registry import Registry

SUITE_DIR = Path(__file__).with_name("suites")
BUDGETS = ("smoke", "cpu", "full")
#: Older names of budgets, kept so that older suite files and records still resolve ("paper" was "full").
BUDGET_ALIASES = {"paper": "full"}
STAGES = ("transform", "purifier", "pipeline")
_SUITE_KEYS = {"name", "version", "description", "threat", "independent", "budgets"}
_BUDGET_KEYS = {"description", "eot_draws", "attacks", "surrogate"}
_SPEC_KEYS = {"attack", "params", "bpda", "label"}


@dataclass(frozen=True)
class AttackSpec:
    attack: str
    params: Tuple[Tuple[str, Any], ...] = ()
    bpda: Tuple[str, ...] = ()  # differentiable stages the attack back-propagates through as the identity
    name: str = ""  # the spec's own label ("label" in the suite file), when the default would not be unique

    def build(self, threat: Threat) -> Attack:
        cls = ATTACKS.get(self.attack)
        try:
            return cls(threat, **dict(self.params))
        except TypeError as exc:
            raise BenchError(f"bad parameters for attack {self.attack}: {exc}") from None

    def for_defense(self, stochastic: bool) -> "AttackSpec":
        """The spec as it runs against a defense: ``autoattack`` with version ``auto`` becomes ``rand`` (APGD-CE and
        APGD-DLR with EOT-20 inside pyautoattack) for a stochastic defense and ``standard`` otherwise, since AutoAttack
        standard takes each gradient from one draw of a stochastic defense and reads higher than the truth."""
        params = dict(self.params)
        if self.attack != "autoattack" or params.get("version") != "auto":
            return self
        params["version"] = "rand" if stochastic else "standard"
        return replace(self, params=tuple(sorted(params.items())))

    @property
    def label(self) -> str:
        """The spec's ``label`` if it has one, else the attack's name with its step count when the spec sets
        one (``pgd-10``, ``pgd-20``)."""
        if self.name:
            return self.name
        steps = dict(self.params).get("steps")
        return self.attack if steps is None else f"{self.attack}-{steps}"

    def to_dict(self) -> Dict[str, Any]:
        return {"attack": self.attack, "params": dict(self.params), **({"bpda": list(self.bpda)} if self.bpda else {}),
                **({"label": self.name} if self.name else {})}


@dataclass(frozen=True)
class Suite:
    """One budget of a suite, resolved: what a run executes and what its record stores."""

    name: str
    version: str
    budget: str
    description: str
    threat: Threat
    eot_draws: int
    attacks: Tuple[AttackSpec, ...]
    independent: bool = False
    standard_eps: Tuple[float, ...] = ()  # the eps values the field reports for this threat (``--eps``)
    surrogate: bool = False  # gradient attacks use the defense's attack_surrogate when it has one

    def build(
        self, threat: Threat, stochastic: bool, differentiable: bool, eot_chunk_images: Optional[int] = None,
        surrogate: Optional[torch.nn.Module] = None, pipeline_bpda: bool = False, complete: bool = False,
    ) -> List[Tuple[str, Attack]]:
        """Resolve the suite for a defense: a list of (label, attack) in the order they run.

        ``surrogate`` (the defense's ``attack_surrogate()``) replaces the model in every oracle-based attack
        when this budget allows it (``"surrogate": true``). ``pipeline_bpda`` runs every gradient attack only
        under BPDA through the whole pipeline (``+bpda[pipeline]``, replacing a spec's stage BPDA and the
        separate BPDA variant): the runner's correction for a defense without usable gradients. ``complete`` builds
        every attack without early stop (``Attack.early_stop``): each runs to its last step on every point, as the
        mean and majority over the draws of a stochastic defense need (``complete_attacks``)."""
        plans: List[Tuple[str, Attack]] = []
        stand_in = surrogate if self.surrogate and not pipeline_bpda else None

        def build(spec: AttackSpec) -> Attack:
            attack = spec.for_defense(stochastic).build(threat)
            attack.early_stop = not complete
            return Surrogate(attack, stand_in) if stand_in is not None and attack.uses_oracle and attack.uses_gradients else attack

        for spec in self.attacks:
            attack = build(spec)
            label = spec.label + ("+surrogate" if isinstance(attack, Surrogate) else "")
            if spec.bpda:
                if not attack.uses_oracle:
                    raise BenchError(f"suite {self.name}: {spec.attack} runs its own model loop; it cannot take bpda stages")
                label = f"{label}+bpda[{','.join(spec.bpda)}]"
                attack = attack if pipeline_bpda else BPDA(attack, stages=spec.bpda)
            gradient = attack.uses_oracle and attack.uses_gradients
            if pipeline_bpda and gradient:
                label, attack = f"{label}+bpda[pipeline]", BPDA(attack, stages=("pipeline",))
            variants = [(label, attack)]
            if gradient and not differentiable and not pipeline_bpda:
                variants.append((f"{label}+bpda", BPDA(build(spec), stages=spec.bpda)))
            for label, variant in variants:
                if variant.uses_oracle and stochastic:
                    label, variant = f"{label}+eot{self.eot_draws}", EOT(variant, self.eot_draws, eot_chunk_images)
                plans.append((label, variant))
        labels = [label for label, _ in plans]
        if len(set(labels)) != len(labels):
            raise BenchError(f"suite {self.name} ({self.budget}): two attacks share a label in {labels}")
        return plans

    def complete_attacks(self, stochastic: bool) -> bool:
        """Whether attacks run to completion for this defense: an independent suite (each attack's own accuracy, the
        papers' columns) on a stochastic defense, whose mean and majority over the draws are reported per attack."""
        return self.independent and stochastic

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "budget": self.budget, "threat": self.threat.to_dict(),
            "eot_draws": self.eot_draws, "independent": self.independent, "surrogate": self.surrogate,
            **({"standard_eps": list(self.standard_eps)} if self.standard_eps else {}),
            "attacks": [spec.to_dict() for spec in self.attacks],
        }


def _parse_spec(item: Dict[str, Any], origin: str) -> AttackSpec:
    if set(item) - _SPEC_KEYS or "attack" not in item:
        raise BenchError(f"suite {origin}: an attack needs 'attack' and may have {sorted(_SPEC_KEYS - {'attack'})}, got {sorted(item)}")
    stages = tuple(item.get("bpda", ()))
    if set(stages) - set(STAGES):
        raise BenchError(f"suite {origin}: bpda stages must be among {list(STAGES)}, got {list(stages)}")
    params = tuple(sorted(item.get("params", {}).items()))
    return AttackSpec(item["attack"], params, stages, str(item.get("label", "")))


def parse_suite(data: Dict[str, Any], origin: str = "<dict>") -> Dict[str, Suite]:
    """Every budget of one suite file, as resolved ``Suite`` objects keyed by budget."""
    unknown, missing = set(data) - _SUITE_KEYS, (_SUITE_KEYS - {"description", "independent"}) - set(data)
    if unknown or missing:
        raise BenchError(f"suite {origin}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    data = {**data, "budgets": {BUDGET_ALIASES.get(k, k): v for k, v in data.get("budgets", {}).items()}}
    if not data["budgets"] or set(data["budgets"]) - set(BUDGETS):
        raise BenchError(f"suite {origin}: budgets must be a non-empty subset of {list(BUDGETS)}")
    try:
        threat = Threat(data["threat"]["norm"], float(data["threat"]["eps"]))
        standard_eps = tuple(float(e) for e in data["threat"].get("standard_eps", ()))
    except (KeyError, TypeError, ValueError):
        raise BenchError(f"suite {origin}: threat needs a norm and an eps") from None
    suites = {}
    for budget, body in data["budgets"].items():
        if set(body) - _BUDGET_KEYS or not {"eot_draws", "attacks"} <= set(body):
            raise BenchError(f"suite {origin}, budget {budget}: needs eot_draws and attacks, may have a description")
        if int(body["eot_draws"]) < 1 or not body["attacks"]:
            raise BenchError(f"suite {origin}, budget {budget}: needs eot_draws >= 1 and at least one attack")
        specs = tuple(_parse_spec(item, origin) for item in body["attacks"])
        description = " ".join(filter(None, (data.get("description", ""), body.get("description", ""))))
        suites[budget] = Suite(data["name"], str(data["version"]), budget, description, threat, int(body["eot_draws"]),
                               specs, bool(data.get("independent", False)), standard_eps, bool(body.get("surrogate", False)))
    return suites


SUITES: Registry[Dict[str, Suite]] = Registry("suite")


def _load_builtin() -> None:
    for path in sorted(SUITE_DIR.glob("*.json")):
        suites = parse_suite(json.loads(path.read_text()), path.name)
        SUITES.add(next(iter(suites.values())).name, suites)


def default_budget(device: torch.device | str) -> str:
    """``full`` on a GPU, ``cpu`` otherwise: the strongest budget that finishes on the device."""
    return "full" if torch.device(device).type == "cuda" else "cpu"


def load_suite(name: Optional[str], norm: Optional[str], budget: str = "full", fallback: bool = False) -> Suite:
    """One budget of the named suite (default: the threat's own suite, ``linf``, ``l2`` or ``stadv``).

    ``norm`` None is the named suite's own threat (``linf`` without a suite). ``fallback`` (``--budget auto``): a
    suite without the asked budget gives its strongest one instead (the reference AutoAttack suites have a single,
    fixed-strength budget)."""
    if norm is None:
        norm = next(iter(SUITES.get(name).values())).threat.norm if name else "linf"
    norm = canonical_norm(norm)
    budget = BUDGET_ALIASES.get(budget, budget)
    budgets = SUITES.get(name or norm)
    any_budget = next(iter(budgets.values()))
    if any_budget.threat.norm != norm:
        raise BenchError(f"suite {any_budget.name} is for threat {any_budget.threat.norm}, not {norm}")
    if budget not in budgets and fallback:
        budget = max(budgets, key=BUDGETS.index)
    if budget not in budgets:
        raise BenchError(f"suite {any_budget.name} has no {budget!r} budget; it has {', '.join(budgets)}")
    return budgets[budget]


_load_builtin()
