"""Configurable locations of data, weights and caches.

Everything outside the repository is found through environment variables, so nothing machine-specific
is written into the packages. The Makefile sets them to the team's shared folders when those exist.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.core.errors import BenchError

DATA_ENV = "BENCH_DATA_DIR"
WEIGHTS_ENV = "BENCH_WEIGHTS_DIR"
CACHE_ENV = "BENCH_CACHE_DIR"
CHECKPOINT_ENV = "BENCH_CHECKPOINT_DIR"


def _env_path(var: str, default: Path) -> Path:
    value = os.environ.get(var, "").strip()
    return Path(value).expanduser() if value else default


def data_dir() -> Path:
    """Root of the datasets (``$BENCH_DATA_DIR``, default ``~/.cache/bench/data``)."""
    return _env_path(DATA_ENV, Path.home() / ".cache" / "bench" / "data")


def weights_dir() -> Path:
    """Root of classifier checkpoints (``$BENCH_WEIGHTS_DIR``, default ``~/.cache/bench/weights``)."""
    return _env_path(WEIGHTS_ENV, Path.home() / ".cache" / "bench" / "weights")


def cache_dir() -> Path:
    """Where decoded datasets are cached (``$BENCH_CACHE_DIR``, default ``~/.cache/bench/cache``)."""
    path = _env_path(CACHE_ENV, Path.home() / ".cache" / "bench" / "cache")
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint_dir() -> Path:
    """Trained defense checkpoints (``$BENCH_CHECKPOINT_DIR``, default ``~/.cache/bench/checkpoints``)."""
    return _env_path(CHECKPOINT_ENV, Path.home() / ".cache" / "bench" / "checkpoints")


def require_file(path: Path, what: str, env: str) -> Path:
    """Return ``path`` if it exists, else a one-line error saying how to provide it."""
    if not path.exists():
        raise BenchError(
            f"{what} not found at {path}. Put it there, or point ${env} at the folder that holds it "
            f"(currently {os.environ.get(env) or 'unset'})."
        )
    return path
