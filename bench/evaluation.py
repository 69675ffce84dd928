"""The evaluation loop: clean accuracy, then each attack on the points still robust, with resumable state.

Per-sample worst case: a point counts as robust only if it is classified correctly on the clean image and
no attack of the suite found an adversarial example for it. Each attack only sees points that survived
the previous ones (early stop). Every finished batch is saved as a small JSON file in ``state_dir``; a
killed run restarted with the same configuration skips those batches. Randomness is re-seeded per batch
from (seed, attack, batch), so a resumed run ends with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from attacks.base import Attack, CountingModule, PassCounter, Threat
from bench.distributed import mine, share
from bench.errors import BenchError
from bench.execution import split_on_oom
from bench.record import write_json_atomic
from bench.stats import accuracy_summary
from bench.subset import Subset

log = logging.getLogger(__name__)


def derived_seed(seed: int, *parts: object) -> int:
    digest = hashlib.sha256(":".join(map(str, (seed, *parts))).encode()).digest()
    return int.from_bytes(digest[:8], "little") % (2**63)


def batch_seed(seed: int, batch: Tuple[object, ...], positions: np.ndarray, depth: int) -> int:
    """The seed of one batch (``batch`` names its stage, attack and number), or of a part of it that an
    out-of-memory split attacks on its own (``depth`` > 0: the part's first position and size are added)."""
    if depth == 0:
        return derived_seed(seed, *batch)
    return derived_seed(seed, *batch, "split", int(positions[0]), len(positions))


def progress_enabled() -> bool:
    """Progress bars only for a person watching: a terminal, not CI, and not ``-q``."""
    return sys.stderr.isatty() and not os.environ.get("CI") and logging.getLogger("bench").isEnabledFor(logging.INFO)


class BatchState:
    """One JSON file per finished batch under ``root`` (or nothing at all when ``root`` is None)."""

    def __init__(self, root: Optional[Path]) -> None:
        self.root = root

    def load(self, key: str) -> Optional[Dict[str, Any]]:
        if self.root is None or not (self.root / f"{key}.json").is_file():
            return None
        return json.loads((self.root / f"{key}.json").read_text())

    def save(self, key: str, data: Dict[str, Any]) -> None:
        if self.root is not None:
            write_json_atomic(self.root / f"{key}.json", data)


def check_logits(logits: torch.Tensor, batch: int, num_classes: int, who: str) -> None:
    """User-facing check of a defense's output: shape (B, classes) and finite."""
    if logits.dim() != 2 or tuple(logits.shape) != (batch, num_classes):
        raise BenchError(f"defense {who} returned logits of shape {tuple(logits.shape)}, expected ({batch}, {num_classes})")
    if not torch.isfinite(logits).all():
        raise BenchError(f"defense {who} returned NaN or infinite logits")


def check_in_ball(x_adv: torch.Tensor, x: torch.Tensor, threat: Threat, label: str) -> None:
    """An attack that leaves the threat ball or [0, 1] is a bug: refuse its result.

    A ``stadv`` flow cannot be recovered from the image, so only [0, 1] is checked there; the StAdv attack
    bounds its own flow (and its tests check that)."""
    if not threat.pixel:
        if x_adv.min() < 0 or x_adv.max() > 1:
            raise RuntimeError(f"attack {label} returned points outside [0, 1]")
        return
    delta = (x_adv - x).flatten(1)
    size = delta.abs().max(dim=1).values if threat.norm == "linf" else delta.norm(dim=1)
    if x_adv.min() < 0 or x_adv.max() > 1 or bool((size > threat.eps * (1 + 1e-5) + 1e-6).any()):
        raise RuntimeError(f"attack {label} returned points outside the {threat.norm} ball of {threat.eps} or [0, 1]")


@dataclass
class Evaluation:
    clean_pred: np.ndarray
    clean_correct: np.ndarray
    robust: np.ndarray
    broken_by: List[Optional[str]]
    attacks: List[Dict[str, Any]]
    clean_mean: float  # mean accuracy over the clean re-classification draws (= clean accuracy if deterministic)
    draws_right: np.ndarray  # per point: fewest right re-classification draws after any attack (0 if clean-wrong)
    draws: int  # re-classification draws per adversarial example
    broken_points: Dict[str, set]  # attack label -> positions it broke (for the integrity checks)

    @property
    def robust_mean(self) -> float:
        """Mean over points and draws of being classified right: the expected accuracy of one forward pass."""
        return float(self.draws_right.sum()) / (self.draws * len(self.draws_right))

    @property
    def robust_majority(self) -> np.ndarray:
        """Points that a majority vote over the draws classifies right."""
        return self.draws_right * 2 > self.draws


def _batches(positions: np.ndarray, size: int) -> List[np.ndarray]:
    return [positions[i : i + size] for i in range(0, len(positions), size)]


def _clean_pass(
    model, subset: Subset, batch_size: int, device, seed: int, who: str, state: BatchState, draws: int = 1
) -> Tuple[np.ndarray, np.ndarray]:
    """The clean prediction (first draw) of every image, and how many of ``draws`` forward passes were right."""
    preds = np.empty(subset.n, dtype=np.int64)
    correct = np.zeros(subset.n, dtype=np.int64)
    batches = _batches(np.arange(subset.n), batch_size)
    done: Dict[int, Dict[str, Any]] = {}
    for b, pos in enumerate(batches):
        if not mine(b):  # another process of a torchrun run has this batch
            continue
        saved = state.load(f"clean-{b}")
        if saved is None:

            def classify(p: np.ndarray, depth: int, b: int = b) -> Dict[str, Any]:
                torch.manual_seed(batch_seed(seed, ("clean", b), p, depth))
                x, y = subset.x[p].to(device), subset.y[p].to(device)
                with torch.inference_mode():
                    logits = model(x)
                    check_logits(logits, len(p), subset.num_classes, who)
                    right = (logits.argmax(1) == y).long()
                    for _ in range(draws - 1):
                        right += model(x).argmax(1) == y
                return {"positions": p.tolist(), "pred": logits.argmax(1).cpu().tolist(), "correct": right.cpu().tolist()}

            saved = split_on_oom(classify, pos, device)
            state.save(f"clean-{b}", saved)
        done[b] = saved
    done = share(done)
    for b, pos in enumerate(batches):
        preds[pos] = done[b]["pred"]
        correct[pos] = done[b]["correct"]
    return preds, correct


def attack_batch(
    model: CountingModule, attack: Attack, label: str, x: torch.Tensor, y: torch.Tensor, threat: Threat, draws: int
) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """Attack one batch; return (fooled on any draw, correct draws per point, cost)."""
    before, start = model.counter.snapshot(), time.perf_counter()
    x_adv = attack.perturb(model, x, y)
    check_in_ball(x_adv, x, threat, label)
    correct = np.zeros(len(y), dtype=np.int64)
    with torch.inference_mode():  # worst case over the draws: one misclassified draw breaks the point
        for _ in range(draws):
            correct += (model(x_adv).argmax(1) == y).cpu().numpy()
    after = model.counter.snapshot()
    cost = {k: after[k] - before[k] for k in after}
    cost["seconds"] = time.perf_counter() - start
    return correct < draws, correct, cost


def evaluate(
    model: nn.Module, subset: Subset, plans: Sequence[Tuple[str, Attack]], threat: Threat, *, who: str,
    batch_size: int = 128, device: str | torch.device = "cpu", seed: int = 0, state_dir: Optional[Path] = None,
    success_draws: int = 1, independent: bool = False,
) -> Evaluation:
    """Clean accuracy, then every attack in ``plans`` on the points still robust.

    ``success_draws`` > 1 (for stochastic defenses) classifies each adversarial example that many times and
    counts it as broken if any draw is wrong, so an attack that found a real weakness is not lost to one
    lucky forward pass; the mean over the draws is kept as well.
    ``independent`` runs every attack on all clean-correct points (each attack's own accuracy is then
    ``robust_alone``); the overall result is still the per-sample worst case.
    """
    state = BatchState(state_dir)
    counting = CountingModule(model, PassCounter())
    clean_pred, clean_draws_correct = _clean_pass(counting, subset, batch_size, device, seed, who, state, success_draws)
    labels = subset.y.numpy()
    robust = clean_pred == labels
    # Per point, the fewest re-classification draws that were right after any attack it met (clean-correct
    # points start at all draws); mean and majority-vote robust accuracy come from it.
    draws_right = np.where(robust, success_draws, 0)
    clean_mean = float(clean_draws_correct.sum()) / (success_draws * subset.n)
    result = Evaluation(clean_pred, robust.copy(), robust, [None] * subset.n, [], clean_mean, draws_right, success_draws, {})
    return run_attacks(result, model, subset, plans, threat, batch_size=batch_size, device=device, seed=seed,
                       state=state, independent=independent)


def run_attacks(
    result: Evaluation, model: nn.Module, subset: Subset, plans: Sequence[Tuple[str, Attack]], threat: Threat, *,
    batch_size: int = 128, device: str | torch.device = "cpu", seed: int = 0, state: Optional[BatchState] = None,
    independent: bool = False, success_draws: Optional[int] = None, stage: str = "attack",
) -> Evaluation:
    """Run ``plans`` on ``result``'s points (still robust, or all clean-correct if ``independent``) and fold
    their outcomes into it (per-sample worst case). ``stage`` names the batch-state keys and marks the
    outcomes (``"correction"`` for the attacks a failed integrity check adds after the suite).
    ``success_draws`` changes the re-classification draws from here on (a defense found stochastic)."""
    state = state if state is not None else BatchState(None)
    counting = CountingModule(model, PassCounter())
    if success_draws is not None and success_draws != result.draws:  # rescale the per-point draw counts
        result.draws_right = result.draws_right * success_draws // result.draws
        result.draws = success_draws
    draws, robust, draws_right = result.draws, result.robust, result.draws_right
    for k, (label, attack) in enumerate(plans):
        positions = np.flatnonzero(result.clean_correct if independent else robust)
        total = {"forward": 0, "backward": 0, "forward_images": 0, "backward_images": 0, "seconds": 0.0}
        broken, correct_draws, oom_splits = 0, 0, 0
        batches = _batches(positions, batch_size)
        done: Dict[int, Dict[str, Any]] = {}
        bar = tqdm(list(enumerate(batches)), desc=label, unit="batch", disable=not progress_enabled(), leave=False)
        for b, pos in bar:
            if not mine(b):  # another process of a torchrun run has this batch
                continue
            key = f"{stage}{k}-{b}"
            saved = state.load(key)
            if saved is None or saved["positions"] != pos.tolist():

                def attack_part(p: np.ndarray, depth: int, k: int = k, b: int = b, label: str = label,
                                attack: Attack = attack) -> Dict[str, Any]:
                    torch.manual_seed(batch_seed(seed, (stage, k, b), p, depth))
                    fooled, correct, cost = attack_batch(counting, attack, label, subset.x[p].to(device),
                                                          subset.y[p].to(device), threat, draws)
                    return {"positions": p.tolist(), "fooled": fooled.tolist(), "correct": correct.tolist(), "cost": cost}

                saved = split_on_oom(attack_part, pos, device)
                state.save(key, saved)
            done[b] = saved
        done = share(done)  # every rank folds in every batch, in the single-process order
        for b, pos in enumerate(batches):
            saved = done[b]
            for p, hit, right in zip(pos, saved["fooled"], saved["correct"]):
                draws_right[p] = min(draws_right[p], right)
                if hit:
                    result.broken_points.setdefault(label, set()).add(int(p))
                    if robust[p]:
                        result.broken_by[p] = label
                    robust[p] = False
                    broken += 1
            correct_draws += sum(saved["correct"])
            oom_splits += saved.get("oom_splits", 0)
            for name in total:
                total[name] += saved["cost"][name]
        outcome = {
            "label": label, **attack.describe(), "attacked": int(len(positions)), "broken": broken,
            "robust_after": accuracy_summary(int(robust.sum()), subset.n), "cost": total,
            **({"stage": stage} if stage != "attack" else {}),
            **({"oom_splits": oom_splits} if oom_splits else {}),
        }
        if independent:  # this attack alone: worst case over the draws, and the mean over the draws
            outcome["robust_alone"] = accuracy_summary(int(len(positions)) - broken, subset.n)
            outcome["robust_alone_mean"] = correct_draws / (draws * subset.n)
        result.attacks.append(outcome)
        log.info("%s: %d of %d attacked points broken, robust %.2f%% so far (%.1f s)", label, broken, len(positions),
                 100 * robust.mean(), total["seconds"])
    return result
