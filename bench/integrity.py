"""Integrity checks: evidence that an evaluation under-attacked a defense.

Each check returns the reasons it found (empty when it passed). A record with any reason is marked
``unreliable: true`` and its tables carry the mark. The checks follow PROTOCOL.md's list:

- ``randomness``: two forward passes on the same images differ although the defense did not declare
  randomness, or are identical although it did;
- ``gradients``: the input gradient of the loss (exact, or through the BPDA surrogate for a defense with
  non-differentiable stages) is NaN, zero on some points or vanishing;
- ``probabilities``: the outputs look like probabilities or log-probabilities rather than logits (a softmax
  inside the model flattens the loss the attacks climb);
- ``black_box``: a score-based or transfer attack broke points that every gradient attack before it missed;
- ``monotone``: on a small probe set, PGD accuracy does not fall when eps doubles, when the steps grow or
  (stochastic defenses) when the EOT draws grow;
- ``unbounded``: PGD at eps = 1 (the whole image box) does not drive accuracy to about 0%.

The probes (``monotone``, ``unbounded``) run a cheap PGD-10 (StAdv-10 for the ``stadv`` threat) on at most
``probe_n`` clean-correct points with ``PROBE_EOT`` EOT draws (the same for every probe but the EOT-growth
one, so their accuracies stay comparable), so they cost a small fraction of the evaluation; the record's
``checks`` gives their settings and results.

Every reason is filed under the check that found it (``Findings.codes``): the runner reads the codes to
correct the attack plan (EOT for undeclared randomness, BPDA for missing gradients), see ``bench/runner.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Sequence

import torch
from torch import nn

import numpy as np

from attacks.adaptive import BPDAView
from attacks.base import CountingModule, Threat, input_grad
from attacks.losses import ce
from attacks.suite import AttackSpec, Suite
from bench.evaluation import attack_batch

# A gradient whose mean absolute value is below this (per input pixel) counts as vanishing.
VANISHING = 1e-10
# Accuracy may rise by this much (fraction of probe points) between probes before it is called a rise, and
# always by up to RISE_POINTS probe points: a probe of 16-32 points with a stochastic defense moves by a point
# or two between runs by chance alone.
RISE_TOLERANCE = 0.05
RISE_POINTS = 2
# An eps = 1 attack may leave at most this fraction of probe points correct.
UNBOUNDED_LIMIT = 0.05
# EOT draws of the probes (fewer than the suite's: the probes compare PGD with itself, not with the suite).
PROBE_EOT = 4


@dataclass
class Findings:
    reasons: List[str] = field(default_factory=list)
    measurements: Dict[str, object] = field(default_factory=dict)
    codes: Dict[str, List[str]] = field(default_factory=dict)  # check name -> its reasons

    @property
    def unreliable(self) -> bool:
        return bool(self.reasons)

    def add(self, code: str, reasons: Sequence[str]) -> None:
        if reasons:
            self.reasons += list(reasons)
            self.codes.setdefault(code, []).extend(reasons)


def check_randomness(model: nn.Module, x: torch.Tensor, declared: bool, seed: int = 0) -> List[str]:
    torch.manual_seed(seed)
    with torch.inference_mode():
        first, second = model(x), model(x)
    observed = not torch.equal(first, second)
    if observed and not declared:
        return ["randomness not declared but observed: two forward passes on the same images differ "
                "(declare stochastic = True so the suites attack it with EOT)"]
    if declared and not observed:
        return ["randomness declared but not observed: two forward passes on the same images were identical"]
    return []


def check_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, differentiable: bool) -> List[str]:
    view = model if differentiable else BPDAView(model)
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        grad = input_grad(ce(view(xg), y), xg)
    how = "exact" if differentiable else "BPDA"
    if not torch.isfinite(grad).all():
        return [f"NaN or infinite input gradients ({how})"]
    per_point = grad.flatten(1).abs().mean(dim=1)
    reasons = []
    zero = int((per_point == 0).sum())
    if zero:
        reasons.append(f"zero input gradients ({how}) on {zero} of {len(per_point)} points")
    elif float(per_point.min()) < VANISHING:
        reasons.append(f"vanishing input gradients ({how}): mean |grad| down to {float(per_point.min()):.2e}")
    return reasons


def check_probabilities(logits: torch.Tensor) -> List[str]:
    rows = logits.detach().float()
    if bool(((rows >= 0) & (rows <= 1)).all()) and torch.allclose(rows.sum(1), torch.ones(len(rows)), atol=1e-3):
        return ["outputs look like probabilities (in [0, 1], rows sum to 1), not logits"]
    if bool((rows <= 0).all()) and torch.allclose(rows.logsumexp(1), torch.zeros(len(rows)), atol=1e-3):
        return ["outputs look like log-probabilities (rows log-sum-exp to 0), not logits"]
    return []


def check_black_box(outcomes: Sequence[Dict[str, object]], broken_points: Dict[str, set]) -> List[str]:
    """Points a score-based or transfer attack broke that no gradient attack broke.

    In a sequential suite a black-box attack only sees the points the attacks before it missed, so the check
    needs a gradient attack to have run before the first black-box one; in an independent suite every attack
    saw every point and the sets compare directly.
    """
    labels = [o["label"] for o in outcomes]
    black = {o["label"] for o in outcomes
             if o["attack"] == "square" or (o["attack"] == "transfer" and not o.get("source_is_target"))}
    if not black or not any(label not in black for label in labels[: min(labels.index(b) for b in black)]):
        return []
    union = lambda keys: set().union(*(broken_points.get(k, set()) for k in keys))  # noqa: E731
    extra = union(black) - union(set(labels) - black)
    if extra:
        return [f"a black-box or transfer attack broke {len(extra)} points every gradient attack missed "
                "(gradients are masked or the gradient attacks are too weak)"]
    return []


def _pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, steps: int, eot: int,
                  stochastic: bool, differentiable: bool, draws: int) -> float:
    """PGD accuracy on the probe points, wrapped (EOT, BPDA) and re-classified exactly as a suite would."""
    attack = "pgd" if threat.pixel else "stadv"
    suite = Suite("probe", "1", "cpu", "integrity probe", threat, eot, (AttackSpec(attack, (("steps", steps),)),))
    fooled = np.zeros(len(y), dtype=bool)
    counting = CountingModule(model)
    for label, attack in suite.build(threat, stochastic, differentiable):  # exact, and BPDA if declared
        fooled |= attack_batch(counting, attack, label, x, y, threat, draws)[0]
    return float(1 - fooled.mean())


def probe_attacks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *, stochastic: bool,
                  differentiable: bool, eot: int, draws: int, steps: int = 10) -> Findings:
    """The eps sweep, the steps check and the eps = 1 attack on clean-correct probe points."""
    findings = Findings()
    run = lambda t, s, e=eot: _pgd_accuracy(model, x, y, t, s, e, stochastic, differentiable, draws)  # noqa: E731
    name = "PGD" if threat.pixel else "StAdv"
    limit = {"linf": 1.0, "l2": float("inf"), "stadv": 2.0}[threat.norm]
    sweep = {eps: run(Threat(threat.norm, min(eps, limit)), steps) for eps in (threat.eps / 2, threat.eps, 2 * threat.eps)}
    more_steps = run(threat, 4 * steps)
    # stadv: a flow of 0.5 (8 pixels on 32x32) already breaks every point of a standard model; a bound of 2.0
    # saturates the signed steps and smears the image into its border, which some classes survive.
    unbounded_threat = {"linf": Threat("linf", 1.0), "l2": Threat("l2", float(x[0].numel()) ** 0.5),
                        "stadv": Threat("stadv", 0.5)}[threat.norm]
    unbounded = run(unbounded_threat, steps)
    findings.measurements = {
        "probe_points": int(len(y)), "pgd_steps": steps, "probe_eot": eot if stochastic else 1,
        "eps_sweep": {f"{eps:.6g}": acc for eps, acc in sweep.items()},
        f"pgd{4 * steps}_at_eps": more_steps, "unbounded_eps": unbounded_threat.eps, "unbounded_accuracy": unbounded,
    }
    accs = list(sweep.values())
    tolerance = max(RISE_TOLERANCE, RISE_POINTS / len(y))
    findings.measurements["rise_tolerance"] = tolerance
    if accs[1] > accs[0] + tolerance or accs[2] > accs[1] + tolerance:
        findings.add("monotone", [f"robust accuracy does not fall as eps grows ({name}-{steps} at eps/2, eps, 2 eps: "
                                  + ", ".join(f"{100 * a:.1f}%" for a in accs) + ")"])
    if more_steps > accs[1] + tolerance:
        findings.add("monotone", [f"robust accuracy rises with more steps ({name}-{steps} {100 * accs[1]:.1f}%, "
                                  f"{name}-{4 * steps} {100 * more_steps:.1f}%)"])
    if stochastic:  # the EOT-growth probe: 4x the draws must not help the defense
        more_eot = run(threat, steps, 4 * eot)
        findings.measurements.update({"eot_growth": [eot, 4 * eot], "pgd_at_eps_more_eot": more_eot})
        if more_eot > accs[1] + tolerance:
            findings.add("monotone", [f"robust accuracy rises with more EOT draws ({name}-{steps} EOT-{eot} "
                                      f"{100 * accs[1]:.1f}%, EOT-{4 * eot} {100 * more_eot:.1f}%)"])
    if unbounded > UNBOUNDED_LIMIT:
        findings.add("unbounded", [f"an unbounded attack ({name}-{steps}, {unbounded_threat.norm} eps {unbounded_threat.eps:.3g}) "
                                   f"leaves {100 * unbounded:.1f}% accuracy instead of about 0%"])
    return findings


def run_checks(model: nn.Module, subset, evaluation, threat: Threat, *, stochastic: bool, differentiable: bool,
               eot: int, draws: int, device, probe_n: int = 32, seed: int = 0) -> Findings:
    """Every check, on the evaluated model and subset; ``evaluation`` is the result of ``bench.evaluation.evaluate``."""
    findings = Findings()
    head = subset.x[: min(32, subset.n)].to(device)
    findings.add("randomness", check_randomness(model, head, stochastic, seed))
    with torch.inference_mode():
        findings.add("probabilities", check_probabilities(model(head)))
    correct = np.flatnonzero(evaluation.clean_correct)[:probe_n]
    if len(correct):
        x, y = subset.x[correct].to(device), subset.y[correct].to(device)
        findings.add("gradients", check_gradients(model, x, y, differentiable))
        torch.manual_seed(seed)
        probes = probe_attacks(model, x, y, threat, stochastic=stochastic, differentiable=differentiable,
                               eot=min(eot, PROBE_EOT), draws=draws)
        for code, reasons in probes.codes.items():
            findings.add(code, reasons)
        findings.measurements.update(probes.measurements)
    findings.add("black_box", check_black_box(evaluation.attacks, evaluation.broken_points))
    return findings
