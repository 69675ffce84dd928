"""purification-bench: adaptive evaluation of adversarial purification defenses.

The Python API (``bench.api``), imported on first use so that ``bench --help`` stays fast::

    import bench
    record = bench.evaluate(bench.load_defense("atop"), suite="linf", budget="smoke", n=64)
    print(record.summary())

Extend it with the decorators the project itself uses: ``bench.register_defense`` (a ``bench.Defense``
subclass), ``bench.register_attack`` (a ``bench.Attack`` subclass).

Layout (each group imports only the groups below it): ``cli``/``sweep`` (front ends) -> ``api`` -> ``reports/``
-> ``training`` -> ``evaluation/`` -> ``data/`` and ``classifiers/`` -> ``core/`` (``tests/test_layout.py``). The modules
were flat before; their old names (``bench.runner``, ``bench.errors``, ...) still import the moved modules, so
plug-ins written against them keep working (see ``MOVED``).
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from typing import Any

_EXPORTS = {
    "load_classifier": "bench.api", "load_defense": "bench.api", "load_subset": "bench.api", "evaluate": "bench.api",
    "run": "bench.api", "Record": "bench.api", "RunConfig": "bench.evaluation.runner",
    "Defense": "defenses.base", "register_defense": "defenses.base",
    "Attack": "attacks.base", "Threat": "attacks.base", "register_attack": "attacks.base",
}

__all__ = sorted(_EXPORTS)

#: Old flat module name -> its module in the package layout. ``bench.evaluation`` is not here: it is now the
#: package, which forwards the engine's names (``bench/evaluation/__init__.py``).
MOVED = {
    f"bench.{old}": f"bench.{new}" for old, new in {
        "errors": "core.errors", "registry": "core.registry", "paths": "core.paths", "plugins": "core.plugins",
        "stats": "core.stats", "record": "core.record",
        "datasets": "data.datasets", "subset": "data.subset",
        "runner": "evaluation.runner", "integrity": "evaluation.integrity", "execution": "evaluation.execution",
        "distributed": "evaluation.distributed",
        "perf": "reports.perf", "pictures": "reports.pictures", "check": "reports.check",
        "summary": "reports.summary", "export": "reports.export", "listing": "reports.listing",
    }.items()
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports an old module name as the moved module itself (one module object under both names, so state and
    monkeypatching are shared)."""

    def find_spec(self, fullname, path=None, target=None):
        return importlib.util.spec_from_loader(fullname, self) if fullname in MOVED else None

    def create_module(self, spec):
        return importlib.import_module(MOVED[spec.name])

    def exec_module(self, module):
        pass


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


def __getattr__(name: str) -> Any:
    if f"bench.{name}" in MOVED:
        return importlib.import_module(f"bench.{name}")
    if name not in _EXPORTS:
        raise AttributeError(f"module 'bench' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__():
    return __all__
