"""Integrity checks: planted broken defenses are flagged with the right reason; honest ones are not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attacks import ATTACKS, Threat
from bench.evaluation import evaluate
from bench.integrity import (
    check_black_box, check_chaos, check_gradients, check_probabilities, check_randomness, run_checks)
from bench.subset import Subset
from defenses.base import Defense
from tests.helpers import CoinOfTheLowBits, NearestColor


class Quantize(nn.Module):
    """Round to 8 levels: the gradient is zero almost everywhere (not declared)."""

    def forward(self, x):
        return torch.round(x * 7) / 7


class HiddenNoise(nn.Module):
    """Heavy Gaussian noise, randomness not declared."""

    def forward(self, x):
        return (x + 0.3 * torch.randn_like(x)).clamp(0, 1)


class Softmaxed(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        return self.net(x).softmax(dim=1)


def _toy(n=24):
    model = NearestColor()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, 8, 8).contiguous()
    y = model(x).argmax(1)
    return model, Subset("toy", "test", n, 0, np.arange(n), x, y, 10, "0" * 64, "0" * 64)


def test_an_honest_model_raises_no_flag():
    model, subset = _toy()
    threat = Threat("linf", 0.03)
    result = evaluate(model, subset, [("pgd-10", ATTACKS.get("pgd")(threat, steps=10))], threat, who="toy")
    findings = run_checks(model, subset, result, threat, stochastic=False, differentiable=True, eot=1, draws=1, device="cpu")
    assert findings.reasons == [], findings.reasons
    assert findings.measurements["unbounded_accuracy"] == 0.0


def test_undeclared_and_phantom_randomness_are_flagged():
    x = torch.rand(4, 3, 8, 8)
    noisy = Defense(NearestColor(), purifier=HiddenNoise())
    assert "randomness not declared but observed" in check_randomness(noisy, x, declared=False)[0]
    assert "randomness declared but not observed" in check_randomness(NearestColor(), x, declared=True)[0]
    assert check_randomness(noisy, x, declared=True) == []


def test_a_deterministic_defense_whose_predictions_a_tiny_nudge_flips_is_flagged_as_chaotic():
    model, subset = _toy()
    x = subset.x
    chaotic = Defense(model, purifier=CoinOfTheLowBits())
    assert torch.equal(chaotic(x), chaotic(x)) and check_randomness(chaotic, x, declared=False) == []
    measured = {}
    reasons = check_chaos(chaotic, x, declared=False, measurements=measured)
    assert len(reasons) == 1 and reasons[0].startswith("predictions are chaotic: a Gaussian nudge of sigma 1e-06")
    assert measured["nudge"]["images"] == len(x) and measured["nudge"]["flipped"] > 0.1 * len(x)
    assert check_chaos(model, x, declared=False) == []  # the honest model: no prediction moves
    assert check_chaos(chaotic, x, declared=True) == []  # declared randomness is the randomness check's business
    threat = Threat("linf", 0.03)
    result = evaluate(chaotic, subset, [("pgd-10", ATTACKS.get("pgd")(threat, steps=10))], threat, who="chaotic")
    findings = run_checks(chaotic, subset, result, threat, stochastic=False, differentiable=True, eot=1, draws=1,
                          device="cpu")
    assert "chaos" in findings.codes and "chaos" in findings.measurements["checks_ran"]
    honest = run_checks(model, subset, result, threat, stochastic=False, differentiable=True, eot=1, draws=1, device="cpu")
    assert "chaos" not in honest.codes and honest.measurements["nudge"]["flipped"] == 0


def test_the_chaos_correction_nudges_each_image_and_call_and_keeps_gradients_at_saturated_pixels():
    from bench.evaluation.integrity import NUDGE, Nudged

    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(x.detach().clone())
            return x.flatten(1)[:, :3] * 2

        def bpda_forward(self, x, stages=()):
            seen.append(stages)
            return self.forward(x)

    x = torch.rand(4, 3, 2, 2)
    x[:, 0] = 1.0  # saturated pixels: the nudge is clamped there on the forward pass
    x.requires_grad_(True)
    wrapped = Nudged(Probe())
    assert wrapped.stochastic and not getattr(Probe(), "stochastic", False)
    wrapped(x).sum().backward()
    first = seen[-1]
    assert 0 <= first.min() and first.max() <= 1  # half the saturated pixels would leave [0, 1] unclamped
    assert 0 < (first - x.detach()).abs().max() <= 10 * NUDGE
    assert torch.equal(x.grad.flatten(1)[:, :3], torch.full((4, 3), 2.0))  # identity backward, also where clamped
    wrapped(x.repeat(2, 1, 1, 1))
    again = seen[-1]
    assert not torch.equal(again[:4], again[4:]) and not torch.equal(again[:4], first)  # per image and per call
    wrapped.bpda_forward(x, stages=("purifier",))
    assert seen[-2] == ("purifier",)


def test_a_redrawn_clean_verdict_bounds_every_earlier_attack_cell_by_the_new_floor():
    # An independent suite reads each attack's own accuracy under the clean verdict of its time. When a correction
    # reads the defense as stochastic and draws the clean verdict again, no cell may stay above the new floor.
    from bench.evaluation.engine import run_attacks
    from bench.evaluation.integrity import Nudged

    model, subset = _toy()
    chaotic = Defense(model, purifier=CoinOfTheLowBits())
    threat = Threat("linf", 0.01)
    plans = [("fgsm", ATTACKS.get("fgsm")(threat)), ("pgd-10", ATTACKS.get("pgd")(threat, steps=10))]
    result = evaluate(chaotic, subset, plans, threat, who="chaotic", independent=True)
    floor_before, before = result.clean_worst.copy(), {a["label"]: a["robust_alone"]["correct"] for a in result.attacks}
    broken_so_far = set()
    for a in result.attacks:  # each cell is the old floor less the points the attack broke; the running worst case
        broken = result.broken_points.get(a["label"], set())  # the old floor less the points any attack so far broke
        broken_so_far |= broken
        assert a["robust_alone"]["correct"] == int(floor_before.sum()) - len(broken)
        assert a["robust_after"]["correct"] == int(floor_before.sum()) - len(broken_so_far)
    torch.manual_seed(0)
    run_attacks(result, Nudged(chaotic), subset, [], threat, success_draws=10, stage="correction")
    floor = int(result.clean_worst.sum())
    assert result.draws == 10 and floor < floor_before.sum()
    for a in result.attacks:
        assert a["robust_alone"]["correct"] <= min(before[a["label"]], floor) and a["robust_after"]["correct"] <= floor
        assert "robust_alone_mean" not in a and a["floor_redrawn"] == 10
    assert any(a["robust_alone"]["correct"] < before[a["label"]] for a in result.attacks)  # a cell did come down


def test_zero_gradients_of_a_quantizer_are_flagged():
    x, defense = torch.rand(6, 3, 8, 8), Defense(NearestColor(), purifier=Quantize())
    y = defense(x).argmax(1)
    reasons = check_gradients(defense, x, y, differentiable=True)
    assert reasons and "zero input gradients (exact) on 6 of 6 points" in reasons[0]
    assert check_gradients(NearestColor(), x, y, differentiable=True) == []


class QuantizeByAdjoint(Quantize):
    """A quantizer whose gradient claims to come from an adjoint solve, as DiffPure's ``gradient=adjoint`` does."""

    gradient_route = "adjoint"


