"""The evaluation loop: clean accuracy, then each attack on the points still robust, with resumable state.

The verdict rule (PROTOCOL rule 8, ``attacks.verdict``): a point is broken when its example is misclassified, for a
stochastic defense when any of ``success_draws`` fresh forward passes misclassifies it. The same rule holds before
any attack (the clean image is a candidate inside the ball: ``clean_worst``, the no-attack floor), inside every
attack (a point leaves an attack only when the evaluation's judge confirms it broken) and after it (the judge's
verdict on the returned example is re-used, the others are classified ``success_draws`` times).

Per-sample worst case: a point counts as robust only if the clean verdict passed and no attack of the suite broke
it; each attack of a sequential suite only sees the points the previous ones left (early stop). An independent suite
runs every attack on every point; for a stochastic defense its attacks run to completion (no early stop) on every
point with at least one right clean draw, so that each attack's mean and majority over the draws are measured on
fully optimised examples. Every finished batch is saved as a small JSON file in ``state_dir``; a killed run restarted
with the same configuration skips those batches. Randomness is re-seeded per batch from (seed, attack, batch), so a
resumed run ends with the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from attacks.base import Attack, CountingModule, PassCounter, Threat
from attacks.verdict import Judge, judging
from bench.core.errors import BenchError
from bench.core.record import write_json_atomic
from bench.core.stats import accuracy_summary
from bench.data.subset import Subset
from bench.evaluation.distributed import is_main, mine, share
from bench.evaluation.execution import split_on_oom

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
    """One JSON file per finished batch under ``root`` (or nothing at all when ``root`` is None).

    With ``started`` (this process's start time), the first batch it saves also adds that time to ``parts.json``:
    the start of every process that has saved work for the run, so a record resumed across sessions says when it
    began and in how many parts it ran. A process that fails before saving anything leaves no trace."""

    def __init__(self, root: Optional[Path], started: Optional[str] = None) -> None:
        self.root, self.started = root, started
        self._part_written = started is None

    def parts(self) -> List[str]:
        """Start times of the processes that have worked on this run, this one last."""
        earlier = (self.load("parts") or {"started": []})["started"]
        return earlier if self.started is None or self.started in earlier else [*earlier, self.started]

    def load(self, key: str) -> Optional[Dict[str, Any]]:
        if self.root is None or not (self.root / f"{key}.json").is_file():
            return None
        return json.loads((self.root / f"{key}.json").read_text())

    def save(self, key: str, data: Dict[str, Any]) -> None:
        if self.root is None:
            return
        if not self._part_written and is_main():
            write_json_atomic(self.root / "parts.json", {"started": self.parts()})
            self._part_written = True
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
    clean_pred: np.ndarray  # first clean draw
    clean_correct: np.ndarray  # first clean draw right (the one-draw clean accuracy)
    robust: np.ndarray
    broken_by: List[Optional[str]]
    attacks: List[Dict[str, Any]]
    clean_mean: float  # mean accuracy over the clean re-classification draws (= clean accuracy if deterministic)
    draws_right: np.ndarray  # per point: fewest right draws on the clean image or after any attack
    draws: int  # re-classification draws per example
    broken_points: Dict[str, set]  # attack label -> positions it broke (for the integrity checks)
    clean_draws_right: Optional[np.ndarray] = None  # per point: right draws on the clean image
    complete: bool = False  # attacks run to completion on every point with a right clean draw (mean is meaningful)
    # attack label -> positions it broke decisively: most draws wrong (every broken point of a deterministic defense)
    decisive_points: Dict[str, set] = field(default_factory=dict)
    parts: List[str] = field(default_factory=list)  # start times of the processes that worked on it (BatchState.parts)

    @property
    def clean_worst(self) -> np.ndarray:
        """Points every clean draw classifies right: the no-attack floor under the verdict rule."""
        base = self.clean_draws_right if self.clean_draws_right is not None else self.clean_correct * self.draws
        return base >= self.draws

    @property
    def mean_valid(self) -> bool:
        """Mean and majority over the draws mean something: one draw (they equal the worst case), or every attack
        ran to completion on every point it could still move."""
        return self.draws == 1 or (self.complete and all(a.get("completed", False) for a in self.attacks))

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
    model, subset: Subset, batch_size: int, device, seed: int, who: str, state: BatchState, draws: int = 1,
    stage: str = "clean",
) -> Tuple[np.ndarray, np.ndarray]:
    """The clean prediction (first draw) of every image, and how many of ``draws`` forward passes were right."""
    preds = np.empty(subset.n, dtype=np.int64)
    correct = np.zeros(subset.n, dtype=np.int64)
    batches = _batches(np.arange(subset.n), batch_size)
    done: Dict[int, Dict[str, Any]] = {}
    for b, pos in enumerate(batches):
        if not mine(b):  # another process of a torchrun run has this batch
            continue
        saved = state.load(f"{stage}-{b}")
        if saved is None:

            def classify(p: np.ndarray, depth: int, b: int = b) -> Dict[str, Any]:
                torch.manual_seed(batch_seed(seed, (stage, b), p, depth))
                x, y = subset.x[p].to(device), subset.y[p].to(device)
                with torch.inference_mode():
                    logits = model(x)
                    check_logits(logits, len(p), subset.num_classes, who)
                    right = (logits.argmax(1) == y).long()
                    for _ in range(draws - 1):
                        right += model(x).argmax(1) == y
                return {"positions": p.tolist(), "pred": logits.argmax(1).cpu().tolist(), "correct": right.cpu().tolist()}

            saved = split_on_oom(classify, pos, device)
            state.save(f"{stage}-{b}", saved)
        done[b] = saved
    done = share(done)
    for b, pos in enumerate(batches):
        preds[pos] = done[b]["pred"]
        correct[pos] = done[b]["correct"]
    return preds, correct


def attack_batch(
    model: CountingModule, attack: Attack, label: str, x: torch.Tensor, y: torch.Tensor, threat: Threat, draws: int,
    stochastic: Optional[bool] = None,
) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """Attack one batch under the verdict rule; return (broken, right draws per point, cost).

    The attack runs inside ``judging`` with this batch's judge (``draws`` fresh passes for a stochastic model), so
    every point it confirmed broken keeps that verdict; the other returned examples are classified ``draws`` times
    and count as broken if any draw is wrong."""
    before, start = model.counter.snapshot(), time.perf_counter()
    stochastic = draws > 1 or model.stochastic if stochastic is None else stochastic
    judge = Judge(model, draws, stochastic=stochastic)
    with judging(judge):
        x_adv = attack.perturb(model, x, y)
    check_in_ball(x_adv, x, threat, label)
    known = [judge.verdict(row) for row in x_adv]
    correct = torch.tensor([-1 if v is None else v for v in known], dtype=torch.long, device=y.device)
    fresh = correct < 0
    if fresh.any():
        correct[fresh] = judge.classify(x_adv[fresh], y[fresh])
    correct = correct.cpu().numpy()
    after = model.counter.snapshot()
    cost = {k: after[k] - before[k] for k in after}
    cost["seconds"] = time.perf_counter() - start
    return correct < judge.draws, correct, cost


def evaluate(
    model: nn.Module, subset: Subset, plans: Sequence[Tuple[str, Attack]], threat: Threat, *, who: str,
    batch_size: int = 128, device: str | torch.device = "cpu", seed: int = 0, state_dir: Optional[Path] = None,
    success_draws: int = 1, independent: bool = False, complete: bool = False, started: Optional[str] = None,
) -> Evaluation:
    """Clean accuracy, then every attack in ``plans`` on the points still robust.

    ``success_draws`` > 1 (for stochastic defenses) classifies each example that many times and counts it as
    broken if any draw is wrong; the clean image is judged by the same rule (``Evaluation.clean_worst``), and only
    points that pass it are attacked in a sequential suite. ``independent`` runs every attack on every clean-verdict
    point (each attack's own accuracy is then ``robust_alone``); with ``complete`` (an independent suite on a
    stochastic defense, attacks built without early stop) on every point with at least one right clean draw, so each
    attack also gets a mean and a majority over the draws. The overall result is the per-sample worst case.
    ``started`` (ISO time) is this process's start, counted in ``Evaluation.parts`` (see ``BatchState``).
    """
    state = BatchState(state_dir, started)
    counting = CountingModule(model, PassCounter())
    clean_pred, clean_draws = _clean_pass(counting, subset, batch_size, device, seed, who, state, success_draws)
    labels = subset.y.numpy()
    first_right = clean_pred == labels
    robust = clean_draws >= success_draws  # the clean verdict: every draw right
    broken_by: List[Optional[str]] = [None if ok or not first else "clean-draws" for ok, first in zip(robust, first_right)]
    clean_mean = float(clean_draws.sum()) / (success_draws * subset.n)
    result = Evaluation(clean_pred, first_right, robust, broken_by, [], clean_mean, clean_draws.copy(), success_draws, {},
                        clean_draws_right=clean_draws, complete=complete and independent)
    result = run_attacks(result, model, subset, plans, threat, batch_size=batch_size, device=device, seed=seed,
                         state=state, independent=independent)
    result.parts = state.parts()
    return result


def _targets(result: Evaluation, independent: bool) -> np.ndarray:
    """Positions an attack meets: the points still robust (sequential), every clean-verdict point (independent), or
    every point with a right clean draw (independent and complete)."""
    if not independent:
        return np.flatnonzero(result.robust)
    if result.complete:
        return np.flatnonzero(result.clean_draws_right > 0)
    return np.flatnonzero(result.clean_worst)


def _bound_by_new_floor(result: Evaluation, floor_before: np.ndarray) -> None:
    """After the clean verdict is drawn again (a correction that reads the defense as stochastic), bound what the
    earlier attacks reported by the new no-attack floor: a point whose clean image fails a new draw was never robust.
    Each attack's own accuracy (``robust_alone``, an independent suite's cell) and the running worst case after it
    (``robust_after``) are recomputed from the points it broke (``broken_points``); its mean and majority, read with
    the old number of draws, are dropped. ``floor_redrawn`` says which verdict bounds the numbers."""
    broken_so_far = floor_before.copy()
    for outcome in result.attacks:
        broken = sorted(result.broken_points.get(outcome["label"], ()))
        broken_so_far[broken] = False
        outcome["robust_after"] = accuracy_summary(int((broken_so_far & result.clean_worst).sum()), len(floor_before))
        if "robust_alone" in outcome:
            alone = floor_before.copy()  # the attack ran on these points; the ones it broke are in broken_points
            alone[broken] = False
            outcome["robust_alone"] = accuracy_summary(int((alone & result.clean_worst).sum()), len(alone))
            outcome.pop("robust_alone_mean", None)
            outcome.pop("robust_alone_majority", None)
            outcome.pop("draws_right", None)
        outcome["floor_redrawn"] = result.draws


def run_attacks(
    result: Evaluation, model: nn.Module, subset: Subset, plans: Sequence[Tuple[str, Attack]], threat: Threat, *,
    batch_size: int = 128, device: str | torch.device = "cpu", seed: int = 0, state: Optional[BatchState] = None,
    independent: bool = False, success_draws: Optional[int] = None, stage: str = "attack",
) -> Evaluation:
    """Run ``plans`` on ``result``'s points (see ``_targets``) and fold their outcomes into it (per-sample worst
    case). ``stage`` names the batch-state keys and marks the outcomes (``"correction"`` for the attacks a failed
    integrity check adds after the suite). ``success_draws`` changes the re-classification draws from here on (a
    defense found stochastic)."""
    state = state if state is not None else BatchState(None)
    counting = CountingModule(model, PassCounter())
    if success_draws is not None and success_draws != result.draws:  # the clean verdict again, with the new draws
        _, clean_draws = _clean_pass(counting, subset, batch_size, device, seed, "correction", state, success_draws,
                                     stage=f"{stage}-clean")
        floor_before = result.clean_worst
        result.draws_right = np.minimum(result.draws_right * success_draws // result.draws, clean_draws)
        result.draws, result.clean_draws_right = success_draws, clean_draws
        result.clean_mean = float(clean_draws.sum()) / (success_draws * subset.n)
        result.robust &= result.clean_worst
        _bound_by_new_floor(result, floor_before)
    draws, robust, draws_right = result.draws, result.robust, result.draws_right
    stochastic = draws > 1 or bool(getattr(model, "stochastic", False))
    for k, (label, attack) in enumerate(plans):
        positions = _targets(result, independent)
        total = {"forward": 0, "backward": 0, "forward_images": 0, "backward_images": 0, "seconds": 0.0}
        broken, oom_splits = 0, 0
        right = np.zeros(subset.n, dtype=np.int64)
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
                                                          subset.y[p].to(device), threat, draws, stochastic)
                    return {"positions": p.tolist(), "fooled": fooled.tolist(), "correct": correct.tolist(), "cost": cost}

                saved = split_on_oom(attack_part, pos, device)
                state.save(key, saved)
            done[b] = saved
        done = share(done)  # every rank folds in every batch, in the single-process order
        for b, pos in enumerate(batches):
            saved = done[b]
            for p, hit, r in zip(pos, saved["fooled"], saved["correct"]):
                draws_right[p] = min(draws_right[p], r)
                right[p] = r
                if hit:
                    broken += 1
                    if result.clean_worst[p]:  # points the clean verdict broke were never robust
                        result.broken_points.setdefault(label, set()).add(int(p))
                        if 2 * r < draws:
                            result.decisive_points.setdefault(label, set()).add(int(p))
                        if robust[p]:
                            result.broken_by[p] = label
                        robust[p] = False
            oom_splits += saved.get("oom_splits", 0)
            for name in total:
                total[name] += saved["cost"][name]
        completed = bool(getattr(attack, "completes", False)) and not getattr(attack, "early_stop", True)
        outcome = {
            "label": label, **attack.describe(), "attacked": int(len(positions)), "broken": broken,
            "robust_after": accuracy_summary(int(robust.sum()), subset.n), "cost": total,
            "completed": completed or draws == 1,
            **({"stage": stage} if stage != "attack" else {}),
            **({"oom_splits": oom_splits} if oom_splits else {}),
        }
        if independent:  # this attack alone: worst case under the verdict rule, and the mean and majority over the draws
            alone = result.clean_worst & (right >= draws)
            outcome["robust_alone"] = accuracy_summary(int(alone.sum()), subset.n)
            outcome["draws_right"] = right.tolist()  # per image, subset order: what bench compare pairs per attack
            if outcome["completed"]:
                outcome["robust_alone_mean"] = float(right.sum()) / (draws * subset.n)
                outcome["robust_alone_majority"] = accuracy_summary(int((right * 2 > draws).sum()), subset.n)
        result.attacks.append(outcome)
        log.info("%s: %d of %d attacked points broken, robust %.2f%% so far (%.1f s)", label, broken, len(positions),
                 100 * robust.mean(), total["seconds"])
    return result
