"""Every registered classifier loads strictly from the shared weights and reproduces its provenance accuracy."""

from __future__ import annotations

import pytest
import torch

from bench.classifiers import CLASSIFIERS, load_classifier
from bench.datasets import load_dataset
from bench.paths import data_dir, weights_dir
from tests.conftest import shared_missing

# Accuracy on the 300 lossless test images, measured independently (PROVENANCE.txt of each weight folder).
LOSSLESS300 = {
    "resnet20": 93.00, "resnet32": 91.67, "resnet44": 93.33, "resnet56": 95.00,
    "resnet4b": 83.33, "resnet2b": 75.00, "cnn-a-adv": 70.00, "conv-small-pgd": 66.33,
}


# Built-in entries only: test plug-ins may register extra classifiers in the same process.
# Classifiers trained here (bench.classifiers.adversarial_training) have no shared-weights provenance: their training
# and loading are tested in test_adversarial_training.py.
BUILTIN = [name for name, loader in CLASSIFIERS.items()
           if loader.__module__.startswith("bench.classifiers") and loader.__module__ != "bench.classifiers.adversarial_training"]


def test_every_registered_classifier_has_a_reference_accuracy():
    assert sorted(LOSSLESS300) == BUILTIN


@pytest.mark.parametrize("name", BUILTIN)
def test_classifier_matches_provenance(name):
    if not (data_dir() / "cifar10-test-lossless300").is_dir() or not weights_dir().is_dir():
        shared_missing("shared data/weights not found")
    model = load_classifier(name)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    model.train()  # must stay frozen in eval mode
    assert not model.training
    x, y = load_dataset("cifar10-lossless300").tensors()
    with torch.no_grad():
        acc = 100 * (model(x).argmax(1) == y).float().mean().item()
    assert acc == pytest.approx(LOSSLESS300[name], abs=0.34)  # one image of 300


def test_pgd_trained_models_record_their_training_eps():
    if not (weights_dir() / "abcrown_cifar10").is_dir() or not (weights_dir() / "akamaster_resnet_cifar10").is_dir():
        shared_missing("shared weights not found")
    info = load_classifier("resnet4b").info
    assert info.training == "pgd-linf" and info.train_eps == pytest.approx(2 / 255)
    assert load_classifier("resnet20").info.train_eps is None
