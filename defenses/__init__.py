"""Defenses: one file each, registered with ``@register_defense`` and discovered automatically."""

from defenses.base import DEFENSES, Defense, build_defense, register_defense

__all__ = ["DEFENSES", "Defense", "build_defense", "register_defense"]