def test_gradient_messages_name_the_route_a_stage_declares():
    x, defense = torch.rand(6, 3, 8, 8), Defense(NearestColor(), purifier=QuantizeByAdjoint())
    assert defense.gradient_route == "adjoint" and Defense(NearestColor(), purifier=Quantize()).gradient_route == "exact"
    reasons = check_gradients(defense, x, defense(x).argmax(1), differentiable=True)
    assert reasons and "zero input gradients (adjoint) on 6 of 6 points" in reasons[0]


def test_probability_outputs_are_flagged():
    x = torch.rand(5, 3, 8, 8)
    assert "probabilities" in check_probabilities(Softmaxed(NearestColor())(x))[0]
    assert "log-probabilities" in check_probabilities(Softmaxed(NearestColor())(x).log())[0]
    assert check_probabilities(NearestColor()(x)) == []


def test_a_black_box_attack_beating_the_gradient_attacks_is_flagged():
    outcomes = [{"label": "pgd-10", "attack": "pgd"}, {"label": "square", "attack": "square"}]
    assert check_black_box(outcomes, {"pgd-10": {1}, "square": {2}})  # sequential: square found a new point
    assert check_black_box(outcomes, {"pgd-10": {1}}) == []
    assert check_black_box(outcomes, {"pgd-10": {1, 2}, "square": {1, 2}}) == []  # independent: nothing new
    assert check_black_box(outcomes, {"pgd-10": {1}, "square": {1, 2}})
    assert check_black_box(outcomes[::-1], {"square": {2}}) == []  # no gradient attack ran before it
    own = [outcomes[0], {"label": "transfer", "attack": "transfer", "source_is_target": True}]
    assert check_black_box(own, {"pgd-10": {1}, "transfer": {2}}) == []  # a transfer from the model itself is white-box


