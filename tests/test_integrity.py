"""Integrity checks: planted broken defenses are flagged with the right reason; honest ones are not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from attacks import ATTACKS, Threat
from bench.evaluation import evaluate
from bench.integrity import check_black_box, check_gradients, check_probabilities, check_randomness, run_checks
from bench.subset import Subset
from defenses.base import Defense
from tests.helpers import NearestColor


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


def test_zero_gradients_of_a_quantizer_are_flagged():
    x, defense = torch.rand(6, 3, 8, 8), Defense(NearestColor(), purifier=Quantize())
    y = defense(x).argmax(1)
    reasons = check_gradients(defense, x, y, differentiable=True)
    assert reasons and "zero input gradients (exact) on 6 of 6 points" in reasons[0]
    assert check_gradients(NearestColor(), x, y, differentiable=True) == []


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
    if name == "planted-noise":
        assert record["settings"]["success_draws"] == 10 and all("+eot2" in a["label"] for a in corrected)
    else:
        assert all("+bpda[pipeline]" in a["label"] and a["bpda_stages"] == ["pipeline"] for a in corrected)


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


def test_stadv_threat_is_probed_with_stadv():
    from bench.integrity import probe_attacks

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x = torch.rand(12, 3, 8, 8)
    findings = probe_attacks(model, x, model(x).argmax(1), Threat("stadv", 0.05), stochastic=False, differentiable=True,
                             eot=1, draws=1)
    assert set(findings.measurements["eps_sweep"]) == {"0.025", "0.05", "0.1"}
    assert findings.measurements["unbounded_eps"] == 0.5
