"""Our suites' ``cpu`` budgets must be at least as strong as AutoAttack ``standard`` (reference code, pyautoattack),
point by point.

On the PGD-trained ResNet-4b, 128 fixed images, at its training eps (linf 2/255), at the field's linf 8/255 and at
l2 0.5: every point AutoAttack breaks must also be broken by our suite (``linf`` or ``l2``, ``cpu`` budget).
"""

from __future__ import annotations

import pytest

from attacks.base import Threat
from attacks.suite import AttackSpec, Suite, load_suite
from bench.classifiers import load_classifier
from bench.evaluation import evaluate
from bench.subset import load_subset
from tests.conftest import needs_resnet4b

N_IMAGES = 128


@pytest.mark.slow
@needs_resnet4b
@pytest.mark.parametrize("norm,eps", [("linf", 2 / 255), ("linf", 8 / 255), ("l2", 0.5)], ids=["linf-2", "linf-8", "l2-0.5"])
def test_no_point_autoattack_breaks_survives_our_suite(norm, eps):
    model = load_classifier("resnet4b")
    threat = Threat(norm, eps)
    subset = load_subset("cifar10-jpeg", N_IMAGES, seed=0)
    ours = evaluate(model, subset, load_suite(norm, norm, "cpu").build(threat, False, True), threat, who="none")
    reference = Suite("autoattack-standard", "1", "full", "", threat, 1, (AttackSpec("autoattack", (("version", "standard"),)),))
    theirs = evaluate(model, subset, reference.build(threat, False, True), threat, who="none")
    assert (ours.clean_worst == theirs.clean_worst).all()
    aa_only = [int(p) for p in (ours.robust & ~theirs.robust).nonzero()[0]]
    print(f"resnet4b {norm} {eps:.4g} n={N_IMAGES}: ours {100 * ours.robust.mean():.2f}%, AutoAttack standard "
          f"{100 * theirs.robust.mean():.2f}%, broken by AutoAttack only: {aa_only}")
    assert 0 < theirs.robust.sum() < theirs.clean_worst.sum()  # a real robust model, really attacked
    assert aa_only == []