def test_a_masked_defense_fails_the_unbounded_attack_probe():
    model, subset = _toy()
    defense = Defense(model, purifier=Quantize())  # gradients are zero: PGD cannot move
    threat = Threat("linf", 0.03)
    result = evaluate(defense, subset, [("pgd-10", ATTACKS.get("pgd")(threat, steps=10, random_start=False))], threat,
                      who="quantize")
    findings = run_checks(defense, subset, result, threat, stochastic=False, differentiable=True, eot=1, draws=1, device="cpu")
    joined = " | ".join(findings.reasons)
    assert "zero input gradients" in joined and "unbounded attack" in joined


def _run_planted(name: str, tmp_path, **overrides):
    from pathlib import Path

    from bench.plugins import load_plugin
    from bench.runner import RunConfig, run

    load_plugin(Path(__file__).with_name("plugin_examples.py"))  # the tiny dataset, classifier and planted defenses
    config = RunConfig(defense=name, classifier="tiny", dataset="tiny-test", n=40, budget="smoke",
                       out=tmp_path / name, **overrides)
    return run(config)[0]


@pytest.mark.parametrize("name,reason,action", [
    ("planted-quantize", "zero input gradients", "BPDA with the identity"),
    ("planted-argmax", "zero input gradients", "BPDA with the identity"),
    ("planted-noise", "randomness not declared but observed", "EOT-2 and 10 re-classification draws"),
    ("planted-chaos", "predictions are chaotic", "EOT-2 over Gaussian input nudges of sigma 1e-06 and 10"),
])
def test_a_failed_check_corrects_the_attack_plan(name, reason, action, tmp_path):
    bare = _run_planted("none", tmp_path)
    record = _run_planted(name, tmp_path)
    assert not bare["unreliable"] and "corrections" not in bare
    assert record["unreliable"] and any(reason in r for r in record["unreliable_reasons"])
    corrections = record["corrections"]
    assert any(action in a for a in corrections["actions"])
    assert corrections["robust_after"]["accuracy"] == record["robust"]["accuracy"] <= corrections["robust_before"]["accuracy"]
    corrected = [a for a in record["attacks"] if a.get("stage") == "correction"]
    assert corrected and all(a["attacked"] <= corrections["robust_before"]["correct"] for a in corrected)
    # driven to the bare classifier's robust accuracy (the planted step costs clean accuracy, so it may end lower)
    assert record["robust"]["accuracy"] <= bare["robust"]["accuracy"] + 0.05
    if name in ("planted-noise", "planted-chaos"):
        assert record["settings"]["success_draws"] == 10 and all("+eot2" in a["label"] for a in corrected)
    else:
        assert all("+bpda[pipeline]" in a["label"] and a["bpda_stages"] == ["pipeline"] for a in corrected)
    if name == "planted-chaos":  # the clean verdict again over 10 nudged draws: a coin per draw, few survive ten
        assert record["clean_worst"]["correct"] < 0.5 * record["clean"]["correct"]


