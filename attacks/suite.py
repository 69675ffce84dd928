"""Suites: frozen, versioned lists of attack specs, stored as JSON data in ``attacks/suites/``.

A suite names its threat (norm, default eps), the attacks with their budgets, and how many EOT draws
every gradient attack gets when the defense is stochastic. ``Suite.build`` resolves it for a defense:
exact-gradient attacks always; for a defense with non-differentiable stages, each gradient attack again
under ``BPDA`` (an addition, never a replacement); ``EOT`` around every gradient attack when stochastic.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from attacks.adaptive import BPDA, EOT
from attacks.base import ATTACKS, Attack, Threat
from bench.errors import BenchError
from bench.registry import Registry

SUITE_DIR = Path(__file__).with_name("suites")
_SUITE_KEYS = {"name", "version", "description", "threat", "eot_draws", "attacks"}
_SPEC_KEYS = {"attack", "params"}


@dataclass(frozen=True)
class AttackSpec:
    attack: str
    params: Tuple[Tuple[str, Any], ...] = ()

    def build(self, threat: Threat) -> Attack:
        cls = ATTACKS.get(self.attack)
        try:
            return cls(threat, **dict(self.params))
        except TypeError as exc:
            raise BenchError(f"bad parameters for attack {self.attack}: {exc}") from None


@dataclass(frozen=True)
class Suite:
    name: str
    version: str
    description: str
    threat: Threat
    eot_draws: int
    attacks: Tuple[AttackSpec, ...]

    def build(
        self, threat: Threat, stochastic: bool, differentiable: bool, eot_chunk_images: Optional[int] = None
    ) -> List[Tuple[str, Attack]]:
        """Resolve the suite for a defense: a list of (label, attack) in the order they run."""
        plans: List[Tuple[str, Attack]] = []
        for spec in self.attacks:
            attack = spec.build(threat)
            variants = [(spec.attack, attack)]
            if attack.uses_oracle and not differentiable:
                variants.append((f"{spec.attack}+bpda", BPDA(spec.build(threat))))
            for label, variant in variants:
                if attack.uses_oracle and stochastic:
                    label, variant = f"{label}+eot{self.eot_draws}", EOT(variant, self.eot_draws, eot_chunk_images)
                plans.append((label, variant))
        return plans

    def to_dict(self) -> Dict[str, Any]:
        return {
            "name": self.name, "version": self.version, "threat": self.threat.to_dict(), "eot_draws": self.eot_draws,
            "attacks": [{"attack": s.attack, "params": dict(s.params)} for s in self.attacks],
        }


def parse_suite(data: Dict[str, Any], origin: str = "<dict>") -> Suite:
    unknown, missing = set(data) - _SUITE_KEYS, (_SUITE_KEYS - {"description"}) - set(data)
    if unknown or missing:
        raise BenchError(f"suite {origin}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")
    if int(data["eot_draws"]) < 1 or not data["attacks"]:
        raise BenchError(f"suite {origin}: needs eot_draws >= 1 and at least one attack")
    specs = []
    for item in data["attacks"]:
        if set(item) - _SPEC_KEYS:
            raise BenchError(f"suite {origin}: unknown attack keys {sorted(set(item) - _SPEC_KEYS)}")
        specs.append(AttackSpec(item["attack"], tuple(sorted(item.get("params", {}).items()))))
    threat = Threat(data["threat"]["norm"], float(data["threat"]["eps"]))
    return Suite(data["name"], str(data["version"]), data.get("description", ""), threat, int(data["eot_draws"]), tuple(specs))


SUITES: Registry[Suite] = Registry("suite")


def _load_builtin() -> None:
    for path in sorted(SUITE_DIR.glob("*.json")):
        suite = parse_suite(json.loads(path.read_text()), path.name)
        SUITES.add(suite.name, suite)


def load_suite(name: Optional[str], norm: str) -> Suite:
    """The named suite, or the default suite of the threat (``linf`` / ``l2``)."""
    suite = SUITES.get(name or norm)
    if suite.threat.norm != norm:
        raise BenchError(f"suite {suite.name} is for threat {suite.threat.norm}, not {norm}")
    return suite


_load_builtin()
