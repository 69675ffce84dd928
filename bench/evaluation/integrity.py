"""Integrity checks: evidence that an evaluation under-attacked a defense.

Each check returns the reasons it found (empty when it passed). A record with any reason is marked
``unreliable: true`` and its tables carry the mark. The checks follow PROTOCOL.md's list:

- ``randomness``: two forward passes on the same images differ although the defense did not declare
  randomness, or are identical although it did; and, for a declared-stochastic defense, copies of one image in
  one batch must get independent draws (noise shared across the batch turns EOT's stacked draws into one draw);
- ``chaos``: a defense that declares no randomness changes its prediction on many images when they move by a
  sub-quantization nudge (Gaussian, sigma 1e-6, far below one 8-bit step of 3.9e-3). Deterministic on paper, it is an
  undeclared random draw over the input's neighbourhood in practice: its gradients say nothing about the points an
  attack steps to, and a robust number from a deterministic evaluation of it is a coin flip per image;
- ``gradients``: the input gradient of the loss (exact, or through the BPDA surrogate for a defense with
  non-differentiable stages) is NaN, zero on some points or vanishing; or it exists but does not help (Athalye et
  al.'s shattered gradients): a small step along it does not raise the loss on most points, or gradients at nearby
  points are uncorrelated. Randomness is held fixed between the compared passes (the same seed), so only the input
  differs;
- ``probabilities``: the outputs look like probabilities or log-probabilities rather than logits (a softmax
  inside the model flattens the loss the attacks climb);
- ``black_box``: a score-based or transfer attack broke points that every gradient attack before it missed
  (every ``cpu`` and ``full`` budget ends with Square and a transfer attack, so the check can fire);
- ``monotone``: on a small probe set, PGD accuracy rises when eps, the steps or (stochastic defenses) the EOT
  draws grow, read against the 95% Wilson interval of the smaller setting's accuracy (not fixed points); or it does
  not fall at all from eps/2 to 2 eps (four times the radius broke not one more probe point);
- ``unbounded``: PGD at eps = 1 (the whole image box) does not drive accuracy to about 0%. The ball holds every
  smaller one, so a point broken by any probe (the eps sweep, more steps, more EOT draws) counts as broken in it,
  as a record counts a point broken by any attack of its suite; what the eps = 1 attack alone left is recorded too.

The probes (``monotone``, ``unbounded``) run a cheap PGD-10 (StAdv-10 for the ``stadv`` threat) on at most
``probe_n`` points that pass the clean verdict, with ``PROBE_EOT`` EOT draws (the same for every probe but the
EOT-growth one, so their accuracies stay comparable), so they cost a small fraction of the evaluation; the record's
``checks`` gives their settings and results.
When the suite's budget differentiates the defense's attacker surrogate (``"surrogate": true``, PROTOCOL rule 5), the
probes take their gradients from the same surrogate (they check the attacker the suite ran) and the real defense
still decides every verdict; the ``gradients`` check always reads the real defense.

Every reason is filed under the check that found it (``Findings.codes``): the runner reads the codes to
correct the attack plan (EOT for undeclared randomness, BPDA for missing or useless gradients), see
``bench/evaluation/runner.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

import numpy as np

from attacks.adaptive import BPDAView
from attacks.base import CountingModule, Threat, bpda_call, input_grad
from attacks.losses import ce
from attacks.suite import AttackSpec, Suite
from bench.core.stats import wilson_interval
from bench.evaluation.engine import attack_batch

# A gradient whose mean absolute value is below this (per input pixel) counts as vanishing.
VANISHING = 1e-10
# An eps = 1 attack, with every smaller probe, may leave at most this fraction of probe points correct.
UNBOUNDED_LIMIT = 0.05
# EOT draws of the probes (fewer than the suite's: the probes compare PGD with itself, not with the suite).
PROBE_EOT = 4
# Useful gradients: a step of STEP_FRACTION * eps along the gradient must raise the loss on at least USEFUL_SHARE of the
# points, and the gradients at x and at a point NEARBY_FRACTION * eps away must have a median cosine of at least
# CORRELATED. Measured on the shared ResNet-20 and ResNet-4b and on atop, the share is 1.0 and the cosine above 0.6;
# a shattered-gradient plant (tests/plugin_examples.py) gives a share near 0.5 and a cosine near 0.
STEP_FRACTION = 0.25
USEFUL_SHARE = 0.75
NEARBY_FRACTION = 0.125
CORRELATED = 0.2
# Copies of each image in the per-image randomness check.
COPIES = 4
# Chaos: the nudge (sigma of a Gaussian on the input) and the share of checked images whose prediction may flip under
# it. Measured on the first 256 images of the subset: AID-Purifier before the standard ResNet-20 flips 42%; before the
# PGD-trained ResNet-4b, and the bare ResNet-20, none.
NUDGE = 1e-6
CHAOTIC_SHARE = 0.1


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
    if declared:
        return check_independent_draws(model, x[: max(1, min(8, len(x)))])
    return []


def nudged(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``x`` moved by seeded Gaussian noise of sigma ``NUDGE`` (far below one 8-bit step), kept in [0, 1]."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    return (x + NUDGE * torch.randn(x.shape, generator=generator).to(x.device)).clamp(0, 1)


class Nudged(nn.Module):
    """``model`` behind a fresh Gaussian nudge of sigma ``sigma`` per image and call: the chaos check's correction.

    A defense whose predictions a sub-quantization nudge flips is a random draw over its input's neighbourhood, so
    it is attacked as the stochastic defense it is: EOT over the nudges, and the verdict's re-classification draws
    each see their own nudge (PROTOCOL rule 8). The nudged image is clamped to [0, 1] on the forward pass only; the
    backward pass is the identity, so saturated pixels keep their gradient. ``bpda_forward`` is nudged the same way."""

    stochastic = True

    def __init__(self, model: nn.Module, sigma: float = NUDGE) -> None:
        super().__init__()
        self.model, self.sigma = model, float(sigma)

    def _nudge(self, x: torch.Tensor) -> torch.Tensor:
        moved = (x + self.sigma * torch.randn_like(x)).clamp(0, 1)
        return x + (moved - x).detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self._nudge(x))

    def bpda_forward(self, x: torch.Tensor, stages: Tuple[str, ...] = ()) -> torch.Tensor:
        return bpda_call(self.model, self._nudge(x), stages)


def check_chaos(model: nn.Module, x: torch.Tensor, declared: bool, seed: int = 0,
                measurements: Optional[Dict[str, object]] = None, outputs: Optional[torch.Tensor] = None) -> List[str]:
    """A deterministic defense's predictions on ``x`` (``outputs``, when the caller already has them) and on ``x``
    nudged by Gaussian noise of sigma ``NUDGE``."""
    if declared:  # a stochastic defense's draws already differ; EOT and the verdict's draws cover it
        return []
    with torch.inference_mode():
        outputs = model(x) if outputs is None else outputs
        flipped = int((outputs.argmax(1) != model(nudged(x, seed)).argmax(1)).sum())
    if measurements is not None:
        measurements["nudge"] = {"sigma": NUDGE, "images": len(x), "flipped": flipped}
    if flipped > CHAOTIC_SHARE * len(x):
        return [f"predictions are chaotic: a Gaussian nudge of sigma {NUDGE:g} (far below one 8-bit step) changed "
                f"{flipped} of {len(x)} predictions, although the defense declares no randomness; its gradients do "
                "not describe its neighbourhood and a deterministic verdict on it is a draw per image (make the "
                "defense stable, or declare it stochastic with its input noise so the suites attack it with EOT)"]
    return []


def check_independent_draws(model: nn.Module, x: torch.Tensor) -> List[str]:
    """Copies of one image stacked in one batch must get their own draws: EOT and the verdict's re-classification
    stack draws along the batch, so noise shared across the batch would make k stacked draws one draw."""
    with torch.inference_mode():
        out = model(x.repeat(COPIES, 1, 1, 1)).view(COPIES, len(x), -1)
    shared = [i for i in range(len(x)) if all(torch.equal(out[0, i], out[c, i]) for c in range(1, COPIES))]
    if shared:
        return [f"randomness is shared across the batch: {COPIES} copies of one image in one batch got identical outputs "
                f"on {len(shared)} of {len(x)} images (draw the noise per image, e.g. torch.randn_like(x); stacked EOT "
                "draws would otherwise collapse into one)"]
    return []


def _view(model: nn.Module, differentiable: bool) -> nn.Module:
    return model if differentiable else BPDAView(model)


def _loss_and_grad(view: nn.Module, x: torch.Tensor, y: torch.Tensor, draws: int, seed: int):
    """Per-point CE averaged over ``draws`` stacked draws, and its input gradient, with the randomness fixed by
    ``seed`` (common random numbers: two calls with one seed see the same draws)."""
    torch.manual_seed(seed)
    xg = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        loss = ce(view(xg.repeat(draws, 1, 1, 1)), y.repeat(draws)).view(draws, len(y)).mean(0)
        grad = input_grad(loss, xg)
    return loss.detach(), grad.detach()


def check_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, differentiable: bool,
                    threat: Optional[Threat] = None, draws: int = 1, seed: int = 0,
                    measurements: Optional[Dict[str, object]] = None) -> List[str]:
    view = _view(model, differentiable)
    how = getattr(model, "gradient_route", "exact") if differentiable else "BPDA"
    loss, grad = _loss_and_grad(view, x, y, draws, seed)
    if not torch.isfinite(grad).all():
        return [f"NaN or infinite input gradients ({how})"]
    per_point = grad.flatten(1).abs().mean(dim=1)
    zero = int((per_point == 0).sum())
    if zero:
        return [f"zero input gradients ({how}) on {zero} of {len(per_point)} points"]
    if float(per_point.min()) < VANISHING:
        return [f"vanishing input gradients ({how}): mean |grad| down to {float(per_point.min()):.2e}"]
    return check_useful_gradients(view, x, y, grad, loss, threat, draws, seed, how, measurements)


def gradient_usefulness(view: nn.Module, x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor,
                        threat: Optional[Threat], draws: int, seed: int) -> Dict[str, float]:
    """The share of points whose loss a small step along the gradient raises, and the median cosine between the
    gradients at x and at a nearby point (the same draws in every pass)."""
    pixel = threat if threat is not None and threat.pixel else Threat("linf", 8 / 255)
    size = STEP_FRACTION * pixel.eps
    stepped = pixel.project(pixel.step(x, grad, size), x)
    torch.manual_seed(seed)
    with torch.no_grad():
        raised = ce(view(stepped.repeat(draws, 1, 1, 1)), y.repeat(draws)).view(draws, len(y)).mean(0) > loss
    near = Threat("linf", NEARBY_FRACTION * (pixel.eps if pixel.norm == "linf" else 8 / 255))
    generator = torch.Generator(device="cpu").manual_seed(seed + 1)
    offset = (torch.rand(x.shape, generator=generator) * 2 - 1).to(x.device) * near.eps
    _, grad_near = _loss_and_grad(view, (x + offset).clamp(0, 1), y, draws, seed)
    cosine = torch.nn.functional.cosine_similarity(grad.flatten(1), grad_near.flatten(1), dim=1)
    return {"raised_share": float(raised.float().mean()), "nearby_cosine": float(cosine.median())}


def check_useful_gradients(view: nn.Module, x: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor,
                           threat: Optional[Threat], draws: int, seed: int, how: str,
                           measurements: Optional[Dict[str, object]] = None) -> List[str]:
    measured = gradient_usefulness(view, x, y, grad, loss, threat, draws, seed)
    if measurements is not None:
        measurements["gradient_usefulness"] = measured
    reasons = []
    if measured["raised_share"] < USEFUL_SHARE:
        reasons.append(f"input gradients ({how}) do not help: a step of {STEP_FRACTION:g} eps along them raised the loss "
                       f"on only {100 * measured['raised_share']:.0f}% of the points (shattered gradients)")
    if measured["nearby_cosine"] < CORRELATED:
        reasons.append(f"input gradients ({how}) at nearby points are uncorrelated: median cosine "
                       f"{measured['nearby_cosine']:.2f} at {NEARBY_FRACTION:g} eps apart (shattered gradients)")
    return reasons


def check_probabilities(logits: torch.Tensor) -> List[str]:
    rows = logits.detach().float()
    if bool(((rows >= 0) & (rows <= 1)).all()) and torch.allclose(rows.sum(1), torch.ones(len(rows)), atol=1e-3):
        return ["outputs look like probabilities (in [0, 1], rows sum to 1), not logits"]
    if bool((rows <= 0).all()) and torch.allclose(rows.logsumexp(1), torch.zeros(len(rows)), atol=1e-3):
        return ["outputs look like log-probabilities (rows log-sum-exp to 0), not logits"]
    return []


def check_black_box(outcomes: Sequence[Dict[str, object]], broken_points: Dict[str, set],
                    decisive_points: Optional[Dict[str, set]] = None) -> List[str]:
    """Points a score-based or transfer attack broke that no gradient attack broke.

    In a sequential suite a black-box attack only sees the points the attacks before it missed, so the check
    needs a gradient attack to have run before the first black-box one; in an independent suite every attack
    saw every point and the sets compare directly. For a stochastic defense only the black-box attack's decisive
    breaks count (``decisive_points``: most of the draws wrong): a point one of ten draws misclassifies can fall to
    any attack by luck, a point most draws misclassify cannot.
    """
    labels = [o["label"] for o in outcomes]
    black = {o["label"] for o in outcomes
             if o["attack"] == "square" or (o["attack"] == "transfer" and not o.get("source_is_target"))}
    if not black or not any(label not in black for label in labels[: min(labels.index(b) for b in black)]):
        return []
    union = lambda keys: set().union(*(broken_points.get(k, set()) for k in keys))  # noqa: E731
    found = union(black) if decisive_points is None else set().union(*(decisive_points.get(k, set()) for k in black))
    extra = found - union(set(labels) - black)
    if extra:
        return [f"a black-box or transfer attack broke {len(extra)} points every gradient attack missed "
                "(gradients are masked or the gradient attacks are too weak)"]
    return []


def _pgd_fooled(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, steps: int, eot: int,
                stochastic: bool, differentiable: bool, draws: int, surrogate: Optional[nn.Module] = None) -> np.ndarray:
    """Which probe points PGD broke (a boolean per point), wrapped (EOT, BPDA, the attacker surrogate if given) and
    re-classified exactly as a suite would."""
    attack = "pgd" if threat.pixel else "stadv"
    suite = Suite("probe", "1", "cpu", "integrity probe", threat, eot, (AttackSpec(attack, (("steps", steps),)),),
                  surrogate=surrogate is not None)
    fooled = np.zeros(len(y), dtype=bool)
    counting = CountingModule(model)
    for label, attack in suite.build(threat, stochastic, differentiable, surrogate=surrogate):  # exact, and BPDA if declared
        fooled |= attack_batch(counting, attack, label, x, y, threat, draws)[0]
    return fooled


# "Does not fall" needs a few points left robust at eps/2 to mean anything: with one or two, a stochastic defense's
# fresh draws alone move the count (measured: atop at 1/255, 5 probe points, PGD-10 EOT-2 read 1, 3 and 3 robust).
MIN_STILL_ROBUST = 3


def _rises(smaller: float, larger: float, n: int) -> bool:
    """``larger`` lies above the 95% Wilson interval of ``smaller`` (both accuracies on the same ``n`` probe points)."""
    return larger > wilson_interval(round(smaller * n), n)[1] + 1e-12


def probe_attacks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, threat: Threat, *, stochastic: bool,
                  differentiable: bool, eot: int, draws: int, steps: int = 10,
                  surrogate: Optional[nn.Module] = None) -> Findings:
    """The eps sweep, the steps check and the eps = 1 attack on probe points that pass the clean verdict; gradients
    from ``surrogate`` when given (the suite's attacker surrogate), verdicts from ``model``."""
    findings = Findings()
    # stadv: a flow of 0.5 (8 pixels on 32x32) already breaks every point of a standard model; a bound of 2.0
    # saturates the signed steps and smears the image into its border, which some classes survive.
    unbounded_threat = {"linf": Threat("linf", 1.0), "l2": Threat("l2", float(x[0].numel()) ** 0.5),
                        "stadv": Threat("stadv", 0.5)}[threat.norm]
    inside = np.zeros(len(y), dtype=bool)  # the points some probe broke inside the unbounded ball

    def run(t: Threat, s: int, e: int = eot) -> float:
        fooled = _pgd_fooled(model, x, y, t, s, e, stochastic, differentiable, draws, surrogate)
        if t.eps <= unbounded_threat.eps:
            inside[fooled] = True
        return float(1 - fooled.mean())

    name = "PGD" if threat.pixel else "StAdv"
    n = len(y)
    limit = {"linf": 1.0, "l2": float("inf"), "stadv": 2.0}[threat.norm]
    sweep = {eps: run(Threat(threat.norm, min(eps, limit)), steps) for eps in (threat.eps / 2, threat.eps, 2 * threat.eps)}
    more_steps = run(threat, 4 * steps)
    unbounded_alone = run(unbounded_threat, steps)
    more_eot = run(threat, steps, 4 * eot) if stochastic else None  # the EOT-growth probe
    unbounded = float(1 - inside.mean())
    findings.measurements = {
        "probe_points": int(n), "pgd_steps": steps, "probe_eot": eot if stochastic else 1,
        "eps_sweep": {f"{eps:.6g}": acc for eps, acc in sweep.items()},
        f"pgd{4 * steps}_at_eps": more_steps, "unbounded_eps": unbounded_threat.eps,
        "unbounded_accuracy": unbounded_alone, "unbounded_accuracy_any_probe": unbounded,
        "tolerance": "95% Wilson interval of the smaller setting's accuracy",
        **({"probe_gradients": "attacker surrogate"} if surrogate is not None else {}),
    }
    accs = list(sweep.values())
    curve = ", ".join(f"{100 * a:.1f}%" for a in accs)
    if _rises(accs[0], accs[1], n) or _rises(accs[1], accs[2], n):
        findings.add("monotone", [f"robust accuracy rises as eps grows ({name}-{steps} at eps/2, eps, 2 eps: {curve}; "
                                  f"{n} probe points)"])
    elif round(accs[0] * n) >= MIN_STILL_ROBUST and accs[2] >= accs[0]:  # 4x the eps broke not one more point
        findings.add("monotone", [f"robust accuracy does not fall as eps grows from eps/2 to 2 eps ({name}-{steps}: "
                                  f"{curve}; {n} probe points)"])
    if _rises(accs[1], more_steps, n):
        findings.add("monotone", [f"robust accuracy rises with more steps ({name}-{steps} {100 * accs[1]:.1f}%, "
                                  f"{name}-{4 * steps} {100 * more_steps:.1f}%)"])
    if stochastic:  # the EOT-growth probe: 4x the draws must not help the defense
        findings.measurements.update({"eot_growth": [eot, 4 * eot], "pgd_at_eps_more_eot": more_eot})
        if _rises(accs[1], more_eot, n):
            findings.add("monotone", [f"robust accuracy rises with more EOT draws ({name}-{steps} EOT-{eot} "
                                      f"{100 * accs[1]:.1f}%, EOT-{4 * eot} {100 * more_eot:.1f}%)"])
    if unbounded > UNBOUNDED_LIMIT:
        findings.add("unbounded", [f"an unbounded attack ({name}-{steps}, {unbounded_threat.norm} eps {unbounded_threat.eps:.3g}) "
                                   f"leaves {100 * unbounded_alone:.1f}% accuracy instead of about 0% ({100 * unbounded:.1f}% "
                                   "counting the points the probes at smaller bounds broke)"])
    return findings


def run_checks(model: nn.Module, subset, evaluation, threat: Threat, *, stochastic: bool, differentiable: bool,
               eot: int, draws: int, device, probe_n: int = 32, seed: int = 0,
               surrogate: Optional[nn.Module] = None) -> Findings:
    """Every check, on the evaluated model and subset; ``evaluation`` is the result of ``bench.evaluation.evaluate``.
    The gradient checks and the probes use points that pass the clean verdict (every draw right); ``surrogate`` (the
    attacker surrogate the suite differentiated, if any) gives the probes their gradients."""
    findings = Findings()
    head = subset.x[: min(32, subset.n)].to(device)
    findings.add("randomness", check_randomness(model, head, stochastic, seed))
    with torch.inference_mode():
        outputs = model(head)
    findings.add("chaos", check_chaos(model, head, stochastic, seed, findings.measurements, outputs))
    findings.add("probabilities", check_probabilities(outputs))
    correct = np.flatnonzero(evaluation.clean_worst)[:probe_n]
    if len(correct):
        x, y = subset.x[correct].to(device), subset.y[correct].to(device)
        findings.add("gradients", check_gradients(model, x, y, differentiable, threat, min(eot, PROBE_EOT) if stochastic else 1,
                                                  seed, findings.measurements))
        torch.manual_seed(seed)
        probes = probe_attacks(model, x, y, threat, stochastic=stochastic, differentiable=differentiable,
                               eot=min(eot, PROBE_EOT), draws=draws, surrogate=surrogate)
        for code, reasons in probes.codes.items():
            findings.add(code, reasons)
        findings.measurements.update(probes.measurements)
    findings.add("black_box", check_black_box(evaluation.attacks, evaluation.broken_points, evaluation.decisive_points))
    findings.measurements["checks_ran"], findings.measurements["checks_not_run"] = checks_run(
        evaluation.attacks, len(correct), stochastic)
    return findings


def checks_run(outcomes: Sequence[Dict[str, object]], probe_points: int, stochastic: bool = False):
    """Which checks ran on this evaluation and which could not (with why)."""
    ran = ["randomness", "probabilities"] if stochastic else ["randomness", "chaos", "probabilities"]  # chaos: deterministic only
    missing = {}
    if probe_points:
        ran += ["gradients", "monotone", "unbounded"]
    else:
        missing.update({k: "no point passed the clean verdict" for k in ("gradients", "monotone", "unbounded")})
    labels = [o["label"] for o in outcomes]
    black = [o for o in outcomes if o["attack"] == "square" or (o["attack"] == "transfer" and not o.get("source_is_target"))]
    if not black:
        missing["black_box"] = "the suite has no score-based or transfer attack"
    elif not any(o not in black for o in outcomes[: labels.index(black[0]["label"])]):
        missing["black_box"] = "no gradient attack ran before the first black-box one"
    else:
        ran.append("black_box")
    return ran, missing