def test_stochastic_probes_grow_the_eot_draws():
    from bench.integrity import probe_attacks

    model, subset = _toy(16)

    class DeclaredNoise(Defense):
        stochastic = True

    defense = DeclaredNoise(model, purifier=HiddenNoise())
    findings = probe_attacks(defense, subset.x, subset.y, Threat("linf", 0.03), stochastic=True, differentiable=True,
                             eot=2, draws=4)
    assert findings.measurements["eot_growth"] == [2, 8]
    assert 0.0 <= findings.measurements["pgd_at_eps_more_eot"] <= 1.0


def test_probes_differentiate_the_attacker_surrogate_when_the_suite_did():
    from bench.integrity import probe_attacks

    model, subset = _toy(8)

    class Counting(nn.Module):
        def __init__(self):
            super().__init__()
            self.with_grad = self.without_grad = 0

        def forward(self, x):
            if torch.is_grad_enabled() and x.requires_grad:
                self.with_grad += 1
            else:
                self.without_grad += 1
            return x

    real, cheap = Counting(), Counting()
    defense, surrogate = Defense(model, purifier=real), Defense(model, purifier=cheap)
    findings = probe_attacks(defense, subset.x, subset.y, Threat("linf", 0.03), stochastic=False, differentiable=True,
                             eot=1, draws=1, surrogate=surrogate)
    assert cheap.with_grad > 0 and real.with_grad == 0  # every probe gradient came from the surrogate
    assert real.without_grad > 0  # the real defense still judged the probes' examples
    assert findings.measurements["probe_gradients"] == "attacker surrogate"
    plain = probe_attacks(defense, subset.x, subset.y, Threat("linf", 0.03), stochastic=False, differentiable=True,
                          eot=1, draws=1)
    assert real.with_grad > 0 and "probe_gradients" not in plain.measurements


def test_stadv_threat_is_probed_with_stadv():
    from bench.integrity import probe_attacks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(12, 3, 8, 8)
    findings = probe_attacks(model, x, model(x).argmax(1), Threat("stadv", 0.05), stochastic=False, differentiable=True,
                             eot=1, draws=1)
    assert set(findings.measurements["eps_sweep"]) == {"0.025", "0.05", "0.1"}
    assert findings.measurements["unbounded_eps"] == 0.5


@pytest.mark.parametrize("broken_by_the_sweep,flagged", [(True, False), (False, True)])
def test_the_unbounded_probe_counts_a_point_broken_at_a_smaller_bound_as_broken(monkeypatch, broken_by_the_sweep,
                                                                                 flagged):
    """The StAdv records' pattern: StAdv-10 at a flow of 0.5 left 1 of 16 probe points right while StAdv-10 at 2 eps
    (0.1, a ball inside it) had broken every point. The unbounded ball holds that example, so the point is broken
    there and nothing is flagged; a point no probe breaks at any bound still is."""
    from bench import integrity

    def scripted(model, x, y, threat, steps, eot, stochastic, differentiable, draws, surrogate=None):
        fooled = np.ones(len(y), dtype=bool)
        if threat.eps == 0.5 or (threat.eps == 0.1 and not broken_by_the_sweep):
            fooled[0] = False
        elif threat.eps < 0.1 or steps == 40 or eot == 16:
            fooled[:2] = False
        return fooled

    monkeypatch.setattr(integrity, "_pgd_fooled", scripted)
    x, y = torch.rand(16, 3, 8, 8), torch.zeros(16, dtype=torch.long)
    findings = integrity.probe_attacks(nn.Identity(), x, y, Threat("stadv", 0.05), stochastic=True,
                                       differentiable=True, eot=4, draws=10)
    measured = findings.measurements
    assert measured["unbounded_accuracy"] == 1 / 16  # what the attack at 0.5 left alone, as before
    assert measured["unbounded_accuracy_any_probe"] == (0.0 if broken_by_the_sweep else 1 / 16)
    assert ("unbounded" in findings.codes) == flagged, findings.reasons
    if flagged:
        assert "6.2% accuracy instead of about 0% (6.2% counting" in " ".join(findings.reasons)


