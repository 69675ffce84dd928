"""One evaluation of a defense: the runner (configuration, record, resumption), the attack engine, the integrity
checks, execution options and process sharding.

``bench.evaluation`` was the attack engine's module before the package layout; its names stay importable from here
(``from bench.evaluation import evaluate``) and now live in ``bench.evaluation.engine``.
"""

from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    engine = importlib.import_module("bench.evaluation.engine")
    try:
        return getattr(engine, name)
    except AttributeError:
        raise AttributeError(f"module 'bench.evaluation' has no attribute {name!r}") from None
