"""Small PGD-trained CIFAR-10 models shipped with the alpha-beta-CROWN verifier (BSD-3-Clause).

``resnet4b`` and ``resnet2b`` were adversarially trained with PGD at Linf eps 2/255 (upstream
``models/cifar10_resnet/README.md``); ``cnn-a-adv`` and ``conv-small-pgd`` are adversarially trained too,
their training eps is not stated upstream (recorded as None). No BatchNorm; every layer has a bias.
Weights are read from ``$BENCH_WEIGHTS_DIR/abcrown_cifar10/``.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bench.classifiers.base import (
    ARCHITECTURES,
    Architecture,
    CIFAR10_MEAN,
    CIFAR10_STD,
    CLASSIFIERS,
    Classifier,
    ClassifierInfo,
    Stats,
    build_strict,
    load_state_dict,
)
from bench.core.paths import WEIGHTS_ENV, require_file, weights_dir

_ERAN_STD: Stats = (0.2023, 0.1994, 0.2010)


class ResidualBlock(nn.Module):
    """conv-ReLU-conv + shortcut (1x1 strided conv when the shape changes), then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        changed = stride != 1 or c_in != c_out
        self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride)) if changed else nn.Sequential()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.conv2(F.relu(self.conv1(x))) + self.shortcut(x))


class VerifierResNet(nn.Module):
    """Stem 3x3/stride 2, one or two stages of two blocks, flatten, Linear-ReLU-Linear head."""

    def __init__(self, stem: int, width: int, stages: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, stem, 3, 2, 1)
        self.layer1 = nn.Sequential(ResidualBlock(stem, width, 2), ResidualBlock(width, width, 1))
        self.layer2 = nn.Sequential(ResidualBlock(width, width, 2), ResidualBlock(width, width, 1)) if stages == 2 else None
        side = 16 // 2**stages
        self.linear1 = nn.Linear(width * side * side, 100)
        self.linear2 = nn.Linear(100, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer1(F.relu(self.conv1(x)))
        if self.layer2 is not None:
            out = self.layer2(out)
        return self.linear2(F.relu(self.linear1(out.flatten(1))))


def small_cnn(padding: int, flat: int) -> nn.Sequential:
    """CNN-A / ERAN ConvSmall: two 4x4 stride-2 convs and a 100-unit hidden layer."""
    return nn.Sequential(
        nn.Conv2d(3, 16, 4, 2, padding), nn.ReLU(), nn.Conv2d(16, 32, 4, 2, padding), nn.ReLU(),
        nn.Flatten(), nn.Linear(flat, 100), nn.ReLU(), nn.Linear(100, 10),
    )


_ARCHS = {
    "resnet4b": lambda: VerifierResNet(16, 32, 2),
    "resnet2b": lambda: VerifierResNet(8, 16, 1),
    "cnn-a": lambda: small_cnn(1, 2048),
    "conv-small": lambda: small_cnn(0, 1152),
}

# name -> (architecture, file, checkpoint key, std, training eps)
_MODELS = {
    "resnet4b": ("resnet4b", "resnet4b.pth", "state_dict", CIFAR10_STD, 2 / 255),
    "resnet2b": ("resnet2b", "resnet2b.pth", "state_dict", CIFAR10_STD, 2 / 255),
    "cnn-a-adv": ("cnn-a", "cifar_cnn_a_adv.model", None, CIFAR10_STD, None),
    "conv-small-pgd": ("conv-small", "cifar_conv_small_pgd.pth", "state_dict", _ERAN_STD, None),
}


# What upstream says about the training: PGD at 2/255 for the ResNets; "adversarially trained" otherwise.
_TRAINING = {"resnet4b": "pgd-linf", "resnet2b": "pgd-linf", "cnn-a-adv": "adversarial (method not stated)",
             "conv-small-pgd": "pgd (eps not stated)"}


def _pretrained(name: str) -> Classifier:
    arch, file, key, std, eps = _MODELS[name]
    path = require_file(weights_dir() / "abcrown_cifar10" / file, f"{name} weights", WEIGHTS_ENV)
    net = build_strict(_ARCHS[arch](), load_state_dict(path, key=key), path)
    info = ClassifierInfo(
        name=name, architecture=arch, dataset="cifar10", num_classes=10, mean=CIFAR10_MEAN, std=std,
        training=_TRAINING[name], train_eps=eps, weights=f"abcrown_cifar10/{file}",
        source="Verified-Intelligence/alpha-beta-CROWN (BSD-3-Clause)",
    )
    return Classifier(net, info)


def training_eps(name: str) -> Optional[float]:
    return _MODELS[name][4]


for _arch, _ctor in _ARCHS.items():
    ARCHITECTURES.add(_arch, Architecture(_ctor, CIFAR10_MEAN, _ERAN_STD if _arch == "conv-small" else CIFAR10_STD))
for _name in _MODELS:
    CLASSIFIERS.add(_name, lambda n=_name: _pretrained(n))