# ------------------------------------------------------------------------------------------- the issue-17 checks


def _plants():
    from pathlib import Path

    from bench.plugins import load_plugin

    load_plugin(Path(__file__).with_name("plugin_examples.py"))
    from defenses.base import DEFENSES

    return DEFENSES


def test_noise_shared_across_the_batch_is_flagged():
    plants = _plants()
    shared = plants.get("planted-shared-noise")(NearestColor())
    x = torch.rand(8, 3, 8, 8)
    reasons = check_randomness(shared, x, declared=True)
    assert len(reasons) == 1 and reasons[0].startswith("randomness is shared across the batch: 4 copies of one image")
    honest = Defense(NearestColor(), purifier=HiddenNoise())
    honest.stochastic = True
    assert check_randomness(honest, x, declared=True) == []


def test_shattered_gradients_are_flagged_and_corrected_with_bpda(tmp_path):
    record = _run_planted("planted-shattered", tmp_path)
    reasons = " | ".join(record["unreliable_reasons"])
    assert "input gradients (exact) at nearby points are uncorrelated" in reasons
    assert record["checks"]["gradient_usefulness"]["nearby_cosine"] < 0.2
    assert any("BPDA with the identity" in a for a in record["corrections"]["actions"])
    bare = _run_planted("none", tmp_path)
    assert bare["checks"]["gradient_usefulness"]["nearby_cosine"] > 0.9 and not bare["unreliable"]


def test_gradients_that_walk_the_wrong_way_trip_the_usefulness_and_black_box_checks():
    from attacks.suite import AttackSpec, Suite

    plants = _plants()
    model, subset = _toy()
    reversed_ = plants.get("planted-reversed")(model)
    threat = Threat("linf", 0.05)
    specs = (AttackSpec("pgd", (("steps", 10),)), AttackSpec("square", (("queries", 200),)), AttackSpec("transfer"))
    plans = Suite("probe", "1", "cpu", "", threat, 1, specs).build(threat, stochastic=False, differentiable=True)
    result = evaluate(reversed_, subset, plans, threat, who="reversed")
    findings = run_checks(reversed_, subset, result, threat, stochastic=False, differentiable=True, eot=1, draws=1,
                          device="cpu")
    joined = " | ".join(findings.reasons)
    assert "input gradients (exact) do not help: a step of 0.25 eps along them raised the loss on only 0%" in joined
    assert "a black-box or transfer attack broke" in joined
    assert "robust accuracy does not fall as eps grows from eps/2 to 2 eps" in joined
    assert "black_box" in findings.measurements["checks_ran"]
    bare = evaluate(model, subset, Suite("probe", "1", "cpu", "", threat, 1, specs).build(threat, False, True), threat,
                    who="bare")
    quiet = run_checks(model, subset, bare, threat, stochastic=False, differentiable=True, eot=1, draws=1, device="cpu")
    assert quiet.reasons == [], quiet.reasons


class EpsDetector(nn.Module):
    """A planted detector: it knows the clean images and answers right once an input is more than ``radius`` away
    from every one of them (linf), so larger perturbations are *more* robust."""

    def __init__(self, model, x_clean, y_clean, radius):
        super().__init__()
        self.model, self.x_clean, self.y_clean, self.radius = model, x_clean, y_clean, radius

    def forward(self, x):
        logits = self.model(x)
        distance = (x[:, None] - self.x_clean[None]).flatten(2).abs().max(2).values  # (B, clean)
        nearest = distance.min(1)
        far = nearest.values > self.radius
        right = torch.nn.functional.one_hot(self.y_clean[nearest.indices], logits.shape[1]).float() * 1e3
        return torch.where(far[:, None], right, logits)


