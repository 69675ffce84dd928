"""Shared plumbing for ``bench train``: options, epoch checkpoints with a manifest, resumption.

A training run writes into one folder: ``<name>.pt`` (tensors only: model and optimizer state, epoch)
after every epoch, and ``<name>.manifest.json`` (command, data, seed, resolved options, per-epoch losses
and the sha256 of the checkpoint). Restarting the same command resumes after the last finished epoch.
A finished stage also exports ``<name>.weights.pt``: the inference weights alone, the file to ship.
"""

from __future__ import annotations

import hashlib
import json
import shlex
import sys
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from bench.errors import BenchError
from bench.record import environment, write_json_atomic
from bench.registry import Registry

TRAINERS: Registry[Callable[["TrainOptions"], Path]] = Registry("trainer", packages=["defenses"])


@dataclass(frozen=True)
class TrainOptions:
    """What ``bench train`` passes to a defense's trainer; ``extra`` holds defense-specific flags."""

    defense: str
    classifier: str = "resnet20"
    dataset: str = "cifar10-jpeg"
    epochs: Optional[int] = None
    train_size: int = 20000
    batch_size: int = 128
    seed: int = 0
    device: str = "auto"
    out: Optional[Path] = None
    extra: Dict[str, Any] = field(default_factory=dict)


def training_subset(n_total: int, size: int, seed: int) -> np.ndarray:
    """The training images used: a seeded permutation's first ``size`` indices."""
    if not 1 <= size <= n_total:
        raise BenchError(f"--train-size must be between 1 and {n_total}, got {size}")
    return np.random.RandomState(seed).permutation(n_total)[:size]


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class Checkpointer:
    """Per-epoch checkpoint ``<folder>/<name>.pt`` plus ``manifest.json`` describing how it was made."""

    def __init__(self, folder: Path, name: str, options: TrainOptions, config: Dict[str, Any]) -> None:
        self.folder, self.name = folder, name
        self.path = folder / f"{name}.pt"
        self.manifest_path = folder / f"{name}.manifest.json"
        self.options, self.config = options, config
        self.history: List[Dict[str, Any]] = []

    def resume(self) -> Optional[Dict[str, Any]]:
        """The saved state if a checkpoint of the same configuration exists, else None."""
        if not self.path.is_file() or not self.manifest_path.is_file():
            return None
        manifest = json.loads(self.manifest_path.read_text())
        if manifest["config"] != json.loads(json.dumps(self.config)):
            raise BenchError(f"{self.path} was trained with another configuration; use another --out or delete it")
        self.history = manifest["history"]
        return torch.load(self.path, map_location="cpu", weights_only=True)

    def export(self, tensors: Dict[str, Any]) -> Path:
        """Write the inference weights alone (``<name>.weights.pt``, small enough to ship) and note them
        in the manifest with their sha256."""
        path = self.folder / f"{self.name}.weights.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(tensors, tmp)
        tmp.replace(path)
        manifest = json.loads(self.manifest_path.read_text())
        manifest.update(weights=path.name, weights_sha256=sha256_file(path))
        write_json_atomic(self.manifest_path, manifest)
        return path

    def save(self, state: Dict[str, Any], epoch_log: Dict[str, Any], finished: bool) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        tmp.replace(self.path)
        self.history.append(epoch_log)
        manifest = {
            "command": " ".join(["bench", *(shlex.quote(a) for a in sys.argv[1:])]), "options": {**asdict(self.options), "out": str(self.options.out)},
            "config": self.config, "history": self.history, "finished": finished,
            "checkpoint": self.path.name, "sha256": sha256_file(self.path),
            "saved": datetime.now(timezone.utc).isoformat(), "environment": environment(),
        }
        write_json_atomic(self.manifest_path, json.loads(json.dumps(manifest, default=str)))


def train_epochs(options: TrainOptions, trainer: Any, folder: Path, name: str, config: Dict[str, Any], epochs: int,
                 train_set: Any, indices: np.ndarray, augment: Optional[Callable] = None) -> Path:
    """The epoch loop one-stage trainers share: seeded order per epoch, ``trainer.step(x, y)`` per batch (after
    ``trainer.set_progress(fraction)`` when it has one), a checkpoint + manifest after every epoch, resumption
    after the last finished epoch, and ``<name>.weights.pt`` from ``trainer.weights()`` at the end.

    ``augment(x, generator)`` transforms each batch with a generator seeded per epoch.
    """
    import logging
    import time

    from tqdm.auto import tqdm

    from bench.evaluation import progress_enabled

    log = logging.getLogger(f"bench.train.{name}")
    checkpointer = Checkpointer(folder, name, options, config)
    saved = checkpointer.resume()
    start = 0
    if saved is not None:
        trainer.load(saved)
        start = int(saved["epoch"])
    per_epoch = -(-len(indices) // options.batch_size)
    for epoch in range(start, epochs):
        seed = options.seed * 1000 + epoch
        order = indices[np.random.RandomState(seed).permutation(len(indices))]
        torch.manual_seed(seed)
        rng = torch.Generator().manual_seed(seed)
        totals: Dict[str, float] = {}
        lr = None
        started = time.perf_counter()
        bar = tqdm(range(per_epoch), desc=f"{config.get('defense', name)} {epoch + 1}/{epochs}", disable=not progress_enabled())
        for step in bar:
            idx = order[step * options.batch_size:(step + 1) * options.batch_size]
            x = torch.from_numpy(train_set.images[idx]).permute(0, 3, 1, 2).float().div(255)
            x = (augment(x, rng) if augment is not None else x.contiguous()).to(trainer.device)
            y = torch.from_numpy(train_set.labels[idx]).long().to(trainer.device)
            if hasattr(trainer, "set_progress"):
                lr = trainer.set_progress((epoch * per_epoch + step) / (epochs * per_epoch))
            for key, value in trainer.step(x, y).items():
                totals[key] = totals.get(key, 0.0) + value
            bar.set_postfix(loss=f"{totals['loss'] / (step + 1):.4f}")
        epoch_log = {"epoch": epoch + 1, **{k: v / per_epoch for k, v in totals.items()},
                     **({"lr": lr} if lr is not None else {}), "seconds": time.perf_counter() - started}
        checkpointer.save(trainer.state(epoch + 1), epoch_log, finished=epoch + 1 == epochs)
        log.info("epoch %d/%d: %s", epoch + 1, epochs, ", ".join(f"{k} {v:.4g}" for k, v in epoch_log.items() if k != "epoch"))
    checkpointer.export(trainer.weights())
    return folder
