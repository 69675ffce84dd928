"""``bench run``: resolve names into a defense, a subset and a suite, evaluate, write the record.

The run key hashes everything that changes the result (defense and its config, classifier, subset hash,
threat, resolved suite, seed, batch size), so per-batch state is only ever reused by the same run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch

from attacks.adaptive import default_chunk_images
from attacks.base import Threat
from attacks.suite import BUDGET_ALIASES, BUDGETS, default_budget, load_suite
from bench.classifiers import load_classifier
from bench.core.errors import BenchError
from bench.core.record import SCHEMA_VERSION, code_version, environment, to_json_data, write_record
from bench.core.stats import accuracy_summary
from bench.data.subset import load_subset
from bench.evaluation.distributed import barrier, init_from_env, is_main, world
from bench.evaluation.engine import BatchState, evaluate, run_attacks
from bench.evaluation.execution import MAX_AUTO_BATCH, Execution, auto_batch_size, executed
from bench.evaluation.integrity import NUDGE, Nudged, run_checks
from defenses.base import Defense, build_defense, card_of

log = logging.getLogger(__name__)

#: The evaluation semantics (verdict rule, clean floor, best candidates); part of the run id, so a record made under
#: other semantics never shares an id with one made under these.
ENGINE_VERSION = 4
SUCCESS_RULE = ("broken if any of the draws misclassifies, on the clean image or on an attack's example; attacks "
                "drop a point only on that verdict")
MEAN_OMITTED = ("attacks stopped refining each point at its verdict, so a mean or majority over the draws would be "
                "measured on barely adversarial examples; an independent suite runs attacks to completion and reports them")


def resume_key(run_id: str) -> str:
    """The state folder of a run: its id and the code that makes it (package version and source hash), so a killed
    run restarted after a code change starts afresh instead of reusing batches the old code made."""
    code = code_version()
    return f"{run_id}-{hashlib.sha256(json.dumps(code, sort_keys=True).encode()).hexdigest()[:12]}"


@dataclass(frozen=True)
class RunConfig:
    """Everything ``bench run`` needs; the CLI fills it from its flags."""

    defense: str = "none"
    threat: Optional[str] = None  # linf, l2 or stadv (RobustBench's Linf and L2 too); None: the suite's own, else linf
    classifier: str = "resnet20"
    dataset: str = "cifar10-jpeg"
    suite: Optional[str] = None
    budget: str = "auto"  # smoke, cpu, full (older name: paper), or auto (full on CUDA, cpu on a CPU)
    eps: Optional[float] = None
    n: int = 512
    seed: int = 0
    success_draws: int = 10  # re-classifications of each adversarial example, for stochastic defenses
    headline: str = "worst"  # which robust accuracy a table leads with: worst (any draw wrong), mean or majority
    checks: bool = True  # run the integrity checks (bench/evaluation/integrity.py) after the attacks
    device: str = "auto"
    batch_size: int | str = 128  # or "auto": the largest batch that fits (bench/evaluation/execution.py); 128 on a CPU
    out: Path = Path("runs")
    download: bool = False
    defense_options: Dict[str, Any] = field(default_factory=dict)
    channels_last: bool = False  # execution options (bench/evaluation/execution.py), meant for CUDA; off by default
    autocast: Optional[str] = None  # None, "bf16" or "fp16"
    compile: bool = False
    skip_existing: bool = False  # return the record already written for this run id instead of running again

    @property
    def execution(self) -> Execution:
        return Execution(self.channels_last, self.autocast, self.compile)


def rerun_config(config: RunConfig, suite, threat: Threat, batch_size: Optional[int] = None) -> Dict[str, Any]:
    """The ``bench run`` settings that reproduce a record (stored in it; ``config_from_record`` reads them)."""
    return {"defense": config.defense, "threat": threat.norm, "eps": threat.eps, "classifier": config.classifier,
            "dataset": config.dataset, "suite": suite.name, "budget": suite.budget, "n": config.n, "seed": config.seed,
            "success_draws": config.success_draws, "headline": config.headline, "checks": config.checks,
            "batch_size": batch_size if batch_size is not None else config.batch_size,
            "defense_options": dict(config.defense_options),
            **({} if config.execution.default else config.execution.to_dict())}


def config_from_record(record: Dict[str, Any], **overrides: Any) -> RunConfig:
    """The RunConfig of a record's run (its stored ``run_config``, or the fields of an older record)."""
    stored = record.get("settings", {}).get("run_config")
    if stored is None:
        stored = {"defense": record["defense"]["name"], "threat": record["threat"]["norm"], "eps": record["threat"]["eps"],
                  "classifier": record["classifier"]["name"], "dataset": record["subset"]["dataset"],
                  "suite": record["suite"]["name"], "budget": record["suite"]["budget"], "n": record["subset"]["n"],
                  "seed": record["subset"]["seed"],
                  # the draws a deterministic run recorded (1) are not its setting; the default is
                  "success_draws": record["settings"].get("success_draws", 10) if record["defense"]["stochastic"] else 10,
                  "headline": record.get("headline", {}).get("metric", "worst"),
                  "checks": record.get("checks", {}).get("ran", True), "batch_size": record["settings"]["batch_size"]}
    return RunConfig(**{**stored, **overrides})