def test_accuracy_that_rises_with_eps_is_flagged_against_the_wilson_interval():
    from bench.integrity import probe_attacks

    model, subset = _toy()
    detector = EpsDetector(model, subset.x, subset.y, radius=0.05)
    findings = probe_attacks(detector, subset.x, subset.y, Threat("linf", 0.04), stochastic=False, differentiable=True,
                             eot=1, draws=1)
    sweep = list(findings.measurements["eps_sweep"].values())
    assert sweep[2] > sweep[1]  # 2 eps = 0.08 lies beyond the detector's radius
    assert any(r.startswith("robust accuracy rises as eps grows (PGD-10 at eps/2, eps, 2 eps:") for r in findings.reasons)
    honest = probe_attacks(model, subset.x, subset.y, Threat("linf", 0.04), stochastic=False, differentiable=True,
                           eot=1, draws=1)
    assert honest.codes.get("monotone") is None


def test_every_check_stays_quiet_on_an_honest_stochastic_model():
    model, subset = _toy(16)

    class DeclaredNoise(Defense):
        stochastic = True

    defense = DeclaredNoise(model, purifier=HiddenNoise())
    threat = Threat("linf", 0.03)
    result = evaluate(defense, subset, [("pgd-10", ATTACKS.get("pgd")(threat, steps=10))], threat, who="noisy",
                      success_draws=4)
    findings = run_checks(defense, subset, result, threat, stochastic=True, differentiable=True, eot=2, draws=4,
                          device="cpu")
    assert findings.codes.get("randomness") is None and findings.codes.get("gradients") is None, findings.reasons
    assert "gradients" in findings.measurements["checks_ran"] and result.clean_worst.sum() > 0


@pytest.mark.slow
@pytest.mark.parametrize("defense,classifier,n", [("none", "resnet20", 64), ("none", "resnet4b", 64), ("atop", "resnet20", 128)])
def test_no_check_fires_on_the_shipped_models(defense, classifier, n, tmp_path):
    """The linf suite's cpu budget (with its Square and transfer attacks) on real models: every check runs, none fires."""
    from tests.conftest import has_cifar10_jpeg, has_weights, shared_missing

    weights = {"resnet20": "akamaster_resnet_cifar10/resnet20-12fca82f.th", "resnet4b": "abcrown_cifar10/resnet4b.pth"}
    if not (has_cifar10_jpeg() and has_weights(weights[classifier])):
        shared_missing("CIFAR-10 bundle or weights not found")
    from bench.runner import RunConfig, run

    record, _ = run(RunConfig(defense=defense, classifier=classifier, budget="cpu", n=n, out=tmp_path))
    assert not record["unreliable"], record["unreliable_reasons"]
    expected = {"randomness", "probabilities", "gradients", "monotone", "unbounded", "black_box"}
    assert set(record["checks"]["checks_ran"]) == expected | ({"chaos"} if defense == "none" else set())
    assert record["checks"].get("nudge", {}).get("flipped", 0) == 0
    assert record["checks"]["gradient_usefulness"]["raised_share"] >= 0.9


