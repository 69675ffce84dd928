"""Stacked defenses (a+b through the defense API), the transfer of any attack, and the auxiliary-aware attack."""

from __future__ import annotations

import pytest
import torch

from attacks.aux_aware import AuxiliaryAware
from attacks.base import Oracle, Threat
from attacks.momentum import MIM
from attacks.transfer import Transfer
from bench.errors import BenchError
from defenses.base import DEFENSES, build_defense
from tests.helpers import TinyNet
from tests.test_jatp import Staged

def _stack(name: str = "pixeldefend+aid-purifier", **extra):
    last = name.split("+")[1]
    untrained = {"pixeldefend.untrained": "1", "pixeldefend.channels": "8", "pixeldefend.layers": "2",
                 f"{last}.untrained": "1"}
    return build_defense(name, Staged().eval(), **{**untrained, **extra}).eval()


def test_a_stack_runs_its_members_in_order_and_names_them_all():
    stack = _stack()
    pd, aid = stack.purifier.stages
    x = torch.rand(2, 3, 8, 8)
    assert torch.equal(stack(x), stack.classifier(aid(pd(x))))
    described = stack.describe()
    assert described["name"] == "pixeldefend+aid-purifier"
    assert [m["name"] for m in described["config"]["members"]] == ["pixeldefend", "aid-purifier"]
    assert not stack.differentiable and not stack.stochastic


def test_member_options_are_routed_by_prefix():
    stack = _stack(**{"aid-purifier.steps": "3", "pixeldefend.eps_defend": str(8 / 255)})
    assert stack.purifier.stages[1].steps == 3 and stack.purifier.stages[0].radius == 8
    with pytest.raises(BenchError, match="MEMBER.KEY"):
        _stack(steps="3")
    with pytest.raises(BenchError):
        build_defense("pixeldefend+no-such-defense", Staged())


def test_bpda_through_a_stack_treats_each_member_stage_by_its_own_declaration():
    x = torch.rand(2, 3, 8, 8)
    # both members non-differentiable: the identity through both, the classifier's gradient at the purified point
    stack = _stack()
    xg = x.clone().requires_grad_(True)
    stack.bpda_forward(xg).sum().backward()
    with torch.no_grad():
        purified = stack.purifier(x)
    pg = purified.clone().requires_grad_(True)
    stack.classifier(pg).sum().backward()
    assert torch.allclose(xg.grad, pg.grad, atol=1e-6)
    # the unrolled AID member keeps its exact gradient: here the identity of PixelDefend only
    unrolled = _stack("pixeldefend+aid-purifier-unrolled")
    assert not unrolled.differentiable
    xg = x.clone().requires_grad_(True)
    unrolled.bpda_forward(xg).sum().backward()
    pd, aid = unrolled.purifier.stages
    with torch.no_grad():
        h = pd(x)
    hg = h.clone().requires_grad_(True)
    unrolled.classifier(aid(hg)).sum().backward()
    # equal up to rounding: the identity's x + (pd(x) - x) may differ from pd(x) by an ulp, which can flip a sign(g)
    # of the AID loop near zero (its smooth surrogate then differs there); nearly every direction agrees
    cosine = torch.nn.functional.cosine_similarity(xg.grad.flatten(1), hg.grad.flatten(1), dim=1)
    assert (cosine > 0.99).all(), cosine


def test_the_papers_stacks_are_registered():
    assert {"pixeldefend+aid-purifier", "nrp+aid-purifier"} <= set(DEFENSES.names())


def test_transfer_runs_any_oracle_attack_on_the_bare_classifier():
    net = TinyNet().eval()
    defense = build_defense("none", net)
    threat = Threat("linf", 8 / 255)
    x, y = torch.rand(4, 3, 8, 8), torch.randint(0, 10, (4,))
    out = Transfer(threat, attack="mim", attack_params={"steps": 4}).perturb(defense, x, y)
    direct = MIM(threat, steps=4)
    direct.early_stop = False  # the source is attacked to completion (no early stop once the source is fooled)
    assert torch.equal(out, direct.run(Oracle(net), x, y))
    assert Transfer(threat, attack="mim", attack_params={"steps": 4}).params()["attack"] == "mim"


def test_aux_aware_trades_the_classifier_loss_for_a_clean_looking_example():
    defense = build_defense("aid-purifier", Staged().eval(), untrained=True).eval()
    aux = defense.purifier
    threat = Threat("linf", 16 / 255)
    x, y = torch.rand(8, 3, 8, 8), torch.randint(0, 10, (8,))
    with torch.no_grad():
        p0, ce0 = aux.p_adv_logit(x), torch.nn.functional.cross_entropy(defense.classifier(x), y)
    looks_clean = AuxiliaryAware(threat, lam=1.0, steps=5, random_start=False).perturb(defense, x, y)
    fools = AuxiliaryAware(threat, lam=0.0, steps=5, random_start=False).perturb(defense, x, y)
    with torch.no_grad():
        assert aux.p_adv_logit(looks_clean).mean() < p0.mean()
        assert torch.nn.functional.cross_entropy(defense.classifier(fools), y) > ce0
    assert (looks_clean - x).abs().max() <= 16 / 255 + 1e-6
    with pytest.raises(BenchError, match="auxiliary"):
        AuxiliaryAware(threat).perturb(build_defense("none", TinyNet()), x, y)


def test_the_table3_suite_has_each_attack_white_box_bpda_and_oblivious():
    from attacks.suite import load_suite

    suite = load_suite("aid-table3", "linf", "cpu")
    labels = [label for label, _ in suite.build(suite.threat, stochastic=False, differentiable=False)]
    for attack in ("pgd-10", "cw-10", "deepfool-10", "mim-10"):
        assert {attack, f"{attack}+bpda", f"oblivious-{attack}"} <= set(labels)
    assert suite.independent and suite.threat.eps == pytest.approx(8 / 255)
    exact = [label for label, _ in suite.build(suite.threat, stochastic=False, differentiable=True)]
    assert not any(label.endswith("+bpda") for label in exact)


def test_board_metrics_read_labels_and_take_the_lowest_of_several():
    from leaderboards.render import metric_value

    def entry(label, attack, accuracy):
        return {"label": label, "attack": attack, "params": {"steps": 10}, "robust_alone": {"accuracy": accuracy}}

    record = {"clean": {"accuracy": 0.8}, "attacks": [entry("pgd-10", "pgd", 0.5), entry("pgd-10+bpda", "pgd", 0.3),
                                                       entry("oblivious-pgd-10", "transfer", 0.6)]}
    assert metric_value(record, "oblivious-pgd-10") == 0.6
    assert metric_value(record, "min:pgd-10,pgd-10+bpda") == 0.3
    assert metric_value(record, "min:clean,pgd-10,mim-10") == 0.5  # attacks the record lacks are skipped
    assert metric_value(record, "min:mim-10") is None
