"""Our ``linf`` suite's ``cpu`` budget must be at least as strong as AutoAttack ``standard`` (reference code,
pyautoattack).

On the PGD-trained ResNet-4b at its training eps (2/255), on the same fixed images, our robust accuracy
may exceed AutoAttack's by at most 1 point. (The ``paper`` budget runs the same APGD attacks with more steps
and restarts, plus APGD-T, PGD-200, Square and transfer.)
"""

from __future__ import annotations

import pytest

from attacks.base import Threat
from attacks.suite import AttackSpec, Suite, load_suite
from bench.classifiers import load_classifier
from bench.evaluation import evaluate
from bench.subset import load_subset
from tests.conftest import needs_resnet4b

N_IMAGES = 64


@pytest.mark.slow
@needs_resnet4b
def test_linf_suite_is_no_weaker_than_autoattack_standard():
    model = load_classifier("resnet4b")
    eps = model.info.train_eps
    assert eps == pytest.approx(2 / 255)
    threat = Threat("linf", eps)
    subset = load_subset("cifar10-jpeg", N_IMAGES, seed=0)
    ours = evaluate(model, subset, load_suite("linf", "linf", "cpu").build(threat, False, True), threat, who="none", batch_size=64)
    reference = Suite("autoattack-standard", "1", "paper", "", threat, 1, (AttackSpec("autoattack", (("version", "standard"),)),))
    theirs = evaluate(model, subset, reference.build(threat, False, True), threat, who="none", batch_size=64)
    assert (ours.clean_correct == theirs.clean_correct).all()
    ours_acc, theirs_acc = ours.robust.mean() * 100, theirs.robust.mean() * 100
    print(f"resnet4b eps 2/255 n={N_IMAGES}: ours {ours_acc:.2f}%, AutoAttack standard {theirs_acc:.2f}%")
    assert 20 < theirs_acc < ours.clean_correct.mean() * 100  # a real robust model, really attacked
    assert ours_acc <= theirs_acc + 1.0