class _ScaledGradient(torch.autograd.Function):
    """The identity whose backward multiplies the gradient by ``scale`` (NaN, or a vanishing factor)."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class ScaledGradient(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, x):
        return _ScaledGradient.apply(x, self.scale)


@pytest.mark.parametrize("scale,reason", [(float("nan"), "NaN or infinite input gradients (exact)"),
                                          (1e-30, "vanishing input gradients (exact): mean |grad| down to")])
def test_nan_and_vanishing_gradients_are_flagged(scale, reason):
    model, subset = _toy(8)
    planted = Defense(model, purifier=ScaledGradient(scale))
    reasons = check_gradients(planted, subset.x, subset.y, differentiable=True)
    assert len(reasons) == 1 and reasons[0].startswith(reason), reasons
    assert check_gradients(Defense(model, purifier=ScaledGradient(1.0)), subset.x, subset.y, differentiable=True) == []


def _scripted_fooled(accuracy):
    """A probe attack scripted by its accuracy: it breaks the last points (so a lower accuracy breaks a superset)."""
    def fooled(model, x, y, threat, steps, eot, stochastic, differentiable, draws, surrogate=None):
        robust = round(accuracy(model, x, y, threat, steps, eot, stochastic, differentiable, draws, surrogate) * len(y))
        return np.arange(len(y)) >= robust
    return fooled


@pytest.mark.parametrize("more_steps,more_eot,flags", [
    (0.25, 0.25, []),  # no rise
    (0.45, 0.25, []),  # 9 of 20 against 5 of 20: inside the Wilson interval of 25% (11.2% - 46.9%)
    (0.50, 0.25, ["rises with more steps"]),  # 10 of 20: above it
    (0.25, 0.50, ["rises with more EOT draws"]),
])
def test_steps_and_eot_rises_are_read_against_the_wilson_interval(monkeypatch, more_steps, more_eot, flags):
    """The probes' rules on scripted accuracies (20 probe points): what counts as a rise is the upper end of the 95%
    Wilson interval of the smaller setting's accuracy, not a fixed number of points."""
    from bench import integrity

    def scripted(model, x, y, threat, steps, eot, stochastic, differentiable, draws, surrogate=None):
        if threat.eps >= 0.5:
            return 0.0  # the unbounded probe
        if steps == 40:
            return more_steps
        if eot == 16:
            return more_eot
        return {0.015: 0.5, 0.03: 0.25, 0.06: 0.05}[round(threat.eps, 3)]

    monkeypatch.setattr(integrity, "_pgd_fooled", _scripted_fooled(scripted))
    x, y = torch.rand(20, 3, 8, 8), torch.zeros(20, dtype=torch.long)
    findings = integrity.probe_attacks(nn.Identity(), x, y, Threat("linf", 0.03), stochastic=True, differentiable=True,
                                       eot=4, draws=10)
    found = [flag for flag in ("rises with more steps", "rises with more EOT draws") if any(flag in r for r in findings.reasons)]
    assert found == flags, findings.reasons
    assert not any("as eps grows" in r or "does not fall" in r for r in findings.reasons)


@pytest.mark.parametrize("robust_counts,flagged", [
    ((1, 3, 3), False),  # atop at 1/255 on 5 probe points: one point left at eps/2, the draws alone move the count
    ((2, 2, 2), False),
    ((3, 3, 3), True),  # three points left robust and 4x the radius broke none of them
    ((3, 2, 1), False),
])
def test_accuracy_that_does_not_fall_with_eps_needs_three_robust_probe_points(monkeypatch, robust_counts, flagged):
    from bench import integrity

    def scripted(model, x, y, threat, steps, eot, stochastic, differentiable, draws, surrogate=None):
        if threat.eps >= 0.5:
            return 0.0  # the unbounded probe
        if steps == 40 or eot == 8:
            return robust_counts[1] / 5
        return {0.004: robust_counts[0], 0.008: robust_counts[1], 0.016: robust_counts[2]}[round(threat.eps, 3)] / 5

    monkeypatch.setattr(integrity, "_pgd_fooled", _scripted_fooled(scripted))
    x, y = torch.rand(5, 3, 8, 8), torch.zeros(5, dtype=torch.long)
    findings = integrity.probe_attacks(nn.Identity(), x, y, Threat("linf", 0.008), stochastic=True, differentiable=True,
                                       eot=2, draws=10)
    assert any("does not fall" in r for r in findings.reasons) == flagged, findings.reasons


def test_the_runner_hands_the_probes_the_surrogate_only_when_the_budget_uses_it():
    from attacks.suite import AttackSpec, Suite
    from bench.evaluation.runner import _run_checks

    model, subset = _toy(8)

    class WithSurrogate(Defense):
        def __init__(self, classifier):
            super().__init__(classifier)
            self.cheap = Defense(classifier)

        def attack_surrogate(self):
            return self.cheap

    defense = WithSurrogate(model)
    threat = Threat("linf", 0.03)
    specs = (AttackSpec("pgd", (("steps", 2),)),)
    result = evaluate(defense, subset, Suite("s", "1", "smoke", "", threat, 1, specs).build(threat, False, True), threat,
                      who="wiring")
    for uses, expected in ((True, "attacker surrogate"), (False, None)):
        suite = Suite("s", "1", "smoke", "", threat, 1, specs, surrogate=uses)
        findings = _run_checks(defense, subset, result, threat, suite, 1, "cpu", 0)
        assert findings.measurements.get("probe_gradients") == expected
