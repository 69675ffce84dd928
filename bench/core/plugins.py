"""Load third-party plug-ins: a Python file passed with ``--plugin`` registers what it defines."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path

from bench.core.errors import BenchError


def load_plugin(path: str | Path) -> None:
    """Import ``path`` as a module so its ``@register_*`` decorators run."""
    file = Path(path).expanduser().resolve()
    if not file.is_file() or file.suffix != ".py":
        raise BenchError(f"plugin {path} is not a Python file")
    name = "bench_plugin_" + hashlib.sha1(str(file).encode()).hexdigest()[:12]
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise BenchError(f"cannot import plugin {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as exc:
        del sys.modules[name]
        raise BenchError(f"plugin {path} has a syntax error at line {exc.lineno}: {exc.msg}") from None
