"""Shared plumbing for ``bench train``: options, epoch checkpoints with a manifest, resumption, learning curves.

A training run writes into one folder: ``<name>.pt`` (tensors only: model and optimizer state, epoch)
after every epoch, and ``<name>.manifest.json`` (command, data, seed, resolved options, per-epoch losses
and the sha256 of the checkpoint). Restarting the same command resumes after the last finished epoch.
A finished stage also exports ``<name>.weights.pt``: the inference weights alone, the file to ship.

Long runs: ``--hours`` stops after the epoch that uses up the budget (counted over every invocation of the run, from
the manifest), exporting the weights so far; rerunning with a larger budget continues. Inside an epoch, every
``--checkpoint-minutes`` (default 20) the run also saves ``<name>.partial.pt``: the trainer's state, the step reached,
the epoch's running loss sums and the random generators' states; a restarted run continues from that step and ends
with the same weights and curve as an uninterrupted one (an epoch of RT3's fine-tuning takes over an hour on a CPU,
longer than a run can count on surviving). The file is removed when its epoch ends. After every epoch the learning
curve is written beside the checkpoint (``<name>.curve.csv`` and ``<name>.curve.png``): the loss terms, and every
``--eval-every`` epochs the pipeline's clean accuracy and PGD-10 robust accuracy (linf ``--eval-eps``: the training eps of
adversarial training and JATP, whose eps is the threat, else 8/255; one draw per pass) on a
fixed held-out slice of the *training* split (the last ``--eval-size`` images of the seeded permutation, never the
ones trained on, never the test subset). A resumed run continues the same curve.

``--autocast bf16`` runs each training step (attack, forward, backward, update) under ``torch.autocast`` with
bfloat16; each epoch's row of the curve says so. Held-out evaluation stays in float32. fp16 is not offered: it would
need loss scaling.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import sys
import typing
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch

from bench.core.errors import BenchError
from bench.core.record import environment, sha256_file, write_json_atomic  # noqa: F401 (sha256_file: re-exported)
from bench.core.registry import Registry

TRAINERS: Registry[Callable[["TrainOptions"], Path]] = Registry("trainer", packages=["defenses", "bench.classifiers"])


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
    hours: Optional[float] = None  # stop after the epoch that uses up this many hours (all invocations together)
    eval_every: int = 1  # epochs between held-out evaluations (0: never)
    eval_size: Optional[int] = None  # held-out training images for the learning curve (None: up to 512 not trained on)
    eval_eps: Optional[float] = None  # the curve's PGD-10 radius (None: the trainer's ``eval_eps``, else 8/255)
    autocast: Optional[str] = None  # "bf16": each training step under torch.autocast (docs/atop.md, measured there)
    checkpoint_minutes: Optional[float] = 20.0  # a mid-epoch checkpoint this often (0: after every step; None: never)


def trainer_settings(cls: Any, options: TrainOptions, **forced: Any) -> Any:
    """A one-stage trainer's settings dataclass from its defense-specific flags, ``--epochs`` and ``forced`` values;
    a flag the trainer does not take is a user error naming the defense."""
    extra = dict(options.extra)
    if options.epochs is not None:
        extra["epochs"] = options.epochs
    extra.update(forced)
    return build_settings(cls, extra, options.defense)


def build_settings(cls: Any, values: Dict[str, Any], defense: str) -> Any:
    """``cls(**values)`` for a trainer's settings dataclass, where a value given as text (``bench train --option
    KEY=VALUE``) is read as the setting's declared type; an unknown setting or an unreadable value is a user error
    that names the defense and lists its settings."""
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise BenchError(f"{defense}: unsupported training option {', '.join(unknown)}; its trainer's settings are "
                         f"{', '.join(f.name for f in dataclasses.fields(cls))}")
    typed = {}
    for key, value in values.items():
        try:
            typed[key] = _read_setting(hints[key], value) if isinstance(value, str) else value
        except ValueError:
            raise BenchError(f"{defense}: training option {key}={value!r} is not a {_type_name(hints[key])}") from None
    return cls(**typed)


def _read_setting(kind: Any, text: str) -> Any:
    """``text`` as a value of the annotation ``kind``: int, float (``8/255`` allowed), bool, str, Optional[...] (``none``)
    and tuples (comma-separated)."""
    args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Union:  # Optional[X]
        if text.strip().lower() == "none":
            return None
        return _read_setting(next(a for a in args if a is not type(None)), text)
    if kind is tuple or typing.get_origin(kind) is tuple:
        element = args[0] if args else float
        return tuple(_read_setting(element, part) for part in text.split(",") if part.strip())
    if kind is bool:
        word = text.strip().lower()
        if word not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(text)
        return word in ("true", "1", "yes")
    if kind is int:
        return int(text)
    if kind is float:
        return float(Fraction(text.strip()))
    return text


def _type_name(kind: Any) -> str:
    return getattr(kind, "__name__", None) or str(kind).replace("typing.", "")


def data_config(options: TrainOptions, indices: np.ndarray) -> Dict[str, Any]:
    """The part of a trainer's manifest config that pins its data: a resumed run must see the same images."""
    return {"dataset": options.dataset, "train_size": options.train_size,
            "train_indices_sha256": hashlib.sha256(indices.tobytes()).hexdigest(), "batch_size": options.batch_size,
            "seed": options.seed}


