"""Run records: schema validation, atomic JSON writing, environment capture.

A record is plain JSON (numbers stay numbers) validated against ``schemas/record.schema.json`` before it
is written; the write goes to a temporary file in the same folder and is renamed into place, so a reader
never sees half a record.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, Dict, Optional

import jsonschema
import torch

SCHEMA_VERSION = 4
SCHEMA_PATH = Path(__file__).with_name("schemas") / "record.schema.json"
_PACKAGES = ("torch", "torchvision", "numpy", "pyautoattack", "robustbench", "pandas", "jsonschema")


@lru_cache(maxsize=1)
def record_schema() -> Dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


@lru_cache(maxsize=1)
def _validator():
    """One validator for the schema (checked once): ``jsonschema.validate`` checks the schema again on every call,
    which made validating a board's records take seconds."""
    cls = jsonschema.validators.validator_for(record_schema())
    cls.check_schema(record_schema())
    return cls(record_schema())


def validate_record(record: Dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if the record does not follow the schema."""
    error = jsonschema.exceptions.best_match(_validator().iter_errors(record))
    if error is not None:
        raise error


def configuration_key(record: Dict[str, Any]) -> str:
    """What a record measures, as asked for: defense and its options, classifier, subset, threat, suite and budget,
    seed and draws; not the code or weights version the run id also hashes. Two records with one key are the same
    board row made twice (say, before and after a code change): a board keeps one of them."""
    run_config = record.get("settings", {}).get("run_config", {})
    budget = record["suite"].get("budget")
    return json.dumps({
        "defense": record["defense"]["name"], "options": run_config.get("defense_options", {}),
        "classifier": record["classifier"]["name"], "subset": record["subset"]["hash"],
        "threat": [record["threat"]["norm"], round(float(record["threat"]["eps"]), 9)],
        "suite": record["suite"]["name"], "budget": "full" if budget == "paper" else budget,
        "seed": record.get("settings", {}).get("seed"), "draws": record.get("settings", {}).get("success_draws"),
    }, sort_keys=True, default=str)


def write_json_atomic(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=1, sort_keys=False, allow_nan=False)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def to_json_data(record: Dict[str, Any]) -> Dict[str, Any]:
    """Plain JSON types only (tuples become lists), as a reader of the file will see them."""
    return json.loads(json.dumps(record, allow_nan=False))


def write_record(path: Path, record: Dict[str, Any]) -> Path:
    record = to_json_data(record)
    validate_record(record)
    write_json_atomic(path, record)
    return path


def _package_version(name: str) -> Optional[str]:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> Optional[str]:
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def sha256_file(path: Path) -> str:
    """The sha256 of a file's bytes (checkpoints and weights named in manifests and records), read afresh each call:
    a training run rewrites its checkpoint at the same path every epoch."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@lru_cache(maxsize=1)
def source_hash() -> str:
    """sha256 over the project's Python sources and suite files (paths and contents): the code that makes a result,
    whether or not the checkout is a git repository. Resume state is keyed by it, so a run killed before a fix
    never resumes from batches the old code made."""
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for package in ("bench", "attacks", "defenses"):
        for path in sorted((root / package).rglob("*")):
            if path.suffix in (".py", ".json") and "checkpoints" not in path.parts and path.is_file():
                digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def code_version() -> Dict[str, str]:
    """The package version and the source hash (what the resume key and the record name)."""
    return {"package": _package_version("purification-bench") or "unknown", "source_sha256": source_hash()}


def environment() -> Dict[str, Any]:
    status = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "python": sys.version.split()[0],
        "packages": {name: _package_version(name) for name in _PACKAGES},
        "platform": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),  # the vector kernels ATen chose: AVX2, AVX512, ...
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "code": code_version(),
    }
