"""purification-bench: adaptive evaluation of adversarial purification defenses.

The Python API (``bench.api``), imported on first use so that ``bench --help`` stays fast::

    import bench
    record = bench.evaluate(bench.load_defense("atop"), suite="linf", budget="smoke", n=64)
    print(record.summary())

Extend it with the decorators the project itself uses: ``bench.register_defense`` (a ``bench.Defense``
subclass), ``bench.register_attack`` (a ``bench.Attack`` subclass).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "load_classifier": "bench.api", "load_defense": "bench.api", "load_subset": "bench.api", "evaluate": "bench.api",
    "run": "bench.api", "Record": "bench.api", "RunConfig": "bench.runner",
    "Defense": "defenses.base", "register_defense": "defenses.base",
    "Attack": "attacks.base", "Threat": "attacks.base", "register_attack": "attacks.base",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bench' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return __all__