def training_subset(n_total: int, size: int, seed: int) -> np.ndarray:
    """The training images used: a seeded permutation's first ``size`` indices."""
    if not 1 <= size <= n_total:
        raise BenchError(f"--train-size must be between 1 and {n_total}, got {size}")
    return np.random.RandomState(seed).permutation(n_total)[:size]


def heldout_subset(n_total: int, train_size: int, size: int, seed: int) -> np.ndarray:
    """The held-out training images of the learning curve: the last ``size`` of the same seeded permutation whose first
    ``train_size`` are trained on, so the two never overlap."""
    if size < 1 or train_size + size > n_total:
        raise BenchError(f"--eval-size {size} with --train-size {train_size} needs at most {n_total} training images")
    return np.random.RandomState(seed).permutation(n_total)[-size:]


def heldout_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device, batch: int = 128,
                     eps: float = 8 / 255, steps: int = 10, attack: bool = True) -> Dict[str, float]:
    """Clean accuracy and PGD-``steps`` robust accuracy (linf ``eps``, step 2.5 eps / steps, random start, every step on
    every point, one draw per pass) of ``model`` on held-out images: the learning curve's two numbers, cheap enough to
    take every few epochs (``attack=False``: clean accuracy only). Not an evaluation (``bench run`` is)."""
    from attacks.base import Oracle, Threat
    from attacks.gradient import PGD
    from attacks.verdict import Judge

    pgd = PGD(Threat("linf", eps), steps=steps)
    pgd.early_stop = False
    clean = robust = 0
    generator = torch.get_rng_state()
    torch.manual_seed(0)  # the same start and draws at every evaluation
    for i in range(0, len(y), batch):
        xb, yb = x[i : i + batch].to(device), y[i : i + batch].to(device)
        with torch.no_grad():
            clean += int((model(xb).argmax(1) == yb).sum())
        if not attack:
            continue
        x_adv = pgd.run(Oracle(model, Judge(model, 1, stochastic=False)), xb, yb)
        with torch.no_grad():
            robust += int((model(x_adv).argmax(1) == yb).sum())
    torch.set_rng_state(generator)
    return {"heldout_clean": clean / len(y), **({f"heldout_pgd{steps}": robust / len(y)} if attack else {})}


