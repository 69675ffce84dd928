"""A third-party plug-in file used by the CLI tests: registers a tiny dataset, a tiny classifier and
three defenses (one well-behaved, two broken) exactly as a user's ``--plugin`` file would."""

from __future__ import annotations

import numpy as np
import torch

from bench.classifiers import CLASSIFIERS, Classifier, ClassifierInfo
from bench.datasets import DATASETS, ArrayDataset
from defenses import Defense, register_defense
from tests.helpers import TinyNet


def _tiny_dataset(split: str, download: bool) -> ArrayDataset:
    rng = np.random.RandomState(0)
    images = rng.randint(0, 256, size=(40, 32, 32, 3)).astype(np.uint8)
    labels = rng.randint(0, 10, size=40).astype(np.int64)
    return ArrayDataset("tiny-test", split, images, labels, 10, tuple(str(i) for i in range(10)), "generated")


def _tiny_classifier() -> Classifier:
    info = ClassifierInfo("tiny", "tinynet", "tiny-test", 10, None, None, "random-init", None, "none", "tests")
    return Classifier(TinyNet(), info)


if "tiny-test" not in DATASETS:
    DATASETS.add("tiny-test", _tiny_dataset)
    CLASSIFIERS.add("tiny", _tiny_classifier)


@register_defense("plugin-blur")
class PluginBlur(Defense):
    """A deterministic, differentiable toy purifier (3x3 average blur)."""

    def __init__(self, classifier):
        super().__init__(classifier, purifier=torch.nn.AvgPool2d(3, 1, 1, count_include_pad=False))


@register_defense("plugin-nan")
class PluginNaN(Defense):
    def forward(self, x):
        return super().forward(x) * float("nan")


@register_defense("plugin-wrong-shape")
class PluginWrongShape(Defense):
    def forward(self, x):
        return super().forward(x)[:, :3]