def _card(defense: Defense) -> Dict[str, Any]:
    """The defense's card for the record (outside the run id: a card's text changes no result), or why there is none."""
    card = card_of(defense)
    return card.to_dict() if card is not None else {"missing": "the defense gives no card (a plug-in may omit it)"}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but no CUDA device is available; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise BenchError(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def record_filename(record: Dict[str, Any]) -> str:
    """Readable and unique: the run-id prefix separates runs that differ only in options or weights."""
    threat = record["threat"]
    parts = [record["subset"]["dataset"], record["classifier"]["name"], record["defense"]["name"],
             record["suite"]["name"], record["suite"]["budget"], f"{threat['norm']}-{threat['eps']:.6g}", f"n{record['subset']['n']}",
             f"s{record['subset']['seed']}", record["run_id"][:8]]
    return re.sub(r"[^A-Za-z0-9._+-]", "-", "_".join(parts)) + ".json"


def run(config: RunConfig) -> Tuple[Dict[str, Any], Optional[Path]]:
    """Evaluate ``config``; return the record and the path it was written to (None on a torchrun rank other
    than 0, which writes nothing)."""
    check_config(config)
    device, suite, threat, subset, defense = _resolve(config)
    if init_from_env(device):  # launched by torchrun: this process runs its share of every stage's batches
        rank, size = world()
        log.info("torchrun: rank %d of %d", rank, size)
    return evaluate_defense(defense, subset, suite, threat, config, device)


def check_config(config: RunConfig) -> None:
    """User errors in the settings, raised before anything is loaded."""
    if config.batch_size != "auto" and (not isinstance(config.batch_size, int) or config.batch_size < 1):
        raise BenchError(f"--batch-size must be auto or an integer >= 1, got {config.batch_size!r}")
    if config.headline not in ("worst", "mean", "majority"):
        raise BenchError(f"--headline must be worst, mean or majority, got {config.headline!r}")
    if config.success_draws < 1:
        raise BenchError(f"success_draws must be >= 1, got {config.success_draws}")
    config.execution  # noqa: B018 - Execution validates its options


def resolve_suite(suite: Optional[str], threat: Optional[str], budget: str, eps: Optional[float], device: torch.device):
    """(suite at its budget, threat): ``suite`` None is the threat's own suite, ``threat`` None the suite's own threat
    (linf without a suite), ``budget`` auto is full on CUDA and cpu on a CPU, ``eps`` None is the suite's."""
    budget = BUDGET_ALIASES.get(budget, budget)
    if budget not in ("auto", *BUDGETS):
        raise BenchError(f"--budget must be auto or one of {', '.join(BUDGETS)}, got {budget!r}")
    resolved = load_suite(suite, threat, default_budget(device) if budget == "auto" else budget, fallback=budget == "auto")
    return resolved, Threat(resolved.threat.norm, eps if eps is not None else resolved.threat.eps)


def _resolve(config: RunConfig):
    """(device, suite budget, threat, subset, defense) named by ``config``."""
    device = resolve_device(config.device)
    suite, threat = resolve_suite(config.suite, config.threat, config.budget, config.eps, device)
    subset = load_subset(config.dataset, config.n, config.seed, download=config.download)
    classifier = load_classifier(config.classifier, device)
    defense = build_defense(config.defense, classifier, **config.defense_options).to(device).eval()
    return device, suite, threat, subset, defense


def _run_checks(defense: Defense, subset, result, threat: Threat, suite, draws: int, device, seed: int):
    """The integrity checks with probe sizes by budget (8 points for smoke, 16 for cpu, 32 for full); the probes
    differentiate the attacker surrogate when the suite's attacks did."""
    surrogate = defense.attack_surrogate() if suite.surrogate else None
    return run_checks(defense, subset, result, threat, stochastic=defense.stochastic,
                      differentiable=defense.differentiable, eot=suite.eot_draws, draws=draws, device=device, seed=seed,
                      probe_n={"smoke": 8, "cpu": 16}.get(suite.budget, 32), surrogate=surrogate)


def correct_plan(defense: Defense, suite, threat: Threat, findings, device, success_draws: int):
    """The attacks a failed check adds after the suite, or None: what the defense should have declared.

    - randomness observed but not declared: the suite again with EOT and ``success_draws`` re-classifications;
    - predictions a sub-quantization nudge flips (``chaos``) on a defense that declares no randomness: the same,
      on the defense behind a fresh nudge per image and call (``Nudged``), so EOT averages over the neighbourhood
      the predictions depend on and each re-classification draw sees its own nudge;
    - zero, NaN or vanishing input gradients: the suite again with BPDA, the identity through everything
      before the classifier on the backward pass (the real forward is kept);
    several when several fail. The corrected attacks run on the points the suite left robust, so the result is the
    per-sample worst case over the suite and its correction. Returns (actions, plans, draws, wrap): ``wrap`` is
    applied to the evaluated model for the corrected attacks (the identity unless the predictions are chaotic).
    """
    undeclared_noise = "randomness" in findings.codes and not defense.stochastic
    chaotic = "chaos" in findings.codes and not defense.stochastic
    no_gradients = "gradients" in findings.codes
    if not (undeclared_noise or chaotic or no_gradients):
        return None
    actions = []
    if undeclared_noise:
        actions.append(f"EOT-{suite.eot_draws} and {success_draws} re-classification draws (undeclared randomness)")
    if chaotic:
        actions.append(f"EOT-{suite.eot_draws} over Gaussian input nudges of sigma {NUDGE:g} and {success_draws} "
                       "re-classification draws, each with its own nudge (chaotic predictions)")
    if no_gradients:
        actions.append("BPDA with the identity through the whole pipeline before the classifier (no usable gradients)")
    read_as_stochastic = defense.stochastic or undeclared_noise or chaotic
    plans = suite.build(threat, stochastic=read_as_stochastic, differentiable=defense.differentiable,
                        eot_chunk_images=default_chunk_images(device), pipeline_bpda=no_gradients)
    wrap = Nudged if chaotic else (lambda model: model)
    return actions, plans, success_draws if (undeclared_noise or chaotic) else None, wrap


def resolve_batch_size(config: RunConfig, model, subset, device) -> int:
    """``config.batch_size``, or for ``auto`` the largest batch whose forward+backward fits (128 on a CPU)."""
    if config.batch_size != "auto":
        return config.batch_size
    size = auto_batch_size(model, subset.x[:MAX_AUTO_BATCH], subset.y[:MAX_AUTO_BATCH], device)
    log.info("--batch-size auto: %d", size)
    return size


@dataclass(frozen=True)
class Planned:
    """What a run will be, known before any attack: its id, where its record goes, the attacks and settings."""

    run_id: str
    state_dir: Path
    target: Path
    plans: Any
    described: Dict[str, Any]
    draws: int
    execution: Execution
    model: Any
    batch_size: int
    complete: bool


def plan_evaluation(defense: Defense, subset, suite, threat: Threat, config: RunConfig, device) -> Planned:
    """The run id (a hash of everything that changes the result), the record's path and the attack plans."""
    check_config(config)
    complete = suite.complete_attacks(defense.stochastic)
    if config.headline != "worst" and defense.stochastic and not complete:
        raise BenchError(f"--headline {config.headline} needs attacks run to completion on every point: use an "
                         f"independent suite (atop-table7, aid-table3, jatp-table1); suite {suite.name} stops attacking "
                         "a point at its verdict, so its mean and majority would read high")
    plans = suite.build(threat, stochastic=defense.stochastic, differentiable=defense.differentiable,
                        eot_chunk_images=default_chunk_images(device), surrogate=defense.attack_surrogate(),
                        complete=complete)
    described = defense.describe()
    draws = config.success_draws if defense.stochastic else 1
    execution = config.execution
    model = executed(defense, execution)  # the defense itself unless an execution option is on
    batch_size = resolve_batch_size(config, model, subset, device)
    key_source = {
        "defense": described, "classifier": defense.classifier.info.to_dict(), "subset": subset.to_dict(),
        "threat": threat.to_dict(), "suite": suite.to_dict(), "plans": [label for label, _ in plans],
        "seed": config.seed, "batch_size": batch_size, "success_draws": draws, "engine": ENGINE_VERSION,
        **({} if execution.default else {"execution": execution.to_dict()}),
    }
    run_id = hashlib.sha256(json.dumps(key_source, sort_keys=True, default=str).encode()).hexdigest()[:24]
    target = Path(config.out) / record_filename({"run_id": run_id, "defense": described, "threat": threat.to_dict(),
                                                 "classifier": defense.classifier.info.to_dict(),
                                                 "subset": subset.to_dict(), "suite": suite.to_dict()})
    return Planned(run_id, Path(config.out) / ".state" / resume_key(run_id), target, plans, described, draws,
                   execution, model, batch_size, complete)


def plan(config: RunConfig) -> Planned:
    """``plan_evaluation`` from names: what ``run(config)`` would do, without doing it (loads the defense and subset)."""
    check_config(config)
    device, suite, threat, subset, defense = _resolve(config)
    return plan_evaluation(defense, subset, suite, threat, config, device)


def existing_record(planned: Planned) -> Optional[Dict[str, Any]]:
    """The record of this run if it is already written (same path and run id), else None."""
    return _written_meanwhile(planned.target, planned.run_id, since=0.0)


def evaluate_defense(defense: Defense, subset, suite, threat: Threat, config: RunConfig, device) -> Tuple[Dict[str, Any], Path]:
    """Evaluate a built defense on ``subset`` against ``suite`` and write the record (``bench.evaluate`` and
    ``bench run`` both end here)."""
    p = plan_evaluation(defense, subset, suite, threat, config, device)
    with run_lock(p.state_dir, enabled=world()[1] == 1) as waited_since:
        written = _written_meanwhile(p.target, p.run_id, 0.0 if config.skip_existing else waited_since)
        if written is not None:
            log.info("run %s: %s: %s", p.run_id, "its record exists (--skip-existing)" if config.skip_existing
                     else "another process wrote its record while this one waited", p.target)
            return written, p.target
        return _evaluate_locked(defense, subset, suite, threat, config, device, p.plans, p.described, p.draws,
                                p.execution, p.model, p.batch_size, p.run_id, p.state_dir, p.complete)


@contextlib.contextmanager
def run_lock(state_dir: Path, enabled: bool = True):
    """One process per run id at a time: an exclusive lock on ``<state_dir>.lock`` (waiting, with one log line, while
    another process holds it), so two processes never interleave the batches of one run. Yields when it started to
    wait. The holder removes the lock file (and the state folder's parent if that leaves it empty) before it lets go;
    a waiter that then holds a lock on a removed file takes a fresh one, so no two processes ever hold the same path."""
    since = time.time()
    if not enabled:
        yield since
        return
    import fcntl

    path = state_dir.with_name(state_dir.name + ".lock")
    announced = False
    while True:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            handle = open(path, "a+")
        except FileNotFoundError:  # the parent was removed between mkdir and open: try again
            continue
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not announced:
                log.info("another process is running this configuration (%s); waiting for it", state_dir.name)
                announced = True
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()  # the previous holder removed the file we waited on: lock the path anew
    try:
        yield since
    finally:
        try:
            path.unlink()
            path.parent.rmdir()  # only when empty; state of other runs keeps it
        except OSError:
            pass
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def _written_meanwhile(target: Path, run_id: str, since: float) -> Optional[Dict[str, Any]]:
    """The record of this run id if another process wrote it after ``since`` (while this one waited for the lock)."""
    try:
        if target.stat().st_mtime < since:
            return None
        record = json.loads(target.read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("run_id") == run_id else None


def _evaluate_locked(defense: Defense, subset, suite, threat: Threat, config: RunConfig, device, plans, described,
                     draws: int, execution, model, batch_size: int, run_id: str, state_dir: Path, complete: bool):
    """The evaluation proper, under the run's lock: attacks, checks, record."""
    started, t0 = datetime.now(timezone.utc), time.perf_counter()
    env = environment()  # the code as it was when the run started (a commit made during a long run is not this run's)
    log.info("run %s: %s on %s (%s, n=%d), suite %s (%s budget)", run_id, config.defense, config.classifier,
             subset.dataset, subset.n, suite.name, suite.budget)
    result = evaluate(model, subset, plans, threat, who=config.defense, batch_size=batch_size, device=device,
                      seed=config.seed, state_dir=state_dir, success_draws=draws, independent=suite.independent,
                      complete=complete, started=started.isoformat())
    findings, checks, corrections = None, {"ran": False}, None
    known = defense.known_problems()
    for problem in known:
        log.warning("unreliable: %s", problem)
    if config.checks:
        t_checks = time.perf_counter()
        findings = _run_checks(defense, subset, result, threat, suite, draws, device, config.seed)
        checks = {"ran": True, "seconds": time.perf_counter() - t_checks, **findings.measurements}
        for reason in findings.reasons:
            log.warning("unreliable: %s", reason)
        fix = correct_plan(defense, suite, threat, findings, device, config.success_draws)
        if fix is not None:
            actions, fix_plans, fix_draws, wrap = fix
            before = accuracy_summary(int(result.robust.sum()), subset.n)
            log.warning("correcting the attack plan: %s", "; ".join(actions))
            run_attacks(result, wrap(model), subset, fix_plans, threat, batch_size=batch_size, device=device,
                        seed=config.seed, state=BatchState(state_dir), success_draws=fix_draws, stage="correction")
            draws = result.draws
            corrections = {"actions": actions, "robust_before": before,
                           "robust_after": accuracy_summary(int(result.robust.sum()), subset.n)}
    if config.headline != "worst" and not result.mean_valid:  # a correction added early-stopped attacks
        raise BenchError(f"--headline {config.headline}: the record has no mean or majority ({MEAN_OMITTED})")
    headline = {"worst": float(result.robust.mean()), "mean": result.robust_mean,
                "majority": float(result.robust_majority.mean())}[config.headline]
    spread = ({"robust_mean": result.robust_mean,
               "robust_majority": accuracy_summary(int(result.robust_majority.sum()), subset.n)}
              if result.mean_valid else {"mean_omitted": MEAN_OMITTED})
    record = {
        "schema_version": SCHEMA_VERSION, "run_id": run_id, "defense": {**described, "card": _card(defense)},
        "classifier": defense.classifier.info.to_dict(), "subset": subset.to_dict(), "threat": threat.to_dict(),
        "suite": suite.to_dict(), "attacks": result.attacks,
        "clean": accuracy_summary(int(result.clean_correct.sum()), subset.n),
        "clean_mean": result.clean_mean,
        "clean_worst": accuracy_summary(int(result.clean_worst.sum()), subset.n),
        "robust": accuracy_summary(int(result.robust.sum()), subset.n),
        **spread,
        "headline": {"metric": config.headline, "accuracy": headline},
        "samples": {
            "index": subset.indices.tolist(), "label": subset.y.tolist(), "clean_pred": result.clean_pred.tolist(),
            "clean_correct": result.clean_correct.tolist(), "robust": result.robust.tolist(), "broken_by": result.broken_by,
            "draws_right": result.draws_right.tolist(), "clean_draws_right": result.clean_draws_right.tolist(),
        },
        "unreliable": bool(known or (findings and findings.unreliable)),
        "unreliable_reasons": [*known, *(findings.reasons if findings else [])], "checks": checks,
        **({"corrections": corrections} if corrections else {}),
        "settings": {"device": str(device), "batch_size": batch_size, "seed": config.seed,
                     **({"batch_size_requested": "auto"} if config.batch_size == "auto" else {}),
                     **({} if execution.default else {"execution": execution.to_dict()}),
                     "success_draws": draws, "success_rule": SUCCESS_RULE, "complete_attacks": result.complete,
                     "run_config": rerun_config(config, suite, threat, batch_size)},
        "environment": env,
        "timing": {"started": started.isoformat(), "finished": datetime.now(timezone.utc).isoformat(),
                   "seconds": time.perf_counter() - t0,
                   # how many processes worked on the run (a resumed run: more than one) and when the first began
                   "parts": len(result.parts), "first_started": result.parts[0],
                   # the attacks' own clocks, kept per batch in the resume state: a resumed run counts its earlier parts
                   "attack_seconds": sum(float(a["cost"]["seconds"]) for a in result.attacks)},
    }
    record = to_json_data(record)
    barrier()  # every rank is done with the state folder before rank 0 removes it
    if not is_main():  # a torchrun rank other than 0: rank 0 writes the one record
        return record, None
    path = write_record(Path(config.out) / record_filename(record), record)
    shutil.rmtree(state_dir, ignore_errors=True)
    return record, path


AUDIT_ATTACKS = (("pgd", (("steps", 10),)), ("square", (("queries", 1000),)), ("transfer", ()))


def audit(config: RunConfig):
    """``bench audit``: only the integrity checks, on ``config.n`` images (no record).

    A short sequential suite (PGD-10 with EOT, then Square with 1000 queries, then a transfer attack from the
    bare classifier) gives the black-box check something to compare; the probes and the other checks run as
    after every evaluation. Returns (findings, evaluation).
    """
    from attacks.suite import AttackSpec, Suite

    device, base, threat, subset, defense = _resolve(config)
    specs = tuple(AttackSpec(name, params) for name, params in AUDIT_ATTACKS)
    suite = Suite("audit", "1", base.budget, "integrity audit", threat, base.eot_draws, specs)
    plans = suite.build(threat, defense.stochastic, defense.differentiable, default_chunk_images(device))
    draws = config.success_draws if defense.stochastic else 1
    result = evaluate(defense, subset, plans, threat, who=config.defense,
                      batch_size=resolve_batch_size(config, defense, subset, device), device=device, seed=config.seed,
                      success_draws=draws)
    return _run_checks(defense, subset, result, threat, suite, draws, device, config.seed), result