def write_curve(folder: Path, name: str, history: List[Dict[str, Any]]) -> None:
    """``<name>.curve.csv`` and ``<name>.curve.png`` from the per-epoch history: loss terms, held-out accuracies."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in dict.fromkeys(k for row in history for k in row) if k != "epoch"]
    with open(folder / f"{name}.curve.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", *keys, "hours"])
        spent = 0.0
        for row in history:
            spent += row.get("seconds", 0.0) / 3600
            writer.writerow([row["epoch"], *(row.get(k, "") for k in keys), f"{spent:.4f}"])
    losses = [k for k in keys if k not in ("seconds", "lr", "autocast") and not k.startswith("heldout")]
    accuracies = [k for k in keys if k.startswith("heldout") and k != "heldout_eps"]
    radii = [row["heldout_eps"] for row in history if "heldout_eps" in row] or [8 / 255]  # older manifests: 8/255
    fig, axes = plt.subplots(1, 2 if accuracies else 1, figsize=(10 if accuracies else 5, 3.5), squeeze=False)
    for k in losses:
        axes[0][0].plot([r["epoch"] for r in history if k in r], [r[k] for r in history if k in r], label=k)
    axes[0][0].set_xlabel("epoch")
    values = [r[k] for r in history for k in losses if isinstance(r.get(k), (int, float))]
    if values and min(values) > 0:  # terms of very different sizes (JATP: BCE ~1, pixel ~0.01): each trend visible
        axes[0][0].set_yscale("log")
    axes[0][0].set_title(f"{name}: training losses{' (log scale)' if axes[0][0].get_yscale() == 'log' else ''}", fontsize=9)
    axes[0][0].legend(fontsize=7)
    if accuracies:
        for k in accuracies:
            axes[0][1].plot([r["epoch"] for r in history if k in r], [100 * r[k] for r in history if k in r], marker="o", label=k)
        axes[0][1].set_xlabel("epoch")
        axes[0][1].set_ylabel("% of the held-out training images")
        radius = ", ".join(sorted({f"{255 * eps:g}/255" for eps in radii}))
        axes[0][1].set_title(f"{name}: held-out accuracy (PGD-10 at linf {radius})", fontsize=9)
        axes[0][1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / f"{name}.curve.png", dpi=80, metadata={"Software": None})
    plt.close(fig)


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

    def _config_text(self) -> str:
        return json.dumps(self.config, sort_keys=True, default=str)

    @property
    def partial_path(self) -> Path:
        return self.folder / f"{self.name}.partial.pt"

    def save_partial(self, partial: Dict[str, Any]) -> None:
        """Save a point inside an epoch (``train_epochs`` says what it holds), replacing the last one."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.partial_path.with_suffix(".pt.tmp")
        torch.save({**partial, "config": self._config_text()}, tmp)
        tmp.replace(self.partial_path)

    def resume_partial(self, epoch: int) -> Optional[Dict[str, Any]]:
        """The point saved inside epoch ``epoch`` (0-based, the first not finished), if there is one of this
        configuration; a point of an earlier epoch is stale (that epoch finished after it) and is ignored."""
        if not self.partial_path.is_file():
            return None
        partial = torch.load(self.partial_path, map_location="cpu", weights_only=True)
        if partial.get("config") != self._config_text():
            raise BenchError(f"{self.partial_path} was trained with another configuration; use another --out or delete it")
        return partial if int(partial["epoch"]) == epoch else None

    def drop_partial(self) -> None:
        self.partial_path.unlink(missing_ok=True)

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


def stage_finished(folder: Path, name: str) -> bool:
    """Whether the stage ``name`` in ``folder`` ran all its epochs (a time budget may stop it before)."""
    path = folder / f"{name}.manifest.json"
    return path.is_file() and bool(json.loads(path.read_text()).get("finished"))


