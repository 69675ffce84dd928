"""Attacks, adaptive wrappers (EOT, BPDA) and the versioned suites that combine them."""

from attacks.base import ATTACKS, Attack, CountingModule, Oracle, Threat, register_attack
from attacks.adaptive import BPDA, EOT
from attacks.suite import SUITES, AttackSpec, Suite, load_suite

__all__ = [
    "ATTACKS", "Attack", "AttackSpec", "BPDA", "CountingModule", "EOT", "Oracle", "SUITES", "Suite",
    "Threat", "load_suite", "register_attack",
]