def train_epochs(options: TrainOptions, trainer: Any, folder: Path, name: str, config: Dict[str, Any], epochs: int,
                 train_set: Any, indices: np.ndarray, augment: Optional[Callable] = None) -> Path:
    """The epoch loop one-stage trainers share: seeded order per epoch, ``trainer.step(x, y)`` per batch (after
    ``trainer.set_progress(fraction)`` when it has one), a checkpoint + manifest after every epoch and a partial
    checkpoint every ``options.checkpoint_minutes`` inside one, resumption from the last of them, and
    ``<name>.weights.pt`` from ``trainer.weights()`` at the end.

    ``augment(x, generator)`` transforms each batch with a generator seeded per epoch.
    """
    import contextlib
    import logging
    import time

    from tqdm.auto import tqdm

    from bench.evaluation.engine import progress_enabled

    log = logging.getLogger(f"bench.train.{name}")
    if options.autocast not in (None, "bf16"):
        raise BenchError(f"bench train --autocast must be bf16, got {options.autocast!r}")
    checkpointer = Checkpointer(folder, name, options, config)
    saved = checkpointer.resume()
    start = 0
    if saved is not None:
        trainer.load(saved)
        start = int(saved["epoch"])
    per_epoch = -(-len(indices) // options.batch_size)
    partial = checkpointer.resume_partial(start)
    if partial is not None:
        trainer.load(partial["state"])
        log.info("resuming epoch %d at step %d of %d", start + 1, int(partial["step"]), per_epoch)
    heldout = None
    size = options.eval_size if options.eval_size is not None else min(512, len(train_set.images) - len(indices))
    if options.eval_every and hasattr(trainer, "eval_model") and size > 0:
        held = heldout_subset(len(train_set.images), len(indices), size, options.seed)
        heldout = (torch.from_numpy(train_set.images[held]).permute(0, 3, 1, 2).float().div(255),
                   torch.from_numpy(train_set.labels[held]).long())
    # the radius the trainer works at where that is the threat (adversarial training, JATP), else 8/255
    eval_eps = options.eval_eps if options.eval_eps is not None else getattr(trainer, "eval_eps", 8 / 255)
    spent = sum(row.get("seconds", 0.0) for row in checkpointer.history)
    for epoch in range(start, epochs):
        if options.hours is not None and spent >= 3600 * options.hours:
            log.info("time budget of %.2f h used (%.2f h): stopping after epoch %d of %d", options.hours, spent / 3600,
                     epoch, epochs)
            break
        seed = options.seed * 1000 + epoch
        order = indices[np.random.RandomState(seed).permutation(len(indices))]
        torch.manual_seed(seed)
        rng = torch.Generator().manual_seed(seed)
        totals: Dict[str, float] = {}
        lr = None
        first, carried = 0, 0.0
        if partial is not None and epoch == start:  # continue the epoch where its partial checkpoint left it
            first, carried, totals, lr = int(partial["step"]), float(partial["seconds"]), dict(partial["totals"]), partial["lr"]
            torch.set_rng_state(partial["torch_rng"])
            rng.set_state(partial["rng"])
            if "cuda_rng" in partial:
                torch.cuda.set_rng_state_all(partial["cuda_rng"])
        started = last_saved = time.perf_counter()
        bar = tqdm(range(first, per_epoch), desc=f"{config.get('defense', name)} {epoch + 1}/{epochs}",
                   initial=first, total=per_epoch, disable=not progress_enabled())
        for step in bar:
            idx = order[step * options.batch_size:(step + 1) * options.batch_size]
            x = torch.from_numpy(train_set.images[idx]).permute(0, 3, 1, 2).float().div(255)
            x = (augment(x, rng) if augment is not None else x.contiguous()).to(trainer.device)
            y = torch.from_numpy(train_set.labels[idx]).long().to(trainer.device)
            if hasattr(trainer, "set_progress"):
                lr = trainer.set_progress((epoch * per_epoch + step) / (epochs * per_epoch))
            with (torch.autocast(x.device.type, dtype=torch.bfloat16) if options.autocast else contextlib.nullcontext()):
                losses = trainer.step(x, y)
            for key, value in losses.items():
                totals[key] = totals.get(key, 0.0) + value
            bar.set_postfix(loss=f"{totals['loss'] / (step + 1):.4f}")
            now = time.perf_counter()
            if options.checkpoint_minutes is not None and step + 1 < per_epoch and now - last_saved >= 60 * options.checkpoint_minutes:
                checkpointer.save_partial({
                    "state": trainer.state(epoch), "epoch": epoch, "step": step + 1, "totals": totals, "lr": lr,
                    "seconds": carried + now - started, "torch_rng": torch.get_rng_state(), "rng": rng.get_state(),
                    **({"cuda_rng": torch.cuda.get_rng_state_all()} if torch.cuda.is_available() else {})})
                last_saved = now
        epoch_log = {"epoch": epoch + 1, **{k: v / per_epoch for k, v in totals.items()},
                     **({"lr": lr} if lr is not None else {}), **({"autocast": options.autocast} if options.autocast else {})}
        if heldout is not None and ((epoch + 1) % options.eval_every == 0 or epoch + 1 == epochs):
            attack = getattr(trainer, "eval_attack", True)
            epoch_log.update(heldout_accuracy(trainer.eval_model(), *heldout, trainer.device, eps=eval_eps, attack=attack))
            if attack:
                epoch_log["heldout_eps"] = eval_eps
            if hasattr(trainer, "eval_extra"):
                epoch_log.update(trainer.eval_extra(*heldout))
        epoch_log["seconds"] = carried + time.perf_counter() - started
        spent += epoch_log["seconds"]
        checkpointer.save(trainer.state(epoch + 1), epoch_log, finished=epoch + 1 == epochs)
        checkpointer.drop_partial()
        write_curve(folder, name, checkpointer.history)
        log.info("epoch %d/%d: %s", epoch + 1, epochs, ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                           for k, v in epoch_log.items() if k != "epoch"))
    if not checkpointer.manifest_path.is_file():  # the budget allowed no epoch at all
        return folder
    checkpointer.export(trainer.weights())
    return folder
